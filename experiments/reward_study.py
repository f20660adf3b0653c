"""Which self-supervised reward works? The attention reward of §3.2 against the internal rewards the
field uses since the paper, with a positive and a random control, each measured against correctness
(results/README.md, "Which internal reward?"):

    python cagsr.py --experiment rewards --dataset qa --seeds 3
    python cagsr.py --experiment rewards --dataset instruct --seeds 3

Per seed: one SFT policy, trained for fewer steps than Table 1's (presets.EXPERIMENT_SFT_STEPS) so
that there is room to improve; one Bradley-Terry reward model on simulated limited human preferences
(the hybrid row's); then one PPO run per reward (experiments/baselines.py), all from that SFT
policy, with the same prompts in the same order. Every `eval_every` iterations the fixed evaluation
set (validation prompts, N candidates each, a fixed sampling seed) is scored by every reward and by
correctness (exact-match on the QA tasks, reference match on instruct; ROUGE-L on both): the
Spearman correlations within and across prompts are the curves of the plot. Each row ends with
greedy answers on the test split.

Rows are written to the work directory (runs/rewards-<dataset>-<size>/) as soon as they are done,
so an interrupted run continues where it stopped (run the same command again); then results/ is
regenerated: rewards_<dataset>.md, .json and .png.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

import data
import parallel
import ppo
from cli import runs
from experiments import baselines, evaluation, rank, stats
from experiments.common import (
    Shared,
    arch_setting,
    device_line,
    rl_settings,
    seed_sft,
    seed_sft_pairs,
    seeds_in_workers,
    shared_setup,
    work_dir,
    write_json,
    write_tables,
)
from experiments.evaluation import PairScorer
from reward import RewardConfig


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    kind: str  # "start" | "self-supervised" | "control" | "not self-supervised"
    source: str
    reward: str | None = None  # its --reward name (baselines.REWARD_NAMES); None: no RL


ROWS = (
    Row("sft", "SFT (start of every row)", "start", "the supervised policy every row starts from"),
    Row(
        "cagsr",
        "Attention reward (CAGSR, PPO)",
        "self-supervised",
        "§3.2: coverage + focus - repetition",
        "attention",
    ),
    Row(
        "self_certainty",
        "Self-certainty",
        "self-supervised",
        "Intuitor, arXiv 2505.19590",
        "self-certainty",
    ),
    Row(
        "neg_entropy",
        "Negative entropy",
        "self-supervised",
        "EM-RL, arXiv 2505.15134",
        "neg-entropy",
    ),
    Row(
        "logprob",
        "Mean token log-probability",
        "self-supervised",
        "trajectory probability, TTRL's family",
        "logprob",
    ),
    Row(
        "random",
        "Random, Bernoulli(0.5)",
        "control",
        "spurious-reward control, arXiv 2506.10947",
        "random",
    ),
    Row(
        "oracle",
        "Oracle: correctness vs reference",
        "control",
        "positive control: it reads the answer (exact-match on QA, reference match on instruct)",
        "oracle",
    ),
    Row(
        "hybrid",
        "Hybrid: attention + RM",
        "not self-supervised",
        "§6, §9: attention reward + weight x reward model on limited (simulated) human preferences",
        "hybrid",
    ),
)
ROW_NAMES = tuple(r.name for r in ROWS)
REWARDS = ("attention", "self_certainty", "neg_entropy", "logprob", "random", "oracle", "hybrid")
OWN_REWARD = {"cagsr": "attention", **{r: r for r in REWARDS if r != "attention"}}
METRICS = ("correct", "rouge_l", "relevance")
"""Test metrics of every row: the task's correctness (exact-match on QA, reference match on
instruct; evaluation.CORRECTNESS), ROUGE-L and the relevance classifier's, on greedy answers."""
EVAL_SEED = 1234
ITERATION_PARTS = ("sample_s", "reward_s", "ref_s", "update_s")
"""The parts of one RL iteration ppo.train times: sampling, reward, reference pass, update."""

