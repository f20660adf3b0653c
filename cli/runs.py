"""The plumbing of a run: the device, the run directory, checkpoints (one layout), resuming, the
metrics log, Ctrl-C and random states. Every stage uses it. None of the method is here: a §
reference only says which part of the paper a stored or loaded piece serves (the IDF table of §3.2,
the frozen SFT policy of §7.2).

A run directory (runs/<time>-<size>-<dataset>/ unless --out is given) holds args.json (the run's
settings), metrics.jsonl (one JSON row per evaluation, iteration and summary) and checkpoints:
sft.pt, rl.pt. Every checkpoint has the layout of `checkpoint_state`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import data
import parallel
from checks import ConfigError
from decoder import build_policy, config_from_dict
from interop import gguf
from interop.snapshot import config_from_hf, from_pretrained, load_hf_config


class UsageError(SystemExit):
    """A flag or an input file the run cannot take, refused before any work. The message names the
    flag or file, what was wrong and what to do; the command line exits with status 2 (argparse's
    convention for usage errors), while errors found at run time exit with status 1."""


CHECKPOINT_FORMAT = 2
"""The layout number every checkpoint carries as its "format" field (`checkpoint_state`); a file
of any other format is refused (`_checked`), never converted."""
REQUIRED = ("model", "model_config", "tokenizer", "idf", "size", "stage")


# --------------------------------------------------------------------------------------------
# Device
# --------------------------------------------------------------------------------------------


def pick_device(requested: str | None = None) -> torch.device:
    """cuda, then mps, then cpu; an explicit request that this machine cannot serve is an error."""
    if requested is not None:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {requested}: CUDA is not available on this machine")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise UsageError("--device mps: MPS is not available on this machine")
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device, precision: str | None):
    """bf16 autocast for --precision bf16 (the default on CUDA): matmuls in bf16, weights, optimizer
    state, softmax of the recorded attention, log-probabilities and losses in float32."""
    device = torch.device(device)
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# --------------------------------------------------------------------------------------------
# Random states
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return dict(
        torch=torch.get_rng_state(),
        python=random.getstate(),
        numpy=np.random.get_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    )


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints
# --------------------------------------------------------------------------------------------


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temporary file, then rename): a reader never sees half
    of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save(path: Path, obj) -> None:
    """torch.save to a temporary file, flushed to disk, then renamed over `path`: a crash at any
    moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_state(
    model, tok, idf, *, size: str, dataset: str | None, stage: str, **extra
) -> dict:
    """The one checkpoint layout: the policy's weights and config, its tokenizer, the IDF table of
    the training prompts (computed once per run; every stage scores salient tokens with it, §3.2),
    the preset, the dataset and the stage; `extra` adds what resuming needs (optimizer, step or
    iteration, random states, ...). The tokenizer's special ids are stored beside it
    (data.Specials), and its chat template with the system text (data.ChatTemplate; None: raw
    prompts)."""
    chat = data.chat_of(tok)
    return dict(
        format=CHECKPOINT_FORMAT,
        model=model.state_dict(),
        model_config=asdict(model.cfg),
        tokenizer=data.tokenizer_to_str(tok),
        specials=asdict(data.specials(tok)),
        chat=None if chat is None else asdict(chat),
        idf=idf,
        size=size,
        dataset=dataset,
        stage=stage,
        **extra,
    )


def save_checkpoint(path: Path, model, tok, idf, **fields) -> None:
    """`checkpoint_state(model, tok, idf, **fields)`, written atomically to `path`."""
    atomic_save(path, checkpoint_state(model, tok, idf, **fields))


