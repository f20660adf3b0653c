"""Which reward sees correctness? No training: a policy's own candidates, each scored by every
signal and marked right or wrong, and for each signal the probability that a correct candidate
outranks a wrong one of the same prompt (results/README.md, "Which reward sees correctness?"):

    python cagsr.py --experiment rank --init SmolLM2-135M-Instruct.Q4_1.gguf --seeds 2
    python cagsr.py --experiment rank --init runs/<sft run>/sft.pt

For each sampling seed: N candidates for each of --num-eval held-out qa-grounded test prompts
(through the model's chat template where it has one), drawn from the full softmax at the rewards
study's temperature (--temperature), with Abar recorded. A candidate is correct when it says the
asked fact's key span and not the distractor's (evaluation.key_span_match, DECISIONS.md §13). A
prompt whose candidates are all right or all wrong ranks nothing; the others give one AUC each
(stats.prompt_auc), and each signal's mean AUC gets a bootstrap interval over those prompts. A
signal blind to correctness lands at 0.5 (the random score must).

Each seed's candidates are kept in the work directory (runs/rank-<dataset>-<model>/) as soon as they
are scored, so an interrupted call continues with the next seed; then results/ gets
rank_<dataset>-<model>.md, .json and .png.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

import data
import parallel
import ppo
from cli import stages
from experiments import evaluation, stats
from experiments.common import (
    check_settings,
    device_line,
    label,
    model_label,
    save_figure,
    work_dir,
    write_json,
    write_tables,
)
from reward import SalientTokens, response_mean


@dataclass(frozen=True)
class Signal:
    name: str
    label: str
    source: str


SIGNALS = (
    Signal("attention", "Attention reward R", "§3.2: coverage + 0.5 focus - repetition"),
    Signal("coverage", "Coverage alone", "§3.2's first term"),
    Signal("focus", "Focus alone", "§3.2's second term: minus the entropy of Abar"),
    Signal("neg_repeat", "Minus repetition alone", "§3.2's third term, as a reward"),
    Signal("attention_no_sinks", "R, sinks excluded", "R with --exclude-special (§6's guard)"),
    Signal("prompt_share", "Prompt share", "attention on the prompt before renormalising"),
    Signal("self_certainty", "Self-certainty", "Intuitor, arXiv 2505.19590"),
    Signal("neg_entropy", "Negative entropy", "EM-RL, arXiv 2505.15134"),
    Signal("logprob", "Mean token log-probability", "trajectory probability"),
    Signal("random", "Random score", "control: uniform, seeded; must rank at 0.5"),
)
SIGNAL_NAMES = tuple(s.name for s in SIGNALS)
ATTENTION_VARIANTS = ("coverage", "focus", "neg_repeat", "attention_no_sinks", "prompt_share")
"""The signals read from the attention map besides R itself: the rewards study's variant row is the
one that ranks best here."""
BATCH_PROMPTS = 16


def rank_settings(run) -> dict:
    """Everything the candidates depend on (a changed setting never reuses an old seed)."""
    return dict(
        study="rank",
        init=str(run.init),
        dataset=run.dataset,
        data_seed=run.seed,
        num_prompts=run.num_eval,
        num_samples=run.ppo.num_samples,
        temperature=run.ppo.temperature,
        top_k=run.ppo.top_k,
        top_p=run.ppo.top_p,
        max_new_tokens=run.ppo.max_new_tokens,
        reward=asdict(run.reward),
        chat=run.args.get("chat_template"),
        system=run.args.get("system"),
        last_layers=run.model_overrides.get("last_layers"),
        **({"split": "val"} if run.experiment.split == "val" else {}),
    )


def check_records(records: list[dict], dataset: str) -> None:
    """The key spans the correctness rule reads must be there before anything is sampled."""
    lacking = next((r for r in records if "key" not in r or "wrong_key" not in r), None)
    if lacking is not None:
        raise SystemExit(
            f"--experiment rank --dataset {dataset}: its records have no 'key' and 'wrong_key' "
            "fields, the key spans a free-form answer is marked by (DECISIONS.md §13); use "
            "--dataset qa-grounded, or a JSONL whose records carry both"
        )


# --------------------------------------------------------------------------------------------
# One seed: candidates, their signals and their correctness
# --------------------------------------------------------------------------------------------


def candidate_signals(policy, src, src_mask, rollout, terms, salient, reward_cfg, sp) -> dict:
    """Every signal but the random one, per candidate: {name: (B*N,) tensor}. terms: R's terms of
    the rollout under reward_cfg (ppo.sample_and_score's); R without the sinks is scored here."""
    no_sinks_cfg = replace(reward_cfg, exclude_special=True)
    no_sinks = ppo.score_rollout(policy, src, src_mask, rollout, salient, no_sinks_cfg, sp)
    return dict(
        attention=terms["reward"],
        coverage=terms["coverage"],
        focus=terms["focus"],
        neg_repeat=-terms["repeat"],
        attention_no_sinks=no_sinks["reward"],
        prompt_share=terms["prompt_share"],
        self_certainty=response_mean(rollout.certainty, rollout.mask),
        neg_entropy=-response_mean(rollout.entropy, rollout.mask),
        logprob=response_mean(rollout.logprobs, rollout.mask),
        length=terms["length"],
    )


@torch.no_grad()
def score_seed(policy, tok, salient, records, run, seed: int, device) -> dict:
    """N candidates per record's prompt at sampling seed `seed`: every signal, the correctness,
    the texts. Lists over the B*N candidates, N consecutive per prompt."""
    policy.eval()
    sp, N = data.specials(tok), run.ppo.num_samples
    gen = torch.Generator(device=device).manual_seed(seed)
    correct_of = evaluation.correctness_function(run.dataset, pretrained=True)
    out = {k: [] for k in (*SIGNAL_NAMES, "length", "correct", "text")}
    with parallel.progress(total=len(records), desc=f"seed {seed}", unit="prompt") as bar:
        for i in range(0, len(records), BATCH_PROMPTS):
            batch = records[i : i + BATCH_PROMPTS]
            src, src_mask = evaluation.prompt_batch(tok, [r["prompt"] for r in batch], device, sp)
            rollout, terms, _, _ = ppo.sample_and_score(
                policy, src, src_mask, salient, run.reward, run.ppo, sp, gen
            )
            signals = candidate_signals(
                policy, src, src_mask, rollout, terms, salient, run.reward, sp
            )
            for k, v in signals.items():
                out[k] += v.float().cpu().tolist()
            texts = [data.decode(tok, row.tolist(), sp) for row in rollout.tokens.cpu()]
            out["text"] += texts
            out["correct"] += [
                correct_of(t, r) for t, r in zip(texts, (r for r in batch for _ in range(N)))
            ]
            bar.update(len(batch))
    out["random"] = np.random.default_rng(seed).random(len(out["correct"])).tolist()
    return out


def run_seed(seed: int, work: Path, policy, tok, salient, records, run, device) -> dict:
    """One seed's candidates, read from work/seed<s>.json when an earlier call wrote them."""
    path = work / f"seed{seed}.json"
    if path.exists():
        print(f"seed {seed}: done earlier")
        return json.loads(path.read_text())
    t0 = time.time()
    scored = score_seed(policy, tok, salient, records, run, seed, device)
    scored["seconds"] = round(time.time() - t0, 1)
    write_json(path, scored)
    return scored


# --------------------------------------------------------------------------------------------
# Over prompts and seeds: AUC per signal with its bootstrap interval
# --------------------------------------------------------------------------------------------


def seed_summary(scored: dict, n: int) -> dict:
    """The share of correct candidates, the prompts with both right and wrong candidates, and
    per signal the per-prompt AUCs (None: unrankable) with their mean's bootstrap interval."""
    correct = np.asarray(scored["correct"])
    per_prompt = correct.reshape(-1, n).mean(1)
    out = dict(
        correct=float(correct.mean()),
        mixed=int(((per_prompt > 0) & (per_prompt < 1)).sum()),
        all_right=int((per_prompt == 1).sum()),
        prompts=int(per_prompt.size),
        signals={},
    )
    for name in SIGNAL_NAMES:
        aucs = stats.within_prompt_auc(scored[name], correct, n)
        constant = bool(np.ptp(scored[name]) == 0)  # the prompt share under cross-attention: 1
        out["signals"][name] = dict(per_prompt=aucs, constant=constant, **auc_interval(aucs))
    return out


def auc_interval(aucs: list) -> dict:
    """The mean of the defined per-prompt AUCs and its bootstrap interval over those prompts; None
    for all three when no prompt ranks anything."""
    kept = [a for a in aucs if a is not None]
    return stats.mean_interval(kept, seed=0) if kept else dict(mean=None, lo=None, hi=None)


def pooled(seeds: list[dict]) -> dict:
    """Each signal's AUC over seeds: per prompt, the mean over the seeds where it ranks something;
    the mean over prompts with a bootstrap interval over those prompts."""
    out = {}
    for name in SIGNAL_NAMES:
        per_prompt = zip(*(s["signals"][name]["per_prompt"] for s in seeds))
        means = [
            float(np.mean([a for a in p if a is not None]))
            for p in per_prompt
            if any(a is not None for a in p)
        ]
        constant = all(s["signals"][name]["constant"] for s in seeds)
        out[name] = dict(prompts=len(means), constant=constant, **auc_interval(means))
    return out


def best_variant(pool: dict) -> str | None:
    """The attention variant (ATTENTION_VARIANTS) with the highest pooled AUC, of those that are
    not one constant on every candidate (a constant ranks nothing: its AUC is 1/2 by ties); None
    when no prompt ranks anything."""
    defined = [
        k for k in ATTENTION_VARIANTS if pool[k]["mean"] is not None and not pool[k]["constant"]
    ]
    return max(defined, key=lambda k: pool[k]["mean"]) if defined else None


# --------------------------------------------------------------------------------------------
# results/rank_<dataset>-<model>.md, .json, .png
# --------------------------------------------------------------------------------------------


def _auc(x: dict) -> str:
    if x["mean"] is None:
        return "— (no prompt to rank)"
    if x["constant"]:
        return "constant (all ties)"
    star = " *" if x["lo"] > 0.5 or x["hi"] < 0.5 else ""
    return f"{x['mean']:.3f} [{x['lo']:.3f}, {x['hi']:.3f}]{star}"


def markdown(result: dict) -> str:
    s, seeds = result["settings"], result["seeds"]
    per = result["per_seed"]
    lines = [
        f"# Which reward sees correctness? `{s['dataset']}`, {result['model']}",
        "",
        f"Written by `{result['command']}` on {result['device']}; this call took "
        f"{result['last_call_minutes']:.1f} min, {result['compute_minutes']:.1f} min of compute "
        "in all (seeds reused from an earlier call count at their original cost).",
        "",
        f"{s['num_prompts']} held-out {s.get('split', 'test')} prompts x {s['num_samples']} "
        "candidates, sampled from "
        f"the full softmax at temperature {s['temperature']} (at most {s['max_new_tokens']} new "
        f"tokens), sampling seeds {', '.join(map(str, seeds))}. Correct: the answer says the "
        "asked fact's key span and not the distractor's (DECISIONS.md §13).",
        "",
        "| sampling seed | correct candidates | prompts with right and wrong | all right | "
        "all wrong |",
        "|---|---|---|---|---|",
    ]
    for sd in seeds:
        p = per[str(sd)]
        lines.append(
            f"| {sd} | {100 * p['correct']:.1f}% | {p['mixed']} of {p['prompts']} | "
            f"{p['all_right']} | {p['prompts'] - p['mixed'] - p['all_right']} |"
        )
    lines += [
        "",
        "## P(a correct candidate outranks a wrong one of the same prompt)",
        "",
        "Per signal: the mean over the prompts with both right and wrong candidates of the share "
        "of (correct, wrong) pairs the signal orders right (ties count 1/2), with its 95% "
        "bootstrap interval over those prompts (10,000 resamples); * = the interval excludes "
        "0.5, the value of a signal blind to correctness. Pooled: each prompt's AUC averaged over "
        "the seeds where it ranks something.",
        "",
        "| signal | " + " | ".join(f"seed {sd}" for sd in seeds) + " | pooled | source |",
        "|---|" + "---|" * len(seeds) + "---|---|",
    ]
    for sig in SIGNALS:
        cells = " | ".join(_auc(per[str(sd)]["signals"][sig.name]) for sd in seeds)
        lines.append(
            f"| {sig.label} | {cells} | {_auc(result['pooled'][sig.name])} | {sig.source} |"
        )
    lines += [
        "",
        "The random score checks the statistic: its pooled interval must hold 0.5. Each per-seed "
        "interval is a 95% interval, so about 1 in 20 of a blind signal's per-seed intervals "
        "misses 0.5 by chance. A signal constant on every candidate ranks nothing (under "
        "cross-attention the prompt share is 1 by construction, DECISIONS.md §10).",
        "",
        f"Best attention variant (the rewards study's variant row): **{result['best_variant']}**.",
        "",
        "## Examples (seed " + str(seeds[0]) + ", first prompt)",
        "",
    ]
    ex = result["examples"]
    lines.append(f"Prompt: {ex['prompt']!r}; key {ex['key']!r}, distractor {ex['wrong_key']!r}.")
    lines.append("")
    for text, ok, r in zip(ex["texts"], ex["correct"], ex["attention"]):
        lines.append(f"- {'right' if ok else 'wrong'}, R {r:+.3f}: {text!r}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    seeds = result["seeds"]
    for j, sd in enumerate(seeds):
        sig = result["per_seed"][str(sd)]["signals"]
        y = np.arange(len(SIGNALS)) + (j - (len(seeds) - 1) / 2) * 0.25
        m = np.array([sig[s.name]["mean"] for s in SIGNALS], dtype=float)
        lo = np.array([sig[s.name]["lo"] for s in SIGNALS], dtype=float)
        hi = np.array([sig[s.name]["hi"] for s in SIGNALS], dtype=float)
        ax.errorbar(m, y, xerr=[m - lo, hi - m], fmt="o", capsize=3, label=f"seed {sd}")
    ax.axvline(0.5, color="black", lw=0.8)
    ax.set_yticks(np.arange(len(SIGNALS)), [s.label for s in SIGNALS])
    ax.invert_yaxis()
    ax.set_xlabel("P(correct candidate outranks a wrong one), 95% bootstrap interval")
    ax.set_title(
        f"Which reward sees correctness? {result['settings']['dataset']}, {result['model']}",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    save_figure(fig, path)


def run_rank(run, device) -> int:
    """`--experiment rank`: every sampling seed (seeds on disk are reused), then results/."""
    t_start = time.time()
    setup = stages.prepare(run, device)
    records = getattr(setup.splits, run.experiment.split)[: run.num_eval]
    check_records(records, run.dataset)
    name = label(run.dataset, run.arch, run.init)
    work = work_dir(run, "rank")
    settings = rank_settings(run)
    work.mkdir(parents=True, exist_ok=True)
    check_settings(work, settings)
    salient = SalientTokens.from_idf(setup.tok, setup.idf)
    seeds = list(range(run.seed, run.seed + run.experiment.seeds))
    scored = {
        s: run_seed(s, work, setup.model, setup.tok, salient, records, run, device) for s in seeds
    }
    per_seed = {str(s): seed_summary(scored[s], run.ppo.num_samples) for s in seeds}
    pool = pooled([per_seed[str(s)] for s in seeds])
    first, N = scored[seeds[0]], run.ppo.num_samples
    result = dict(
        command=run.command,
        device=device_line(run, device),
        model=model_label(run.init),
        seeds=seeds,
        last_call_minutes=(time.time() - t_start) / 60,
        compute_minutes=sum(scored[s]["seconds"] for s in seeds) / 60,
        settings=settings,
        per_seed=per_seed,
        pooled=pool,
        best_variant=best_variant(pool),
        examples=dict(
            prompt=records[0]["prompt"],
            key=records[0]["key"],
            wrong_key=records[0]["wrong_key"],
            texts=first["text"][:N],
            correct=first["correct"][:N],
            attention=first["attention"][:N],
        ),
    )
    write_tables(result, f"rank_{name}", markdown(result), plot, run.experiment.results_dir, work)
    return 0