PRETRAINED_ROWS = (
    Row("sft", "Pretrained model (start of every row)", "start", "the --init model itself, no SFT"),
    ROWS[1],
    Row(
        "variant",
        "Attention variant (the best-ranked signal, named in the notes)",
        "self-supervised",
        "the attention signal that ranks correct candidates highest in --experiment rank",
        "attention",
    ),
    ROWS[2],
    ROWS[5],
    Row(
        "oracle",
        "Oracle: key-span correctness",
        "control",
        "positive control: it reads the answer's key spans (DECISIONS.md §13)",
        "oracle",
    ),
)
"""The rows of the study from a pretrained model (--init): no SFT, no reward model, so no hybrid;
the rival rewards cut to self-certainty, the one the field's intrinsic-reward studies train on."""


@dataclass(frozen=True)
class Study:
    """What one rewards study compares: its rows, the rewards scored on the fixed set, the test
    metrics."""

    rows: tuple
    rewards: tuple
    metrics: tuple

    @property
    def row_names(self) -> tuple:
        return tuple(r.name for r in self.rows)


def study_of(settings: dict) -> Study:
    """The tiny presets' study (SFT from scratch), or the pretrained model's (settings["init"])."""
    if "init" not in settings:
        return Study(ROWS, REWARDS, METRICS)
    return Study(
        PRETRAINED_ROWS,
        ("attention", "variant", "self_certainty", "random", "oracle"),
        ("correct", "rouge_l"),
    )


def own_reward(row: str) -> str:
    """The fixed-set reward a row trains on."""
    return "variant" if row == "variant" else OWN_REWARD[row]


def study_settings(run) -> dict:
    """Everything the rows depend on (a changed setting never reuses an old row)."""
    experiment = run.experiment
    return dict(
        study="rewards",
        dataset=run.dataset,
        size=run.size,
        data_seed=run.seed,
        warmup=run.sft.warmup,
        sft_steps=run.sft.steps,
        sft_batch_size=run.sft.batch_size,
        sft_lr=run.sft.lr,
        sft_noise=run.sft_noise,
        sft_noise_draw="per seed",
        **rl_settings(run),
        rm=dict(
            human_steps=experiment.rm_steps, human_prompts=experiment.human_prompts, label_noise=0.1
        ),
        hybrid_weight=experiment.hybrid_weight,
        relevance_steps=experiment.relevance_steps,
        **arch_setting(run),
    )


def study_correctness(settings: dict):
    """The study's correctness(prediction, record): exact-match or reference match on the tiny
    presets, key spans from a pretrained model."""
    return evaluation.correctness_function(settings["dataset"], "init" in settings)


# --------------------------------------------------------------------------------------------
# Rewards and correctness on the fixed evaluation set
# --------------------------------------------------------------------------------------------


def row_reward(name: str, sh, rm: PairScorer, settings: dict, seed: int):
    """The reward_fn of ppo.RLTask for row `name` (None: the attention reward): the registry behind
    --reward."""
    row = next(r for r in study_of(settings).rows if r.name == name)
    if name == "variant":
        v = settings["variant"]
        return None if v == "attention_no_sinks" else baselines.TermReward(v)
    return baselines.make_reward(
        row.reward,
        tok=sh.tok,
        records=sh.splits.train,
        seed=seed,
        correct=study_correctness(settings),
        rm=rm,
        hybrid_weight=settings.get("hybrid_weight", 0.0),
    )


def row_reward_config(name: str, settings: dict) -> RewardConfig:
    """The attention reward's config of row `name`: the study's, with the sinks excluded on the
    variant row when that is the variant."""
    cfg = RewardConfig(**settings["reward"])
    no_sinks = name == "variant" and settings["variant"] == "attention_no_sinks"
    return replace(cfg, exclude_special=True) if no_sinks else cfg


