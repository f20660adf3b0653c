"""The paper's comparison (§7.3-§7.6, Table 1) from one command:

    python cagsr.py --experiment table1 --dataset instruct --seeds 3
    python cagsr.py --experiment table1 --dataset qa --seeds 3

For every seed: one SFT model (the No-RL row and the start of every other row), the two preference
reward models of the baselines, then each RL row (the same PPO loop, the same prompts in the same
order, only the reward or one setting changed), each scored on the test split. Once per dataset:
the tokenizer and the relevance classifier (an evaluator, trained on the validation split and
frozen). Every row's result is written to the work directory (runs/table1-<dataset>-<size>/) as
soon as it is done, so an interrupted table continues where it stopped; then results/ is
regenerated from those files: table1_<dataset>.md, .json and .png (training curves).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import data
import parallel
import ppo
from cli import runs
from decoder import policy_config
from experiments import baselines, evaluation
from experiments.common import (
    ExperimentConfig,
    arch_setting,
    device_line,
    save_figure,
    seed_sft,
    seeds_in_workers,
    shared_setup,
    work_dir,
    write_json,
    write_tables,
)
from experiments.stats import mean_std
from reward import RewardConfig

# Table 1 of the paper (Instruction test set): relevance, ROUGE-L, human score (1-5).
PAPER_TABLE1 = {
    "no_rl": (0.72, 0.33, 3.2),
    "synthetic_pref": (0.78, 0.37, 3.5),
    "cagsr": (0.83, 0.39, 3.7),
    "human_pref_sim": (0.87, 0.44, 4.0),
}


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    kind: str  # "sft" | "cagsr" | "synthetic" | "human"
    ppo: dict = field(default_factory=dict)  # PPOConfig fields this row changes
    reward: dict = field(
        default_factory=dict
    )  # RewardConfig fields this row changes (the RL reward only)
    note: str = ""


METHODS = (
    Method("no_rl", "No-RL baseline (SFT)", "sft"),
    Method(
        "synthetic_pref",
        "Synthetic Preference RL",
        "synthetic",
        note="reward model fitted to references (good) vs shuffled/truncated/repeated/off-topic "
        "references (bad) of the training split",
    ),
    Method(
        "human_pref_sim",
        "Human Preference RL (limited, simulated)",
        "human",
        note="Bradley-Terry reward model fitted to simulated annotators who prefer by ROUGE-L "
        "against the reference (10% label noise): this row has an edge on ROUGE-L",
    ),
    Method(
        "cagsr",
        "CAGSR (PPO)",
        "cagsr",
        note="the attention reward of §3.2, alpha/beta/gamma 1/0.5/1",
    ),
    Method(
        "cagsr_pg",
        "CAGSR (plain policy gradient)",
        "cagsr",
        ppo=dict(algo="pg"),
        note="REINFORCE with the group baseline instead of PPO: one epoch over each rollout, one "
        "step per minibatch (2 in the CPU profile), so after the first step the samples are "
        "slightly off-policy and, unlike PPO, no ratio corrects for it",
    ),
    Method(
        "cagsr_kl",
        "CAGSR (PPO) + KL to SFT (0.1)",
        "cagsr",
        ppo=dict(kl_coef=0.1),
        note="not in the paper: a k1 KL penalty to the SFT policy, coefficient 0.1",
    ),
    Method(
        "ablate_coverage",
        "CAGSR without coverage",
        "cagsr",
        reward=dict(alpha=0.0),
        note="§7.6: alpha = 0",
    ),
    Method(
        "ablate_focus", "CAGSR without focus", "cagsr", reward=dict(beta=0.0), note="§7.6: beta = 0"
    ),
    Method(
        "ablate_repeat",
        "CAGSR without repetition penalty",
        "cagsr",
        reward=dict(gamma=0.0),
        note="§7.6: gamma = 0",
    ),
)


METHOD_NAMES = tuple(m.name for m in METHODS)


METRICS = (
    "relevance",
    "rouge_l",
    "exact_match",
    "perplexity",
    "reward",
    "coverage",
    "focus",
    "repeat",
    "sink_share",
    "length",
    "answer_words",
)


CURVE_KEYS = (
    "reward",
    "kl_ref",
    "coverage",
    "focus",
    "sink_share",
    "length",
)  # per RL iteration, from ppo.train


# --------------------------------------------------------------------------------------------
# Settings: what a row depends on (a changed setting never reuses an old row)
# --------------------------------------------------------------------------------------------


def table_settings(run, experiment: ExperimentConfig) -> dict:
    """Everything the rows of one table depend on: the run's resolved configs (the "table1"
    profile, settings.resolve) and each row's change to them."""
    methods = {}
    for m in METHODS:
        try:
            methods[m.name] = dict(
                ppo=asdict(replace(run.ppo, **m.ppo)),
                reward=asdict(replace(run.reward, **m.reward)),
            )
        except ValueError as e:
            raise runs.UsageError(f"--experiment table1, row {m.name}: {e}") from None
    return dict(
        dataset=run.dataset,
        size=run.size,
        data_seed=run.seed,
        warmup=run.sft.warmup,
        sft_steps=run.sft.steps,
        sft_batch_size=run.sft.batch_size,
        sft_lr=run.sft.lr,
        sft_noise=run.sft_noise,
        iterations=run.iterations,
        num_eval=run.num_eval,
        methods=methods,
        eval_ppo=asdict(run.ppo),
        eval_reward=asdict(run.reward),
        rm=dict(
            synthetic_steps=experiment.rm_steps,
            human_steps=experiment.rm_steps,
            human_prompts=experiment.human_prompts,
            label_noise=0.1,
        ),
        relevance_steps=experiment.relevance_steps,
        **arch_setting(run),
    )


