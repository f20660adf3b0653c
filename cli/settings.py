"""From flags to configs: the one place where the command line's flags, the per-size profiles and
an --init checkpoint become the configs every stage receives (ModelConfig overrides, SFTConfig,
PPOConfig, RewardConfig), and where those settings are checked.

`resolve(args, command)` reads the argparse namespace (never changing it) and returns a `Run`;
the stages see only the `Run`. The presets and per-size profiles it reads are in presets.py.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

import parallel
import ppo
import reward
from checks import AT_LEAST_1, NON_NEGATIVE, SHARE, ConfigError, check_values
from cli import runs
from cli.plan import memory_plan
from cli.runs import UsageError
from data import DATASETS, dataset_name
from decoder import DecoderConfig, count_policy_params, policy_config
from experiments.common import ExperimentConfig, label
from interop.gguf import is_gguf
from model import ModelConfig
from presets import (
    DECODER_SIZES,
    EXPERIMENT_SFT_STEPS,
    GPU_SIZES,
    GPU_SNAPSHOT_PARAMS,
    RL_PROFILES,
    SFT_NOISE,
    SIZES,
)
from reward import RewardConfig
from sft import SFTConfig, sft_config


@dataclass
class Run:
    """Everything one invocation runs with, resolved."""

    stage: str  # all | sft | rl | sample | eval, or "dry-run" / "experiment"
    size: str
    dataset: str
    seed: int
    sft: SFTConfig
    ppo: ppo.PPOConfig
    reward: RewardConfig
    iterations: int
    num_eval: int
    command: str
    args: dict  # the settings as args.json and the checkpoints record them
    init: str | None = None  # a checkpoint file, or a snapshot directory (size "pretrained")
    # a snapshot's, from its config.json and --set (--dry-run)
    model_config: ModelConfig | DecoderConfig | None = None
    # the policy: "encoder-decoder" (model.py) or "decoder" (decoder.py)
    arch: str = "encoder-decoder"
    resume: str | None = None  # the run directory of --resume
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
    reward_name: str = "attention"  # --reward: the RL reward (baselines.REWARD_NAMES)
    # --sft-noise: the share of SFT training responses made wrong (data.sft_noise)
    sft_noise: float = 0.0
    hybrid: dict = field(default_factory=dict)  # --reward hybrid: rm_steps, human_prompts, weight
    # --chat-template and --system: the prompts' template (data.ChatTemplate), None for raw prompts
    chat: object = None


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a config dataclass: the help text of its flag."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        a.target.id: " ".join(b.value.value.split())
        for a, b in zip(body, body[1:])
        if isinstance(a, ast.AnnAssign)
        and isinstance(b, ast.Expr)
        and isinstance(b.value, ast.Constant)
    }


OFF = "none"
"""What `--top-k none` (and every flag of an optional field) parses to: given, and meaning None. The
flags default to None for "not given", so None itself cannot say "set to none"; `_flags` turns OFF
into None."""


def _optional(kind, off=None):
    """A parser of `kind` that also reads "none" or "off" as `off`:
    None for --set, OFF for a flag."""

    def parse(text):
        return off if text.lower() in ("none", "off") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def per_size(values: dict) -> str:
    """{size: value} as help text: "X" when every size has it,
    else "X (tiny/small), Y (base/1.3b)"."""
    groups: dict = {}
    for size, v in values.items():
        groups.setdefault("none" if v is None else str(v), []).append(size)
    return (
        next(iter(groups))
        if len(groups) == 1
        else ", ".join(f"{v} ({'/'.join(s)})" for v, s in groups.items())
    )


def add_config_flags(group, cls, profile: dict | None = None):
    """One flag per field of the dataclass `cls` (--clip-eps for clip_eps), default None = "the
    run's default", so a run can print which values the user set. The help gives the default of
    every preset: the field's own, or the per-size `profile`'s (presets.RL_PROFILES)."""
    docs = field_docs(cls)
    kinds = {
        "int": int,
        "float": float,
        "str": str,
        "int | None": _optional(int, off=OFF),
        "float | None": _optional(float, off=OFF),
    }
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = per_size(
            {
                size: p["ppo"].get(f.name, f.default)
                for size, p in (profile or {"": {"ppo": {}}}).items()
            }
        )
        help_ = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        if f.type == "bool":
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_
            )
        else:
            group.add_argument(
                flag, type=kinds[f.type], default=None, metavar=f.name.upper(), help=help_
            )


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError
    return text.lower() == "true"


SET_TYPES = {
    "int": (int, "an integer"),
    "float": (float, "a number"),
    "str": (str, "a word"),
    "bool": (_bool, "true or false"),
    "int | None": (_optional(int), "an integer or none"),
}


def parse_overrides(items: list[str], cls=ModelConfig) -> dict:
    """`--set d_model=64 --set ffn=gated-gelu --set tie_head=false` -> {"d_model": 64, ...}, each
    value typed by its field of `cls` (ModelConfig, or DecoderConfig for --arch decoder: int, float,
    word, true/false, or none where None is allowed); the config itself then checks the values
    (settings.flag_errors names the flag)."""
    types = {f.name: f.type for f in fields(cls) if f.type in SET_TYPES}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set expects FIELD=VALUE, got {item!r}")
        if key not in types:
            raise UsageError(
                f"--set: unknown {cls.__name__} field {key!r}; "
                f"valid fields: {', '.join(sorted(types))}"
            )
        kind, what = SET_TYPES[types[key]]
        try:
            out[key] = kind(value)
        except ValueError:
            raise UsageError(f"--set {key}={value}: must be {what}") from None
    return out


def _flags(args, cls) -> dict:
    """The fields of the config dataclass `cls` that the user set (flags default to None; OFF, a
    flag set to none, is None)."""
    given = {
        f.name: getattr(args, f.name)
        for f in fields(cls)
        if getattr(args, f.name, None) is not None
    }
    return {k: None if v == OFF else v for k, v in given.items()}


SFT_FLAGS = dict(
    steps="--sft-steps",
    batch_size="--sft-batch-size",
    lr="--sft-lr",
    warmup="--warmup",
    eval_every="--sft-eval-every",
)


@contextmanager
def flag_errors(
    flag_of=lambda field: "--" + field.replace("_", "-"), where: str = "", given: dict | None = None
):
    """A config's ConfigError as the UsageError of the flag that set the field. given: the fields
    the user set ({field: value}); when the rule broken reads two fields (ConfigError.related) and
    the user set only the other one, the error names that one: the user's setting, not the default
    it met."""
    try:
        yield
    except ConfigError as e:

        def named(field, value):
            flag = flag_of(field)
            return f"{flag}{'' if flag.endswith('=') else ' '}{value}"

        if given is not None and e.field not in given and e.related in given:
            raise UsageError(
                f"{where}{named(e.related, given[e.related])}: {e.field} is {e.value} "
                f"(the default; not set), which must be {e.what}; choose another "
                f"{flag_of(e.related).rstrip('=')}, or give {flag_of(e.field).rstrip('=')} too"
            ) from None
        raise UsageError(f"{where}{named(e.field, e.value)}: must be {e.what}") from None


def rl_configs(args, size: str, profile: str) -> tuple[ppo.PPOConfig, RewardConfig, int]:
    """PPOConfig, RewardConfig and the iteration count:
    the profile's per-size values, then the flags."""
    defaults = RL_PROFILES[profile][size]
    given = _flags(args, ppo.PPOConfig)
    with flag_errors(given=given):
        cfg = ppo.PPOConfig(**{**defaults["ppo"], **given})
        reward_cfg = RewardConfig(**_flags(args, RewardConfig))
    return (
        cfg,
        reward_cfg,
        args.iterations if args.iterations is not None else defaults["iterations"],
    )


