"""CAGSR from the command line (§5, Figure 1): data -> tokenizer -> SFT (the initial policy, §7.2)
-> RL with the cross-attention reward (§3.2) and PPO (§4).

    python cagsr.py                                   # the main job: SFT then CAGSR, on a CPU
    python cagsr.py --stage rl --init runs/X/sft.pt   # RL from a saved SFT model
    python cagsr.py --stage sample --init runs/X/rl.pt --prompt "Where does Varo Kelin live?"
    python cagsr.py --stage eval --init runs/X/rl.pt
    python cagsr.py --help

A training run writes a new run directory (runs/<time>-<size>-<dataset>/ unless --out is given)
with its arguments, a JSONL metrics log and checkpoints that hold the weights together with the
optimizer, RNG states, step, configs, tokenizer and IDF table.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import os
import random
import shlex
import signal
import sys
import textwrap
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import data
import ppo
from evaluation import exact_match, mean_nll, rouge_l
from model import SIZES, EncoderDecoder, ModelConfig, config_for
from reward import RewardConfig, SalientTokens

# Training defaults per size, next to the model sizes they go with. The SFT budget of `tiny` is
# a deliberate trade-off (README, "The SFT stage"): enough steps for most held-out answers to be
# right on a 2-core CPU, leaving room for RL inside the main job's 10 minutes.
SFT_DEFAULTS = {
    "tiny": dict(sft_steps=1200, sft_batch_size=64, sft_lr=2e-3),
    "small": dict(sft_steps=3000, sft_batch_size=64, sft_lr=1e-3),
    "base": dict(sft_steps=10000, sft_batch_size=64, sft_lr=5e-4),
    "1.3b": dict(sft_steps=20000, sft_batch_size=64, sft_lr=1e-4),
}

# RL defaults per size. The GPU presets keep the paper's setting (§7.2: 64 prompts, N = 4,
# Adam lr 1e-5, eps 0.2, no KL penalty = PPOConfig's defaults). The CPU presets have their own,
# chosen by measurement (README, "The RL stage"): at lr 1e-5 nothing moves in the few dozen
# iterations a CPU affords. Every run prints its values next to the paper's.
CPU_PPO = dict(lr=1e-4, baseline="group", whiten=True, kl_coef=0.1, epochs=4, minibatches=4)
RL_DEFAULTS = {
    "tiny": dict(iterations=40, ppo=CPU_PPO),
    "small": dict(iterations=40, ppo=CPU_PPO),
    "base": dict(iterations=500, ppo={}),
    "1.3b": dict(iterations=500, ppo={}),
}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse, but an unknown flag is answered with the list of the valid ones."""

    def error(self, message):
        valid = sorted(o for a in self._actions for o in a.option_strings if o.startswith("--"))
        self.exit(2, f"{self.prog}: error: {message}\nvalid flags: {' '.join(valid)}\n")


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a config dataclass: the help text of its flag."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def _optional(kind):
    def parse(text):
        return None if text.lower() in ("none", "off") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def add_config_flags(group, cls, skip=()):
    """One flag per field of the dataclass `cls` (--clip-eps for clip_eps), default None = "the run's
    default", so a run can print which values the user set."""
    docs = field_docs(cls)
    kinds = {"int": int, "float": float, "str": str, "int | None": _optional(int), "float | None": _optional(float)}
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{docs.get(f.name, '')} (paper/default: {f.default})".replace("%", "%%")
        if f.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            group.add_argument(flag, type=kinds[f.type], default=None, metavar=f.name.upper(), help=help_)


