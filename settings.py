"""From flags to configs: the one place where the command line's flags, the per-size profiles and
an --init checkpoint become the configs every stage receives (ModelConfig overrides, SFTConfig,
PPOConfig, RewardConfig), and where those settings are checked.

`resolve(args, command)` reads the argparse namespace (never changing it) and returns a `Run`;
the stages see only the `Run`. The per-size defaults live next to the configs they fill:
sft.SFT_DEFAULTS and ppo.RL_PROFILES ("run" for `python cagsr.py`, "table1" for the Table 1 runner).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import textwrap
from dataclasses import dataclass, field, fields
from pathlib import Path

import ppo
import runs
from experiments import ExperimentConfig
from model import SIZES, ModelConfig, config_for, memory_plan
from reward import RewardConfig
from sft import SFT_DEFAULTS, TABLE_SFT_STEPS, SFTConfig, sft_config

# Presets meant for a GPU: on a CPU they would run for days, so they start there only on request.
GPU_SIZES = ("base", "1.3b")


@dataclass
class Run:
    """Everything one invocation runs with, resolved."""
    stage: str                       # all | sft | rl | sample | eval, or "dry-run" / "experiment"
    size: str
    dataset: str
    seed: int
    sft: SFTConfig
    ppo: ppo.PPOConfig
    reward: RewardConfig
    iterations: int
    num_eval: int
    command: str
    args: dict                       # the settings as args.json and the checkpoints record them
    init: str | None = None
    resume: str | None = None        # the run directory of --resume
    resume_from: Path | None = None  # its last checkpoint (None: it wrote none yet)
    model_overrides: dict = field(default_factory=dict)
    eval_every: int = 10
    eval_prompts: int = 64
    ckpt_every: int = 50
    prompts: list = field(default_factory=list)
    truncate: bool = False
    device: str | None = None
    precision: str | None = None
    grad_checkpoint: bool = False
    compile: bool = False
    out: str | None = None
    overwrite: bool = False
    experiment: ExperimentConfig | None = None


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


def _flags(args, cls) -> dict:
    """The fields of the config dataclass `cls` that the user set (flags default to None)."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


def rl_configs(args, size: str, profile: str) -> tuple[ppo.PPOConfig, RewardConfig, int]:
    """PPOConfig, RewardConfig and the iteration count: the profile's per-size values, then the flags."""
    defaults = ppo.RL_PROFILES[profile][size]
    try:
        cfg = ppo.PPOConfig(**{**defaults["ppo"], **_flags(args, ppo.PPOConfig)})
        reward_cfg = RewardConfig(**_flags(args, RewardConfig))
    except ValueError as e:
        raise SystemExit(f"RL settings: {e}") from None
    return cfg, reward_cfg, args.iterations if args.iterations is not None else defaults["iterations"]


def _init_checkpoint(args) -> dict | None:
    """The --init checkpoint's fields, peeked (tensors memory-mapped, not read); None without one."""
    if args.init is None:
        return None
    if not Path(args.init).is_file():
        raise SystemExit(f"--init {args.init}: no such checkpoint file")
    return runs.peek_checkpoint(args.init)


def _check_stage(args) -> None:
    if args.stage in ("rl", "sample", "eval") and args.init is None:
        raise SystemExit(f"--stage {args.stage} needs --init CKPT (a checkpoint written by an earlier run)")
    if args.stage == "sample" and not args.prompt:
        raise SystemExit('--stage sample needs at least one --prompt "..."')
    if args.stage == "sample" and any(not p.strip() for p in args.prompt):
        raise SystemExit('--prompt is empty: give the text to answer, e.g. --prompt "Where does Stimdol Mellu live?"')
    if args.init is not None and args.stage == "all":
        raise SystemExit("--init with --stage all would retrain the checkpoint; use --stage rl (or --stage sft)")


def _experiment(args) -> ExperimentConfig:
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be at least 1, got {args.seeds}")
    if args.init is not None:
        raise SystemExit("--experiment table1 trains its own SFT model per seed; it does not take --init")
    return ExperimentConfig(name=args.experiment, seeds=args.seeds, results_dir=args.results_dir, work_dir=args.out,
                            rm_steps=args.rm_steps, human_prompts=args.human_prompts,
                            relevance_steps=args.relevance_steps)