def check_flags(rule, **values) -> None:
    """The command line's own flags (those that are no config's field) under a rule of checks.py,
    with the configs' message: "--flag value: must be ..." (flag_errors)."""
    with flag_errors():
        check_values(rule, **values)


def _check_stage(args) -> None:
    if args.stage in ("rl", "sample", "eval", "export") and args.init is None:
        raise UsageError(
            f"--stage {args.stage} needs --init CKPT (a checkpoint written by an earlier run, or a "
            f"Hugging Face snapshot directory)"
        )
    if args.stage == "export" and args.out is None:
        raise UsageError(
            "--stage export needs --out DIR, the new directory to write the Hugging Face files into"
        )
    if args.stage == "sample" and not args.prompt:
        raise UsageError('--stage sample needs at least one --prompt "..."')
    if args.stage == "sample" and any(not p.strip() for p in args.prompt):
        raise UsageError(
            "--prompt is empty: give the text to answer, e.g. "
            '--prompt "Where does Stimdol Mellu live?"'
        )
    if (
        args.init is not None
        and args.stage == "all"
        and args.resume is None
        and not runs.is_snapshot(args.init)
    ):
        raise UsageError(
            "--init CKPT with --stage all would retrain the checkpoint; use --stage rl "
            "(or --stage sft). (--init with a snapshot directory and --stage all is SFT from the "
            "snapshot, then CAGSR.)"
        )


