"""CAGSR from the command line: data -> tokenizer -> SFT, the paper's initial policy (§7.2).

    python cagsr.py                      # the main job on the embedded defaults
    python cagsr.py --size small --dataset qa-grounded
    python cagsr.py --help

Every run writes a new run directory (runs/<time>-<size>-<dataset>/ unless --out is given) with
the arguments, a JSONL metrics log and checkpoints that hold the weights together with the model
config and the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import data
from evaluation import exact_match
from model import SIZES, EncoderDecoder, ModelConfig, config_for

# Training defaults per size, next to the model sizes they go with. The SFT budget of `tiny` is
# a deliberate trade-off (README, "The SFT stage"): enough steps for most held-out answers to be
# right on a 2-core CPU, leaving room for RL inside the main job's 10 minutes.
SFT_DEFAULTS = {
    "tiny": dict(sft_steps=1200, batch_size=64, lr=2e-3),
    "small": dict(sft_steps=3000, batch_size=64, lr=1e-3),
    "base": dict(sft_steps=10000, batch_size=64, lr=5e-4),
    "1.3b": dict(sft_steps=20000, batch_size=64, lr=1e-4),
}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse, but an unknown flag is answered with the list of the valid ones."""

    def error(self, message):
        valid = sorted(o for a in self._actions for o in a.option_strings if o.startswith("--"))
        self.exit(2, f"{self.prog}: error: {message}\nvalid flags: {' '.join(valid)}\n")


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
    p = Parser(description="CAGSR (arXiv 2502.10482): SFT of an encoder-decoder, the paper's initial policy.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="tiny", help=f"model preset: {', '.join(SIZES)}")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one ModelConfig field of the preset (repeatable); printed at start")
    p.add_argument("--last-layers", type=int, default=None,
                   help="L' of §3.2: decoder layers whose cross-attention is recorded (preset: 1)")
    p.add_argument("--dataset", default="qa",
                   help=f"one of {', '.join(data.DATASETS)}, or a PATH.jsonl with prompt/response fields")
    p.add_argument("--stage", default="sft", choices=["sft"], help="what to run")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT optimizer steps (default: per size)")
    p.add_argument("--batch-size", type=int, default=None, help="SFT batch size in pairs (default: per size)")
    p.add_argument("--lr", type=float, default=None, help="SFT peak learning rate, AdamW (default: per size)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then cosine decay to lr/10")
    p.add_argument("--eval-every", type=int, default=250, help="validation loss every this many steps")
    p.add_argument("--num-eval", type=int, default=500, help="held-out test prompts scored by exact-match")
    p.add_argument("--truncate", action="store_true",
                   help="truncate over-long prompts/responses (with a warning) instead of failing")
    p.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and sampling")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    p.add_argument("--out", default=None, help="run directory (default: a new runs/<time>-<size>-<dataset>)")
    p.add_argument("--overwrite", action="store_true", help="allow --out to name a non-empty directory")
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


