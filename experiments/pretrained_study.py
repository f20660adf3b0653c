"""The rewards study from a pretrained model (`--experiment rewards --init MODEL`;
results/README.md, "A pretrained model"): the model itself is every row's start, with no SFT. Its
own mix of right and wrong answers is the headroom. The rows are the start, the attention reward,
the attention variant that ranks best in the model's rank table (experiments/rank.py, written
first), self-certainty, and the random and oracle controls. Correctness is by key spans
(DECISIONS.md §13). The rows, the PPO runs and the summary over seeds are reward_study.py's; this
module holds the settings, the setup from --init, and the tables:

    python cagsr.py --experiment rank --init $GGUF --seeds 2 --temperature 0.5 --max-new-tokens 32
    python cagsr.py --experiment rewards --init $GGUF --seeds 2 --workers 2 --iterations 10 ...

(the whole CPU command is in results/README.md; `gpu_command` gives the paper's scale).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cli import stages
from experiments import evaluation, reward_study
from experiments.common import Shared, check_settings, label, rl_settings, save_figure, work_dir
from reward import SalientTokens


def pretrained_settings(run) -> dict:
    """The settings of the study from a pretrained model: no SFT, no reward model; correctness by
    key spans (DECISIONS.md §13); the variant row's signal from the rank table."""
    return dict(
        study="rewards",
        init=str(run.init),
        dataset=run.dataset,
        data_seed=run.seed,
        **rl_settings(run),
        correctness=evaluation.correctness_name(run.dataset, pretrained=True),
        variant=ranked_variant(run),
        chat_template=run.args.get("chat_template"),
        system=run.args.get("system"),
        last_layers=run.model_overrides.get("last_layers"),
    )


def ranked_variant(run) -> str:
    """The attention variant that ranks best in this model's rank table (--experiment rank with
    the same --init, written first)."""
    path = Path(run.experiment.results_dir) / f"rank_{label(run.dataset, run.arch, run.init)}.json"
    if not path.exists():
        raise SystemExit(
            f"--experiment rewards --init {run.init}: its variant row is the attention variant "
            f"that ranks best in {path}, which is missing; run --experiment rank with the same "
            "--init and --dataset first"
        )
    variant = json.loads(path.read_text())["best_variant"]
    if variant is None:
        raise SystemExit(
            f"{path}: no prompt had both right and wrong candidates, so no variant ranks anything "
            "and the variant row cannot be chosen; rank with more prompts (--num-eval) or "
            "candidates (--num-samples)"
        )
    return variant


def gpu_command(run) -> str:
    """The study at the paper's scale (the pretrained profile: presets.RL_PROFILES), for a GPU."""
    return (
        f"python cagsr.py --experiment rewards --init {run.init} --dataset {run.dataset} "
        f"--temperature {run.ppo.temperature} --max-new-tokens {run.ppo.max_new_tokens} "
        "--seeds 3 --device cuda --out runs/rewards-gpu --results-dir results/gpu"
    )


def _curve(cur: list[dict], key: str) -> str:
    return " → ".join("—" if p[key] is None else f"{100 * p[key]:.1f}" for p in cur)