def _check_paths(args, dataset: str, experiment: bool) -> None:
    """--dataset names a dataset or an existing .jsonl file; --out and --results-dir are
    directories; a new run's --out holds no files unless --overwrite; --device names a device."""
    if dataset not in DATASETS and not (dataset.endswith(".jsonl") and Path(dataset).is_file()):
        what = (
            "no such file"
            if dataset.endswith(".jsonl")
            else f"not one of {', '.join(DATASETS)}, nor a .jsonl file"
        )
        raise UsageError(
            f"--dataset {dataset}: {what}; give a bundled dataset's name or your own PATH.jsonl"
        )
    for flag, path in (
        ("--out", args.out),
        ("--results-dir", args.results_dir if experiment else None),
    ):
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            raise UsageError(
                f"{flag} {path} is a file; give a directory (it is created when missing)"
            )
    if args.out is not None and not experiment:  # the table's work directory is meant to be reused
        runs.check_out(args.out, args.overwrite or args.resume is not None)
    if experiment or (args.stage in ("all", "sft", "rl", "export") and not args.dry_run):
        runs.check_writable("--out", args.out or "runs")
    if experiment:
        runs.check_writable("--results-dir", args.results_dir)
        _check_results(args, dataset)
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError:
            raise UsageError(
                f"--device {args.device}: not a device; use cuda, cuda:N, mps or cpu"
            ) from None


def result_files(
    kind: str, results_dir: str, dataset: str, arch: str = "encoder-decoder", init=None
) -> list[Path]:
    """The files `--experiment kind` writes: <results_dir>/<kind>_<dataset>[-decoder].md, .json
    and .png; from --init, <kind>_<dataset>-<model>.*."""
    name = label(dataset, arch, init)
    return [Path(results_dir) / f"{kind}_{name}.{ext}" for ext in ("md", "json", "png")]


def _check_results(args, dataset: str) -> None:
    """An experiment never replaces result files (the project's committed tables)
    unless --overwrite."""
    there = [
        str(p)
        for p in result_files(args.experiment, args.results_dir, dataset, args.arch, args.init)
        if p.exists()
    ]
    if there and not args.overwrite:
        raise UsageError(
            f"--experiment {args.experiment} would replace {', '.join(there)}; "
            "pass --results-dir DIR to write the tables elsewhere, or --overwrite to replace them"
        )


