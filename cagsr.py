"""CAGSR from the command line (§5, Figure 1): data -> tokenizer -> SFT (the initial policy, §7.2)
-> RL with the cross-attention reward (§3.2) and PPO (§4).

    python cagsr.py                                   # the main job: SFT then CAGSR, on a CPU
    python cagsr.py --stage rl --init runs/X/sft.pt   # RL from a saved SFT model
    python cagsr.py --stage sample --init runs/X/rl.pt --prompt "Where does Varo Kelin live?"
    python cagsr.py --stage eval --init runs/X/rl.pt  # python cagsr.py --help lists every flag
    python cagsr.py --init ~/snapshots/flan-t5-base   # SFT then CAGSR from a pretrained T5 snapshot

The command line only: the parser and `main` (parse, resolve and check the configs in
cli/settings.py, then dispatch to a stage of cli/stages.py or an experiment's runner); the method is
model.py, reward.py, ppo.py, sft.py; plumbing cli/runs.py.
"""

from __future__ import annotations

import argparse
import difflib
import shlex
import sys
import time

import data
import parallel
import ppo
from cli import runs, settings, stages
from decoder import ARCHS
from experiments import ablations, baselines, pretrained_study, rank, reward_tables, table1
from presets import DECODER_SIZES, RL_PROFILES, SFT_DEFAULTS, SFT_NOISE, SIZES
from reward import RewardConfig

# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, but an unknown flag is answered with the nearest valid one and the list of them
    all; any other error (a bad value, a missing argument) with argparse's message alone."""

    def error(self, message):
        if not message.startswith("unrecognized arguments:"):
            self.exit(2, f"{self.prog}: error: {message}\n")
        valid = sorted(o for a in self._actions for o in a.option_strings if o.startswith("--"))
        unknown = [
            w.split("=")[0]
            for w in message.split()[2:]
            if w.startswith("--") and w.split("=")[0] not in valid
        ]
        near = [
            f"did you mean {m[0]} (not {w})?\n"
            for w in unknown
            if (m := difflib.get_close_matches(w, valid, 1))
        ]
        self.exit(
            2, f"{self.prog}: error: {message}\n{''.join(near)}valid flags: {' '.join(valid)}\n"
        )


SPLIT_HELP = "rank: the held-out split of its prompts; val to choose a setting (default: test)"


def sft_default(field: str) -> str:
    return settings.per_size({size: d[field] for size, d in SFT_DEFAULTS.items()})