def pretrained_markdown(result: dict) -> str:
    """The pretrained study's table: greedy test correctness against the start, the fixed set's
    sampled and greedy correctness along the iterations, each row's own reward and its ranking."""
    s, summ, h = result["settings"], result["rows"], result["headroom"]
    p = s["ppo"]
    head = (
        f"**Headroom check: passed.** The oracle row raises greedy key-span correctness by "
        f"{100 * h['diff']:+.1f} points [{100 * h['lo']:+.1f}, {100 * h['hi']:+.1f}] over the "
        f"start (95% paired bootstrap over {s['num_eval']} test prompts): RL from this model can "
        "improve here, so a reward that does not improve it says something."
        if h["ok"]
        else "**HEADROOM CHECK FAILED: THIS APPARATUS CANNOT SEE AN EFFECT HERE.** The oracle "
        f"row changes greedy key-span correctness by {100 * h['diff']:+.1f} points "
        f"[{100 * h['lo']:+.1f}, {100 * h['hi']:+.1f}] (95% paired bootstrap over "
        f"{s['num_eval']} test prompts): even a reward that reads the answer does not beat the "
        "start within this budget, so no row's failure to do so is evidence against its reward, "
        "and no row's change is evidence for it. What would be needed: more RL (the paper's "
        f"200 iterations x 64 prompts, against {s['iterations']} x {p['prompts_per_iter']} "
        "here), which takes a GPU. "
        f"The command, ready for one: `{result['gpu_command']}`."
    )
    lines = [
        f"# Which internal reward, on a pretrained model? `{s['dataset']}`, "
        f"{s['init'].split('/')[-1]} ({len(result['seeds'])} seeds)",
        "",
        f"Written by `{result['command']}` on {result['device']}; this call took "
        f"{result['last_call_minutes']:.1f} min. Compute: {result['compute_minutes']:.1f} min in "
        "all (rows reused from an earlier call count at their original cost).",
        "",
        head,
        "",
        "## Correctness before and after",
        "",
        "Correct: the answer says the asked fact's key span and not the distractor's "
        "(DECISIONS.md §13). Test: greedy answers to "
        f"{s['num_eval']} test prompts; each cell the difference from the start with its 95% "
        "paired bootstrap interval (per-prompt correctness averaged over seeds, 10,000 resamples; "
        "* = the interval excludes 0), then the mean ± std over seeds, in %. Fixed set: "
        f"{s['eval_prompts']} validation prompts at iterations "
        + ", ".join(str(q["iteration"]) for q in summ["sft"]["curve"] + summ["oracle"]["curve"][1:])
        + f", greedy, and {p['num_samples']} samples each at temperature {p['temperature']} "
        "(mean over seeds, in %).",
        "",
        "| row | kind | test, greedy | fixed set, greedy, per evaluation | fixed set, sampled, "
        "per evaluation | collapse |",
        "|---|---|---|---|---|---|",
    ]
    for r in reward_study.PRETRAINED_ROWS:
        cur = summ[r.name]["curve"]
        c, test = summ[r.name]["collapse"], summ[r.name]["metrics"]["correct"]
        lines.append(
            f"| {r.label} | {r.kind} | {reward_study._cell(test, True)} | "
            f"{_curve(cur, 'greedy_correct')} | {_curve(cur, 'correct')} | "
            f"{'—' if r.name == 'sft' else 'none' if c is None else 'iteration ' + str(c)} |"
        )
    lines += [
        "",
        "## Each row's own reward: its rise, and how it ranks the fixed set's candidates",
        "",
        "| row | own reward, start → end | within-prompt ρ of own reward vs correctness, "
        "per evaluation |",
        "|---|---|---|",
    ]
    for r in reward_study.PRETRAINED_ROWS[1:]:
        cur, own = summ[r.name]["curve"], reward_study.own_reward(r.name)
        rho = " → ".join(reward_study._r(q["vs_correct"][own]["within"]) for q in cur)
        lines.append(
            f"| {r.label} | {cur[0]['rewards'][own]:+.3f} → {cur[-1]['rewards'][own]:+.3f} | "
            f"{rho} |"
        )
    lines += [
        "",
        "## Notes",
        "",
        f"- Every RL row: {s['iterations']} iterations x {p['prompts_per_iter']} prompts x "
        f"{p['num_samples']} candidates of at most {p['max_new_tokens']} tokens, lr {p['lr']}, "
        f"baseline {p['baseline']}{', whitened advantages' if p['whiten'] else ''}, "
        f"{p['epochs']} epoch(s) x {p['minibatches']} minibatch(es), KL coefficient "
        f"{p['kl_coef']}, samples from the full softmax at temperature {p['temperature']}; full "
        "fine-tuning of every weight; the same prompts in the same order from the same start "
        "on every row; only the reward differs.",
        f"- One iteration, mean over the RL rows and seeds: {iteration_split(result)}.",
        f"- At the paper's scale, on a GPU: `{result['gpu_command']}`.",
        f"- Attention variant: **{s['variant']}** (the attention signal with the highest pooled "
        "AUC in this model's rank table), trained as a reward on its own.",
        "- Random and oracle are controls, not methods: random shows what RL does with a reward "
        "that carries no information; the oracle (key-span correctness, it reads the answer) "
        "shows whether RL can improve here at all.",
        "- Collapse: the first evaluation at which the fixed set's sampled correctness falls "
        "below the lower end of its start's 95% interval "
        f"({100 * summ['start_correct']['lo']:.1f}%).",
    ]
    for r in reward_study.PRETRAINED_ROWS:
        lines.append(f"- {r.label}: {r.source}.")
    return "\n".join(lines) + "\n"