def sft_noise(args, dataset: str, experiment: bool) -> float:
    """--sft-noise, else SFT_NOISE's default for a run or experiment that trains SFT
    from scratch."""
    if args.sft_noise is not None:
        return args.sft_noise
    from_scratch = args.init is None and (experiment or args.stage in ("all", "sft"))
    return SFT_NOISE.get(dataset_name(dataset), 0.0) if from_scratch else 0.0


def _check_rl_choices(args, dataset: str, experiment: bool) -> None:
    """--sft-noise and --reward: where they apply and what they can take."""
    check_flags(SHARE, sft_noise=args.sft_noise)
    if args.sft_noise and dataset_name(dataset) == "qa":
        raise UsageError(
            "--sft-noise on qa: closed-book QA has no plausible wrong answer to train on; use "
            "--dataset qa-grounded (the distractor's answer) or instruct (an off-topic response)"
        )
    if args.sft_noise and not experiment and args.stage not in ("all", "sft"):
        raise UsageError(
            f"--sft-noise changes the SFT training data; --stage {args.stage} trains no SFT model"
        )
    if args.reward == "hybrid":
        check_flags(AT_LEAST_1, rm_steps=args.rm_steps, human_prompts=args.human_prompts)
        check_flags(NON_NEGATIVE, hybrid_weight=args.hybrid_weight)
    if experiment and args.reward != "attention":
        raise UsageError(
            f"--reward {args.reward}: --experiment {args.experiment} sets each row's reward "
            "itself; drop --reward"
        )


EXPERIMENT_FLAGS = {
    "seeds": (("table1", "rewards", "rank", "ablations"), False),
    "workers": (("table1", "rewards", "ablations"), False),
    "results_dir": (("table1", "rewards", "rank", "ablations"), False),
    "split": (("rank",), False),
    "rm_steps": (("table1", "rewards", "ablations"), True),
    "human_prompts": (("table1", "rewards", "ablations"), True),
    "hybrid_weight": (("rewards", "ablations"), True),
    "relevance_steps": (("table1", "rewards", "ablations"), False),
}
"""The flags of cagsr.py's "experiments" group: {field: (the --experiment kinds that read it,
whether a run with --reward hybrid reads it)}. They default to None, "not given" (the value is then
ExperimentConfig's default), so that one given where it has no effect is refused, even at its
default value (_check_experiment_flags)."""


def _check_experiment_flags(args) -> None:
    """An experiment flag given where nothing reads it (EXPERIMENT_FLAGS) is refused, naming where
    it applies: `--seeds 3` without --experiment, `--hybrid-weight` with --experiment table1."""
    for name, (kinds, hybrid) in EXPERIMENT_FLAGS.items():
        read = args.experiment in kinds or (
            hybrid and args.experiment is None and args.reward == "hybrid"
        )
        if getattr(args, name) is None or read:
            continue
        names = ", ".join(kinds[:-1]) + (" or " if len(kinds) > 1 else "") + kinds[-1]
        where = f"--experiment {names}" + (", or --reward hybrid" if hybrid else "")
        context = (
            f"with --experiment {args.experiment}"
            if args.experiment is not None
            else f"without --experiment{' or --reward hybrid' if hybrid else ''}"
        )
        raise UsageError(
            f"--{name.replace('_', '-')} has no effect {context}: "
            f"it applies only to {where}; drop it"
        )


def _experiment_defaults(args) -> argparse.Namespace:
    """A copy of `args` with each experiment flag not given (None) at ExperimentConfig's default."""
    defaults = {f.name: f.default for f in fields(ExperimentConfig) if f.name in EXPERIMENT_FLAGS}
    return argparse.Namespace(
        **{**vars(args), **{k: v for k, v in defaults.items() if getattr(args, k) is None}}
    )