# --------------------------------------------------------------------------------------------
# Scoring one policy on the test split (§7.4)
# --------------------------------------------------------------------------------------------


def evaluate_row(policy, tok, test, test_pairs, salient, classifier, settings, device) -> dict:
    """The table's metrics for one policy: greedy answers for relevance, ROUGE-L, exact-match and
    answer length; perplexity of the references; the attention reward's terms (the paper's
    alpha/beta/gamma for every row) on 4 fixed-seed samples per prompt."""
    ppo_cfg, reward_cfg = (
        ppo.PPOConfig(**settings["eval_ppo"]),
        RewardConfig(**settings["eval_reward"]),
    )
    preds, em, rl = evaluation.greedy_scores(policy, tok, test, device, ppo_cfg.max_new_tokens)
    rel = evaluation.relevance(classifier, tok, [r["prompt"] for r in test], preds, device)
    terms = evaluation.sampled_terms(policy, tok, test, salient, reward_cfg, ppo_cfg, device)
    return dict(
        relevance=sum(rel) / len(rel),
        rouge_l=rl,
        exact_match=em,
        perplexity=evaluation.perplexity(policy, test_pairs, device, data.specials(tok)),
        answer_words=sum(len(evaluation.words(p)) for p in preds) / len(preds),
        **{k: terms[k] for k in ("reward", "coverage", "focus", "repeat", "sink_share", "length")},
        examples=[
            dict(prompt=r["prompt"], answer=p, reference=r["response"])
            for r, p in zip(test[:3], preds)
        ],
    )


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def rl_row(
    m: Method, seed, settings, policy, sft_state, tok, splits, train_pairs, salient, device
) -> dict:
    """Train `policy` as row `m` says (its reward model first, for the preference rows) with the KL
    reference `sft_state`: the curve, skipped updates and reward model statistics of the row."""
    mset, row = settings["methods"][m.name], {}
    ppo_cfg, reward_cfg = ppo.PPOConfig(**mset["ppo"]), RewardConfig(**mset["reward"])
    reward_fn = None
    if m.kind == "synthetic":
        scorer, row["reward_model"] = (
            baselines.train_synthetic_rm(  # accuracy on held-out validation records
                policy,
                tok,
                splits.train,
                splits.val[:500],
                device,
                steps=settings["rm"]["synthetic_steps"],
                seed=seed,
            )
        )
        reward_fn = baselines.ScorerReward(scorer)
    elif m.kind == "human":
        scorer, row["reward_model"] = baselines.train_bt_rm(
            policy,
            tok,
            splits.train,
            ppo_cfg,
            device,
            num_prompts=settings["rm"]["human_prompts"],
            noise=settings["rm"]["label_noise"],
            steps=settings["rm"]["human_steps"],
            seed=seed,
        )
        reward_fn = baselines.ScorerReward(scorer)
    ref, optimizer = runs.rl_start(policy, sft_state, ppo_cfg.lr, device)
    with parallel.progress(
        total=settings["iterations"], desc=f"seed {seed} {m.name}", unit="iter", leave=False
    ) as bar:
        history = ppo.train(
            policy,
            ref,
            optimizer,
            ppo.RLTask(
                [p for p, _ in train_pairs],
                specials=data.specials(tok),
                salient=salient,
                reward_cfg=reward_cfg,
                reward_fn=reward_fn,
            ),
            ppo_cfg,
            ppo.RLRun(settings["iterations"], seed=seed),
            ppo.RLHooks(progress=bar),
        )
    row["curve"] = {k: [h[k] for h in history] for k in CURVE_KEYS}
    row["skipped_updates"] = ppo.skipped_updates(history)
    return row