def iteration_split(result: dict) -> str:
    """Where one RL iteration's time goes, from every RL row's mean timing."""
    rows = [
        r
        for seed in result["per_seed_rows"].values()
        for r in seed.values()
        if r.get("iteration_seconds")
    ]
    mean = {
        k: float(np.mean([r["iteration_seconds"][k] for r in rows]))
        for k in reward_study.ITERATION_PARTS
    }
    return (
        f"{sum(mean.values()):.1f} s: sampling {mean['sample_s']:.1f} s, the reward "
        f"{mean['reward_s']:.3f} s, the reference pass {mean['ref_s']:.1f} s, the update "
        f"{mean['update_s']:.1f} s"
    )


def pretrained_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for r in reward_study.PRETRAINED_ROWS[1:]:
        cur, own = result["rows"][r.name]["curve"], reward_study.own_reward(r.name)
        its = [q["iteration"] for q in cur]
        (line,) = axes[0].plot(its, [q["greedy_correct"] for q in cur], marker="o", label=r.label)
        axes[1].plot(its, [q["correct"] for q in cur], marker="o", color=line.get_color())
        nan = lambda v: float("nan") if v is None else v
        axes[2].plot(
            its,
            [nan(q["vs_correct"][own]["within"]) for q in cur],
            marker="o",
            color=line.get_color(),
        )
    titles = (
        "fixed set: greedy key-span correctness",
        "fixed set: sampled key-span correctness",
        "within-prompt Spearman, own reward vs correctness",
    )
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL iteration")
    axes[2].axhline(0, color="black", lw=0.5)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"Which internal reward, on {result['settings']['init'].split('/')[-1]}? "
        f"{result['settings']['dataset']}, mean over {len(result['seeds'])} seeds"
    )
    save_figure(fig, path)


def pretrained_setup(run, work: Path, settings: dict, device) -> Shared:
    """What every seed of the pretrained study shares: the --init model's tokenizer (with its chat
    template), config and weights (every row's start), the splits, the encoded training prompts and
    their salient tokens (IDF from them, with the model's tokenizer); no relevance classifier
    (it needs the tiny presets' tokenizer). `work` is bound to `settings` (check_settings)."""
    setup = stages.prepare(run, device)
    work.mkdir(parents=True, exist_ok=True)
    Path(run.experiment.results_dir).mkdir(parents=True, exist_ok=True)
    check_settings(work, settings)
    return Shared(
        label(run.dataset, run.arch, run.init),
        setup.splits,
        setup.tok,
        setup.model.cfg,
        setup.train_pairs,
        setup.train_pairs,
        SalientTokens.from_idf(setup.tok, setup.idf),
        classifier=None,
        clf_stats=None,
        start_state=setup.model.state_dict(),
    )


def seed_worker(run, seed: int, device) -> None:
    """The rows of one seed, from the run alone (in a worker process of
    experiments.seeds_in_workers)."""
    settings = pretrained_settings(run)
    work = work_dir(run, "rewards")
    reward_study.run_seed(
        seed, work, settings, pretrained_setup(run, work, settings, device), device
    )


def run_rewards(run, device) -> int:
    """`--experiment rewards --init MODEL`: every row of every seed, then results/."""
    result, sh, work = reward_study.run_study(
        run, device, pretrained_settings(run), pretrained_setup, __name__
    )
    result["gpu_command"] = gpu_command(run)
    md = pretrained_markdown(result)
    reward_study.write_tables(
        result, sh.name, md, pretrained_plot, run.experiment.results_dir, work
    )
    return 0