def _checked(ckpt, where: str) -> dict:
    """`ckpt` when it is a policy checkpoint of CHECKPOINT_FORMAT; anything else is a UsageError
    that names the file, what is wrong with it and what to do."""
    if not isinstance(ckpt, dict):
        raise UsageError(
            f"{where}: not a checkpoint written by cagsr.py (a {type(ckpt).__name__}, not a dict)"
        )
    found, note = ckpt.get("format"), ""
    if "format" not in ckpt and "model" in ckpt and "model_config" in ckpt:
        found, note = 1, ' (it has no "format" field)'  # format 1 has no such field
    if found != CHECKPOINT_FORMAT and ("format" in ckpt or note):
        newer = isinstance(found, int) and found > CHECKPOINT_FORMAT
        raise UsageError(
            f"{where}: checkpoint format {found}{note}, "
            f"but this cagsr.py reads format {CHECKPOINT_FORMAT} only and converts no other; "
            + (
                "it was written by a newer cagsr.py: update the code"
                if newer
                else "train a new checkpoint with this code, or read this one with the cagsr.py "
                "that wrote it"
            )
        )
    missing = [k for k in ("format", *REQUIRED) if k not in ckpt]
    if missing:
        raise UsageError(
            f"{where}: not a policy checkpoint written by cagsr.py (missing {', '.join(missing)})"
        )
    return ckpt


def _read(path, flag: str, **load_kw) -> dict:
    """torch.load of a checkpoint file named by `flag`, or a UsageError that says what is wrong
    with it."""
    path, where = Path(path), f"{flag} {path}".strip()
    if path.is_dir():
        raise UsageError(
            f"{where} is a directory without a config.json: {flag or 'this'} takes a checkpoint "
            "file written by cagsr.py (a run's sft.pt or rl.pt) or a Hugging Face snapshot "
            "directory (config.json, weights, tokenizer.json); to continue the run in a directory, "
            f"use --resume {path}"
        )
    if not path.is_file():
        raise UsageError(f"{where}: no such checkpoint file")
    try:
        obj = torch.load(path, weights_only=False, **load_kw)
    except Exception as e:  # pickle, zip and torch errors alike: the file is not usable
        advice = (
            "this run's checkpoint is damaged: restore it from a copy, or move it away to resume "
            "from the run's earlier checkpoint (rl.pt falls back to sft.pt), or start a new run"
            if flag == "--resume"
            else "give a .pt file written by cagsr.py, a run's sft.pt or rl.pt"
        )
        raise UsageError(
            f"{where}: cannot be read as a checkpoint ({type(e).__name__}): it was not written by "
            f"torch.save, or it was cut short (a copy that did not finish); {advice}"
        ) from None
    return _checked(obj, where)


def peek_checkpoint(path, flag: str = "") -> dict:
    """A checkpoint's fields with its tensors memory-mapped, not read: to check its size or
    tokenizer before (or instead of) loading what may be gigabytes of weights."""
    return _read(path, flag, map_location="cpu", mmap=True)


def policy_from_state(state: dict, cfg, device, frozen: bool = False):
    """The policy of `cfg` (an EncoderDecoder, or a DecoderOnly for a DecoderConfig) holding
    the weights `state`; frozen: in eval mode without gradients (the reference policy of the
    KL penalty)."""
    model = build_policy(cfg).to(device)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False) if frozen else model


def rl_start(policy, sft_state: dict, lr: float, device, optimizer_state: dict | None = None):
    """What RL from an SFT state needs beside the policy (§7.2): the frozen SFT policy (the KL
    penalty's reference, and the metrics' baseline) and Adam on the policy, with a resumed optimizer
    state when given. Returns (reference policy, optimizer)."""
    reference = policy_from_state(sft_state, policy.cfg, device, frozen=True)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr, **parallel.fused(device))
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    return reference, optimizer


def load_checkpoint(path, device="cpu", flag: str = ""):
    """(model, tokenizer, checkpoint dict) from a file written by `save_checkpoint`, the tokenizer
    carrying the stored chat template (a checkpoint written before templates has none)."""
    ckpt = _read(path, flag, map_location=device)
    model = policy_from_state(ckpt["model"], config_from_dict(ckpt["model_config"]), device)
    tok = data.tokenizer_from_str(ckpt["tokenizer"], ckpt.get("specials"))
    data.with_chat(tok, stored_chat(ckpt))
    try:
        data.specials(tok)
    except ValueError as e:
        raise UsageError(
            f"{flag} {path}: {e}; the file was changed after cagsr.py wrote it"
        ) from None
    return model, tok, ckpt