def resolve(args, command: str, resume_from: Path | None = None) -> Run:
    """The `Run` of these flags. Size and dataset come from the flags, else from the --init checkpoint,
    else the defaults (tiny; qa, or instruct for --experiment table1)."""
    if args.size is not None and args.size not in SIZES:
        raise SystemExit(f"--size {args.size!r} is not a preset; valid sizes: {', '.join(SIZES)}")
    experiment = _experiment(args) if args.experiment is not None else None
    if experiment is None and not args.dry_run:
        _check_stage(args)
    init = None if experiment or args.dry_run else _init_checkpoint(args)
    size = args.size or (init["size"] if init else "tiny")
    if init is not None and args.size is not None and args.size != init["size"] and args.resume is None:
        raise SystemExit(f"--size {args.size} does not match the --init checkpoint, which is a {init['size']} model")
    overrides = parse_overrides(args.set)
    if args.last_layers is not None:
        overrides["last_layers"] = args.last_layers
    if init is not None and overrides and args.resume is None:
        raise SystemExit(f"--set/--last-layers cannot change a model loaded with --init ({overrides})")
    dataset = args.dataset or (init and init["dataset"]) or ("instruct" if experiment else "qa")
    name = Path(dataset).stem if dataset.endswith(".jsonl") else dataset
    steps = args.sft_steps if args.sft_steps is not None or not experiment else TABLE_SFT_STEPS.get(name)
    sft = sft_config(size, steps=steps, batch_size=args.sft_batch_size, lr=args.sft_lr, warmup=args.warmup,
                     eval_every=args.sft_eval_every)
    ppo_cfg, reward_cfg, iterations = rl_configs(args, size, "table1" if experiment else "run")
    num_eval = args.num_eval if args.num_eval is not None else (300 if experiment else 500)
    stage = "dry-run" if args.dry_run else "experiment" if experiment else args.stage
    recorded = {**vars(args), "command": command, "dataset": dataset, "num_eval": num_eval}
    return Run(stage=stage, size=size, dataset=dataset, seed=args.seed, sft=sft, ppo=ppo_cfg, reward=reward_cfg,
               iterations=iterations, num_eval=num_eval, command=command, args=recorded, init=args.init,
               resume=args.resume, resume_from=resume_from, model_overrides=overrides, eval_every=args.eval_every,
               eval_prompts=args.eval_prompts, ckpt_every=args.ckpt_every, prompts=list(args.prompt),
               truncate=args.truncate, device=args.device, precision=args.precision,
               grad_checkpoint=args.grad_checkpoint, compile=args.compile, out=args.out, overwrite=args.overwrite,
               experiment=experiment)


def single_process(run: Run) -> str | None:
    """Why `run` must not run under torchrun, or None when it may."""
    if run.stage in ("experiment", "dry-run"):
        return f"--{run.stage}"
    return f"--stage {run.stage}" if run.stage in ("sample", "eval") else None


def check_device(run: Run, device, world: int) -> None:
    """Checks that need the device and the number of processes: a GPU preset (by --size or by the
    --init checkpoint) is refused on a CPU unless --device cpu asks for it; every process must get
    an equal share of each batch."""
    by_flag = run.args["size"] in GPU_SIZES and run.stage not in ("dry-run", "experiment")
    by_init = run.init is not None and run.args["size"] is None and run.size in GPU_SIZES and run.stage in ("sft", "rl")
    if run.device is None and device.type == "cpu" and (by_flag or by_init):
        print_plan(run.size, run.sft.batch_size)
        if by_flag:
            raise SystemExit(f"--size {run.size} is a GPU preset and no GPU was found: on this CPU it would run for "
                             f"days. Pass --device cpu to run it here anyway, or --dry-run to see only the plan above.")
        raise SystemExit(f"--init {run.init} is a {run.size} model, a GPU preset, and no GPU was found: training it "
                         f"on this CPU would run for days. Pass --device cpu to run it here anyway.")
    for flag, n in (("--prompts-per-iter", run.ppo.prompts_per_iter), ("--sft-batch-size", run.sft.batch_size)):
        if world > 1 and n % world:
            raise SystemExit(f"{flag} {n} cannot be split evenly over {world} processes: choose a multiple of {world}")


def print_plan(size: str, batch: int | None = None) -> None:
    """The memory plan of the preset `size` (model.memory_plan) for one SFT batch (default: the
    size's SFT batch) at the preset's longest lengths."""
    cfg = config_for(size)
    batch = batch or SFT_DEFAULTS[size]["batch_size"]
    plan = memory_plan(cfg, batch, cfg.max_src_len, cfg.max_tgt_len, act_bytes=2)
    print(f"plan for --size {size}: {plan['parameters']:,} parameters")
    notes = {"optimizer": " (Adam: two float32 moments)", "reference_policy": " (frozen SFT policy for the KL, RL only)",
             "activations": f" (estimate: one SFT batch of {batch} x ({cfg.max_src_len} + {cfg.max_tgt_len}) tokens, "
                            f"bf16; the longest the preset allows, so an upper bound for the bundled data)"}
    for k in ("weights", "gradients", "optimizer", "reference_policy", "activations", "total"):
        print(f"  {k:17s} {plan[k] / 2**30:8.2f} GiB{notes.get(k, '')}")


def print_rl_settings(cfg: ppo.PPOConfig, reward_cfg: RewardConfig, iterations: int) -> None:
    """This run's RL settings next to the paper's (§7.2), '*' where they differ."""
    paper, paper_reward = ppo.PPOConfig(), RewardConfig()
    print("RL settings (this run | the paper, §7.2; '*' = differs):")
    for obj, ref in ((cfg, paper), (reward_cfg, paper_reward)):
        for f in fields(obj):
            mine, theirs = getattr(obj, f.name), getattr(ref, f.name)
            print(f"  {'*' if mine != theirs else ' '} {f.name:16s} {mine!s:>10} | {theirs}")
    print(f"    iterations       {iterations:>10} | not stated")