@torch.no_grad()
def fixed_candidates(policy, sh, fixed: list[dict], settings: dict, device):
    """The fixed set's N candidates per prompt from `policy`, sampled with seed EVAL_SEED and
    scored by the study's attention reward: (src, src_mask, rollout, terms)."""
    policy.eval()
    ppo_cfg, reward_cfg, sp = (
        ppo.PPOConfig(**settings["ppo"]),
        RewardConfig(**settings["reward"]),
        data.specials(sh.tok),
    )
    src, src_mask = evaluation.prompt_batch(sh.tok, [r["prompt"] for r in fixed], device, sp)
    gen = torch.Generator(device=device).manual_seed(EVAL_SEED)
    rollout, terms, _, _ = ppo.sample_and_score(
        policy, src, src_mask, sh.salient, reward_cfg, ppo_cfg, sp, gen
    )
    return src, src_mask, rollout, terms


@torch.no_grad()
def fixed_eval(
    policy, sh, fixed: list[dict], rm: PairScorer | None, settings: dict, device, extra=None
) -> dict:
    """Every reward and correctness on N fixed-seed candidates per fixed prompt: their means and
    per-prompt means, the per-prompt correctness, each reward's Spearman with correctness and with
    ROUGE-L and its per-prompt probability of ranking a correct candidate above a wrong one
    (stats.within_prompt_auc); and the correctness of the greedy answers to the same prompts.
    extra: more rewards to score, {name: fn(policy, src, src_mask, rollout) -> (B*N,)}."""
    src, src_mask, rollout, terms = fixed_candidates(policy, sh, fixed, settings, device)
    tok, N, prompts = sh.tok, settings["ppo"]["num_samples"], [rec["prompt"] for rec in fixed]
    correctness = study_correctness(settings)
    oracle = baselines.OracleReward.from_records(tok, fixed, correctness)
    pairs = oracle.texts(src, src_mask, rollout)  # decoded once
    rewards = dict(
        attention=terms["reward"],
        random=baselines.RandomReward(EVAL_SEED)(src, src_mask, rollout),
        oracle=torch.tensor(oracle.scores(pairs)),
        **{
            k: baselines.RolloutReward(k)(src, src_mask, rollout)
            for k in baselines.RolloutReward.KINDS
        },
    )
    if rm is not None:
        hybrid = baselines.HybridReward(rm, settings["hybrid_weight"])
        rewards["hybrid"] = hybrid(src, src_mask, rollout, terms)
    if "variant" in settings:  # the pretrained study's variant row
        reward_cfg, sp = RewardConfig(**settings["reward"]), data.specials(tok)
        scored = (policy, src, src_mask, rollout, terms, sh.salient, reward_cfg, sp)
        rewards["variant"] = rank.candidate_signals(*scored)[settings["variant"]]
    rewards.update({k: fn(policy, src, src_mask, rollout) for k, fn in (extra or {}).items()})
    greedy = evaluation.answer(policy, tok, prompts, device, settings["ppo"]["max_new_tokens"])
    texts = [t for t, _ in pairs]
    recs = [rec for rec in fixed for _ in range(N)]
    rouge = [evaluation.rouge_l(t, rec["response"]) for t, rec in zip(texts, recs)]
    correct = [correctness(t, rec) for t, rec in zip(texts, recs)]
    rewards = {k: v.float().cpu().numpy() for k, v in rewards.items()}
    greedy_correct = [correctness(t, rec) for t, rec in zip(greedy, fixed)]
    return dict(
        correct=float(np.mean(correct)),
        greedy_correct=float(np.mean(greedy_correct)),
        per_prompt_greedy=greedy_correct,
        rouge_l=float(np.mean(rouge)),
        pass_at_n=float(np.asarray(correct).reshape(-1, N).max(1).mean()),
        per_prompt_correct=np.asarray(correct).reshape(-1, N).mean(1).tolist(),
        rewards={k: float(v.mean()) for k, v in rewards.items()},
        per_prompt_rewards={k: v.reshape(-1, N).mean(1).tolist() for k, v in rewards.items()},
        auc={k: stats.within_prompt_auc(v, np.asarray(correct), N) for k, v in rewards.items()},
        vs_correct={k: stats.correlations(v, correct, N) for k, v in rewards.items()},
        vs_rouge={k: stats.correlations(v, rouge, N) for k, v in rewards.items()},
    )