# --------------------------------------------------------------------------------------------
# --init: a checkpoint file, or a Hugging Face snapshot directory
# --------------------------------------------------------------------------------------------

PRETRAINED = "pretrained"
"""The `size` of a run from a snapshot: its model comes from config.json, its defaults from the
"pretrained" profile (presets.SFT_DEFAULTS, presets.RL_PROFILES)."""


def is_snapshot(path) -> bool:
    """A pretrained model from outside training: a Hugging Face snapshot directory holding a
    config.json (what `snapshot.from_pretrained` reads), or a llama.cpp GGUF file
    (`gguf.from_gguf`)."""
    path = Path(path)
    return (path.is_dir() and (path / "config.json").is_file()) or gguf.is_gguf(path)


def snapshot_arch(path, flag: str = "--init") -> str:
    """ "decoder" for a Llama/Qwen2 snapshot or a GGUF file, else "encoder-decoder" (by its
    config.json's model_type)."""
    if gguf.is_gguf(path):
        snapshot_config(path, {}, flag)  # another architecture is refused here, in one line
        return "decoder"
    try:
        model_type = load_hf_config(path).get("model_type")
    except ValueError as e:
        raise UsageError(f"{flag} {path}: {e}") from None
    return "decoder" if model_type in data.DECODER_ONLY_TYPES else "encoder-decoder"


def snapshot_config(path, overrides: dict, flag: str = "--init"):
    """The model config (ModelConfig or DecoderConfig) of a snapshot from its config.json, or of a
    GGUF file from its metadata, alone (no weights read), `overrides` on top."""
    if gguf.is_gguf(path):
        try:
            return gguf.gguf_config(gguf.read_gguf(path), path, **overrides)
        except ConfigError:
            raise  # settings.flag_errors names the --set flag
        except ValueError as e:  # gguf.py's errors name the file
            raise UsageError(f"{flag} {e}") from None
    try:
        return config_from_hf(load_hf_config(path), **overrides)
    except ConfigError:
        raise  # settings.flag_errors names the --set flag
    except (ValueError, json.JSONDecodeError) as e:
        raise UsageError(f"{flag} {path}: {e}") from None


def snapshot_tokenizer(path, flag: str = "--init"):
    """The tokenizer of a snapshot (its tokenizer.json) or of a GGUF file (its vocabulary and
    merges), with its special ids; a UsageError naming the flag when it cannot be read."""
    try:
        return gguf.gguf_tokenizer(path) if gguf.is_gguf(path) else data.snapshot_tokenizer(path)
    except ValueError as e:
        raise UsageError(f"{flag} {e}") from None


def peek_init(
    path, flag: str = "--init", overrides: dict | None = None, tokenizer: bool = True
) -> dict:
    """What `--init` names, checked without reading weights: a checkpoint file's fields (peeked), or
    for a snapshot {"size": "pretrained", "dataset": None, "snapshot_config": ModelConfig or
    DecoderConfig} after reading its config.json and, when `tokenizer`, its tokenizer.json."""
    if not is_snapshot(path):
        return peek_checkpoint(path, flag)
    cfg = snapshot_config(path, overrides or {}, flag)
    if tokenizer:
        snapshot_tokenizer(path, flag)
    return dict(size=PRETRAINED, dataset=None, stage=PRETRAINED, snapshot_config=cfg)


