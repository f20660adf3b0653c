"""CAGSR from the command line (§5, Figure 1): data -> tokenizer -> SFT (the initial policy, §7.2)
-> RL with the cross-attention reward (§3.2) and PPO (§4).

    python cagsr.py                                   # the main job: SFT then CAGSR, on a CPU
    python cagsr.py --stage rl --init runs/X/sft.pt   # RL from a saved SFT model
    python cagsr.py --stage sample --init runs/X/rl.pt --prompt "Where does Varo Kelin live?"
    python cagsr.py --stage eval --init runs/X/rl.pt      # python cagsr.py --help lists every flag
    python cagsr.py --init ~/snapshots/flan-t5-base       # SFT then CAGSR from a pretrained T5 snapshot

The command line only: the parser, `main` (parse, resolve and check the configs in settings.py,
dispatch) and the stages' wiring; the method is model.py, reward.py, ppo.py, sft.py; plumbing runs.py.
"""

from __future__ import annotations

import argparse
import difflib
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

import baselines
import data
import evaluation
import experiments
import reward_study
import parallel
import ppo
import runs
import settings
from evaluation import REPORT_KEYS, candidates, evaluate_policy, format_candidate, greedy_scores, print_report
from model import SIZES, EncoderDecoder, config_for
from reward import RewardConfig, SalientTokens
from sft import SFT_DEFAULTS, train_sft


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse, but an unknown flag is answered with the nearest valid one and the list of them all;
    any other error (a bad value, a missing argument) with argparse's message alone."""

    def error(self, message):
        if not message.startswith("unrecognized arguments:"):
            self.exit(2, f"{self.prog}: error: {message}\n")
        valid = sorted(o for a in self._actions for o in a.option_strings if o.startswith("--"))
        unknown = [w.split("=")[0] for w in message.split()[2:] if w.startswith("--") and w.split("=")[0] not in valid]
        near = [f"did you mean {m[0]} (not {w})?\n" for w in unknown if (m := difflib.get_close_matches(w, valid, 1))]
        self.exit(2, f"{self.prog}: error: {message}\n{''.join(near)}valid flags: {' '.join(valid)}\n")


def sft_default(field: str) -> str:
    return settings.per_size({size: d[field] for size, d in SFT_DEFAULTS.items()})