def build_parser() -> Parser:
    p = Parser(
        description="CAGSR (arXiv 2502.10482): SFT, then RL with a reward from the model's own "
        "cross-attention. Defaults that depend on the preset are given per size."
    )
    g = p.add_argument_group("run")
    g.add_argument(
        "--size",
        default=None,
        help=f"model preset: {', '.join(SIZES)} (default: tiny, or the --init checkpoint's)",
    )
    g.add_argument(
        "--arch",
        default=None,
        choices=ARCHS,
        help="the policy: encoder-decoder (the paper's §7.2 model, model.py) or decoder "
        "(decoder-only, §3.1's other configuration, decoder.py; sizes "
        f"{', '.join(DECODER_SIZES)}) (default: encoder-decoder, or what --init holds)",
    )
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override one ModelConfig field of the preset (repeatable); printed at start",
    )
    g.add_argument(
        "--last-layers",
        type=int,
        default=None,
        help="L' of §3.2: decoder layers whose cross-attention is recorded (preset: 1)",
    )
    g.add_argument(
        "--dataset",
        default=None,
        help=f"one of {', '.join(data.DATASETS)}, or a PATH.jsonl with prompt/response fields "
        "(default: qa-grounded, or the --init checkpoint's; instruct for --experiment)",
    )
    g.add_argument(
        "--stage",
        default="all",
        choices=["all", "sft", "rl", "sample", "eval", "export"],
        help="all = SFT then RL; rl/sample/eval start from --init; export writes --init as a "
        "Hugging Face directory --out that transformers loads (T5, Llama, Qwen2 layouts) "
        "(default: all)",
    )
    g.add_argument(
        "--init",
        default=None,
        metavar="CKPT|DIR",
        help="a checkpoint to start the stage from, or a local Hugging Face snapshot directory "
        "(config.json, weights, tokenizer.json; size 'pretrained'): T5 or mT5 "
        "(the encoder-decoder), or Llama or Qwen2 (decoder-only); the snapshot's model_type "
        "sets --arch",
    )
    g.add_argument(
        "--prompt", action="append", default=[], help="prompt(s) for --stage sample (repeatable)"
    )
    g.add_argument(
        "--chat-template",
        default="auto",
        metavar="auto|none|FILE",
        help="the chat template every prompt goes through, with the generation prompt appended: "
        "auto = the --init model's own (a snapshot's or GGUF file's, a checkpoint's stored one) "
        "when it has one; none = raw prompts ending in EOS; FILE = that Jinja template "
        "(default: auto)",
    )
    g.add_argument(
        "--system",
        default=None,
        metavar="TEXT",
        help="the system turn of the chat template (default: the template's own)",
    )
    g.add_argument(
        "--truncate",
        action="store_true",
        help="truncate over-long prompts/responses (with a warning) instead of failing",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for data, initialisation and sampling (default: 0)",
    )
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    g.add_argument(
        "--out", default=None, help="run directory (default: a new runs/<time>-<size>-<dataset>)"
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="allow --out to name a non-empty directory; with --experiment, allow replacing "
        "the tables already in --results-dir",
    )
    g.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint, "
        "with its own settings (args.json)",
    )
    g.add_argument(
        "--precision",
        default=None,
        choices=["fp32", "bf16"],
        help="bf16 autocast (float32 weights and optimizer) or plain fp32 "
        "(default: bf16 on CUDA, else fp32)",
    )
    g.add_argument(
        "--grad-checkpoint",
        action="store_true",
        help="recompute each layer's activations in the backward pass "
        "(less memory, ~1/3 more compute)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training forward passes (SFT, PPO update); the sampler stays eager",
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory plan of the chosen size (parameters, weights, gradients, optimizer, "
        "reference policy, activations of one SFT batch) and exit",
    )
    g = p.add_argument_group("SFT (§7.2)")
    g.add_argument(
        "--sft-steps",
        type=int,
        default=None,
        help=f"SFT optimizer steps (default: {sft_default('steps')})",
    )
    g.add_argument(
        "--sft-batch-size",
        type=int,
        default=None,
        help=f"SFT batch size in pairs (default: {sft_default('batch_size')})",
    )
    g.add_argument(
        "--sft-lr",
        type=float,
        default=None,
        help=f"SFT peak learning rate, AdamW (default: {sft_default('lr')})",
    )
    g.add_argument(
        "--sft-noise",
        type=float,
        default=None,
        metavar="P",
        help="replace a seeded share P of the SFT training responses with plausible wrong ones "
        "(qa-grounded: the distractor's answer; instruct: another instruction's response; a JSONL: "
        "each record's 'wrong' field), so RL has good and bad behaviours to choose between; "
        "evaluation and the oracle keep the clean references (default: "
        f"{', '.join(f'{v} on {k}' for k, v in SFT_NOISE.items())} when SFT starts from "
        "scratch, else 0)",
    )
    g.add_argument(
        "--warmup",
        type=int,
        default=100,
        help="SFT linear warm-up steps, then cosine decay to lr/10 (default: 100)",
    )
    g.add_argument(
        "--sft-eval-every",
        type=int,
        default=250,
        help="SFT validation and checkpoint every this many steps (default: 250)",
    )
    g.add_argument(
        "--num-eval",
        type=int,
        default=None,
        help="held-out test prompts scored (default: 500 before and after RL; 300 per table row)",
    )
    g = p.add_argument_group("RL (§4, §5)")
    g.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="RL iterations (default: "
        f"{settings.per_size({k: v['iterations'] for k, v in RL_PROFILES['run'].items()})}; "
        "table1: "
        f"{settings.per_size({k: v['iterations'] for k, v in RL_PROFILES['table1'].items()})})",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        default=10,
        help="score the fixed evaluation set every this many iterations (default: 10)",
    )
    g.add_argument(
        "--eval-prompts",
        type=int,
        default=64,
        help="size of the fixed evaluation set, in validation prompts (default: 64)",
    )
    g.add_argument(
        "--ckpt-every",
        type=int,
        default=50,
        help="RL checkpoint every this many iterations (default: 50)",
    )
    g.add_argument(
        "--reward",
        default="attention",
        choices=baselines.REWARD_NAMES,
        help="the RL reward: attention (§3.2, the paper's), the rival internal rewards "
        "self-certainty, neg-entropy, logprob, the controls random and oracle (the task's "
        "correctness against the reference), or hybrid (attention + --hybrid-weight x a "
        "preference reward model trained with --rm-steps on --human-prompts; not "
        "self-supervised) (default: attention)",
    )
    settings.add_config_flags(g, ppo.PPOConfig, RL_PROFILES["run"])
    settings.add_config_flags(p.add_argument_group("reward (§3.2)"), RewardConfig)
    g = p.add_argument_group(
        "experiments (§7.3-§7.6; experiments/table1.py, reward_study.py, rank.py)"
    )
    g.add_argument(
        "--experiment",
        default=None,
        choices=["table1", "rewards", "rank", "ablations"],
        help="table1: Table 1's baselines, CAGSR variants and ablations per seed (default "
        "dataset instruct; work directory --out, default runs/table1-<dataset>-<size>). rewards: "
        "the attention reward against self-certainty, entropy, log-probability, random, oracle "
        "and the hybrid, measured against correctness (experiments/reward_study.py; work "
        "directory runs/rewards-<dataset>-<size>; from --init MODEL: the pretrained model's own "
        "study). rank: which signal ranks a policy's correct candidates first, no training "
        "(experiments/rank.py; needs --init). ablations: R's terms, the paper's guards and an "
        "oracle salient set as rows of the rewards study (experiments/ablations.py)",
    )
    g.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="table1, rewards: seeds --seed, --seed+1, ... (one SFT model each; default: 3); "
        "rank: sampling seeds",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="table1, rewards: seeds computed at once, each in its own process, sharing the "
        "CPU's threads (default: 1; on 2 cores, --workers 3 runs 3 seeds together)",
    )
    g.add_argument(
        "--results-dir",
        default=None,
        help="table1, rewards, rank: where the .md, .json and .png tables go (default: results)",
    )
    g.add_argument("--split", default=None, choices=["test", "val"], help=SPLIT_HELP)
    g.add_argument(
        "--rm-steps",
        type=int,
        default=None,
        help="table1, rewards, --reward hybrid: training steps of each baseline reward model "
        "(default: 300)",
    )
    g.add_argument(
        "--hybrid-weight",
        type=float,
        default=None,
        help="rewards, --reward hybrid: weight of the preference reward model in the hybrid "
        "reward (default: 1.0)",
    )
    g.add_argument(
        "--human-prompts",
        type=int,
        default=None,
        help="table1, rewards, --reward hybrid: training prompts the simulated annotators "
        "compare two SFT samples on (§7.3; default: 1000)",
    )
    g.add_argument(
        "--relevance-steps",
        type=int,
        default=None,
        help="table1, rewards: training steps of the relevance classifier (default: 600)",
    )
    return p


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
        print(
            f"--resume {run.resume}: this run is complete (its metrics.jsonl ends with the "
            "'done' row); nothing was changed. For more RL, start a new run: --stage rl "
            f"--init {run.resume}/rl.pt"
        )
        return 0
    if run.stage == "experiment":
        rewards = pretrained_study if run.init is not None else reward_tables
        runner = dict(rewards=rewards.run_rewards, rank=rank.run_rank, table1=table1.run_table1)
        return runner.get(run.experiment.name, ablations.run_ablations)(run, device)
    if run.stage == "export":
        return stages.export_stage(run)
    if run.stage == "sample":
        runs.seed_everything(run.seed)
        return stages.sample_stage(run, device)
    setup = stages.prepare(run, device)
    return (
        stages.eval_stage(run, setup, device)
        if run.stage == "eval"
        else stages.train_stages(run, setup, device, t_start)
    )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except runs.UsageError as e:  # refused before any work: argparse's status for usage
        print(f"cagsr.py: error: {e}", file=sys.stderr)
        sys.exit(2)