def load_init(path, device, flag: str = "--init", overrides: dict | None = None):
    """(model, tokenizer, checkpoint dict) of `--init`: a checkpoint file (`load_checkpoint`), or a
    snapshot: its weights through `snapshot.from_pretrained` (config `overrides` on top, e.g.
    last_layers), its tokenizer.json, a fresh value head, and no IDF table yet (idf None)."""
    if not is_snapshot(path):
        return load_checkpoint(path, device, flag)
    tok = snapshot_tokenizer(path, flag)  # before the weights: a bad tokenizer fails fast
    load = gguf.from_gguf if gguf.is_gguf(path) else from_pretrained
    try:
        model = load(path, **(overrides or {})).to(device)
    except ValueError as e:
        raise SystemExit(f"{flag} {path}: {e}") from None
    return (
        model,
        tok,
        dict(size=PRETRAINED, dataset=None, stage=PRETRAINED, idf=None, snapshot=str(path)),
    )


# --------------------------------------------------------------------------------------------
# Chat templates (DECISIONS.md §12)
# --------------------------------------------------------------------------------------------

TOKEN_NAMES = ("bos", "eos", "unk", "pad")
"""The special-token strings a chat template may read, as {name}_token (transformers'
special_tokens_map)."""


def stored_chat(ckpt: dict) -> data.ChatTemplate | None:
    """The chat template a checkpoint stores, or None (raw prompts, or a checkpoint written before
    templates)."""
    chat = ckpt.get("chat")
    return None if chat is None else data.ChatTemplate(**chat)


def named_tokens(tok_json: str, stored_specials: dict | None) -> dict:
    """The special-token strings of a checkpoint without a template, from its special ids: eos,
    pad, and bos when the tokenizer starts prompts with one."""
    tok = data.tokenizer_from_str(tok_json, stored_specials)
    sp = data.specials(tok)
    names = dict(eos=sp.eos, pad=sp.pad, **({"bos": sp.start} if sp.start != sp.pad else {}))
    return {f"{k}_token": tok.id_to_token(i) for k, i in names.items()}


def snapshot_chat(path: Path) -> tuple[str | None, dict]:
    """(the template, the special-token strings) of a snapshot directory: chat_template.jinja, else
    tokenizer_config.json's "chat_template" (a string, or a list of named templates: "default");
    the strings from tokenizer_config.json's bos_token, eos_token, unk_token, pad_token."""
    file = path / "tokenizer_config.json"
    config = data.read_json(file) if file.is_file() else {}
    source = config.get("chat_template")
    if isinstance(source, list):
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if (path / "chat_template.jinja").is_file():
        source = (path / "chat_template.jinja").read_text(encoding="utf-8")
    tokens = {}
    for name in TOKEN_NAMES:
        value = config.get(f"{name}_token")
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            tokens[f"{name}_token"] = value
    return (source if isinstance(source, str) else None), tokens


def gguf_chat(path) -> tuple[str | None, dict]:
    """(the template, the special-token strings) of a GGUF file: tokenizer.chat_template and the
    tokens of tokenizer.ggml.{bos,eos,unknown,padding}_token_id, as transformers names them."""
    meta = gguf.gguf_metadata(gguf.read_gguf(path))
    names = dict(bos="bos", eos="eos", unk="unknown", pad="padding")
    tokens = {
        f"{k}_token": meta["tokenizer.ggml.tokens"][i]
        for k, g in names.items()
        if (i := gguf.special_id(meta, g)) is not None
    }
    return meta.get("tokenizer.chat_template"), tokens


def model_chat(path, flag: str = "--init") -> tuple[str | None, str | None, dict]:
    """(its own template or None, its system text or None, its special-token strings) of what
    --init or --resume names: a GGUF file, a snapshot directory or a checkpoint (its stored
    template and system text)."""
    try:
        if is_snapshot(path):
            source, tokens = gguf_chat(path) if gguf.is_gguf(path) else snapshot_chat(Path(path))
            return source, None, tokens
    except ValueError as e:
        raise UsageError(f"{flag} {e}") from None
    ckpt = peek_checkpoint(path, flag)
    chat = stored_chat(ckpt)
    if chat is not None:
        return chat.source, chat.system, chat.tokens
    return None, None, named_tokens(ckpt["tokenizer"], ckpt.get("specials"))