def build_parser() -> Parser:
    p = Parser(description="CAGSR (arXiv 2502.10482): SFT, then RL with a reward from the model's own "
                           "cross-attention. Defaults that depend on the preset are given per size.")
    g = p.add_argument_group("run")
    g.add_argument("--size", default=None, help=f"model preset: {', '.join(SIZES)} (default: tiny, or the --init checkpoint's)")
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one ModelConfig field of the preset (repeatable); printed at start")
    g.add_argument("--last-layers", type=int, default=None,
                   help="L' of §3.2: decoder layers whose cross-attention is recorded (preset: 1)")
    g.add_argument("--dataset", default=None,
                   help=f"one of {', '.join(data.DATASETS)}, or a PATH.jsonl with prompt/response fields "
                        "(default: qa-grounded, or the --init checkpoint's; instruct for --experiment)")
    g.add_argument("--stage", default="all", choices=["all", "sft", "rl", "sample", "eval"],
                   help="all = SFT then RL; rl/sample/eval start from --init (default: all)")
    g.add_argument("--init", default=None, metavar="CKPT|DIR",
                   help="a checkpoint to start the stage from, or a local Hugging Face T5 snapshot directory "
                        "(config.json, weights, tokenizer.json; size 'pretrained')")
    g.add_argument("--prompt", action="append", default=[], help="prompt(s) for --stage sample (repeatable)")
    g.add_argument("--truncate", action="store_true",
                   help="truncate over-long prompts/responses (with a warning) instead of failing")
    g.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and sampling (default: 0)")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    g.add_argument("--out", default=None, help="run directory (default: a new runs/<time>-<size>-<dataset>)")
    g.add_argument("--overwrite", action="store_true", help="allow --out to name a non-empty directory; with --experiment, allow replacing "
                        "the tables already in --results-dir")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint, with its own settings (args.json)")
    g.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="bf16 autocast (float32 weights and optimizer) or plain fp32 (default: bf16 on CUDA, else fp32)")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each layer's activations in the backward pass (less memory, ~1/3 more compute)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward passes (SFT, PPO update); the sampler stays eager")
    g.add_argument("--dry-run", action="store_true",
                   help="print the memory plan of the chosen size (parameters, weights, gradients, optimizer, "
                        "reference policy, activations of one SFT batch) and exit")
    g = p.add_argument_group("SFT (§7.2)")
    g.add_argument("--sft-steps", type=int, default=None, help=f"SFT optimizer steps (default: {sft_default('steps')})")
    g.add_argument("--sft-batch-size", type=int, default=None, help=f"SFT batch size in pairs (default: {sft_default('batch_size')})")
    g.add_argument("--sft-lr", type=float, default=None, help=f"SFT peak learning rate, AdamW (default: {sft_default('lr')})")
    g.add_argument("--sft-noise", type=float, default=None, metavar="P",
                   help="replace a seeded share P of the SFT training responses with plausible wrong ones "
                        "(qa-grounded: the distractor's answer; instruct: another instruction's response; a JSONL: "
                        "each record's 'wrong' field), so RL has good and bad behaviours to choose between; "
                        "evaluation and the oracle keep the clean references (default: "
                        f"{', '.join(f'{v} on {k}' for k, v in settings.SFT_NOISE.items())} when SFT starts from "
                        "scratch, else 0)")
    g.add_argument("--warmup", type=int, default=100, help="SFT linear warm-up steps, then cosine decay to lr/10 (default: 100)")
    g.add_argument("--sft-eval-every", type=int, default=250, help="SFT validation and checkpoint every this many steps (default: 250)")
    g.add_argument("--num-eval", type=int, default=None,
                   help="held-out test prompts scored (default: 500 before and after RL; 300 per table row)")
    g = p.add_argument_group("RL (§4, §5)")
    g.add_argument("--iterations", type=int, default=None, help=f"RL iterations (default: {settings.per_size({k: v['iterations'] for k, v in ppo.RL_PROFILES['run'].items()})}; "
                        f"table1: {settings.per_size({k: v['iterations'] for k, v in ppo.RL_PROFILES['table1'].items()})})")
    g.add_argument("--eval-every", type=int, default=10, help="score the fixed evaluation set every this many iterations (default: 10)")
    g.add_argument("--eval-prompts", type=int, default=64, help="size of the fixed evaluation set, in validation prompts (default: 64)")
    g.add_argument("--ckpt-every", type=int, default=50,
                   help="RL checkpoint every this many iterations (default: 50)")
    g.add_argument("--reward", default="attention", choices=baselines.REWARD_NAMES,
                   help="the RL reward: attention (§3.2, the paper's), the rival internal rewards self-certainty, "
                        "neg-entropy, logprob, the controls random and oracle (the task's correctness against the "
                        "reference), or hybrid (attention + --hybrid-weight x a preference reward model trained "
                        "with --rm-steps on --human-prompts; not self-supervised) (default: attention)")
    settings.add_config_flags(g, ppo.PPOConfig, ppo.RL_PROFILES["run"])
    settings.add_config_flags(p.add_argument_group("reward (§3.2)"), RewardConfig)
    g = p.add_argument_group("experiments (§7.3-§7.6; experiments.py)")
    g.add_argument("--experiment", default=None, choices=["table1", "rewards"],
                   help="table1: every baseline, CAGSR variant and ablation of Table 1 per seed, into --results-dir "
                        "(default dataset instruct; --out sets the work directory, default runs/table1-<dataset>-<size>). "
                        "rewards: the attention reward against self-certainty, negative entropy, log-probability, "
                        "random and oracle controls and the hybrid, each measured against correctness "
                        "(reward_study.py; work directory runs/rewards-<dataset>-<size>)")
    g.add_argument("--seeds", type=int, default=3, help="table1, rewards: seeds --seed, --seed+1, ... (one SFT model each; default: 3)")
    g.add_argument("--workers", type=int, default=1,
                   help="table1, rewards: seeds computed at once, each in its own process; on a CPU the threads are "
                        "shared out among them (default: 1; on 2 cores, --workers 3 runs the 3 seeds together)")
    g.add_argument("--results-dir", default="results", help="table1, rewards: where the .md, .json and .png tables go (default: results)")
    g.add_argument("--rm-steps", type=int, default=300, help="table1, rewards, --reward hybrid: training steps of each baseline reward model (default: 300)")
    g.add_argument("--hybrid-weight", type=float, default=1.0,
                   help="rewards, --reward hybrid: weight of the preference reward model in the hybrid reward (default: 1.0)")
    g.add_argument("--human-prompts", type=int, default=1000,
                   help="table1, rewards, --reward hybrid: training prompts the simulated annotators compare two SFT samples on (§7.3; default: 1000)")
    g.add_argument("--relevance-steps", type=int, default=600, help="table1: training steps of the relevance classifier (default: 600)")
    return p


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------