def run_seed(seed: int, work: Path, settings: dict, sh, device) -> dict:
    """Every row of one seed; rows already on disk are read, not recomputed."""
    tok, splits, salient, classifier = sh.tok, sh.splits, sh.salient, sh.classifier
    sd = work / f"seed{seed}"
    sd.mkdir(parents=True, exist_ok=True)
    cfg = policy_config(
        settings.get("arch", "encoder-decoder"), settings["size"], vocab_size=tok.get_vocab_size()
    )
    test = splits.test[: settings["num_eval"]]
    test_pairs = data.encode_records(tok, test, cfg.max_src_len, cfg.max_tgt_len)
    sft_state, sft_seconds = seed_sft(
        seed, sd, settings, cfg, tok, splits, sh.sft_pairs, salient, device
    )
    rows = {}
    for m in METHODS:
        path = sd / f"{m.name}.json"
        if path.exists():
            rows[m.name] = json.loads(path.read_text())
            print(f"seed {seed} | {m.name}: done earlier ({rows[m.name]['seconds']:.0f} s)")
            continue
        t0 = time.time()
        runs.seed_everything(seed)
        policy = runs.policy_from_state(sft_state, cfg, device)
        row = dict(method=m.name, seed=seed)
        if m.kind != "sft":
            row.update(
                rl_row(
                    m,
                    seed,
                    settings,
                    policy,
                    sft_state,
                    tok,
                    splits,
                    sh.train_pairs,
                    salient,
                    device,
                )
            )
        row["metrics"] = evaluate_row(
            policy, tok, test, test_pairs, salient, classifier, settings, device
        )
        row["seconds"] = round(time.time() - t0, 1)
        write_json(path, row)
        rows[m.name] = row
        mt = row["metrics"]
        print(
            f"seed {seed} | {m.name:16s} relevance {mt['relevance']:.3f} | "
            f"ROUGE-L {mt['rouge_l']:.3f} | EM {mt['exact_match']:.3f} | "
            f"ppl {mt['perplexity']:.3f} | R {mt['reward']:+.4f} | {row['seconds']:.0f} s"
        )
    return dict(sft_seconds=sft_seconds, rows=rows)