def make_run_dir(args) -> Path:
    if args.out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = Path(args.dataset).stem if args.dataset.endswith(".jsonl") else args.dataset
        out = Path("runs") / f"{stamp}-{args.size}-{name}"
        i = 1
        while out.exists():                       # new for every run, even two in the same second
            out = out.with_name(f"{stamp}-{args.size}-{name}-{i}")
            i += 1
    else:
        out = Path(args.out)
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise SystemExit(f"--out {out} already holds files; choose another directory or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_checkpoint(path: Path, **state) -> None:
    """torch.save to a temporary file, flushed to disk, then renamed over `path`: a crash at any
    moment leaves either the old checkpoint or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """(model, tokenizer, checkpoint dict) from a file written by `save_checkpoint`."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model = EncoderDecoder(ModelConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model, data.tokenizer_from_str(ckpt["tokenizer"]), ckpt


# --------------------------------------------------------------------------------------------
# SFT: cross-entropy fine-tuning, the paper's initial policy (§7.2)
# --------------------------------------------------------------------------------------------

def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def sft_loss(model, batch) -> torch.Tensor:
    """Mean token cross-entropy of the reference response given the prompt (teacher forcing)."""
    logits, _ = model(batch["src"], batch["src_mask"], batch["tgt_in"])          # (B, T, V)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), batch["tgt_out"].flatten(), reduction="none")
    mask = batch["tgt_mask"].flatten()
    return (nll * mask).sum() / mask.sum()


@torch.no_grad()
def eval_loss(model, pairs, device, batch_size=128) -> float:
    """Token-weighted mean cross-entropy over `pairs`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in data.batches(pairs, batch_size, seed=0, shuffle=False):
        batch = to_device(batch, device)
        n = int(batch["tgt_mask"].sum())
        total += float(sft_loss(model, batch)) * n
        count += n
    model.train(was_training)
    return total / count


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to peak/10 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_sft(model, train_pairs, val_pairs, *, steps, batch_size, lr, warmup, eval_every, device, seed,
              log=None, probe=None) -> dict:
    """AdamW on the SFT loss for `steps` steps. Returns the final optimizer and the loss history.

    Every `eval_every` steps: validation loss, and `probe(model)` (a dict of extra metrics, e.g.
    exact-match on a fixed validation subset) when given."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    history, step, t0, tokens, eval_s = [], 0, time.time(), 0, 0.0
    bar = tqdm(total=steps, desc="SFT", unit="step", dynamic_ncols=True, mininterval=1.0)
    epoch = 0
    while step < steps:
        for batch in data.batches(train_pairs, batch_size, seed=seed + epoch, shuffle=True):
            if step >= steps:
                break
            batch = to_device(batch, device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr, warmup, steps)
            loss = sft_loss(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"SFT loss is {float(loss)} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            tokens += int(batch["src_mask"].sum() + batch["tgt_mask"].sum())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if step % eval_every == 0 or step == steps:
                t_eval = time.time()
                row = dict(stage="sft", step=step, train_loss=loss.item(), lr=lr_at(step - 1, lr, warmup, steps),
                           tokens_per_s=round(tokens / (t_eval - t0 - eval_s)),  # training alone, evaluation excluded
                           val_loss=eval_loss(model, val_pairs, device))
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
        epoch += 1
    bar.close()
    model.eval()
    return dict(optimizer=opt, history=history, steps=step)


@torch.no_grad()
def answer(model, tok, prompts: list[str], device, max_new_tokens=64, batch_size=128) -> list[str]:
    """Greedy answers to `prompts`, decoded to text."""
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [data.encode_prompt(tok, p) for p in prompts[i:i + batch_size]]
        batch = data.collate([(x, [data.EOS_ID]) for x in ids])
        r = model.sample(batch["src"].to(device), batch["src_mask"].to(device), greedy=True,
                         max_new_tokens=max_new_tokens, record_attention=False)
        out += [data.decode(tok, row.tolist()) for row in r.tokens.cpu()]
    return out


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.time()
    if args.size not in SIZES:
        raise SystemExit(f"--size {args.size!r} is not a preset; valid sizes: {', '.join(SIZES)}")
    overrides = parse_overrides(args.set)
    if args.last_layers is not None:
        overrides["last_layers"] = args.last_layers
    defaults = SFT_DEFAULTS[args.size]
    steps = args.sft_steps if args.sft_steps is not None else defaults["sft_steps"]
    batch_size = args.batch_size if args.batch_size is not None else defaults["batch_size"]
    lr = args.lr if args.lr is not None else defaults["lr"]
    device = pick_device(args.device)
    seed_everything(args.seed)

    # Data and tokenizer (§7.1): generated here, or the user's JSONL; BPE trained on the train split.
    splits = data.load_dataset(args.dataset, seed=args.seed)
    preset_vocab = overrides.get("vocab_size", SIZES[args.size]["vocab_size"])
    tok = data.train_tokenizer([t for r in splits.train for t in (r["prompt"], r["response"])], preset_vocab)
    # A run's vocabulary is its tokenizer's; the preset's number is only the BPE target.
    overrides["vocab_size"] = tok.get_vocab_size()
    cfg = config_for(args.size, **overrides)
    print(f"size {args.size} | overrides {overrides} | device {device}")
    print(f"dataset {args.dataset}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test pairs; "
          f"BPE vocabulary {cfg.vocab_size} (target {preset_vocab})")
    enc = lambda recs: data.encode_records(tok, recs, cfg.max_src_len, cfg.max_tgt_len, truncate=args.truncate)
    try:
        train_pairs, val_pairs = enc(splits.train), enc(splits.val)
    except ValueError as e:
        raise SystemExit(f"{args.dataset}: {e}") from None

    model = EncoderDecoder(cfg).to(device)
    print(f"model: {model.num_params():,} parameters | SFT {steps} steps x {batch_size} pairs, peak lr {lr}")
    run_dir = make_run_dir(args)
    (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
    metrics = open(run_dir / "metrics.jsonl", "w")

    def log(row):
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()

    probe_set = splits.val[:200]

    def probe(m):  # exact-match on a fixed validation subset: the SFT curve in the README
        preds = answer(m, tok, [r["prompt"] for r in probe_set], device)
        return dict(val_exact_match=sum(exact_match(p, r["response"]) for p, r in zip(preds, probe_set)) / len(probe_set))

    t0 = time.time()
    result = train_sft(model, train_pairs, val_pairs, steps=steps, batch_size=batch_size, lr=lr, warmup=args.warmup,
                       eval_every=args.eval_every, device=device, seed=args.seed, log=log, probe=probe)
    sft_seconds = time.time() - t0
    save_checkpoint(run_dir / "sft.pt", model=model.state_dict(), optimizer=result["optimizer"].state_dict(),
                    model_config=asdict(cfg), tokenizer=data.tokenizer_to_str(tok), stage="sft",
                    step=result["steps"], args=vars(args), rng=torch.get_rng_state())

    # Held-out answers: a few to read, and exact-match on the test split.
    test = splits.test[:args.num_eval]
    preds = answer(model, tok, [r["prompt"] for r in test], device)
    em = sum(exact_match(p, r["response"]) for p, r in zip(preds, test)) / max(1, len(test))
    print("\nSample answers on held-out test prompts (greedy):")
    for r, p in list(zip(test, preds))[:5]:
        print(f"  prompt:    {r['prompt']}\n  model:     {p}\n  reference: {r['response']}\n")
    summary = dict(stage="sft_eval", exact_match=em, num_eval=len(test), sft_seconds=round(sft_seconds, 1),
                   total_seconds=round(time.time() - t_start, 1))
    log(summary)
    metrics.close()
    print(f"held-out exact-match: {em:.1%} of {len(test)} test prompts | SFT {sft_seconds:.0f}s | "
          f"total {summary['total_seconds']:.0f}s | run directory {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