@dataclass
class Setup:
    """What the training and evaluation stages start from."""
    model: EncoderDecoder
    tok: object
    specials: data.Specials         # the tokenizer's special ids
    idf: torch.Tensor               # (V,) over the training prompts, computed once per run (§3.2)
    splits: data.Splits
    train_pairs: list               # the clean training pairs: RL's prompts, the oracle's references
    sft_pairs: list                 # what SFT trains on: train_pairs with --sft-noise's share made wrong
    corrupted: int                  # how many SFT responses --sft-noise replaced
    resume: dict | None             # the --resume checkpoint


def _encode(run, tok, records, cfg):
    try:
        return data.encode_records(tok, records, cfg.max_src_len, cfg.max_tgt_len, truncate=run.truncate)
    except ValueError as e:
        raise SystemExit(f"--dataset {run.dataset}: {e}") from None


def _splits(run) -> data.Splits:
    try:
        return data.load_dataset(run.dataset, seed=run.seed)
    except ValueError as e:                         # DataError included: it names the file and line
        raise SystemExit(f"--dataset: {e}") from None


def _checked_splits(run, splits: data.Splits, tok, cfg) -> data.Splits:
    """The splits with their held-out records checked before anything is written (data.check_held_out)."""
    try:
        splits, left_out = data.check_held_out(splits, tok, cfg.max_src_len, cfg.max_tgt_len, run.truncate)
    except data.DataError as e:
        raise SystemExit(f"--dataset {run.dataset}: {e}") from None
    for name, n in left_out.items():
        if n:
            print(f"--truncate: {n} over-long {name} records left out of evaluation")
    return splits


def snapshot_idf(run, prompts, vocab_size: int) -> torch.Tensor:
    """The IDF table of a run from a bare snapshot, which has none: from --dataset's training prompts."""
    print(f"IDF (§3.2): the snapshot has none; computed from --dataset {run.dataset}'s {len(prompts)} training "
          f"prompts with the snapshot's tokenizer")
    return data.idf(prompts, vocab_size)


def new_model(run, splits, device):
    """A preset's fresh model and a tokenizer trained on the training split (rank 0's, under torchrun)."""
    rank, world = parallel.rank_and_world()
    target = run.model_overrides.get("vocab_size", SIZES[run.size]["vocab_size"])
    tok = data.train_tokenizer(list(data.record_texts(splits.train)), target) if rank == 0 else None
    if world > 1:                                   # rank 0's tokenizer for all: the vocabularies must agree
        tok = data.tokenizer_from_str(parallel.broadcast_object(data.tokenizer_to_str(tok) if rank == 0 else None))
    # A run's vocabulary is its tokenizer's; the preset's number is only the BPE target.
    overrides = {**run.model_overrides, "vocab_size": tok.get_vocab_size()}
    print(f"size {run.size} | overrides {overrides} | device {device}")
    return EncoderDecoder(config_for(run.size, **overrides)).to(device), tok