def test_metrics(policy, sh, test: list[dict], device, settings: dict) -> dict:
    """Greedy answers on the test prompts: the answers, their correctness, ROUGE-L and
    relevance, and 3 examples."""
    prompts = [r["prompt"] for r in test]
    preds = evaluation.answer(
        policy, sh.tok, prompts, device, max_new_tokens=settings["ppo"]["max_new_tokens"]
    )
    correctness = study_correctness(settings)
    out = dict(
        correct=[correctness(p, r) for p, r in zip(preds, test)],
        rouge_l=[evaluation.rouge_l(p, r["response"]) for p, r in zip(preds, test)],
        answers=preds,
        examples=[
            dict(prompt=r["prompt"], answer=p, reference=r["response"])
            for r, p in zip(test[:3], preds)
        ],
    )
    if sh.classifier is not None:  # the tiny presets' relevance classifier
        out["relevance"] = evaluation.relevance(sh.classifier, sh.tok, prompts, preds, device)
    return out


# --------------------------------------------------------------------------------------------
# One seed: SFT, the preference reward model, every row
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowRL:
    """What one RL row trains with: the attention reward's config, the reward_fn that replaces R
    (None: R itself), I_x (None: the study's salient tokens) and the KL coefficient to SFT (None:
    the study's PPO setting)."""

    reward_cfg: RewardConfig
    reward_fn: object = None
    salient: object = None
    kl_coef: float | None = None


@dataclass(frozen=True)
class SeedPlan:
    """The rows one seed runs, each RL row's RowRL (rl(name)), and the rewards the fixed set is
    scored by beyond the study's own (fixed_eval's `extra`)."""

    names: tuple
    rl: Callable[[str], RowRL]
    extra: dict = field(default_factory=dict)


def study_plan(seed: int, sd: Path, settings: dict, sh, rm, sft_state, fixed, device) -> SeedPlan:
    """The rewards study's rows, each with its reward (row_reward, row_reward_config)."""
    return SeedPlan(
        study_of(settings).row_names,
        lambda name: RowRL(
            row_reward_config(name, settings), row_reward(name, sh, rm, settings, seed)
        ),
    )


def seed_rm(
    seed: int, sd: Path, settings: dict, sft_state: dict, sh, device
) -> tuple[PairScorer, dict]:
    """The hybrid row's reward model (baselines.train_bt_rm on SFT samples), kept in sd/rm.pt."""
    path = sd / "rm.pt"
    if path.exists():
        saved = torch.load(path, map_location=device, weights_only=False)
        scorer = PairScorer(PairScorer.config_of(sh.cfg)).to(device)
        scorer.load_state_dict(saved["model"])
        return scorer.eval().requires_grad_(False), saved["stats"]
    t0 = time.time()
    rm = settings["rm"]
    policy = runs.policy_from_state(sft_state, sh.cfg, device)
    scorer, rm_stats = baselines.train_bt_rm(
        policy,
        sh.tok,
        sh.splits.train,
        ppo.PPOConfig(**settings["ppo"]),
        device,
        num_prompts=rm["human_prompts"],
        noise=rm["label_noise"],
        steps=rm["human_steps"],
        seed=seed,
    )
    rm_stats["seconds"] = round(time.time() - t0, 1)
    runs.atomic_save(path, dict(model=scorer.state_dict(), stats=rm_stats))
    return scorer.eval().requires_grad_(False), rm_stats


