"""Why does the attention reward fail? Its terms, the paper's guards (§6) and an upper bound,
trained one at a time from the same SFT policy per seed (results/README.md, "Why the attention
reward fails"):

    python cagsr.py --experiment ablations --dataset qa-grounded --seeds 3
    python cagsr.py --experiment ablations --arch decoder --dataset qa-grounded --seeds 3

The rows are rows of the rewards study (experiments/reward_study.py): the same work directory
(runs/rewards-<dataset>[-decoder]-<size>/), the same settings, the same SFT policy, reward model
and prompts per seed, so the R, oracle and random rows are shared between the two tables. What the
ablation adds, per seed:

- the guards' settings, read off that seed's SFT policy before any row is trained (seed_guards):
  the entropy floor and the KL coefficient, kept in seed<k>/guards.json;
- the answer clause's tokens as an oracle I_x (OracleSalient): coverage of them is an upper bound
  of the mechanism, since it reads the reference;
- every row's own reward on the fixed set, so that its rise and its ranking can be read.

It runs on `qa-grounded` only: the answer clause is defined by its records' right and wrong
answers. Tables: results/ablations_<dataset>[-decoder].md, .json and .png.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import data
import ppo
from cli import runs
from experiments import evaluation, reward_study, stats
from experiments.common import (
    device_line,
    save_figure,
    shared_setup,
    work_dir,
    write_json,
    write_tables,
)
from experiments.reward_study import RowRL, SeedPlan
from reward import RewardConfig, attention_entropy


@dataclass(frozen=True)
class Ablation:
    """One row of the ablation table: its name (its row file), label, kind, what it changes, and
    the fixed-set reward it trains on."""

    name: str
    label: str
    kind: str  # "start" | "the paper's" | "term" | "guard" | "upper bound" | "control"
    what: str
    own: str  # the fixed-set reward it trains on (fixed_eval's name)


ROWS = (
    Ablation("sft", "SFT (start of every row)", "start", "no RL", "attention"),
    Ablation(
        "cagsr",
        "R, the paper's (§3.2)",
        "the paper's",
        "coverage + 0.5 focus - repetition",
        "attention",
    ),
    Ablation("coverage", "Coverage alone", "term", "alpha 1, beta 0, gamma 0", "coverage"),
    Ablation("focus", "Focus alone", "term", "alpha 0, beta 0.5, gamma 0", "focus"),
    Ablation("no_repeat", "R without repetition", "term", "gamma 0", "no_repeat"),
    Ablation(
        "no_sinks",
        "R, sinks excluded",
        "guard",
        "the sinks dropped from Abar and Abar renormalised (--exclude-special)",
        "no_sinks",
    ),
    Ablation(
        "entropy_floor",
        "R, entropy floor",
        "guard",
        "each step's attention entropy clamped from below at the floor (§6)",
        "entropy_floor",
    ),
    Ablation(
        "kl",
        "R, KL penalty to SFT",
        "guard",
        "R - kl_coef x KL(policy || SFT) per sequence",
        "attention",
    ),
    Ablation(
        "oracle_coverage",
        "Coverage of the answer clause (upper bound, reads the reference)",
        "upper bound",
        "coverage with I_x = the answer clause's own tokens",
        "oracle_coverage",
    ),
    Ablation(
        "oracle", "Oracle: exact-match", "control", "correctness against the reference", "oracle"
    ),
    Ablation("random", "Random, Bernoulli(0.5)", "control", "a fair coin per candidate", "random"),
)
ROW_NAMES = tuple(r.name for r in ROWS)
ATTENTION_ROWS = ("coverage", "focus", "no_repeat", "no_sinks", "entropy_floor", "oracle_coverage")
"""The rows whose reward is an attention reward with another config (row_config)."""
TEMPLATE_SHARE = 0.01
"""An invented answer is prompt-independent when at least this share of the test answers (and at
least 3) invent the same words (DECISIONS.md §9)."""


# --------------------------------------------------------------------------------------------
# The oracle salient set, the guards, the rows' rewards
# --------------------------------------------------------------------------------------------


class OracleSalient:
    """I_x = the answer clause's own tokens: the prompt positions before its question whose token is
    in the reference answer and not in the distractor's (record["wrong"]), content tokens only. It
    reads the reference, so it is an upper bound of the mechanism, not a self-supervised reward.
    Called as SalientTokens is: (src, src_mask, cfg, sinks) -> (B, S) bool."""

    def __init__(self, tok, records: list[dict], content: torch.Tensor):
        sp = data.specials(tok)
        self.masks = {}
        for r in records:
            ids = data.encode(tok, r["prompt"], sp)
            self.masks[tuple(ids)] = clause_positions(tok, r, ids, content)

    def __call__(self, src, src_mask, cfg: RewardConfig, sinks=None):
        out = torch.zeros_like(src_mask)
        for b in range(src.size(0)):
            real = src_mask[b].nonzero().squeeze(-1)
            key = tuple(src[b, real].tolist())
            if key not in self.masks:
                raise KeyError(
                    f"OracleSalient: prompt {b} of the batch is not one of the records it was "
                    "built from (the training and fixed evaluation prompts)"
                )
            out[b, real] = torch.tensor(self.masks[key], device=src.device)
        return out if sinks is None else out & ~sinks


def clause_positions(tok, record: dict, ids: list[int], content: torch.Tensor) -> list[bool]:
    """For each of the prompt's token ids: is it one of the answer clause's own tokens (before the
    question, in the reference answer, not in the distractor's, a content token)?"""
    enc = tok.encode(record["prompt"])
    question = question_start(record["prompt"])
    own = set(tok.encode(record["response"]).ids) - set(tok.encode(record["wrong"]).ids)
    before = [start < question for start, _ in enc.offsets]
    before += [False] * (len(ids) - len(before))  # EOS (and nothing else) follows the text
    return [b and i in own and bool(content[i]) for i, b in zip(ids, before)]


def row_config(name: str, settings: dict, guards: dict) -> RewardConfig:
    """The attention reward's config of an ablation row: the study's with one change."""
    cfg = RewardConfig(**settings["reward"])
    change = dict(
        coverage=dict(alpha=1.0, beta=0.0, gamma=0.0),
        focus=dict(alpha=0.0, gamma=0.0),
        no_repeat=dict(gamma=0.0),
        no_sinks=dict(exclude_special=True),
        entropy_floor=dict(entropy_floor=guards["entropy_floor"]),
        oracle_coverage=dict(alpha=1.0, beta=0.0, gamma=0.0),
    ).get(name, {})
    return replace(cfg, **change)


@torch.no_grad()
def seed_guards(sd: Path, settings: dict, sh, sft_state, fixed, device) -> dict:
    """The guards' settings of one seed, from its SFT policy's candidates on the fixed set (N per
    prompt, sampling seed EVAL_SEED), before any row is trained (kept in sd/guards.json):

    - entropy_floor: the median attention entropy of the SFT policy's response steps. §6 asks for
      "a lower bound on entropy" against attention spikier than the natural one: at the floor, no
      step earns more focus by being sharper than the SFT policy's typical step.
    - kl_coef: the mean within-prompt standard deviation of R over the N candidates, per nat. A
      candidate 1 nat further from SFT than its siblings then loses what one typical within-prompt
      spread of R gains, so the penalty weighs as much as the reward's own signal."""
    path = sd / "guards.json"
    if path.exists():
        return json.loads(path.read_text())
    policy = runs.policy_from_state(sft_state, sh.cfg, device)
    _, _, rollout, terms = reward_study.fixed_candidates(policy, sh, fixed, settings, device)
    temperature = settings["reward"]["attn_temperature"]
    h = attention_entropy(rollout.attn, temperature)[rollout.mask.bool()]  # (steps,)
    spread = terms["reward"].reshape(-1, settings["ppo"]["num_samples"]).std(dim=1, unbiased=True)
    guards = dict(
        entropy_floor=round(float(h.median()), 4),
        kl_coef=round(float(spread.mean()), 4),
        steps=int(h.numel()),
        entropy_quartiles=[round(float(q), 4) for q in h.quantile(torch.tensor([0.25, 0.75]))],
    )
    write_json(path, guards)
    return guards


def ablation_plan(
    seed: int, sd: Path, settings: dict, sh, rm, sft_state, fixed, device
) -> SeedPlan:
    """reward_study.run_seed's plan for the ablation rows: each row's RowRL, and every attention
    row's reward scored on the fixed set beside the study's own."""
    guards = seed_guards(sd, settings, sh, sft_state, fixed, device)
    oracle_set = OracleSalient(sh.tok, sh.splits.train + fixed, sh.salient.content)
    sp = data.specials(sh.tok)
    salient = lambda name: oracle_set if name == "oracle_coverage" else sh.salient

    def scorer(name):
        cfg = row_config(name, settings, guards)
        return lambda policy, src, src_mask, rollout: ppo.score_rollout(
            policy, src, src_mask, rollout, salient(name), cfg, sp
        )["reward"]

    study = reward_study.study_plan(seed, sd, settings, sh, rm, sft_state, fixed, device)

    def rl(name: str) -> RowRL:
        if name in ATTENTION_ROWS:
            return RowRL(row_config(name, settings, guards), salient=salient(name))
        if name == "kl":
            return RowRL(RewardConfig(**settings["reward"]), kl_coef=guards["kl_coef"])
        return study.rl(name)  # R, the oracle and random: the rewards study's own rows

    return SeedPlan(ROW_NAMES, rl, {name: scorer(name) for name in ATTENTION_ROWS})


# --------------------------------------------------------------------------------------------
# Collapse: answers that do not depend on their prompt
# --------------------------------------------------------------------------------------------


def question_start(prompt: str) -> int:
    """Where a qa-grounded prompt's question (its last sentence) starts."""
    return prompt.rstrip().rfind(". ") + 1


def invented(answer: str, prompt: str) -> str:
    """The words of an answer that its prompt does not contain (evaluation.words), in order: what
    it did not read from the prompt. A qa-grounded answer, right or the distractor's, has none."""
    seen = set(evaluation.words(prompt))
    return " ".join(w for w in evaluation.words(answer) if w not in seen)


def prompt_independent(answers: list[str], prompts: list[str], share=TEMPLATE_SHARE) -> list:
    """1.0 for each answer that does not depend on its prompt, else 0.0 (DECISIONS.md §9): it
    invents words its prompt does not contain, and the same words as at least `share` of all the
    answers (at least 3): "X lives in pet." to a prompt without a pet, said to many prompts."""
    words = [invented(a, p) for a, p in zip(answers, prompts)]
    counts, need = Counter(words), max(3, math.ceil(share * len(answers)))
    return [float(bool(w) and counts[w] >= need) for w in words]


def templates(answers: list[str], prompts: list[str], most: int = 2) -> list[dict]:
    """The words the prompt-independent answers invent most often: [{invented, answers, example}],
    how many answers invent them and one such answer, most frequent first."""
    flags = prompt_independent(answers, prompts)
    said = [(invented(a, p), a) for a, p, f in zip(answers, prompts, flags) if f]
    counts = Counter(w for w, _ in said)
    return [
        dict(invented=w, answers=n, example=next(a for x, a in said if x == w))
        for w, n in counts.most_common(most)
    ]


def distractor_answers(answers: list[str], records: list[dict]) -> list:
    """1.0 for each answer that gives the distractor's fact: its key span and not the asked one's
    (evaluation.key_span_match with the keys swapped)."""
    return [
        evaluation.key_span_match(a, r["wrong_key"], r["key"]) for a, r in zip(answers, records)
    ]


# --------------------------------------------------------------------------------------------
# Over seeds: two-stage bootstrap intervals (seeds, then prompts within each seed)
# --------------------------------------------------------------------------------------------

RANKED_AT = 10
"""The iteration the within-prompt ranking is read at beside the start (the issue's 10)."""


def point_at(curve: list[dict], iteration: int) -> dict:
    """The first evaluation at or after `iteration` (the last one if none is)."""
    return next((p for p in curve if p["iteration"] >= iteration), curve[-1])


def seed_values(row: dict, own: str, test: list[dict]) -> dict:
    """The per-prompt values of one row of one seed the table is computed from."""
    answers, prompts = row["test"]["answers"], [r["prompt"] for r in test]
    start, end = row["curve"][0], row["curve"][-1]
    at = point_at(row["curve"], RANKED_AT)
    kept = lambda aucs: [a for a in aucs if a is not None]
    return dict(
        greedy=row["test"]["correct"],
        sampled=end["per_prompt_correct"],
        own_rise=(
            np.subtract(end["per_prompt_rewards"][own], start["per_prompt_rewards"][own]).tolist()
        ),
        auc_start=kept(start["auc"][own]),
        auc_later=kept(at["auc"][own]),
        auc_later_iteration=at["iteration"],
        independent=prompt_independent(answers, prompts),
        distractor=distractor_answers(answers, test),
        kl=row["kl_to_start"][-1] if row["kl_to_start"] else 0.0,
        templates=templates(answers, prompts),
    )


def interval_or_none(per_seed: list[list]) -> dict | None:
    """The two-stage interval, or None when a seed has no value (no prompt to rank)."""
    return stats.hierarchical_interval(per_seed) if all(per_seed) else None


def summarize(values: dict, seeds: list) -> dict:
    """Per row: each measure's mean over seeds with its two-stage 95% interval, the paired
    difference from the random row of greedy and sampled correctness, the KL per seed."""
    out = {}
    over = lambda name, key: [values[s][name][key] for s in seeds]
    for r in ROWS:
        row = dict(
            greedy=stats.hierarchical_interval(over(r.name, "greedy")),
            sampled=stats.hierarchical_interval(over(r.name, "sampled")),
            greedy_vs_random=stats.hierarchical_difference(
                over(r.name, "greedy"), over("random", "greedy")
            ),
            sampled_vs_random=stats.hierarchical_difference(
                over(r.name, "sampled"), over("random", "sampled")
            ),
            own_rise=stats.hierarchical_interval(over(r.name, "own_rise")),
            auc_start=interval_or_none(over(r.name, "auc_start")),
            auc_later=interval_or_none(over(r.name, "auc_later")),
            independent=stats.hierarchical_interval(over(r.name, "independent")),
            distractor=stats.hierarchical_interval(over(r.name, "distractor")),
            kl=dict(mean=float(np.mean(over(r.name, "kl"))), values=over(r.name, "kl")),
            greedy_per_seed=[float(np.mean(v)) for v in over(r.name, "greedy")],
        )
        out[r.name] = row
    return out


# --------------------------------------------------------------------------------------------
# results/ablations_<dataset>[-decoder].md, .json, .png
# --------------------------------------------------------------------------------------------


def _pct(m: dict | None, signed=False) -> str:
    if m is None:
        return "—"
    f = (lambda v: f"{100 * v:+.1f}") if signed else (lambda v: f"{100 * v:.1f}")
    return f"{f(m['mean'])} [{f(m['lo'])}, {f(m['hi'])}]"


def _diff(d: dict) -> str:
    star = " *" if d["excludes_0"] else ""
    return f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]{star}"