def prepare(run, device) -> Setup:
    """The model (--resume, --init or new), its tokenizer, the data and the IDF table."""
    runs.seed_everything(run.seed)
    ckpt = resume = None
    if run.resume_from is not None:                 # the model and everything else from its checkpoint
        model, tok, resume = runs.load_checkpoint(run.resume_from, device, "--resume")    # checked in main
        where = f"step {resume['step']}" if resume["stage"] == "sft" else f"iteration {resume['iteration']}"
        print(f"resuming {run.resume} from {run.resume_from.name} ({resume['stage']}, {where})")
        ckpt = resume
    elif run.init is not None:                      # the model and tokenizer: a checkpoint's or a snapshot's
        model, tok, ckpt = runs.load_init(run.init, device, "--init", run.model_overrides)
        print(f"loaded {run.init}: stage {ckpt['stage']}, size {run.size}, {model.num_params():,} parameters")
    splits = _splits(run)
    if ckpt is None:
        model, tok = new_model(run, splits, device)
    settings.print_profile(run)
    model.gradient_checkpointing = run.grad_checkpoint
    cfg = model.cfg
    print(f"dataset {run.dataset}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test pairs; "
          f"vocabulary {cfg.vocab_size}; model {model.num_params():,} parameters")
    train_pairs = _encode(run, tok, splits.train, cfg)
    splits = _checked_splits(run, splits, tok, cfg)
    if run.stage in ("all", "rl") and len(train_pairs) < run.ppo.prompts_per_iter:
        raise SystemExit(f"{run.dataset}: {len(train_pairs)} training prompts, fewer than --prompts-per-iter "
                         f"{run.ppo.prompts_per_iter}; lower --prompts-per-iter or give more data")
    sft_pairs, corrupted = sft_data(run, tok, splits.train, cfg, train_pairs)
    prompts = [p for p, _ in train_pairs]
    if ckpt is None or ckpt["idf"] is None:         # a new model, or a bare snapshot
        idf = data.idf(prompts, cfg.vocab_size) if ckpt is None else snapshot_idf(run, prompts, cfg.vocab_size)
    else:
        idf = ckpt["idf"]
    return Setup(model, tok, data.specials(tok), idf, splits, train_pairs, sft_pairs, corrupted, resume)


def sft_data(run, tok, records, cfg, train_pairs) -> tuple[list, int]:
    """SFT's training pairs: the clean ones, or with --sft-noise a seeded share made wrong (data.noisy_sft_pairs)."""
    try:
        pairs, corrupted = data.noisy_sft_pairs(tok, records, train_pairs, run.sft_noise, run.seed, run.dataset,
                                                cfg.max_src_len, cfg.max_tgt_len, run.truncate)
    except ValueError as e:                         # DataError included: it names the record
        raise SystemExit(f"--dataset {run.dataset}: {e}") from None
    if run.sft_noise:
        print(f"--sft-noise {run.sft_noise}: {len(corrupted)} of {len(records)} SFT training responses replaced by "
              f"wrong ones; RL, evaluation and the oracle keep the clean references")
    return pairs, len(corrupted)


def interrupted(run_dir, stage: str, where: str) -> int:                # Ctrl-C: the checkpoint is written
    print(f"\ninterrupted: {stage} stopped at {where}; checkpoint written. Continue with:\n"
          f"    python cagsr.py --resume {run_dir}")
    return 130


def sft_stage(run, s: Setup, device, run_dir, log, stop) -> int | None:
    """SFT (§7.2) with its checkpoints; then five held-out answers and the held-out exact-match.
    Returns 130 when Ctrl-C stopped it, else None."""
    rank, world = parallel.rank_and_world()
    cfg, resume = run.sft, s.resume
    val_pairs = _encode(run, s.tok, s.splits.val, s.model.cfg)
    print(f"SFT: {cfg.steps} steps x {cfg.batch_size} pairs, peak lr {cfg.lr}")
    probe_set = s.splits.val[:200]           # exact-match on a fixed validation subset: the SFT curve in the README

    def checkpoint(step, opt, complete=False):
        if rank == 0:
            runs.save_checkpoint(run_dir / "sft.pt", s.model, s.tok, s.idf, size=run.size, dataset=run.dataset,
                                 stage="sft", optimizer=opt.state_dict(), step=step, steps=cfg.steps, complete=complete,
                                 args=run.args, rng=runs.rng_state(), log_rows=log.rows, world=world)

    t0 = time.time()
    with runs.autocast(device, run.precision):
        result = train_sft(s.model, s.sft_pairs, val_pairs, cfg, device, specials=s.specials, seed=run.seed, log=log,
                           probe=lambda m: dict(val_exact_match=greedy_scores(m, s.tok, probe_set, device)[1]),
                           resume=resume, on_checkpoint=checkpoint, stop=stop, compile=run.compile)
    sft_seconds = time.time() - t0
    parallel.check_replicas(s.model, "SFT")
    if result["stopped"]:
        return interrupted(run_dir, "SFT", f"step {result['steps']} of {cfg.steps}")
    checkpoint(result["steps"], result["optimizer"], complete=True)
    if rank == 0:
        test = s.splits.test[:run.num_eval]
        preds, em, _ = greedy_scores(s.model, s.tok, test, device)
        print("\nSample answers on held-out test prompts (greedy):")
        for r, p in list(zip(test, preds))[:5]:
            print(f"  prompt:    {r['prompt']}\n  model:     {p}\n  reference: {r['response']}\n")
        log(dict(stage="sft_eval", exact_match=em, num_eval=len(test), sft_seconds=round(sft_seconds, 1),
                 sft_noise=run.sft_noise, corrupted=s.corrupted))
        print(f"after SFT: held-out exact-match {em:.1%} of {len(test)} test prompts | SFT took {sft_seconds:.0f}s")
    return None