def aggregate(per_seed: dict) -> dict:
    """{method: {metric: {mean, std, values}, seconds: {...}}} over seeds."""
    out = {}
    for m in METHODS:
        rows = [per_seed[s]["rows"][m.name] for s in sorted(per_seed)]
        agg = {
            k: dict(
                zip(("mean", "std"), mean_std([r["metrics"][k] for r in rows])),
                values=[r["metrics"][k] for r in rows],
            )
            for k in METRICS
        }
        agg["seconds"] = dict(zip(("mean", "std"), mean_std([r["seconds"] for r in rows])))
        if "curve" in rows[0]:
            agg["curve"] = {
                k: [
                    sum(r["curve"][k][i] for r in rows) / len(rows)
                    for i in range(len(rows[0]["curve"][k]))
                ]
                for k in CURVE_KEYS
            }
        if "reward_model" in rows[0]:
            agg["reward_model"] = [r["reward_model"] for r in rows]
        agg["examples"] = rows[0]["metrics"]["examples"]
        out[m.name] = agg
    return out


def fmt(a: dict, digits=3) -> str:
    return f"{a['mean']:.{digits}f} ± {a['std']:.{digits}f}"


def markdown(result: dict) -> str:
    s, agg, qa = result["settings"], result["rows"], result["is_qa"]
    policy = "decoder-only " if s.get("arch") == "decoder" else ""
    lines = [
        f"# Table 1 on `{s['dataset']}` ({s['size']} {policy}preset, {len(result['seeds'])} seeds)",
        "",
        f"Written by `{result['command']}` on {result['device']}; this call took "
        f"{result['last_call_minutes']:.1f} min. Compute: {result['compute_minutes']:.1f} min in "
        "all (the classifier, each seed's SFT, reward models, RL and evaluation, each timed when "
        "it ran; rows reused from an earlier call count at their original cost). Mean ± sample std "
        f"over seeds {result['seeds']}; {s['num_eval']} test prompts.",
        "",
        "## The paper's columns",
        "",
        "| method | relevance | paper | ROUGE-L | paper | human score | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        p = PAPER_TABLE1.get(m.name)
        pr = lambda i: f"{p[i]:.2f}" if p else "—"
        lines.append(
            f"| {m.label} | {fmt(agg[m.name]['relevance'])} | {pr(0)} | "
            f"{fmt(agg[m.name]['rouge_l'])} | {pr(1)} | not measured | {pr(2) if p else '—'} |"
        )
    lines += [
        "",
        "## Every metric",
        "",
        "| method | "
        + ("exact-match | " if qa else "")
        + "perplexity | R | coverage | focus | repeat | sink share "
        "| length (tok) | answer words | row time (s) |",
        "|---|" + "---|" * (10 if qa else 9),
    ]
    for m in METHODS:
        a = agg[m.name]
        cells = ([fmt(a["exact_match"])] if qa else []) + [
            fmt(a["perplexity"]),
            fmt(a["reward"], 4),
            fmt(a["coverage"], 4),
            fmt(a["focus"], 4),
            fmt(a["repeat"], 4),
            fmt(a["sink_share"]),
            fmt(a["length"], 1),
            fmt(a["answer_words"], 1),
            f"{a['seconds']['mean']:.0f}",
        ]
        lines.append(f"| {m.label} | " + " | ".join(cells) + " |")
    c = result["classifier"]
    first = s["methods"]["cagsr"]["ppo"]
    differs = ", ".join(
        f"{k} {first[k]} (paper {v})" for k, v in ppo.PAPER.items() if first[k] != v
    )
    unstated = ", ".join(
        f"{k} {first[k]}"
        for k in (
            "whiten",
            "epochs",
            "minibatches",
            "temperature",
            "top_k",
            "top_p",
            "max_grad_norm",
            "max_new_tokens",
        )
    )
    lines += [
        "",
        "## Notes",
        "",
        f"- Relevance: a from-scratch {c['parameters']:,}-parameter Transformer classifier trained "
        "on the validation split (on-topic: prompt + its reference; off-topic: prompt + another "
        "prompt's reference), frozen, never a reward. On the test split it ranks a prompt's own "
        f"reference above another's {c['pairwise']:.1%} of the time and classifies "
        f"{c['accuracy']:.1%} of on/off-topic pairs right. It scores the greedy answers.",
        "- ROUGE-L, exact-match, relevance and answer words are on greedy answers; R, coverage, "
        "focus, repeat, sink share (attention on the prompt's special tokens) and length on 4 "
        "fixed-seed samples per prompt with the paper's alpha/beta/gamma for every row; perplexity "
        "is of the test references.",
        "- The human score column is not measured: no people were asked. The paper's numbers are "
        "its Table 1 on its Instruction set with a 1.3B pretrained model; ours are a from-scratch "
        "model on generated data.",
        f"- Every RL row: {s['iterations']} iterations x {first['prompts_per_iter']} prompts x "
        f"{first['num_samples']} candidates from the same SFT model, same prompt order per seed. "
        f"Settings that differ from the paper's: {differs or 'none'}; settings the paper does not "
        f"state (the project's choice): {unstated}.",
    ]
    for m in METHODS:
        if m.note:
            lines.append(f"- {m.label}: {m.note}.")
    for name in ("synthetic_pref", "human_pref_sim"):
        st = agg[name]["reward_model"]
        lines.append(
            f"- {name} reward model per seed: "
            + "; ".join(
                ", ".join(
                    f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in x.items()
                )
                for x in st
            )
            + "."
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # coverage and focus are computed on every row's rollouts (the preference rows too); R itself
    # is not comparable across rows, since the ablations optimise R without one of its terms.
    panels = (
        ("coverage", "coverage of the rollouts"),
        ("focus", "focus of the rollouts"),
        ("reward", "the reward each row optimises"),
        ("kl_ref", "KL to the SFT policy (nats / response)"),
    )
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    for ax, (key, title) in zip(axes, panels):
        for m in METHODS:
            curve = result["rows"][m.name].get("curve")
            if curve:
                ax.plot(range(1, len(curve[key]) + 1), curve[key], label=m.label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL iteration")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"Table 1 training curves, {result['settings']['dataset']}, mean over "
        f"{len(result['seeds'])} seeds"
    )
    save_figure(fig, path)


def seed_worker(run, seed: int, device) -> None:
    """Table 1's rows of one seed, from the run alone (in a worker process of seeds_in_workers)."""
    settings = table_settings(run, run.experiment)
    work = work_dir(run, "table1")
    run_seed(seed, work, settings, shared_setup(run, work, settings, device), device)


def run_table1(run, device) -> int:
    """`--experiment table1`: every row of every seed (rows on disk are reused), then results/."""
    t_start, experiment = time.time(), run.experiment
    settings = table_settings(run, experiment)
    work = work_dir(run, "table1")
    results = Path(experiment.results_dir)
    sh = shared_setup(run, work, settings, device)
    name = sh.name
    seeds = list(range(run.seed, run.seed + experiment.seeds))
    seeds_in_workers(run, __name__, work, seeds, device)
    per_seed = {s: run_seed(s, work, settings, sh, device) for s in seeds}
    compute = sum(
        ps["sft_seconds"] + sum(r["seconds"] for r in ps["rows"].values())
        for ps in per_seed.values()
    )
    compute += sh.clf_stats["seconds"]
    result = dict(
        command=run.command,
        device=device_line(run, device),
        seeds=seeds,
        last_call_minutes=(time.time() - t_start) / 60,
        compute_minutes=compute / 60,
        settings=settings,
        classifier=sh.clf_stats,
        is_qa=data.is_qa(run.dataset),
        paper=PAPER_TABLE1,
        rows=aggregate(per_seed),
        sft_seconds=[per_seed[s]["sft_seconds"] for s in seeds],
    )
    write_tables(result, f"table1_{name}", markdown(result), plot, results, work)
    return 0