def run_row(
    name: str, seed: int, settings: dict, sh, sft_state, rm, fixed, test, start, device, plan
) -> dict:
    """Row `name` of one seed: PPO with its reward (plan.rl(name)) from the SFT policy, or from the
    pretrained model (none for the start row, "sft"), the fixed set scored every eval_every
    iterations (`start` is iteration 0), the KL to the start at every iteration, then the test
    metrics."""
    t0 = time.time()
    runs.seed_everything(seed)
    policy = runs.policy_from_state(sft_state, sh.cfg, device)
    curve, skipped, timing, kl = [dict(iteration=0, **start)], 0, None, []
    if name != "sft":
        rl, every = plan.rl(name), settings["eval_every"]
        ppo_cfg = ppo.PPOConfig(**settings["ppo"])
        if rl.kl_coef is not None:
            ppo_cfg = replace(ppo_cfg, kl_coef=rl.kl_coef)

        def on_iteration(i, row, state):
            if i % every == 0 or i == settings["iterations"]:
                curve.append(
                    dict(
                        iteration=i,
                        **fixed_eval(policy, sh, fixed, rm, settings, device, plan.extra),
                    )
                )

        ref, optimizer = runs.rl_start(policy, sft_state, ppo_cfg.lr, device)
        with parallel.progress(
            total=settings["iterations"], desc=f"seed {seed} {name}", unit="iter", leave=False
        ) as bar:
            history = ppo.train(
                policy,
                ref,
                optimizer,
                ppo.RLTask(
                    [p for p, _ in sh.train_pairs],
                    specials=data.specials(sh.tok),
                    salient=rl.salient or sh.salient,
                    reward_cfg=rl.reward_cfg,
                    reward_fn=rl.reward_fn,
                ),
                ppo_cfg,
                ppo.RLRun(settings["iterations"], seed=seed),
                ppo.RLHooks(on_iteration=on_iteration, progress=bar),
            )
        skipped = ppo.skipped_updates(history)
        timing = {k: float(np.mean([h[k] for h in history])) for k in ITERATION_PARTS}
        kl = [h["kl_ref"] for h in history]
    metrics = test_metrics(policy, sh, test, device, settings)
    return dict(
        row=name,
        seed=seed,
        curve=curve,
        skipped_updates=skipped,
        iteration_seconds=timing,
        kl_to_start=kl,
        test=metrics,
        seconds=round(time.time() - t0, 1),
    )


def run_seed(seed: int, work: Path, settings: dict, sh, device, planner=study_plan) -> dict:
    """Every row of one seed (planner(seed, seed directory, settings, sh, rm, sft_state, fixed,
    device) -> its SeedPlan); rows already on disk are read, not recomputed."""
    sd = work / f"seed{seed}"
    sd.mkdir(parents=True, exist_ok=True)
    test = sh.splits.test[: settings["num_eval"]]
    fixed = sh.splits.val[: settings["eval_prompts"]]
    if "init" in settings:  # the pretrained model is every row's start: no SFT, no hybrid row
        sft_state, sft_seconds, rm, rm_stats = sh.start_state, 0.0, None, None
    else:
        sft_state, sft_seconds = seed_sft(
            seed,
            sd,
            settings,
            sh.cfg,
            sh.tok,
            sh.splits,
            seed_sft_pairs(sh, settings, seed),
            sh.salient,
            device,
        )
        rm, rm_stats = seed_rm(seed, sd, settings, sft_state, sh, device)
    plan = planner(seed, sd, settings, sh, rm, sft_state, fixed, device)
    start = None
    rows = {}
    for name in plan.names:
        path = sd / f"row_{name}.json"  # (sft.json is the SFT timing of seed_sft)
        if path.exists():
            rows[name] = json.loads(path.read_text())
            print(f"seed {seed} | {name}: done earlier ({rows[name]['seconds']:.0f} s)")
            continue
        if start is None:  # iteration 0: the SFT policy, the same for every row
            policy = runs.policy_from_state(sft_state, sh.cfg, device)
            start = fixed_eval(policy, sh, fixed, rm, settings, device, plan.extra)
        rows[name] = row = run_row(
            name, seed, settings, sh, sft_state, rm, fixed, test, start, device, plan
        )
        write_json(path, row)
        t, last = row["test"], row["curve"][-1]
        relevance = f"relevance {np.mean(t['relevance']):.3f} " if "relevance" in t else ""
        print(
            f"seed {seed} | {name:14s} test correct {np.mean(t['correct']):.3f} "
            f"ROUGE-L {np.mean(t['rouge_l']):.3f} {relevance}| "
            f"fixed set correctness {last['correct']:.3f} | {row['seconds']:.0f} s"
        )
    return dict(sft_seconds=sft_seconds, rm=rm_stats, rows=rows)