def parse_overrides(items: list[str]) -> dict:
    """`--set d_model=64 --set last_layers=2` -> {"d_model": 64, "last_layers": 2}, typed by ModelConfig."""
    types = {f.name: f.type for f in fields(ModelConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        if key not in types:
            raise SystemExit(f"--set: unknown ModelConfig field {key!r}; valid fields: {', '.join(sorted(types))}")
        try:
            out[key] = float(value) if types[key] in (float, "float") else int(value)
        except ValueError:
            raise SystemExit(f"--set {key}: {value!r} is not a number") from None
    return out


def build_parser() -> Parser:
    p = Parser(description="CAGSR (arXiv 2502.10482): SFT, then RL with a reward from the model's own "
                           "cross-attention.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--size", default=None, help=f"model preset: {', '.join(SIZES)} (default: tiny, or the --init checkpoint's)")
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one ModelConfig field of the preset (repeatable); printed at start")
    g.add_argument("--last-layers", type=int, default=None,
                   help="L' of §3.2: decoder layers whose cross-attention is recorded (preset: 1)")
    g.add_argument("--dataset", default=None,
                   help=f"one of {', '.join(data.DATASETS)}, or a PATH.jsonl with prompt/response fields "
                        "(default: qa, or the --init checkpoint's)")
    g.add_argument("--stage", default="all", choices=["all", "sft", "rl", "sample", "eval"],
                   help="all = SFT then RL; rl/sample/eval start from --init")
    g.add_argument("--init", default=None, metavar="CKPT", help="checkpoint to start the stage from")
    g.add_argument("--prompt", action="append", default=[], help="prompt(s) for --stage sample (repeatable)")
    g.add_argument("--truncate", action="store_true",
                   help="truncate over-long prompts/responses (with a warning) instead of failing")
    g.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and sampling")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    g.add_argument("--out", default=None, help="run directory (default: a new runs/<time>-<size>-<dataset>)")
    g.add_argument("--overwrite", action="store_true", help="allow --out to name a non-empty directory")
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
    g.add_argument("--sft-steps", type=int, default=None, help="SFT optimizer steps (default: per size)")
    g.add_argument("--sft-batch-size", type=int, default=None, help="SFT batch size in pairs (default: per size)")
    g.add_argument("--sft-lr", type=float, default=None, help="SFT peak learning rate, AdamW (default: per size)")
    g.add_argument("--warmup", type=int, default=100, help="SFT linear warm-up steps, then cosine decay to lr/10")
    g.add_argument("--sft-eval-every", type=int, default=250, help="SFT validation every this many steps")
    g.add_argument("--num-eval", type=int, default=None,
                   help="held-out test prompts scored (default: 500 before and after RL; 300 per table row)")
    g = p.add_argument_group("RL (§4, §5)")
    g.add_argument("--iterations", type=int, default=None, help="RL iterations (default: per size)")
    g.add_argument("--eval-every", type=int, default=10, help="score the fixed evaluation set every this many iterations")
    g.add_argument("--eval-prompts", type=int, default=64, help="size of the fixed evaluation set (validation prompts)")
    g.add_argument("--ckpt-every", type=int, default=50,
                   help="RL checkpoint every this many iterations (SFT writes one at every --sft-eval-every)")
    add_config_flags(g, ppo.PPOConfig)
    add_config_flags(p.add_argument_group("reward (§3.2)"), RewardConfig)
    g = p.add_argument_group("experiments (§7.3-§7.6; experiments.py)")
    g.add_argument("--experiment", default=None, choices=["table1"],
                   help="table1: every baseline, CAGSR variant and ablation of Table 1 per seed, into --results-dir "
                        "(default dataset instruct; --out sets the work directory, default runs/table1-<dataset>-<size>)")
    g.add_argument("--seeds", type=int, default=3, help="table1: seeds --seed, --seed+1, ... (one SFT model each)")
    g.add_argument("--results-dir", default="results", help="table1: where the .md, .json and .png tables go")
    g.add_argument("--rm-steps", type=int, default=300, help="table1: training steps of each baseline reward model")
    g.add_argument("--human-prompts", type=int, default=1000,
                   help="table1: training prompts the simulated annotators compare two SFT samples on (§7.3: 1,000)")
    g.add_argument("--relevance-steps", type=int, default=600, help="table1: training steps of the relevance classifier")
    return p


def pick_device(requested: str | None = None) -> torch.device:
    """cuda, then mps, then cpu; an explicit request that this machine cannot serve is an error."""
    if requested is not None:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"--device {requested}: CUDA is not available on this machine")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise SystemExit("--device mps: MPS is not available on this machine")
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# Presets meant for a GPU: on a CPU they would run for days, so they start there only on request.
GPU_SIZES = ("base", "1.3b")


def print_plan(size: str, batch: int | None = None) -> None:
    """The memory plan of the preset `size` (model.memory_plan) for one SFT batch (default: the
    size's SFT batch) at the preset's longest lengths."""
    from model import memory_plan
    cfg = config_for(size)
    batch = batch or SFT_DEFAULTS[size]["sft_batch_size"]
    plan = memory_plan(cfg, batch, cfg.max_src_len, cfg.max_tgt_len, act_bytes=2)
    gib = lambda b: f"{b / 2**30:8.2f} GiB"
    print(f"plan for --size {size}: {plan['parameters']:,} parameters")
    for k in ("weights", "gradients", "optimizer", "reference_policy", "activations", "total"):
        note = {"optimizer": " (Adam: two float32 moments)", "reference_policy": " (frozen SFT policy for the KL, RL only)",
                "activations": f" (estimate: one SFT batch of {batch} x ({cfg.max_src_len} + {cfg.max_tgt_len}) tokens, "
                               f"bf16; the longest the preset allows, so an upper bound for the bundled data)"
                }.get(k, "")
        print(f"  {k:17s} {gib(plan[k])}{note}")


def fused(device) -> dict:
    """The fused (one-kernel) Adam/AdamW step on CUDA; the default elsewhere."""
    return dict(fused=True) if torch.device(device).type == "cuda" else {}


def init_distributed(args) -> tuple[int, int, torch.device | None]:
    """Data parallelism under `torchrun --nproc_per_node K cagsr.py ...`, which sets WORLD_SIZE, RANK
    and LOCAL_RANK: one process per GPU (NCCL), or K CPU processes (gloo) with --device cpu or no GPU.
    Returns (rank, world, device); (0, 1, None) without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    if args.experiment is not None or args.stage in ("sample", "eval") or args.dry_run:
        what = "--experiment" if args.experiment else "--dry-run" if args.dry_run else f"--stage {args.stage}"
        raise SystemExit(f"{what} runs in one process; run it with python, not torchrun (WORLD_SIZE={world})")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and (args.device is None or args.device.startswith("cuda")):
        if local >= torch.cuda.device_count():
            raise SystemExit(f"torchrun started {world} processes on this node but only {torch.cuda.device_count()} "
                             f"GPU(s) are visible; use --nproc_per_node {torch.cuda.device_count()}")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank()
    if rank > 0:                                      # one voice: rank 0 prints, logs and checkpoints
        sys.stdout = open(os.devnull, "w")
    print(f"data parallel: {world} processes ({backend}), this is rank {rank} on {device}")
    return rank, world, device


def check_replicas(model, stage: str) -> None:
    """After a data-parallel stage: every rank must hold the same weights (ppo.replicas_agree)."""
    rank, world = ppo.rank_and_world()
    if world == 1:
        return
    diff = ppo.replicas_agree(model)
    if diff != 0.0:
        raise RuntimeError(f"after {stage}, the weights differ between ranks (checksum difference {diff:g}): "
                           f"data parallelism is broken; do not use this run")
    print(f"after {stage}: all {world} ranks hold identical weights (per-tensor checksums agree exactly)")


def autocast(device, precision: str | None):
    """bf16 autocast for --precision bf16 (the default on CUDA): matmuls in bf16, weights, optimizer
    state, softmax of the recorded attention, log-probabilities and losses in float32."""
    device = torch.device(device)
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def make_run_dir(args, size: str) -> Path:
    if args.out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = Path(args.dataset).stem if args.dataset.endswith(".jsonl") else args.dataset
        out = Path("runs") / f"{stamp}-{size}-{name}"
        i = 1
        while out.exists():                       # new for every run, even two in the same second
            out = out.with_name(f"{stamp}-{size}-{name}-{i}")
            i += 1
    else:
        out = Path(args.out)
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise SystemExit(f"--out {out} already holds files; choose another directory or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out


def rng_state() -> dict:
    return dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def save_checkpoint(path: Path, **state) -> None:
    """torch.save to a temporary file, flushed to disk, then renamed over `path`: a crash at any
    moment leaves either the old checkpoint or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temporary file, then rename): a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """(model, tokenizer, checkpoint dict) from a file written by `save_checkpoint`."""
    if not Path(path).is_file():
        raise SystemExit(f"--init {path}: no such checkpoint file")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model = EncoderDecoder(ModelConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model, data.tokenizer_from_str(ckpt["tokenizer"]), ckpt


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """metrics.jsonl: one JSON row per line. `rows` counts the lines, so a checkpoint records where
    the log stood and a resumed run first cuts the log back to that line (`keep`), then appends."""

    def __init__(self, path: Path | None, keep: int = 0):
        self.rows = 0
        if path is None:                              # ranks > 0 under torchrun: nothing is written
            self.file = None
            return
        lines = path.read_text().splitlines() if keep and path.exists() else []
        if len(lines) < keep:
            raise SystemExit(f"{path} has {len(lines)} rows but the checkpoint was written after row {keep}: "
                             f"the log does not belong to this checkpoint")
        write_text(path, "".join(line + "\n" for line in lines[:keep]))
        self.file, self.rows = open(path, "a"), keep

    def __call__(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        self.rows += 1

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class StopFlag:
    """Ctrl-C during training. The first SIGINT asks the loop to stop at the end of the current step
    or iteration, write a checkpoint and exit; a second one aborts at once. Calling the flag answers
    "stop now?", the same on every rank under torchrun."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and writing a checkpoint (Ctrl-C again aborts without one)",
              file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return ppo.any_rank(self.requested)


def resume_settings(args) -> tuple[argparse.Namespace, Path | None]:
    """--resume RUN_DIR: the run's own settings from RUN_DIR/args.json (only --device may be given
    beside it) and its last checkpoint, rl.pt before sft.pt (None: the run wrote none yet)."""
    run = Path(args.resume)
    if not (run / "args.json").is_file():
        raise SystemExit(f"--resume {run}: no args.json there; give the directory of a run written by cagsr.py")
    defaults = vars(build_parser().parse_args([]))
    extra = sorted(k for k, v in vars(args).items() if k not in ("resume", "device", "command") and v != defaults[k])
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise SystemExit(f"--resume continues the run with its own settings ({run / 'args.json'}); drop {flags} "
                         f"(only --device may be given), or start a new run")
    saved = json.loads((run / "args.json").read_text())
    new = argparse.Namespace(**{**defaults, **saved})
    new.resume, new.out, new.overwrite = str(run), str(run), True
    new.device = args.device or saved.get("device")
    new.command = saved.get("command", "") + f"  [resumed: {args.command}]"
    for name in ("rl.pt", "sft.pt"):
        if (run / name).is_file():
            return new, run / name
    return new, None


def check_resume(path: Path, ckpt: dict, args, overrides: dict, size: str) -> None:
    """A checkpoint given to --resume must belong to the run: its size, model settings and
    tokenizer (against the run's other checkpoint) must match; and it must carry the resume state."""
    where = f"--resume {args.resume}: {path.name}"
    if "log_rows" not in ckpt:
        raise SystemExit(f"{where} was written by an older cagsr.py without the state needed to resume; "
                         f"start a new run with --init {path}")
    if ckpt.get("size") != size:
        raise SystemExit(f"{where} is a {ckpt.get('size')} checkpoint but the run is --size {size}: "
                         f"the file does not belong to this run")
    for k, v in overrides.items():
        if ckpt["model_config"].get(k) != v:
            raise SystemExit(f"{where} has {k}={ckpt['model_config'].get(k)} but the run set {k}={v}: "
                             f"the file does not belong to this run")
    world = ppo.rank_and_world()[1]
    if ckpt.get("world", 1) != world:
        raise SystemExit(f"{where} was written by a run on {ckpt.get('world', 1)} process(es); resume it on as many "
                         f"(now {world}), since every process's data shard and random stream are in it")
    other = path.with_name("sft.pt") if path.name == "rl.pt" else None
    if other is not None and other.is_file():
        if peek_checkpoint(other)["tokenizer"] != ckpt["tokenizer"]:
            raise SystemExit(f"{where} was written with another tokenizer than {other.name} in the same run "
                             f"directory: the file does not belong to this run")


def peek_checkpoint(path) -> dict:
    """A checkpoint's fields with its tensors memory-mapped, not read: to check its size or
    tokenizer before (or instead of) loading what may be gigabytes of weights."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------
# SFT: cross-entropy fine-tuning, the paper's initial policy (§7.2)
# --------------------------------------------------------------------------------------------

def sft_loss(model, batch) -> torch.Tensor:
    """Mean token cross-entropy of the reference response given the prompt (teacher forcing)."""
    logits, _ = model(batch["src"], batch["src_mask"], batch["tgt_in"])          # (B, T, V)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), batch["tgt_out"].flatten(), reduction="none")
    mask = batch["tgt_mask"].flatten()
    return (nll * mask).sum() / mask.sum()


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to peak/10 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_sft(model, train_pairs, val_pairs, *, steps, batch_size, lr, warmup, eval_every, device, seed,
              log=None, probe=None, compile=False, start=0, opt_state=None, on_checkpoint=None,
              ckpt_every=0, stop=None, max_bad=3) -> dict:
    """AdamW on the SFT loss for `steps` steps. Returns the final optimizer, the loss history, the
    steps done and whether `stop` ended it early.

    Every `eval_every` steps: validation loss, and `probe(model)` (a dict of extra metrics, e.g.
    exact-match on a fixed validation subset) when given. Every `ckpt_every` steps, and when stop()
    turns True (Ctrl-C), on_checkpoint(step, optimizer). A resumed run passes the step it reached as
    `start` and the optimizer's state: the data order and learning rate go on from there. A step
    whose loss or gradient is not finite is skipped (no weight changes; an "sft_skip" row is
    logged), and `max_bad` in a row stop the run with ppo.NonFiniteError.

    Under torchrun each rank trains on its share of every batch through DistributedDataParallel
    and rank 0 alone evaluates and logs. compile: the training forward through torch.compile."""
    rank, world = ppo.rank_and_world()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01, **fused(device))
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    net = ppo.data_parallel(model, device, find_unused_parameters=True)      # V(x) has no part in SFT
    net = torch.compile(net) if compile else net
    model.train()
    history, step, t0, tokens, eval_s, bad, stopped = [], start, time.time(), 0, 0.0, 0, False
    bar = tqdm(total=steps, initial=start, desc="SFT", unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=rank > 0)
    epoch, skip = divmod(start, data.batches_per_epoch(len(train_pairs), batch_size, world))   # resumed: go on there
    while step < steps and not stopped:
        for batch in data.batches(train_pairs, batch_size, seed=seed + epoch, shuffle=True, rank=rank, world=world,
                                  skip=skip):
            if step >= steps:
                break
            batch = to_device(batch, device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr, warmup, steps)
            loss = sft_loss(net, batch)
            opt.zero_grad(set_to_none=True)
            cause = None
            if ppo.all_finite(loss):
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                if torch.isfinite(norm):
                    opt.step()
                else:
                    cause = "gradient"
            else:
                cause = "loss"
            if cause is not None:                           # nothing reached the weights
                opt.zero_grad(set_to_none=True)
                bad += 1
                tqdm.write(f"step {step + 1}: SFT {cause} not finite; step skipped")
                if log is not None and rank == 0:
                    log(dict(stage="sft_skip", step=step + 1, skip_cause=cause))
                if bad >= max_bad:
                    raise ppo.NonFiniteError(f"SFT steps {step + 2 - bad}-{step + 1}: the {cause} was not finite "
                                             f"{bad} times in a row; no weight was changed. Lower --sft-lr, or look "
                                             f"for a bad batch in the data.")
            else:
                bad = 0
            step += 1
            tokens += int(batch["src_mask"].sum() + batch["tgt_mask"].sum())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if rank == 0 and (step % eval_every == 0 or step == steps):
                t_eval = time.time()
                row = dict(stage="sft", step=step, train_loss=loss.item(), lr=lr_at(step - 1, lr, warmup, steps),
                           # training alone, evaluation excluded; all ranks' tokens (equal shares)
                           tokens_per_s=round(tokens * world / (t_eval - t0 - eval_s)),
                           val_loss=mean_nll(model, val_pairs, device))
                row.update(probe(model) if probe is not None else {})
                eval_s += time.time() - t_eval
                row["elapsed_s"] = round(time.time() - t0, 1)
                history.append(row)
                extra = "".join(f" | {k} {v:.3f}" for k, v in row.items() if k.startswith("val_") and k != "val_loss")
                tqdm.write(f"step {step:5d} | train loss {row['train_loss']:.3f} | val loss {row['val_loss']:.3f}{extra} | "
                           f"{row['tokens_per_s']:,} tok/s | {row['elapsed_s']:.0f}s")
                model.train()
                if log is not None:
                    log(row)
            stopped = stop is not None and step < steps and stop()
            if on_checkpoint is not None and step < steps and (stopped or (ckpt_every and step % ckpt_every == 0)):
                on_checkpoint(step, opt)
            if stopped:
                break
        epoch, skip = epoch + 1, 0
    bar.close()
    model.eval()
    return dict(optimizer=opt, history=history, steps=step, stopped=stopped)


def prompt_batch(tok, prompts: list[str], device):
    """Encode and pad prompts: (src (B, S), src_mask (B, S)) on `device`."""
    src, src_mask = data.collate_prompts([data.encode_prompt(tok, p) for p in prompts])
    return src.to(device), src_mask.to(device)


@torch.no_grad()
def answer(model, tok, prompts: list[str], device, max_new_tokens=64, batch_size=128) -> list[str]:
    """Greedy answers to `prompts`, decoded to text."""
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        r = model.sample(*prompt_batch(tok, prompts[i:i + batch_size], device), greedy=True,
                         max_new_tokens=max_new_tokens, record_attention=False)
        out += [data.decode(tok, row.tolist()) for row in r.tokens.cpu()]
    return out


def greedy_scores(model, tok, records, device, max_new_tokens=64) -> tuple[list[str], float, float]:
    """Greedy answers to the records' prompts, their mean exact-match and mean ROUGE-L (§7.4)."""
    preds = answer(model, tok, [r["prompt"] for r in records], device, max_new_tokens=max_new_tokens)
    n = max(1, len(records))
    return (preds, sum(exact_match(p, r["response"]) for p, r in zip(preds, records)) / n,
            sum(rouge_l(p, r["response"]) for p, r in zip(preds, records)) / n)


# --------------------------------------------------------------------------------------------
# Scoring a policy: reward on sampled candidates, correctness of greedy answers
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def sampled_terms(model, tok, records, salient, reward_cfg, ppo_cfg, device, seed=1234, batch_size=64) -> dict:
    """The mean reward and reward terms of N candidates per prompt sampled with a fixed seed, so two
    checkpoints are compared on the same random numbers."""
    gen = torch.Generator(device=device).manual_seed(seed)
    sums, count = {}, 0
    for i in range(0, len(records), batch_size):
        src, src_mask = prompt_batch(tok, [r["prompt"] for r in records[i:i + batch_size]], device)
        _, terms, _, _ = ppo.score(model, src, src_mask, salient, reward_cfg, ppo_cfg, gen)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
        count += len(terms["reward"])
    return {k: v / count for k, v in sums.items()}


def evaluate_policy(model, tok, records, salient, reward_cfg, ppo_cfg, device, seed=1234) -> dict:
    """A fixed evaluation: `sampled_terms`, plus exact-match and ROUGE-L of the greedy answers
    against the references (§7.4)."""
    out = sampled_terms(model, tok, records, salient, reward_cfg, ppo_cfg, device, seed)
    _, out["exact_match"], out["rouge_l"] = greedy_scores(model, tok, records, device, ppo_cfg.max_new_tokens)
    return out


@torch.no_grad()
def candidates(model, tok, prompts, salient, reward_cfg, ppo_cfg, device, num_samples, seed=99) -> list:
    """[(prompt, [(text, terms of that candidate)] * N)] for printing."""
    src, src_mask = prompt_batch(tok, prompts, device)
    r, terms, _, _ = ppo.score(model, src, src_mask, salient, reward_cfg, ppo_cfg,
                               torch.Generator(device=device).manual_seed(seed), num_samples=num_samples)
    rows = [(data.decode(tok, r.tokens[i].tolist()), {k: float(v[i]) for k, v in terms.items()})
            for i in range(r.tokens.size(0))]
    return [(p, rows[b * num_samples:(b + 1) * num_samples]) for b, p in enumerate(prompts)]


def format_candidate(text, t) -> str:
    """One candidate with its reward and the terms R is made of (§3.2)."""
    return (f"R {t['reward']:+.3f} (coverage {t['coverage']:.3f}, focus {t['focus']:+.3f}, repeat {t['repeat']:.3f}) "
            f"| sink {t['sink_share']:.2f} | {text}")


# --------------------------------------------------------------------------------------------
# The RL stage (§4, §5)
# --------------------------------------------------------------------------------------------

def rl_configs(args, size):
    """PPOConfig, RewardConfig and the iteration count: per-size defaults, then the user's flags."""
    defaults = RL_DEFAULTS[size]
    ppo_kw = dict(defaults["ppo"])
    ppo_kw.update({f.name: getattr(args, f.name) for f in fields(ppo.PPOConfig) if getattr(args, f.name) is not None})
    reward_kw = {f.name: getattr(args, f.name) for f in fields(RewardConfig) if getattr(args, f.name) is not None}
    try:
        return (ppo.PPOConfig(**ppo_kw), RewardConfig(**reward_kw),
                args.iterations if args.iterations is not None else defaults["iterations"])
    except ValueError as e:
        raise SystemExit(f"RL settings: {e}") from None


def print_rl_settings(cfg: ppo.PPOConfig, reward_cfg: RewardConfig, iterations: int) -> None:
    paper, paper_reward = ppo.PPOConfig(), RewardConfig()
    print("RL settings (this run | the paper, §7.2; '*' = differs):")
    for obj, ref in ((cfg, paper), (reward_cfg, paper_reward)):
        for f in fields(obj):
            mine, theirs = getattr(obj, f.name), getattr(ref, f.name)
            print(f"  {'*' if mine != theirs else ' '} {f.name:16s} {mine!s:>10} | {theirs}")
    print(f"    iterations       {iterations:>10} | not stated")


def run_rl(args, model, tok, splits, run_dir, log, device, size, resume=None, stop=None) -> dict:
    """The RL stage with its evaluation, checkpoints and summary. resume: an rl.pt checkpoint dict
    (`--resume`) to continue from; stop: the Ctrl-C flag. Returns the summary row, or
    dict(stopped=iteration) when stop() ended it early (a checkpoint is written first)."""
    cfg, reward_cfg, iterations = rl_configs(args, size)
    print_rl_settings(cfg, reward_cfg, iterations)
    try:
        train_prompts = [p for p, _ in data.encode_records(tok, splits.train, model.cfg.max_src_len,
                                                           model.cfg.max_tgt_len, truncate=args.truncate)]
    except ValueError as e:
        raise SystemExit(f"{args.dataset}: {e}") from None
    salient = SalientTokens.build(tok, train_prompts)
    ref_model = EncoderDecoder(model.cfg).to(device)                 # the frozen SFT policy (KL, metrics)
    ref_model.load_state_dict(resume["ref_model"] if resume else model.state_dict())
    ref_model.eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, **fused(device))     # §7.2: Adam
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
    start = resume["iteration"] if resume else 0
    eval_set, test = splits.val[:args.eval_prompts], splits.test[:args.num_eval]
    show = [r["prompt"] for r in test[:3]]
    rank, world = ppo.rank_and_world()
    last = dict(iteration=start, state=resume["train_state"] if resume else None)

    def checkpoint(iteration, state):
        if rank > 0:                                  # rank 0 writes; every rank holds the same weights
            return
        save_checkpoint(run_dir / "rl.pt", model=model.state_dict(), optimizer=optimizer.state_dict(),
                        ref_model=ref_model.state_dict(), model_config=asdict(model.cfg),
                        tokenizer=data.tokenizer_to_str(tok), idf=salient.idf, stage="rl", iteration=iteration,
                        iterations=iterations, ppo_config=asdict(cfg), reward_config=asdict(reward_cfg),
                        kl_coef=state["kl_coef"] if state else cfg.kl_coef, train_state=state, before=before,
                        shown_before=shown_before, size=size, args=vars(args), rng=rng_state(), log_rows=log.rows,
                        world=world)

    def fixed_eval(iteration):
        row = dict(stage="rl_eval", iteration=iteration,
                   **evaluate_policy(model, tok, eval_set, salient, reward_cfg, cfg, device))
        log(row)
        tqdm.write(f"iter {iteration:4d} | fixed-set reward {row['reward']:+.4f} (cov {row['coverage']:.3f} "
                   f"focus {row['focus']:+.3f} rep {row['repeat']:.3f}) | sink {row['sink_share']:.3f} | "
                   f"EM {row['exact_match']:.1%} | ROUGE-L {row['rouge_l']:.3f}")
        return row

    print(f"\nRL: {iterations} iterations x {cfg.prompts_per_iter} prompts x {cfg.num_samples} candidates "
          f"({cfg.algo}, baseline {cfg.baseline}); fixed evaluation set: {len(eval_set)} validation prompts")
    before = shown_before = None
    if resume:
        before, shown_before = resume["before"], resume["shown_before"]
        print(f"resuming RL after iteration {start} of {iterations}")
    elif rank == 0:                                   # evaluation is rank 0's; the others go on to the rollouts
        before = evaluate_policy(model, tok, test, salient, reward_cfg, cfg, device)
        shown_before = candidates(model, tok, show, salient, reward_cfg, cfg, device, num_samples=2)
        fixed_eval(0)

    def on_iteration(i, row, state):
        log(row)
        last.update(iteration=i, state=state)
        if rank == 0 and (i % args.eval_every == 0 or i == iterations):
            fixed_eval(i)
        if i % args.ckpt_every == 0:
            checkpoint(i, state)

    t0 = time.time()
    with tqdm(total=iterations, initial=start, desc="RL", unit="iter", dynamic_ncols=True, mininterval=1.0,
              disable=rank > 0) as bar:
        ppo.train(model, ref_model, optimizer, train_prompts, salient, reward_cfg, cfg, iterations - start,
                  seed=args.seed, start=start, on_iteration=on_iteration, progress=bar, compile=args.compile,
                  resume=resume["train_state"] if resume else None, stop=stop)
    rl_seconds = time.time() - t0
    check_replicas(model, "RL")
    checkpoint(last["iteration"], last["state"])
    if last["iteration"] < iterations:                # stopped by Ctrl-C
        return dict(stopped=last["iteration"])
    if rank > 0:
        return {}
    after = evaluate_policy(model, tok, test, salient, reward_cfg, cfg, device)
    shown_after = candidates(model, tok, show, salient, reward_cfg, cfg, device, num_samples=2)
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = next(r for r in logged if r["stage"] == "rl_eval"), logged[-1]

    print("\nCandidates before -> after RL (2 samples each, fixed seed):")
    for (prompt, b), (_, a) in zip(shown_before, shown_after):
        print(f"  prompt: {prompt}")
        for text, t in b:
            print(f"    before  {format_candidate(text, t)}")
        for text, t in a:
            print(f"    after   {format_candidate(text, t)}")
    keys = ["reward", "coverage", "focus", "repeat", "sink_share", "length", "exact_match", "rouge_l"]
    print(f"\n{'metric':12s} {'before RL':>10s} {'after RL':>10s}   (test split, {len(test)} prompts; reward terms on "
          f"{cfg.num_samples} fixed-seed samples per prompt, EM and ROUGE-L on greedy answers)")
    for k in keys:
        print(f"{k:12s} {before[k]:10.4f} {after[k]:10.4f}")
    print(f"fixed validation set ({len(eval_set)} prompts): reward {first['reward']:+.4f} -> {last['reward']:+.4f}")
    skipped = sum(r.get("skipped", 0) for r in logged if r["stage"] == "rl")
    summary = dict(stage="rl_summary", iterations=iterations, rl_seconds=round(rl_seconds, 1), skipped_updates=skipped,
                   **{f"before_{k}": before[k] for k in keys}, **{f"after_{k}": after[k] for k in keys})
    log(summary)
    return summary


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_sample(args, device) -> int:
    """--stage sample: N candidates per --prompt with their reward terms."""
    model, tok, ckpt = load_checkpoint(args.init, device)
    size = ckpt.get("size") or ckpt["args"].get("size") or "tiny"
    cfg, reward_cfg, _ = rl_configs(args, size)
    if "idf" not in ckpt:
        raise SystemExit(f"--init {args.init}: this checkpoint has no IDF table; it was not written by cagsr.py")
    salient = SalientTokens.from_idf(tok, ckpt["idf"])
    for prompt in args.prompt:
        if not prompt.strip():
            raise SystemExit('--prompt is empty: give the text to answer, e.g. --prompt "Where does Stimdol Mellu live?"')
        n = len(data.encode_prompt(tok, prompt))
        if n > model.cfg.max_src_len:
            raise SystemExit(f"--prompt is {n} tokens, over this model's max_src_len={model.cfg.max_src_len}")
    for prompt, rows in candidates(model, tok, args.prompt, salient, reward_cfg, cfg, device, cfg.num_samples,
                                   seed=args.seed):
        print(f"prompt: {prompt}")
        for text, t in rows:
            print(f"  {format_candidate(text, t)}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command = " ".join(["python cagsr.py", *map(shlex.quote, argv)])
    t_start = time.time()
    if args.size is not None and args.size not in SIZES:
        raise SystemExit(f"--size {args.size!r} is not a preset; valid sizes: {', '.join(SIZES)}")
    resume_path = None
    if args.resume is not None:
        args, resume_path = resume_settings(args)
    rank, world, dp_device = init_distributed(args)
    if args.dry_run:
        size = args.size or "tiny"
        print_plan(size, args.sft_batch_size)
        return 0
    if args.experiment is not None:
        import experiments                            # imports this module: loaded only when asked for
        if args.num_eval is None:
            args.num_eval = 300
        device = pick_device(args.device)
        return experiments.run_table1(args, device)
    if args.num_eval is None:
        args.num_eval = 500
    if args.stage in ("rl", "sample", "eval") and args.init is None:
        raise SystemExit(f"--stage {args.stage} needs --init CKPT (a checkpoint written by an earlier run)")
    if args.stage == "sample" and not args.prompt:
        raise SystemExit('--stage sample needs at least one --prompt "..."')
    if args.init is not None and args.stage == "all":
        raise SystemExit("--init with --stage all would retrain the checkpoint; use --stage rl (or --stage sft)")
    device = dp_device or pick_device(args.device)
    if args.size in GPU_SIZES and device.type == "cpu" and args.device is None:
        print_plan(args.size, args.sft_batch_size)
        raise SystemExit(f"--size {args.size} is a GPU preset and no GPU was found: on this CPU it would run for days. "
                         f"Pass --device cpu to run it here anyway, or --dry-run to see only the plan above.")
    if (args.init is not None and args.size is None and args.stage in ("sft", "rl") and device.type == "cpu"
            and args.device is None and Path(args.init).is_file()):
        init_size = peek_checkpoint(args.init).get("size")
        if init_size in GPU_SIZES:
            print_plan(init_size, args.sft_batch_size)
            raise SystemExit(f"--init {args.init} is a {init_size} model, a GPU preset, and no GPU was found: training "
                             f"it on this CPU would run for days. Pass --device cpu to run it here anyway.")
    seed_everything(args.seed)
    if args.stage == "sample":
        return run_sample(args, device)

    overrides = parse_overrides(args.set)
    if args.last_layers is not None:
        overrides["last_layers"] = args.last_layers
    resume = None
    if resume_path is not None:                     # --resume: the model and everything else from its checkpoint
        model, tok, resume = load_checkpoint(resume_path, device)
        run_size = args.size or (peek_checkpoint(args.init).get("size") if args.init else "tiny")
        check_resume(resume_path, resume, args, {k: v for k, v in overrides.items() if k != "vocab_size"}, run_size)
        size = resume["size"]
        where = f"step {resume['step']}" if resume["stage"] == "sft" else f"iteration {resume['iteration']}"
        print(f"resuming {args.resume} from {resume_path.name} ({resume['stage']}, {where})")
        ckpt = resume
    elif args.init is not None:                     # the model, its size and tokenizer come from the checkpoint
        model, tok, ckpt = load_checkpoint(args.init, device)
        size = ckpt.get("size") or ckpt["args"].get("size") or "tiny"
        if args.size is not None and args.size != size:
            raise SystemExit(f"--size {args.size} does not match the --init checkpoint, which is a {size} model")
        if overrides:
            raise SystemExit(f"--set/--last-layers cannot change a model loaded with --init ({overrides})")
        print(f"loaded {args.init}: stage {ckpt['stage']}, size {size}, {model.num_params():,} parameters")
    else:
        size = args.size or "tiny"
    if args.dataset is None:
        args.dataset = (ckpt["args"].get("dataset") if args.init is not None or resume else None) or "qa"
    try:
        splits = data.load_dataset(args.dataset, seed=args.seed)
    except ValueError as e:                         # DataError included: it names the file and line
        raise SystemExit(f"--dataset: {e}") from None
    if world > 1:                                   # every rank gets an equal share of each batch
        sft_b = args.sft_batch_size or SFT_DEFAULTS[size]["sft_batch_size"]
        for flag, n in (("--prompts-per-iter", rl_configs(args, size)[0].prompts_per_iter), ("--sft-batch-size", sft_b)):
            if n % world:
                raise SystemExit(f"{flag} {n} cannot be split evenly over {world} processes: choose a multiple of {world}")
    if args.init is None and resume is None:
        preset_vocab = overrides.get("vocab_size", SIZES[size]["vocab_size"])
        tok = data.train_tokenizer(list(data.record_texts(splits.train)), preset_vocab) if rank == 0 else None
        if world > 1:                               # rank 0's tokenizer for all: the vocabularies must agree
            shared = [data.tokenizer_to_str(tok) if rank == 0 else None]
            torch.distributed.broadcast_object_list(shared, src=0)
            tok = data.tokenizer_from_str(shared[0])
        # A run's vocabulary is its tokenizer's; the preset's number is only the BPE target.
        overrides["vocab_size"] = tok.get_vocab_size()
        model = EncoderDecoder(config_for(size, **overrides)).to(device)
        print(f"size {size} | overrides {overrides} | device {device}")
    model.gradient_checkpointing = args.grad_checkpoint
    cfg = model.cfg
    print(f"dataset {args.dataset}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test pairs; "
          f"vocabulary {cfg.vocab_size}; model {model.num_params():,} parameters")

    if args.stage == "eval":
        rl_cfg, reward_cfg, _ = rl_configs(args, size)
        train_prompts = [data.encode_prompt(tok, r["prompt"]) for r in splits.train]
        salient = SalientTokens.build(tok, train_prompts)
        for name, recs in (("fixed validation set", splits.val[:args.eval_prompts]), ("test", splits.test[:args.num_eval])):
            res = evaluate_policy(model, tok, recs, salient, reward_cfg, rl_cfg, device)
            print(f"{name} ({len(recs)} prompts): " + " | ".join(f"{k} {v:.4f}" for k, v in res.items()))
        return 0

    if rank == 0:
        run_dir = make_run_dir(args, size)
        if resume_path is None:
            (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
        log = MetricsLog(run_dir / "metrics.jsonl", keep=resume["log_rows"] if resume else 0)
    else:                                           # under torchrun only rank 0 writes the run directory
        run_dir, log = None, MetricsLog(None)
    if resume is not None:
        set_rng_state(resume["rng"])
    stop = StopFlag()

    def interrupted(stage: str, where: str) -> int:
        print(f"\ninterrupted: {stage} stopped at {where}; checkpoint written. Continue with:\n"
              f"    python cagsr.py --resume {run_dir}")
        return 130

    def stages() -> int:
        if args.stage in ("all", "sft") and not (resume and resume["stage"] == "rl"):
            d = SFT_DEFAULTS[size]
            steps, batch_size, lr = (getattr(args, k) if getattr(args, k) is not None else d[k]
                                     for k in ("sft_steps", "sft_batch_size", "sft_lr"))
            enc = lambda recs: data.encode_records(tok, recs, cfg.max_src_len, cfg.max_tgt_len, truncate=args.truncate)
            try:
                train_pairs, val_pairs = enc(splits.train), enc(splits.val)
            except ValueError as e:
                raise SystemExit(f"{args.dataset}: {e}") from None
            idf = data.idf([p for p, _ in train_pairs], cfg.vocab_size)     # so `--stage sample` can score candidates
            print(f"SFT: {steps} steps x {batch_size} pairs, peak lr {lr}")
            probe_set = splits.val[:200]

            def probe(m):  # exact-match on a fixed validation subset: the SFT curve in the README
                return dict(val_exact_match=greedy_scores(m, tok, probe_set, device)[1])

            def sft_checkpoint(step, opt, complete=False):
                if rank == 0:
                    save_checkpoint(run_dir / "sft.pt", model=model.state_dict(), optimizer=opt.state_dict(),
                                    model_config=asdict(cfg), tokenizer=data.tokenizer_to_str(tok), idf=idf, stage="sft",
                                    step=step, steps=steps, complete=complete, size=size, args=vars(args),
                                    rng=rng_state(), log_rows=log.rows, world=world)

            t0 = time.time()
            with autocast(device, args.precision):
                result = train_sft(model, train_pairs, val_pairs, steps=steps, batch_size=batch_size, lr=lr,
                                   warmup=args.warmup, eval_every=args.sft_eval_every, device=device, seed=args.seed,
                                   log=log, probe=probe, compile=args.compile, start=resume["step"] if resume else 0,
                                   opt_state=resume["optimizer"] if resume else None, on_checkpoint=sft_checkpoint,
                                   ckpt_every=args.sft_eval_every, stop=stop)
            sft_seconds = time.time() - t0
            check_replicas(model, "SFT")
            if result["stopped"]:
                return interrupted("SFT", f"step {result['steps']} of {steps}")
            sft_checkpoint(result["steps"], result["optimizer"], complete=True)
            if rank == 0:
                test = splits.test[:args.num_eval]
                preds, em, _ = greedy_scores(model, tok, test, device)
                print("\nSample answers on held-out test prompts (greedy):")
                for r, p in list(zip(test, preds))[:5]:
                    print(f"  prompt:    {r['prompt']}\n  model:     {p}\n  reference: {r['response']}\n")
                log(dict(stage="sft_eval", exact_match=em, num_eval=len(test), sft_seconds=round(sft_seconds, 1)))
                print(f"after SFT: held-out exact-match {em:.1%} of {len(test)} test prompts | SFT took {sft_seconds:.0f}s")

        if args.stage in ("all", "rl"):
            with autocast(device, args.precision):
                summary = run_rl(args, model, tok, splits, run_dir, log, device, size,
                                 resume=resume if resume and resume["stage"] == "rl" else None, stop=stop)
            if "stopped" in summary:
                return interrupted("RL", f"iteration {summary['stopped']}")
        return 0

    with stop:                                      # Ctrl-C from here on: checkpoint, then exit 130
        code = stages()
    if code == 0:
        total = time.time() - t_start
        log(dict(stage="done", total_seconds=round(total, 1)))
        print(f"\ndone in {total / 60:.1f} min | run directory {run_dir}")
    log.close()
    if world > 1:
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