def rl_models(model, cfg, resume, device):
    """The frozen SFT policy (for the KL penalty and the metrics) and Adam (§7.2), new or resumed."""
    ref_model = runs.policy_from_state(resume["ref_model"] if resume else model.state_dict(), model.cfg, device,
                                       frozen=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, **runs.fused(device))
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
    return ref_model, optimizer


def rl_reward(run, s: Setup, sft_policy, device):
    """ppo.train's reward_fn for --reward (baselines.make_reward; None: the attention reward). The
    hybrid's preference reward model is fitted here first, on samples of the SFT policy (§7.3)."""
    rm = None
    if run.reward_name == "hybrid":
        h = run.hybrid
        rm, rm_stats = baselines.train_bt_rm(sft_policy, s.tok, s.splits.train, run.ppo, device,
                                             num_prompts=h["human_prompts"], steps=h["rm_steps"], seed=run.seed)
        print(f"hybrid reward: attention + {h['weight']} x a Bradley-Terry reward model on {rm_stats['pairs']} "
              f"simulated preference pairs (not self-supervised)")
        rm = rm.eval().requires_grad_(False)
    return baselines.make_reward(run.reward_name, tok=s.tok, records=s.splits.train, seed=run.seed,
                                 correct=evaluation.correctness(run.dataset), rm=rm, hybrid_weight=run.hybrid.get("weight", 1.0))