def _experiment(args) -> ExperimentConfig:
    check_flags(
        AT_LEAST_1,
        seeds=args.seeds,
        rm_steps=args.rm_steps,
        human_prompts=args.human_prompts,
        relevance_steps=args.relevance_steps,
        workers=args.workers,
    )
    check_flags(NON_NEGATIVE, hybrid_weight=args.hybrid_weight)
    if args.experiment in ("table1", "ablations") and args.init is not None:
        raise UsageError(
            f"--experiment {args.experiment} trains its own SFT model per seed; it does not take "
            "--init (--experiment rewards and rank start from the --init model)"
        )
    if args.experiment == "ablations" and args.dataset not in (None, "qa-grounded"):
        raise UsageError(
            f"--experiment ablations --dataset {args.dataset}: qa-grounded only (the oracle "
            "salient set is the answer's clause, which only its records mark); drop --dataset"
        )
    if args.experiment == "rank" and args.init is None:
        raise UsageError(
            "--experiment rank ranks the candidates of a given policy: pass --init MODEL (a "
            "snapshot directory or GGUF file, or an SFT checkpoint such as runs/<run>/sft.pt)"
        )
    return ExperimentConfig(
        name=args.experiment,
        seeds=args.seeds,
        results_dir=args.results_dir,
        split=args.split,
        work_dir=args.out,
        rm_steps=args.rm_steps,
        human_prompts=args.human_prompts,
        relevance_steps=args.relevance_steps,
        hybrid_weight=args.hybrid_weight,
        workers=args.workers,
    )


SNAPSHOT_SETTABLE = {"last_layers", "max_src_len", "max_tgt_len", "dropout"}
"""The config fields (ModelConfig, DecoderConfig) --set may change on a snapshot: the others would
make its weights not fit."""


def _arch(args, resume_from: Path | None) -> str:
    """The policy's architecture: what --resume's checkpoint or --init (a checkpoint, or a
    snapshot's config.json) holds; else --arch, else the encoder-decoder. An --arch that contradicts
    them is refused."""
    source, flag = (resume_from, "--resume") if resume_from is not None else (args.init, "--init")
    held = None
    if source is not None and runs.is_snapshot(source):
        held = runs.snapshot_arch(source, flag)
    elif source is not None and Path(source).is_file():
        held = (
            runs.peek_checkpoint(source, flag)
            .get("model_config", {})
            .get("arch", "encoder-decoder")
        )
    if held is not None and args.arch is not None and args.arch != held:
        raise UsageError(
            f"--arch {args.arch}: {source} holds a{'n' if held[0] == 'e' else ''} {held} model; "
            "drop --arch (a model's architecture is its own)"
        )
    return held or args.arch or "encoder-decoder"


def _model(args, resume_from: Path | None, arch: str) -> tuple[dict, dict | None, str]:
    """The --set/--last-layers overrides, checked against the preset or the snapshot they change;
    what --init names (peeked, weights unread); and the size: --size, the checkpoint's, "pretrained"
    for a snapshot, else tiny. A resumed run's last checkpoint stands for --init (the snapshot or
    file it started from may be gone)."""
    overrides = parse_overrides(args.set, DecoderConfig if arch == "decoder" else ModelConfig)
    if args.last_layers is not None:
        overrides["last_layers"] = args.last_layers
    if resume_from is not None:  # the size the run started with, checked against its checkpoint
        init = runs.peek_checkpoint(resume_from, "--resume")
        if args.init is None or args.size is not None:
            return overrides, init, args.size or "tiny"
        if runs.is_snapshot(args.init) or Path(args.init).is_file():
            return (
                overrides,
                init,
                runs.peek_init(args.init, "--init", overrides, tokenizer=False)["size"],
            )
        return overrides, init, init["size"]  # what it started from is gone: the checkpoint's word
    snapshot = args.init is not None and runs.is_snapshot(args.init)
    if snapshot and args.size is not None and args.resume is None:
        raise UsageError(
            f"--size {args.size} cannot reshape the snapshot --init {args.init}: its shape is its "
            "own, from its config.json or GGUF metadata (change single fields with --set "
            "FIELD=VALUE)"
        )
    shaped = sorted(set(overrides) - SNAPSHOT_SETTABLE)
    if snapshot and shaped and args.resume is None:
        raise UsageError(
            f"--set {shaped[0]}: the architecture of the snapshot --init {args.init} is its "
            "own (config.json or GGUF metadata); with a snapshot only "
            f"{', '.join(sorted(SNAPSHOT_SETTABLE))} may be set"
        )
    peek = args.init is not None and (snapshot or not args.dry_run)
    with flag_errors(
        lambda f: (
            "--last-layers"
            if f == "last_layers" and args.last_layers is not None
            else f"--set {f}="
        ),
        given=overrides,
    ):
        init = (
            runs.peek_init(args.init, "--init", overrides, tokenizer=not args.dry_run)
            if peek
            else None
        )
        if init is not None and not snapshot and overrides and args.resume is None:
            raise UsageError(
                f"--set/--last-layers cannot change a model loaded from a checkpoint ({overrides})"
            )
        size = args.size or (init["size"] if init else "tiny")
        if init is None:
            policy_config(arch, size, **overrides)
    return overrides, init, size