CHAT_CHOICES = ("auto", "none")
"""--chat-template's words: the model's own template when it has one (the default), or raw
prompts; anything else is a template file."""


def check_chat(chat: data.ChatTemplate, probe: str = "What is the capital of France?") -> None:
    """ValueError with the reason when the template does not render a probe prompt, or renders it
    without the prompt's text: checked once, before any work."""
    try:
        text = data.render_chat(chat, probe)
    except Exception as e:  # Jinja's syntax, undefined and raise_exception errors, and any other
        reason = " ".join(str(e).split())[:200]
        raise ValueError(f"the template does not render ({type(e).__name__}: {reason})") from None
    if probe not in text:
        raise ValueError("the template renders a prompt without its text (it ignores messages)")


def resolve_chat(
    choice: str, system: str | None, init, resume_from: Path | None, dry_run: bool = False
) -> data.ChatTemplate | None:
    """The chat template every prompt goes through (DECISIONS.md §12), rendered once on a probe
    prompt: --chat-template `choice` auto (what --init holds: a snapshot's or GGUF file's template,
    a checkpoint's stored one), none, or a FILE; --system `system` replaces its system text. A
    resumed run keeps its checkpoint's (its flags were checked when it began). None: raw prompts.
    A UsageError in one line for a missing or failing file and for a --system with no template."""
    if resume_from is not None:
        return stored_chat(peek_checkpoint(resume_from, "--resume"))
    named = choice not in CHAT_CHOICES
    if named and not Path(choice).is_file():
        raise UsageError(
            f"--chat-template {choice}: no such file; give a Jinja template file, "
            "or auto (the model's own template) or none (raw prompts)"
        )
    if init is None and (named or system is not None):
        raise UsageError(
            f"{'--chat-template' if named else '--system'} applies to a pretrained model or "
            "checkpoint: give it with --init (a model trained here from scratch reads raw prompts)"
        )
    if init is None or dry_run:
        return None
    own, own_system, tokens = model_chat(init, "--init")
    try:
        source = Path(choice).read_text(encoding="utf-8") if named else None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--chat-template {choice}: cannot be read ({e})") from None
    source = source if named else own if choice == "auto" else None
    if source is None:
        if system is not None:
            why = "--chat-template none" if choice == "none" else f"--init {init}"
            raise UsageError(
                f"--system: {why} has no chat template to put a system turn in; "
                "drop --system, or give a template with --chat-template FILE.jinja"
            )
        return None
    chat = data.ChatTemplate(source, system if system is not None else own_system, tokens)
    try:
        check_chat(chat)
    except ValueError as e:
        where = choice if named else f"auto (the template of --init {init})"
        raise UsageError(
            f"--chat-template {where}: {e}; fix the template, or pass --chat-template none "
            "for raw prompts"
        ) from None
    return chat


# --------------------------------------------------------------------------------------------
# The run directory, resuming, the metrics log
# --------------------------------------------------------------------------------------------