def rl_stage(run, s: Setup, device, run_dir, log, stop) -> int | None:
    """CAGSR (§4, §5): the RL loop with the fixed-set evaluation every run.eval_every iterations,
    checkpoints, and the before/after report. Returns 130 when Ctrl-C stopped it, else None."""
    cfg, reward_cfg, model = run.ppo, run.reward, s.model
    settings.print_rl_settings(cfg, reward_cfg, run.iterations, run.reward_name)
    resume = s.resume if s.resume is not None and s.resume["stage"] == "rl" else None
    rank, world = parallel.rank_and_world()
    salient = SalientTokens.from_idf(s.tok, s.idf)
    ref_model, optimizer = rl_models(model, cfg, resume, device)
    reward_fn, correct = rl_reward(run, s, ref_model, device), evaluation.correctness(run.dataset)
    eval_set, test = s.splits.val[:run.eval_prompts], s.splits.test[:run.num_eval]
    state = {**resume["train_state"], "iteration": resume["iteration"]} if resume and resume["train_state"] else None
    last = dict(iteration=resume["iteration"] if resume else 0, state=state)
    report = dict(before=resume["before"], shown_before=resume["shown_before"]) if resume else {}

    def checkpoint(iteration, state):
        if rank == 0:                                 # rank 0 writes; every rank holds the same weights
            runs.save_checkpoint(run_dir / "rl.pt", model, s.tok, s.idf, size=run.size, dataset=run.dataset, stage="rl",
                                 optimizer=optimizer.state_dict(), ref_model=ref_model.state_dict(), iteration=iteration,
                                 iterations=run.iterations, ppo_config=asdict(cfg), reward_config=asdict(reward_cfg),
                                 kl_coef=state["kl_coef"] if state else cfg.kl_coef, train_state=state, **report,
                                 args=run.args, rng=runs.rng_state(), log_rows=log.rows, world=world)

    def fixed_eval(iteration):
        row = dict(stage="rl_eval", iteration=iteration,
                   **evaluate_policy(model, s.tok, eval_set, salient, reward_cfg, cfg, device, correct=correct))
        log(row)
        tqdm.write(f"iter {iteration:4d} | fixed-set reward {row['reward']:+.4f} (cov {row['coverage']:.3f} "
                   f"focus {row['focus']:+.3f} rep {row['repeat']:.3f}) | sink {row['sink_share']:.3f} | "
                   f"EM {row['exact_match']:.1%} | ROUGE-L {row['rouge_l']:.3f} | sampled T {cfg.temperature}: "
                   f"correct {row['sampled_correct']:.1%}, pass@{cfg.num_samples} {row['pass_at_n']:.1%}")

    def on_iteration(i, row, state):
        log(row)
        last.update(iteration=i, state=state)
        if rank == 0 and (i % run.eval_every == 0 or i == run.iterations):
            fixed_eval(i)
        if i % run.ckpt_every == 0:
            checkpoint(i, state)

    print(f"\nRL: {run.iterations} iterations x {cfg.prompts_per_iter} prompts x {cfg.num_samples} candidates "
          f"({cfg.algo}, baseline {cfg.baseline}); fixed evaluation set: {len(eval_set)} validation prompts")
    if resume:
        print(f"resuming RL after iteration {last['iteration']} of {run.iterations}")
    elif rank == 0:                                   # evaluation is rank 0's; the others go on to the rollouts
        report = dict(before=evaluate_policy(model, s.tok, test, salient, reward_cfg, cfg, device, correct=correct),
                      shown_before=candidates(model, s.tok, [r["prompt"] for r in test[:3]], salient, reward_cfg, cfg,
                                              device, num_samples=2))
        fixed_eval(0)
    t0 = time.time()
    with runs.progress(total=run.iterations, initial=last["iteration"], desc="RL", unit="iter") as bar:
        ppo.train(model, ref_model, optimizer, [p for p, _ in s.train_pairs], salient, reward_cfg, cfg, run.iterations,
                  specials=s.specials, seed=run.seed, resume=state, on_iteration=on_iteration, stop=stop, progress=bar,
                  compile=run.compile, reward_fn=reward_fn)
    rl_seconds = time.time() - t0
    parallel.check_replicas(model, "RL")
    checkpoint(last["iteration"], last["state"])
    if last["iteration"] < run.iterations:            # stopped by Ctrl-C
        return interrupted(run_dir, "RL", f"iteration {last['iteration']}")
    if rank == 0:
        rl_summary(run, s, report, salient, test, eval_set, rl_seconds, run_dir, log, device)
    return None


def rl_summary(run, s: Setup, report, salient, test, eval_set, rl_seconds, run_dir, log, device) -> None:
    """After RL: the test prompts scored again, the before/after report, the summary row."""
    correctness = evaluation.correctness_of(run.dataset)
    after = evaluate_policy(s.model, s.tok, test, salient, run.reward, run.ppo, device,
                            correct=evaluation.correctness(run.dataset))
    shown_after = candidates(s.model, s.tok, [r["prompt"] for r in test[:3]], salient, run.reward, run.ppo, device,
                             num_samples=2)
    print_report(report["before"], after, report["shown_before"], shown_after, len(test), run.ppo.num_samples,
                 correctness)
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = next(r for r in logged if r["stage"] == "rl_eval"), logged[-1]
    print(f"fixed validation set ({len(eval_set)} prompts): reward {first['reward']:+.4f} -> {last['reward']:+.4f}")
    skipped = sum(r.get("skipped", 0) for r in logged if r["stage"] == "rl")
    log(dict(stage="rl_summary", iterations=run.iterations, rl_seconds=round(rl_seconds, 1), skipped_updates=skipped,
             reward_name=run.reward_name, temperature=run.ppo.temperature, sft_noise=run.sft_noise,
             correctness=correctness, num_samples=run.ppo.num_samples,
             **{f"before_{k}": report["before"][k] for k in REPORT_KEYS}, **{f"after_{k}": after[k] for k in REPORT_KEYS}))