def resolve(args, command: str, resume_from: Path | None = None) -> Run:
    """The `Run` of these flags, every setting checked. Size and dataset come from the flags, else
    from the --init checkpoint, else the defaults: size tiny; dataset qa-grounded, or instruct for
    either --experiment (table1 and rewards)."""
    if args.resume is None:  # a resumed run's settings are its args.json's, checked when it began
        _check_experiment_flags(args)
    args = _experiment_defaults(args)
    arch = _arch(args, resume_from)
    sizes = DECODER_SIZES if arch == "decoder" else SIZES
    if args.size is not None and args.size not in sizes:
        raise UsageError(
            f"--size {args.size!r} is not a{' decoder-only' if arch == 'decoder' else ''} preset; "
            f"valid sizes: {', '.join(sizes)}"
        )
    experiment = _experiment(args) if args.experiment is not None else None
    if experiment is None and not args.dry_run:
        _check_stage(args)
    overrides, init, size = _model(args, resume_from, arch)
    if (
        init is not None
        and args.size is not None
        and args.size != init["size"]
        and args.resume is None
    ):
        raise UsageError(
            f"--size {args.size} does not match the --init checkpoint, "
            f"which is a {init['size']} model"
        )
    from_scratch = experiment is not None and init is None  # table1 and rewards' tiny tables
    dataset = (
        args.dataset
        or (init and init["dataset"])
        or ("instruct" if from_scratch and experiment.name != "ablations" else "qa-grounded")
    )
    _check_paths(args, dataset, experiment is not None)
    check_flags(
        AT_LEAST_1,
        iterations=args.iterations,
        eval_every=args.eval_every,
        eval_prompts=args.eval_prompts,
        ckpt_every=args.ckpt_every,
        num_eval=args.num_eval,
    )
    name = dataset_name(dataset)
    # "table1" | "rewards" | "run"; rank and the ablations sample as the rewards study does
    profile = "run" if not experiment else "table1" if experiment.name == "table1" else "rewards"
    steps = args.sft_steps
    if args.sft_steps is None and experiment:
        steps = EXPERIMENT_SFT_STEPS[profile].get(name)
    with flag_errors(SFT_FLAGS.get):
        sft = sft_config(
            size,
            steps=steps,
            batch_size=args.sft_batch_size,
            lr=args.sft_lr,
            warmup=args.warmup,
            eval_every=args.sft_eval_every,
        )
    ppo_cfg, reward_cfg, iterations = rl_configs(args, size, profile)
    if experiment or args.stage in ("all", "rl"):
        with flag_errors(given=_flags(args, ppo.PPOConfig)):
            ppo.check_on_policy(ppo_cfg)
    _check_rl_choices(args, dataset, experiment is not None)
    num_eval = args.num_eval if args.num_eval is not None else (300 if experiment else 500)
    stage = "dry-run" if args.dry_run else "experiment" if experiment else args.stage
    recorded = {**vars(args), "command": command, "dataset": dataset, "num_eval": num_eval}
    return Run(
        stage=stage,
        size=size,
        dataset=dataset,
        seed=args.seed,
        sft=sft,
        ppo=ppo_cfg,
        reward=reward_cfg,
        iterations=iterations,
        num_eval=num_eval,
        command=command,
        args=recorded,
        init=args.init,
        model_config=init.get("snapshot_config") if init else None,
        resume=args.resume,
        resume_from=resume_from,
        model_overrides=overrides,
        eval_every=args.eval_every,
        eval_prompts=args.eval_prompts,
        ckpt_every=args.ckpt_every,
        prompts=list(args.prompt),
        truncate=args.truncate,
        device=args.device,
        precision=args.precision,
        grad_checkpoint=args.grad_checkpoint,
        compile=args.compile,
        out=args.out,
        overwrite=args.overwrite,
        experiment=experiment,
        reward_name=args.reward,
        arch=arch,
        sft_noise=sft_noise(args, dataset, experiment is not None),
        hybrid=dict(
            rm_steps=args.rm_steps, human_prompts=args.human_prompts, weight=args.hybrid_weight
        ),
        chat=runs.resolve_chat(
            getattr(args, "chat_template", "auto"),
            getattr(args, "system", None),
            args.init,
            resume_from,
            args.dry_run,
        ),
    )


