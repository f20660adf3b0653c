"""The rewards study's tables (experiments/reward_study.py): results/rewards_<dataset>.md and
.png from the result the study writes to .json. Every interval includes the seeds: a two-stage
bootstrap (seeds, then prompts within each seed) where the JSON keeps each seed's per-prompt
values, Student's t over the seeds' means where it keeps only those (the earlier tables).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cli import runs
from experiments import reward_study, stats
from experiments.common import save_figure, shared_setup
from experiments.reward_study import EVAL_SEED, METRICS, OWN_REWARD, REWARDS, ROW_NAMES, ROWS

# --------------------------------------------------------------------------------------------
# results/rewards_<dataset>.md, .json, .png
# --------------------------------------------------------------------------------------------


def _cell(level: dict, pct=False) -> str:
    """One row's test metric (reward_study.seed_level): its mean [95% interval], then its
    differences from the start and from random, * where the interval excludes 0."""
    f = (lambda v: f"{100 * v:+.1f}") if pct else (lambda v: f"{v:+.3f}")
    g = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3f}")
    v = level["value"]
    parts = [f"{g(v['mean'])} [{g(v['lo'])}, {g(v['hi'])}]"]
    for key, name in (("vs_start", "start"), ("vs_random", "random")):
        d = level[key]
        if d is not None:
            star = " *" if d["excludes_0"] else ""
            parts.append(f"{name} {f(d['diff'])} [{f(d['lo'])}, {f(d['hi'])}]{star}")
    return "<br>".join(parts)


def noise_line(settings: dict) -> str:
    """Whether the seeds' SFT policies learned one draw of wrong answers or one each."""
    if settings.get("sft_noise_draw") == "per seed":
        return "Each seed's SFT data has its own draw of wrong answers (--sft-noise, per seed)."
    return (
        "**All seeds share one draw of the SFT noise** (the data seed's): their SFT policies "
        "learned the same wrong answers and differ only in initialisation and batch order, so "
        "the seed-level intervals below understate what a new draw would vary."
    )


def _r(v) -> str:
    return "—" if v is None else f"{v:+.2f}"


def _rho(c: dict) -> str:
    return f"{_r(c['within'])} ({c['skipped']:.0f})"