def check_writable(flag: str, path) -> None:
    """The directory `path` can be created (or is there) and written: tried by making and removing a
    scratch directory in it or in its nearest existing parent, so a read-only file system, /sys or a
    path under a file is refused before any work, with the path and the reason."""
    path = Path(path).absolute()
    base = next(p for p in (path, *path.parents) if p.exists())
    if not base.is_dir():
        raise UsageError(
            f"{flag} {path}: cannot be created, {base} is a file; give a directory path"
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cagsr-probe-", dir=base))
    except OSError as e:
        raise UsageError(
            f"{flag} {path}: cannot {'write in' if base == path else 'be created in'} {base} "
            f"({e.strerror}); give a directory on a writable disk"
        ) from None


def check_out(out: str, overwrite: bool) -> None:
    """--out must not hold files of another run, unless --overwrite."""
    path = Path(out)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(
            f"--out {path} already holds files; choose another directory or pass --overwrite"
        )


def make_run_dir(out: str | None, overwrite: bool, size: str, dataset: str) -> Path:
    """--out, or a new runs/<time>-<size>-<dataset>/ (new for every run, even two in the
    same second)."""
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = data.dataset_name(dataset)
        path = Path("runs") / f"{stamp}-{size}-{name}"
        i = 1
        while path.exists():
            path = path.with_name(f"{stamp}-{size}-{name}-{i}")
            i += 1
    else:
        check_out(out, overwrite)
        path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_run(run_dir: str) -> tuple[dict, Path | None]:
    """--resume RUN_DIR: the run's own settings (args.json) and its last checkpoint, rl.pt before
    sft.pt (None: the run wrote none yet)."""
    run = Path(run_dir)
    if not (run / "args.json").is_file():
        raise UsageError(
            f"--resume {run}: no args.json there; give the directory of a run written by cagsr.py"
        )
    saved = json.loads((run / "args.json").read_text())
    return saved, next((run / n for n in ("rl.pt", "sft.pt") if (run / n).is_file()), None)


def run_complete(run_dir: str) -> bool:
    """True when the run in `run_dir` finished: its metrics log ends with the "done" row."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return bool(lines) and json.loads(lines[-1]).get("stage") == "done"


def check_resume(path: Path, ckpt: dict, run_dir: str, overrides: dict, size: str) -> None:
    """A checkpoint given to --resume must belong to the run: its size, model settings and tokenizer
    (against the run's other checkpoint) must match; and it must carry the resume state."""
    where = f"--resume {run_dir}: {path.name}"
    if "log_rows" not in ckpt:
        raise UsageError(
            f"{where} holds no resume state (it was written outside a run's SFT or RL stage, e.g. "
            f"by an experiment); start a new run with --init {path}"
        )
    if ckpt["size"] != size:
        raise UsageError(
            f"{where} is a {ckpt['size']} checkpoint but the run is --size {size}: "
            f"the file does not belong to this run"
        )
    for k, v in overrides.items():
        if ckpt["model_config"].get(k) != v:
            raise UsageError(
                f"{where} has {k}={ckpt['model_config'].get(k)} but the run set {k}={v}: "
                f"the file does not belong to this run"
            )
    world = parallel.rank_and_world()[1]
    if ckpt.get("world", 1) != world:
        raise UsageError(
            f"{where} was written by a run on {ckpt.get('world', 1)} process(es); resume it on as "
            f"many (now {world}), since every process's data shard and random stream are in it"
        )
    other = path.with_name("sft.pt") if path.name == "rl.pt" else None
    if (
        other is not None
        and other.is_file()
        and peek_checkpoint(other)["tokenizer"] != ckpt["tokenizer"]
    ):
        raise UsageError(
            f"{where} was written with another tokenizer than {other.name} in the same run "
            f"directory: the file does not belong to this run"
        )


class MetricsLog:
    """metrics.jsonl: one JSON row per line. `rows` counts the lines, so a checkpoint records where
    the log stood and a resumed run first cuts the log back to that line (`keep`), then appends."""

    def __init__(self, path: Path | None, keep: int = 0):
        self.rows = 0
        if path is None:  # ranks > 0 under torchrun: nothing is written
            self.file = None
            return
        lines = path.read_text().splitlines() if keep and path.exists() else []
        if len(lines) < keep:
            raise SystemExit(
                f"{path} has {len(lines)} rows but the checkpoint was written after row {keep}: "
                f"the log does not belong to this checkpoint"
            )
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
        print(
            "\nCtrl-C: stopping after this step and writing a checkpoint "
            "(Ctrl-C again aborts without one)",
            file=sys.stderr,
            flush=True,
        )

    def __call__(self) -> bool:
        return parallel.any_rank(self.requested)