def resumed(defaults: dict, args, command: str):
    """--resume RUN_DIR: a new namespace with the run's own settings (RUN_DIR/args.json; only
    --device may be given beside it), the command line to record, and the run's last checkpoint.
    defaults: every flag's default (the parser's)."""
    saved, path = runs.read_run(args.resume)
    extra = sorted(
        k for k, v in vars(args).items() if k not in ("resume", "device") and v != defaults[k]
    )
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise UsageError(
            f"--resume continues the run with its own settings ({args.resume}/args.json); "
            f"drop {flags} (only --device may be given), or start a new run"
        )
    new = argparse.Namespace(**{**defaults, **{k: v for k, v in saved.items() if k in defaults}})
    new.resume, new.out, new.overwrite = args.resume, args.resume, True
    new.device = args.device or saved.get("device")
    return new, saved.get("command", "") + f"  [resumed: {command}]", path


def resume_complete(run: Run) -> bool:
    """--resume: its last checkpoint must belong to the run (size, model settings, tokenizer, number
    of processes; peeked, not loaded), then True when the run already finished."""
    if run.resume_from is not None:
        overrides = {k: v for k, v in run.model_overrides.items() if k != "vocab_size"}
        runs.check_resume(
            run.resume_from,
            runs.peek_checkpoint(run.resume_from, "--resume"),
            run.resume,
            overrides,
            run.size,
        )
    return runs.run_complete(run.resume)


def single_process(run: Run) -> str | None:
    """Why `run` must not run under torchrun, or None when it may."""
    if run.stage in ("experiment", "dry-run"):
        return f"--{run.stage}"
    return f"--stage {run.stage}" if run.stage in ("sample", "eval", "export") else None