def train(run, s: Setup, device, t_start: float) -> int:
    """--stage all|sft|rl: the run directory and metrics log, then SFT and/or RL under Ctrl-C handling."""
    rank = parallel.rank_and_world()[0]
    if rank == 0:
        run_dir = runs.make_run_dir(run.out, run.overwrite, run.size, run.dataset)
        if run.resume_from is None:
            runs.write_text(run_dir / "args.json", json.dumps(run.args, indent=2))
        log = runs.MetricsLog(run_dir / "metrics.jsonl", keep=s.resume["log_rows"] if s.resume else 0)
    else:                                           # under torchrun only rank 0 writes the run directory
        run_dir, log = None, runs.MetricsLog(None)
    if s.resume is not None:
        runs.set_rng_state(s.resume["rng"])
    code = None
    with runs.StopFlag() as stop:                   # Ctrl-C from here on: checkpoint, then exit 130
        if run.stage in ("all", "sft") and not (s.resume and s.resume["stage"] == "rl"):
            code = sft_stage(run, s, device, run_dir, log, stop)
        if code is None and run.stage in ("all", "rl"):
            with runs.autocast(device, run.precision):
                code = rl_stage(run, s, device, run_dir, log, stop)
    if code is None:
        total = time.time() - t_start
        log(dict(stage="done", total_seconds=round(total, 1)))
        print(f"\ndone in {total / 60:.1f} min | run directory {run_dir}")
    log.close()
    return code or 0


def sample_stage(run, device) -> int:
    """--stage sample: N candidates per --prompt with their reward terms."""
    model, tok, ckpt = runs.load_init(run.init, device, "--init", run.model_overrides)
    idf = ckpt["idf"]
    if idf is None:
        idf = snapshot_idf(run, [p for p, _ in _encode(run, tok, _splits(run).train, model.cfg)], model.cfg.vocab_size)
    salient = SalientTokens.from_idf(tok, idf)
    for prompt in run.prompts:
        n = len(data.encode(tok, prompt))
        if n > model.cfg.max_src_len:
            raise SystemExit(f"--prompt is {n} tokens, over this model's max_src_len={model.cfg.max_src_len}")
    for prompt, rows in candidates(model, tok, run.prompts, salient, run.reward, run.ppo, device, run.ppo.num_samples,
                                   seed=run.seed):
        print(f"prompt: {prompt}")
        for text, t in rows:
            print(f"  {format_candidate(text, t)}")
    return 0


def eval_stage(run, s: Setup, device) -> int:
    """--stage eval: the fixed evaluation set and the test prompts, scored (`evaluate_policy`)."""
    salient = SalientTokens.from_idf(s.tok, s.idf)
    for name, recs in (("fixed validation set", s.splits.val[:run.eval_prompts]), ("test", s.splits.test[:run.num_eval])):
        res = evaluate_policy(s.model, s.tok, recs, salient, run.reward, run.ppo, device, correct=evaluation.correctness(run.dataset))
        print(f"{name} ({len(recs)} prompts): " + " | ".join(f"{k} {v:.4f}" for k, v in res.items()))
    return 0


def main(argv=None) -> int:
    t_start = time.time()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    command, resume_from = " ".join(["python cagsr.py", *map(shlex.quote, argv)]), None
    if args.resume is not None:
        args, command, resume_from = settings.resumed(vars(parser.parse_args([])), args, command)
    run = settings.resolve(args, command, resume_from)
    rank, world, dp_device = parallel.init(run.device, settings.single_process(run))
    try:
        return dispatch(run, dp_device, world, t_start)
    finally:
        parallel.close()


def dispatch(run, device, world: int, t_start: float) -> int:
    """The stage `run` names, after the checks that need the device and the number of processes.
    device: torchrun's for this rank, else None (chosen here)."""
    if run.stage == "dry-run":
        settings.print_plan(run)
        return 0
    device = device or runs.pick_device(run.device)
    settings.check_device(run, device, world)
    if run.resume is not None and settings.resume_complete(run):
        print(f"--resume {run.resume}: this run is complete (its metrics.jsonl ends with the 'done' row); nothing was "
              f"changed. For more RL, start a new run: --stage rl --init {run.resume}/rl.pt")
        return 0
    if run.stage == "experiment":
        return (reward_study.run_rewards if run.experiment.name == "rewards" else experiments.run_table1)(run, device)
    if run.stage == "sample":
        runs.seed_everything(run.seed)
        return sample_stage(run, device)
    setup = prepare(run, device)
    return eval_stage(run, setup, device) if run.stage == "eval" else train(run, setup, device, t_start)

if __name__ == "__main__":
    try:
        sys.exit(main())
    except runs.UsageError as e:                       # refused before any work: argparse's status for usage
        print(f"cagsr.py: error: {e}", file=sys.stderr)
        sys.exit(2)