def markdown(result: dict) -> str:
    s, summ, qa = result["settings"], result["rows"], result["is_qa"]
    h = reward_study.headroom(result)
    level = {m: reward_study.seed_level(result, m, ROW_NAMES) for m in METRICS}
    correct = "exact-match" if qa else "reference match"
    check = (
        f"**Headroom check: passed.** The oracle row raises {correct} by {h['diff']:+.3f} "
        f"[{h['lo']:+.3f}, {h['hi']:+.3f}] over SFT (95%, {level['correct']['sft']['method']}, "
        f"{s['num_eval']} test prompts): RL from this SFT policy can improve, so a reward that "
        "does not improve it says something."
        if h["ok"]
        else "**HEADROOM CHECK FAILED: THIS COMPARISON CANNOT SHOW ANYTHING.** The oracle row "
        f"changes {correct} by {h['diff']:+.3f} [{h['lo']:+.3f}, {h['hi']:+.3f}] (95%, "
        f"{level['correct']['sft']['method']}): even a reward that reads the answer does not "
        "beat SFT here, so no row's failure to do so is evidence against its reward."
    )
    policy = "decoder-only " if s.get("arch") == "decoder" else ""
    lines = [
        f"# Which internal reward? `{s['dataset']}` ({s['size']} {policy}preset, "
        f"{len(result['seeds'])} seeds)",
        "",
        f"Written by `{result['command']}` on {result['device']}; this call took "
        f"{result['last_call_minutes']:.1f} min. Compute: {result['compute_minutes']:.1f} min in "
        "all (rows reused from an earlier call count at their original cost).",
        "",
        check,
        "",
        noise_line(s),
        "",
        "## Test metrics (greedy answers)",
        "",
        "Each cell: the mean over seeds with its 95% interval, then the difference from the start "
        "(SFT) and from the random row with theirs (* = the interval excludes 0). The intervals "
        f"include the seeds: {level['correct']['sft']['method']}"
        + (
            f" ({stats.RESAMPLES:,} resamples, {s['num_eval']} test prompts per seed)"
            if "per_seed_rows" in result
            else "; this table's JSON keeps one mean per seed, not its per-prompt values"
        )
        + ". "
        f"{correct.capitalize()} and relevance in %. Sampled: the fixed set's "
        f"{s['ppo']['num_samples']} candidates per prompt at the RL temperature "
        f"{s['ppo']['temperature']} at the last evaluation (mean {correct} of the samples / "
        f"pass@{s['ppo']['num_samples']}, the best of each prompt's), mean over seeds.",
        "",
        f"| row | kind | {correct} (%) | ROUGE-L | relevance (%) | sampled: {correct} / "
        f"pass@{s['ppo']['num_samples']} (%) | updates skipped |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in ROWS:
        end = summ[r.name]["curve"][-1]
        lines.append(
            f"| {r.label} | {r.kind} | {_cell(level['correct'][r.name], True)} | "
            f"{_cell(level['rouge_l'][r.name])} | {_cell(level['relevance'][r.name], True)} | "
            f"{100 * end['correct']:.1f} / {100 * end['pass_at_n']:.1f} | "
            f"{summ[r.name]['skipped_updates']} |"
        )
    st = summ["sft"]["curve"][0]
    lines += [
        "",
        "## Each reward against correctness, on the SFT policy's candidates",
        "",
        f"{s['eval_prompts']} fixed validation prompts x {s['ppo']['num_samples']} candidates "
        f"(sampling seed {EVAL_SEED}). Within: Spearman (ties averaged) among a prompt's "
        "candidates, mean over the prompts whose candidates are not all tied (prompts skipped in "
        "brackets, mean over seeds); across: Spearman of the per-prompt means. "
        f"Correctness is {correct}.",
        "",
        f"| reward | within vs {correct} | across vs {correct} | "
        "within vs ROUGE-L | across vs ROUGE-L |",
        "|---|---|---|---|---|",
    ]
    for k in REWARDS:
        c, g = st["vs_correct"][k], st["vs_rouge"][k]
        lines.append(f"| {k} | {_rho(c)} | {_r(c['across'])} | {_rho(g)} | {_r(g['across'])} |")
    sc = result["rows"]["start_correct"]
    lines += [
        "",
        "## Training its own reward: correlation and collapse",
        "",
        f"On the fixed set every {s['eval_every']} iterations of {s['iterations']} (mean over "
        f"seeds). Collapse: the first evaluation at which the fixed set's {correct} falls below "
        "the lower end of its start's 95% interval "
        f"({sc['mean']:.3f} [{sc['lo']:.3f}, {sc['hi']:.3f}]).",
        "",
        f"| row | own reward, start → end | within ρ of own reward vs {correct}, per evaluation | "
        f"fixed-set {correct}, per evaluation | collapse |",
        "|---|---|---|---|---|",
    ]
    for r in ROWS[1:]:
        cur, own = summ[r.name]["curve"], OWN_REWARD[r.name]
        rho = " → ".join(_r(p["vs_correct"][own]["within"]) for p in cur)
        lines.append(
            f"| {r.label} | {cur[0]['rewards'][own]:+.3f} → {cur[-1]['rewards'][own]:+.3f} | "
            f"{rho} | "
            + " → ".join(f"{p['correct']:.3f}" for p in cur)
            + " | "
            + (
                "none"
                if summ[r.name]["collapse"] is None
                else "iteration " + str(summ[r.name]["collapse"])
            )
            + " |"
        )
    rm = "; ".join(
        f"seed {sd}: {x['pairs']} pairs, fit accuracy {x['fit_accuracy']:.3f}"
        for sd, x in result["rm"].items()
    )
    lines += [
        "",
        "## Notes",
        "",
        f"- Every RL row: {s['iterations']} PPO iterations x "
        f"{s['ppo']['prompts_per_iter']} prompts x {s['ppo']['num_samples']} candidates "
        f"(lr {s['ppo']['lr']}, baseline {s['ppo']['baseline']}, whitened advantages, "
        f"{s['ppo']['epochs']} epochs x {s['ppo']['minibatches']} minibatches, no KL penalty, "
        f"samples from the full softmax at temperature {s['ppo']['temperature']}) from "
        f"one SFT policy per seed trained {s['sft_steps']} steps x {s['sft_batch_size']}, "
        "the same prompts in the same order; only the reward differs.",
        "- Self-certainty, negative entropy and log-probability are read from the sampler's "
        "records: the full-vocabulary logits / temperature, the distribution RL samples from and "
        "the PPO log-probs use.",
        f"- Hybrid: attention reward + {s['hybrid_weight']} x a Bradley-Terry reward model fitted "
        f"on {s['rm']['human_prompts']} simulated human comparisons (annotators who prefer by "
        f"ROUGE-L, {s['rm']['label_noise']:.0%} label noise): {rm}. "
        "It uses labels, so it is not self-supervised.",
        "- Random and oracle are controls, not methods: random shows what RL does with a reward "
        f"that carries no information; oracle ({correct} against the clean reference, the answer "
        "itself) shows that RL can improve here.",
        f"- SFT data: {s['sft_noise']:.0%} of the training responses replaced by plausible wrong "
        "ones (--sft-noise; qa-grounded: the distractor's answer, instruct: another instruction's "
        "response), so the SFT policy has right and wrong behaviours to choose between; evaluation "
        "and the oracle use the clean references.",
        "- Relevance: the frozen classifier of Table 1 (held-out pairwise "
        f"{result['classifier']['pairwise']:.1%}).",
    ]
    for r in ROWS:
        lines.append(f"- {r.label}: {r.source}.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    correct = "exact-match" if result["is_qa"] else "reference match"
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
    for r in ROWS[1:]:
        cur, own = result["rows"][r.name]["curve"], OWN_REWARD[r.name]
        its = [p["iteration"] for p in cur]
        nan = lambda v: float("nan") if v is None else v
        (line,) = axes[0].plot(
            its, [nan(p["vs_correct"][own]["within"]) for p in cur], marker="o", label=r.label
        )
        axes[1].plot(
            its,
            [nan(p["vs_correct"][own]["across"]) for p in cur],
            marker="o",
            color=line.get_color(),
        )
        axes[2].plot(its, [p["correct"] for p in cur], marker="o", color=line.get_color())
        c = result["rows"][r.name]["collapse"]
        if c is not None:
            axes[2].plot(
                [c],
                [next(p["correct"] for p in cur if p["iteration"] == c)],
                "x",
                ms=12,
                mew=2.5,
                color=line.get_color(),
            )
    sc = result["rows"]["start_correct"]
    axes[2].axhspan(sc["lo"], sc["hi"], color="grey", alpha=0.2, label="start's 95% interval")
    titles = (
        f"within-prompt Spearman, own reward vs {correct}",
        f"across-prompt Spearman, own reward vs {correct}",
        f"fixed-set {correct} (x: collapse)",
    )
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL iteration")
    axes[0].axhline(0, color="black", lw=0.5)
    axes[1].axhline(0, color="black", lw=0.5)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle(
        f"Which internal reward? {result['settings']['dataset']}, "
        f"mean over {len(result['seeds'])} seeds"
    )
    save_figure(fig, path)


def _curve(cur: list[dict], key: str) -> str:
    return " → ".join("—" if p[key] is None else f"{100 * p[key]:.1f}" for p in cur)


def pretrained_markdown(result: dict) -> str:
    """The pretrained study's table: greedy test correctness against the start, the fixed set's
    sampled and greedy correctness along the iterations, each row's own reward and its ranking."""
    s, summ, p = result["settings"], result["rows"], result["settings"]["ppo"]
    names = tuple(r.name for r in reward_study.PRETRAINED_ROWS)
    level, h = reward_study.seed_level(result, "correct", names), reward_study.headroom(result)
    method = level["sft"]["method"]
    head = (
        f"**Headroom check: passed.** The oracle row raises greedy key-span correctness by "
        f"{100 * h['diff']:+.1f} points [{100 * h['lo']:+.1f}, {100 * h['hi']:+.1f}] over the "
        f"start (95%, {method}, {s['num_eval']} test prompts): RL from this model can "
        "improve here, so a reward that does not improve it says something."
        if h["ok"]
        else "**HEADROOM CHECK FAILED: THIS APPARATUS CANNOT SEE AN EFFECT HERE.** The oracle "
        f"row changes greedy key-span correctness by {100 * h['diff']:+.1f} points "
        f"[{100 * h['lo']:+.1f}, {100 * h['hi']:+.1f}] (95%, {method}, "
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
        "No SFT and so no SFT noise: every seed starts from the same pretrained model; the seeds "
        "differ in RL's prompt order, sampling and update streams.",
        "",
        "## Correctness before and after",
        "",
        "Correct: the answer says the asked fact's key span and not the distractor's "
        "(DECISIONS.md §13). Test: greedy answers to "
        f"{s['num_eval']} test prompts; each cell the mean over seeds, then the differences from "
        "the start and from the random row, each with its 95% interval, which includes the seeds "
        f"({method}, {stats.RESAMPLES:,} resamples; * = the interval excludes 0), in %. With "
        f"{len(result['seeds'])} seeds the seed stage can only draw those seeds, so the interval "
        "is rough. Fixed set: "
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
        c = summ[r.name]["collapse"]
        lines.append(
            f"| {r.label} | {r.kind} | {_cell(level[r.name], True)} | "
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
        rho = " → ".join(_r(q["vs_correct"][own]["within"]) for q in cur)
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


def run_rewards(run, device) -> int:
    """`--experiment rewards` from scratch: every row of every seed (reward_study), then its
    tables in results/."""
    settings = reward_study.study_settings(run)
    result, sh, work = reward_study.run_study(
        run, device, settings, shared_setup, "experiments.reward_study"
    )
    reward_study.write_rewards_tables(
        result, sh.name, markdown(result), plot, run.experiment.results_dir, work
    )
    return 0


def main(argv=None) -> int:
    """python -m experiments.reward_tables results/rewards_<name>.json ...: rewrite each table's .md
    from its .json with this code, the intervals recomputed from what the JSON keeps (the JSON and
    the figure stay as they are). Every file is checked before any is written."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__.split(":")[0])
    p.add_argument("tables", nargs="+", type=Path, help="results/rewards_<name>.json files")
    results = {}
    for path in p.parse_args(argv).tables:
        try:
            results[path] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"{path}: not a readable JSON file ({e})") from None
        if not {"settings", "rows", "seeds"} <= set(results[path]):
            raise SystemExit(
                f"{path}: not a rewards table (no settings, rows or seeds); pass the .json that "
                "--experiment rewards wrote"
            )
    for path, result in results.items():
        pretrained = "init" in result["settings"]
        md = pretrained_markdown(result) if pretrained else markdown(result)
        runs.write_text(path.with_suffix(".md"), md)
        print(f"wrote {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