def check_device(run: Run, device, world: int) -> None:
    """Checks that need the device and the number of processes: a GPU preset (by --size or by the
    --init checkpoint) or a snapshot of over GPU_SNAPSHOT_PARAMS parameters is refused on a CPU
    unless --device cpu asks for it; every process must get an equal share of each batch."""
    by_flag = run.args["size"] in GPU_SIZES and run.stage not in ("dry-run", "experiment")
    by_init = (
        run.init is not None
        and run.args["size"] is None
        and run.size in GPU_SIZES
        and run.stage in ("sft", "rl")
    )
    big = (
        run.model_config is not None and count_policy_params(run.model_config) > GPU_SNAPSHOT_PARAMS
    )
    by_snapshot = big and run.stage in ("all", "sft", "rl")
    if run.device is None and device.type == "cpu" and (by_flag or by_init or by_snapshot):
        print_plan(run)
        if by_flag:
            raise UsageError(
                f"--size {run.size} is a GPU preset and no GPU was found: on this CPU it would run "
                "for days. Pass --device cpu to run it here anyway, or --dry-run to see only the "
                "plan above."
            )
        what = (
            f"a {run.size} model, a GPU preset"
            if by_init
            else f"a snapshot of over {GPU_SNAPSHOT_PARAMS:,} parameters"
        )
        raise UsageError(
            f"--init {run.init} is {what}, and no GPU was found: training it on this CPU would "
            "run for days. Pass --device cpu to run it here anyway."
        )
    for flag, n in (
        ("--prompts-per-iter", run.ppo.prompts_per_iter),
        ("--sft-batch-size", run.sft.batch_size),
    ):
        try:
            parallel.check_split(flag, n, world)
        except ValueError as e:
            raise UsageError(str(e)) from None


def print_plan(run: Run) -> None:
    """The memory plan (plan.memory_plan) of the run's model, the preset with --set or a snapshot's
    config.json, for one SFT batch of the run at the model's longest lengths."""
    cfg = run.model_config or policy_config(run.arch, run.size, **run.model_overrides)
    batch = run.sft.batch_size
    plan = memory_plan(cfg, batch, cfg.max_src_len, cfg.max_tgt_len, act_bytes=2)
    source = "its GGUF metadata" if run.init and is_gguf(run.init) else "its config.json"
    what = f"--init {run.init} (from {source})" if run.model_config else f"--size {run.size}"
    print(f"plan for {what}: {plan['parameters']:,} parameters")
    notes = {
        "optimizer": " (Adam: two float32 moments)",
        "reference_policy": " (frozen SFT policy for the KL, RL only)",
        "activations": f" (estimate: one SFT batch of {batch} x "
        f"({cfg.max_src_len} + {cfg.max_tgt_len}) tokens, bf16; the longest the model allows, "
        "so an upper bound for the bundled data)",
    }
    for k in ("weights", "gradients", "optimizer", "reference_policy", "activations", "total"):
        print(f"  {k:17s} {plan[k] / 2**30:8.2f} GiB{notes.get(k, '')}")


def print_profile(run: Run) -> None:
    """A run from a snapshot says which defaults it fine-tunes with (the "pretrained" profile)."""
    if run.size == runs.PRETRAINED and run.stage in ("all", "sft", "rl"):
        print(
            f"profile pretrained (fine-tuning a snapshot): SFT AdamW lr {run.sft.lr}, "
            f"{run.sft.steps} steps x {run.sft.batch_size} pairs; RL Adam lr {run.ppo.lr} "
            f"(the paper's), {run.iterations} iterations"
        )


def print_rl_settings(
    cfg: ppo.PPOConfig, reward_cfg: RewardConfig, iterations: int, reward_name: str = "attention"
) -> None:
    """This run's RL settings next to the paper's (§4, §7.2): '*' where they differ, '-' where the
    paper states no value (ppo.PAPER, reward.PAPER)."""
    print("RL settings (this run | the paper, §7.2; '*' = differs, '-' = the paper states none):")
    for obj, paper in ((cfg, ppo.PAPER), (reward_cfg, reward.PAPER)):
        for f in fields(obj):
            mine = getattr(obj, f.name)
            mark = "-" if f.name not in paper else "*" if mine != paper[f.name] else " "
            print(f"  {mark} {f.name:16s} {mine!s:>10} | {paper.get(f.name, 'not stated')}")
    print(f"  - iterations       {iterations:>10} | not stated")
    print(
        f"  {' ' if reward_name == 'attention' else '*'} reward           "
        f"{reward_name:>10} | attention (§3.2)"
    )