# --------------------------------------------------------------------------------------------
# Over seeds: differences with paired bootstrap intervals, curves, collapse
# --------------------------------------------------------------------------------------------


def _nanmean(values) -> float | None:
    """Mean of the defined values (None: an undefined correlation); None when none is defined."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def mean_curve(rows: list[dict], rewards: tuple = REWARDS) -> list[dict]:
    """Each evaluation point averaged over seeds (undefined correlations, a seed whose candidates
    were all tied, left out of the mean; greedy correctness None where not recorded)."""
    out = []
    for points in zip(*(r["curve"] for r in rows)):
        corr = lambda key: {
            k: {
                f: _nanmean([p[key][k][f] for p in points]) for f in ("within", "across", "skipped")
            }
            for k in rewards
        }
        out.append(
            dict(
                iteration=points[0]["iteration"],
                correct=_nanmean([p["correct"] for p in points]),
                pass_at_n=_nanmean([p["pass_at_n"] for p in points]),
                greedy_correct=_nanmean([p.get("greedy_correct") for p in points]),
                rouge_l=_nanmean([p["rouge_l"] for p in points]),
                rewards={k: _nanmean([p["rewards"][k] for p in points]) for k in rewards},
                vs_correct=corr("vs_correct"),
                vs_rouge=corr("vs_rouge"),
            )
        )
    return out


def collapse_step(curve: list[dict], start_lo: float):
    """The first evaluation (its iteration) at which the fixed set's correctness is below the lower
    end of the start's 95% bootstrap interval; None if it never is."""
    return next((p["iteration"] for p in curve[1:] if p["correct"] < start_lo), None)


def summarize(per_seed: dict, seeds: list[int], study: Study) -> dict:
    """Per row: every metric's mean, std and values over seeds (its intervals: seed_level); the
    curve averaged over seeds; the collapse step; seconds."""
    start_pp = np.mean(
        [per_seed[s]["rows"]["sft"]["curve"][0]["per_prompt_correct"] for s in seeds], axis=0
    )
    start = stats.mean_interval(start_pp, seed=0)
    out = dict(start_correct=start)
    for name in study.row_names:
        rows = [per_seed[s]["rows"][name] for s in seeds]
        metrics = {}
        for m in study.metrics:
            values = [float(np.mean(r["test"][m])) for r in rows]
            mean, std = stats.mean_std(values)
            metrics[m] = dict(mean=mean, std=std, values=values)
        curve = mean_curve(rows, study.rewards)
        out[name] = dict(
            metrics=metrics,
            curve=curve,
            collapse=collapse_step(curve, start["lo"]),
            skipped_updates=sum(r["skipped_updates"] for r in rows),
            seconds=stats.mean_std([r["seconds"] for r in rows])[0],
            examples=rows[0]["test"]["examples"],
        )
    return out


def seed_level(result: dict, metric: str, names) -> dict:
    """Per row of `names`: its test `metric` with a 95% interval that includes the seeds, and its
    differences from the start row ("sft") and from the random row. From each seed's per-prompt
    values (result["per_seed_rows"]): the two-stage bootstrap, seeds then prompts (stats); from a
    table that kept only each seed's mean (the earlier JSONs): Student's t over the seeds.
    {name: {method, value {mean, lo, hi}, vs_start, vs_random ({diff, lo, hi, excludes_0} or
    None)}}."""
    per = result.get("per_seed_rows")
    if per:
        values = lambda n: [seed[n]["test"][metric] for seed in per.values()]
        interval, difference = stats.hierarchical_interval, stats.hierarchical_difference
        method = "two-stage bootstrap (seeds, then prompts)"
    else:
        values = lambda n: result["rows"][n]["metrics"][metric]["values"]
        interval, difference = stats.seed_t_interval, stats.seed_t_difference
        method = "Student's t over the seed means"
    diff = lambda n, other: None if n == other else difference(values(n), values(other))
    return {
        n: dict(
            method=method,
            value=interval(values(n)),
            vs_start=diff(n, "sft"),
            vs_random=diff(n, "random") if "random" in names else None,
        )
        for n in names
    }