def _auc(m: dict | None) -> str:
    return "—" if m is None else f"{m['mean']:.2f} [{m['lo']:.2f}, {m['hi']:.2f}]"


def markdown(result: dict) -> str:
    s, rows, seeds = result["settings"], result["rows"], result["seeds"]
    policy = "decoder-only " if s.get("arch") == "decoder" else ""
    N, later = s["ppo"]["num_samples"], result["auc_later_iteration"]
    lines = [
        f"# Why the attention reward fails: `{s['dataset']}` ({s['size']} {policy}preset, "
        f"{len(seeds)} seeds)",
        "",
        f"Written by `{result['command']}` on {result['device']}. Compute: "
        f"{result['compute_minutes']:.1f} min for the rows in this table (rows shared with the "
        "rewards study count at their original cost).",
        "",
        "Every row starts from the same SFT policy per seed (SFT noise drawn per seed) and sees "
        "the same prompts in the same order; only its reward, or the one guard it adds, differs. "
        "Intervals: 95%, two-stage bootstrap (the seeds resampled, then the prompts within each "
        f"seed; {stats.RESAMPLES:,} resamples); * = the difference from random excludes 0.",
        "",
        "## Correctness and collapse",
        "",
        f"Greedy: exact-match of the greedy answers on {s['num_eval']} test prompts. Sampled: "
        f"exact-match of the fixed set's {N} candidates per prompt ({s['eval_prompts']} "
        f"validation prompts, temperature {s['ppo']['temperature']}) after the last iteration. "
        "Prompt-independent: the share of test answers that invent words their prompt does not "
        f"contain, the same words as at least {TEMPLATE_SHARE:.0%} of all the answers "
        "(DECISIONS.md §9). Distractor's: the share that give the other clause's fact. All in %.",
        "",
        "| row | kind | greedy | greedy − random | sampled | sampled − random | "
        "prompt-independent | distractor's |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ROWS:
        m = rows[r.name]
        lines.append(
            f"| {r.label} | {r.kind} | {_pct(m['greedy'])} | {_diff(m['greedy_vs_random'])} | "
            f"{_pct(m['sampled'])} | {_diff(m['sampled_vs_random'])} | {_pct(m['independent'])} | "
            f"{_pct(m['distractor'])} |"
        )
    lines += [
        "",
        "## What each row's own reward did",
        "",
        "Own reward: the reward the row trains on, on the fixed set's candidates, its rise from "
        "the start to the last iteration (per prompt, then the two-stage interval). KL: the KL "
        "from the SFT policy of the last iteration's samples, nats per sequence, per seed. "
        "Ranking: the probability that the row's own reward puts a correct candidate above a "
        "wrong one of the same prompt (prompts with both), at the start and at iteration "
        f"{later}; 0.5 is chance.",
        "",
        f"| row | trains on | own reward: rise | KL to SFT (seeds) | ranking at start | "
        f"ranking at iteration {later} |",
        "|---|---|---|---|---|---|",
    ]
    for r in ROWS[1:]:
        m = rows[r.name]
        kl = " / ".join(f"{v:.2f}" for v in m["kl"]["values"])
        rise = m["own_rise"]
        lines.append(
            f"| {r.label} | {r.what} | {rise['mean']:+.4f} [{rise['lo']:+.4f}, {rise['hi']:+.4f}] "
            f"| {kl} | {_auc(m['auc_start'])} | {_auc(m['auc_later'])} |"
        )
    lines += ["", "## Settings and per-seed values", ""] + notes(result)
    return "\n".join(lines) + "\n"


def notes(result: dict) -> list[str]:
    s, rows, seeds = result["settings"], result["rows"], result["seeds"]
    guard = lambda k: ", ".join(f"seed {sd}: {result['guards'][str(sd)][k]}" for sd in seeds)
    greedy = lambda name: " / ".join(f"{100 * v:.1f}" for v in rows[name]["greedy_per_seed"])
    out = [
        f"- Every RL row: {s['iterations']} PPO iterations x {s['ppo']['prompts_per_iter']} "
        f"prompts x {s['ppo']['num_samples']} candidates (lr {s['ppo']['lr']}, baseline "
        f"{s['ppo']['baseline']}, whitened advantages, temperature {s['ppo']['temperature']}), "
        f"from one SFT policy per seed ({s['sft_steps']} steps x {s['sft_batch_size']}, "
        f"{s['sft_noise']:.0%} of its responses the distractor's answer, drawn per seed).",
        "- Entropy floor: the SFT policy's median attention entropy per response step on the "
        f"fixed set, read before any row was trained (nats): {guard('entropy_floor')}.",
        "- KL coefficient: the SFT policy's mean within-prompt standard deviation of R on the "
        f"fixed set, per nat: {guard('kl_coef')}. Neither setting was tuned on any row.",
        "- Coverage of the answer clause: I_x is the prompt's tokens before its question that are "
        "in the reference answer and not in the distractor's (content tokens): it reads the "
        "reference, so it is an upper bound of what attention coverage can do, not a "
        "self-supervised reward.",
        "- R, the oracle and random rows are the rewards study's rows of the same seeds.",
        "- Greedy exact-match per seed (%): "
        + "; ".join(f"{r.label} {greedy(r.name)}" for r in ROWS),
    ]
    out.append(
        "- What the prompt-independent answers invent most often, per seed (how many of the "
        "test answers, and one of them):"
    )
    for r in ROWS:
        said = [
            f"seed {sd}: "
            + ", ".join(
                f'"{t["invented"]}" x{t["answers"]} ({t["example"]!r})'
                for t in result["per_seed"][str(sd)][r.name]["templates"]
            )
            for sd in seeds
            if result["per_seed"][str(sd)][r.name]["templates"]
        ]
        out.append(f"  - {r.label}: " + ("; ".join(said) if said else "none"))
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    y = np.arange(len(ROWS))[::-1]
    for ax, key, title in (
        (axes[0], "greedy", "greedy exact-match on the test prompts (%)"),
        (axes[1], "independent", "prompt-independent answers (%)"),
    ):
        m = [rows[r.name][key] for r in ROWS]
        mean = np.array([100 * x["mean"] for x in m])
        err = np.array(
            [[100 * (x["mean"] - x["lo"]) for x in m], [100 * (x["hi"] - x["mean"]) for x in m]]
        )
        ax.errorbar(mean, y, xerr=err, fmt="o", capsize=3)
        ax.set_yticks(y, [r.label.replace(", reads the reference", "") for r in ROWS], fontsize=8)
        ax.axvline(100 * rows["random"][key]["mean"], color="grey", lw=0.8, ls="--")
        ax.set_title(title, fontsize=10)
    fig.suptitle(
        f"Why the attention reward fails: {result['settings']['dataset']}, "
        f"{len(result['seeds'])} seeds (95% intervals over seeds and prompts; dashed: random)"
    )
    save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


def seed_worker(run, seed: int, device) -> None:
    """The rows of one seed, from the run alone (a worker process of seeds_in_workers)."""
    settings = reward_study.study_settings(run)
    work = work_dir(run, "rewards")
    sh = shared_setup(run, work, settings, device)
    reward_study.run_seed(seed, work, settings, sh, device, ablation_plan)


def run_ablations(run, device) -> int:
    """`--experiment ablations`: every row of every seed (rows on disk reused), then results/."""
    settings = reward_study.study_settings(run)
    sh, work, seeds, per_seed = reward_study.every_seed(
        run, device, settings, shared_setup, __name__, ablation_plan
    )
    test = sh.splits.test[: settings["num_eval"]]
    values = {
        s: {r.name: seed_values(per_seed[s]["rows"][r.name], r.own, test) for r in ROWS}
        for s in seeds
    }
    result = dict(
        command=run.command,
        device=device_line(run, device),
        seeds=seeds,
        compute_minutes=sum(per_seed[s]["rows"][n]["seconds"] for s in seeds for n in ROW_NAMES)
        / 60,
        settings=settings,
        guards={str(s): json.loads((work / f"seed{s}" / "guards.json").read_text()) for s in seeds},
        auc_later_iteration=values[seeds[0]]["cagsr"]["auc_later_iteration"],
        rows=summarize(values, seeds),
        per_seed={str(s): {n: slim(v) for n, v in values[s].items()} for s in seeds},
    )
    md = markdown(result)
    write_tables(result, f"ablations_{sh.name}", md, plot, run.experiment.results_dir, work)
    return 0


def slim(values: dict) -> dict:
    """The per-prompt values the table is computed from, as the JSON keeps them."""
    return values