def headroom(result: dict) -> dict:
    """Does the oracle row beat the start on the task's correctness, with a 95% interval that
    includes the seeds (seed_level) above 0?"""
    d = seed_level(result, "correct", ("sft", "oracle"))["oracle"]["vs_start"]
    return dict(ok=bool(d["lo"] > 0), **d)


def seed_worker(run, seed: int, device) -> None:
    """The rows of one seed, from the run alone (in a worker process of
    experiments.seeds_in_workers)."""
    settings = study_settings(run)
    work = work_dir(run, "rewards")
    run_seed(seed, work, settings, shared_setup(run, work, settings, device), device)


def every_seed(run, device, settings: dict, setup, module: str, planner=study_plan) -> tuple:
    """Every row of every seed, planned by `planner` (rows on disk are reused; `module`'s
    seed_worker computes seeds in worker processes): (the shared setup, the work directory, the
    seeds, each seed's run_seed). setup(run, work, settings, device) -> Shared."""
    work = work_dir(run, "rewards")
    sh = setup(run, work, settings, device)
    seeds = list(range(run.seed, run.seed + run.experiment.seeds))
    seeds_in_workers(run, module, work, seeds, device)
    return sh, work, seeds, {s: run_seed(s, work, settings, sh, device, planner) for s in seeds}


def run_study(run, device, settings: dict, setup, module: str) -> tuple[dict, Shared, Path]:
    """Every row of every seed (every_seed), then the summary over seeds: (the result the tables
    are written from, the shared setup, the work directory)."""
    t_start = time.time()
    sh, work, seeds, per_seed = every_seed(run, device, settings, setup, module)
    compute = (sh.clf_stats or {}).get("seconds", 0.0) + sum(
        ps["sft_seconds"]
        + (ps["rm"] or {}).get("seconds", 0.0)
        + sum(r["seconds"] for r in ps["rows"].values())
        for ps in per_seed.values()
    )
    summary = summarize(per_seed, seeds, study_of(settings))
    result = dict(
        command=run.command,
        device=device_line(run, device),
        seeds=seeds,
        last_call_minutes=(time.time() - t_start) / 60,
        compute_minutes=compute / 60,
        settings=settings,
        classifier=sh.clf_stats,
        is_qa=data.is_qa(settings["dataset"]),
        rows=summary,
        rm={s: per_seed[s]["rm"] for s in seeds},
        per_seed_rows={s: {n: kept_row(r) for n, r in per_seed[s]["rows"].items()} for s in seeds},
    )
    result["headroom"] = headroom(result)
    return result, sh, work


def kept_row(row: dict) -> dict:
    """A row as the table's JSON keeps it: its per-prompt test values (the intervals are computed
    from them) and its curve, without what only the ablation table reads (each evaluation's
    per-prompt rewards and rankings, every test answer: they stay in the work directory)."""
    curve = [
        {k: v for k, v in p.items() if k not in ("per_prompt_rewards", "auc")} for p in row["curve"]
    ]
    test = {k: v for k, v in row["test"].items() if k != "answers"}
    return {**row, "curve": curve, "test": test}


def write_rewards_tables(result: dict, name: str, md: str, plot_to, results_dir, work) -> None:
    """results/rewards_<name>.json, .md and .png (plot_to(result, path) draws the figure), and a
    warning when the headroom check failed."""
    write_tables(result, f"rewards_{name}", md, plot_to, results_dir, work)
    if not result["headroom"]["ok"]:
        print(
            "WARNING: the headroom check failed (the oracle row does not beat the start on "
            "correctness): this comparison cannot show anything; see the table's header."
        )
