"""The SFT stage (§7.2): the paper's initial policy is the model fine-tuned with cross-entropy on
the task. The presets train from scratch; `--init` with a T5 snapshot fine-tunes pretrained weights
(the "pretrained" profile of presets.SFT_DEFAULTS). AdamW (betas 0.9/0.98, weight decay 0.01),
linear warm-up then cosine decay to a tenth, gradient-norm clipping at 1.

    L_SFT = - (1 / sum_b |y_b|) * sum_b sum_t log p_theta(y_t | x, y_<t)      (teacher forcing)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import data
import parallel
from checks import AT_LEAST_0, AT_LEAST_1, POSITIVE, check_fields
from parallel import MAX_BAD, NonFiniteError, fused, progress
from presets import SFT_DEFAULTS


@dataclass
class SFTConfig:
    steps: int = 1200
    """AdamW optimizer steps."""
    batch_size: int = 64
    """Pairs per step (under torchrun, split over the processes)."""
    lr: float = 2e-3
    """Peak learning rate."""
    warmup: int = 100
    """Linear warm-up steps, then cosine decay to lr/10."""
    eval_every: int = 250
    """Validation (and, in a run, a checkpoint) every this many steps."""

    def __post_init__(self):
        check_fields(
            self,
            dict(
                steps=AT_LEAST_1,
                batch_size=AT_LEAST_1,
                lr=POSITIVE,
                warmup=AT_LEAST_0,
                eval_every=AT_LEAST_1,
            ),
        )


def sft_config(size: str, **overrides) -> SFTConfig:
    """The per-size defaults of `size`, with `overrides` (field=value; None = keep) on top."""
    return replace(
        SFTConfig(**SFT_DEFAULTS[size]), **{k: v for k, v in overrides.items() if v is not None}
    )


def response_nll(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced negative log-likelihood of a collated batch's responses: (the sum over the
    response tokens, EOS included, of -log p(y_t | x, y_<t); the number of those tokens)."""
    logits, _ = model(batch["src"], batch["src_mask"], batch["tgt_in"])  # (B, T, V)
    nll = F.cross_entropy(
        logits.flatten(0, 1).float(), batch["tgt_out"].flatten(), reduction="none"
    )
    mask = batch["tgt_mask"].flatten()
    return (nll * mask).sum(), mask.sum()


@torch.no_grad()
def mean_nll(model, pairs, device, sp: data.Specials, batch_size=128) -> float:
    """Token-weighted mean negative log-likelihood (nats) of the responses of `pairs` (encoded
    (prompt ids, response ids); sp: their tokenizer's special ids) under `model`, teacher-forced.
    Perplexity is exp of this."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in data.batches(pairs, batch_size, sp, shuffle=False):
        nll, n = response_nll(model, {k: v.to(device) for k, v in batch.items()})
        total += float(nll)
        count += int(n)
    model.train(was_training)
    return total / max(1, count)


def sft_loss(model, batch) -> torch.Tensor:
    """L_SFT: the mean token cross-entropy of the reference responses given the prompts."""
    nll, count = response_nll(model, batch)
    return nll / count


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to peak/10 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _skipped(step: int, cause: str, bad: int, log) -> None:
    """Log a skipped step; MAX_BAD in a row stop the run."""
    tqdm.write(f"step {step + 1}: SFT {cause} not finite; step skipped")
    if log is not None and parallel.rank_and_world()[0] == 0:
        log(dict(stage="sft_skip", step=step + 1, skip_cause=cause))
    if bad >= MAX_BAD:
        raise NonFiniteError(
            f"SFT steps {step + 2 - bad}-{step + 1}: the {cause} was not finite {bad} times in a "
            "row; no weight was changed. Lower --sft-lr, or look for a bad batch in the data."
        )


def _evaluate(model, loss, step, cfg, val_pairs, sp, device, probe, timing) -> dict:
    """The row logged every cfg.eval_every steps: training loss, learning rate, throughput (training
    alone, all ranks' tokens), validation loss and `probe(model)`."""
    t_eval = time.time()
    row = dict(
        stage="sft",
        step=step,
        train_loss=loss.item(),
        lr=lr_at(step - 1, cfg.lr, cfg.warmup, cfg.steps),
        tokens_per_s=round(
            timing["tokens"]
            * parallel.rank_and_world()[1]
            / (t_eval - timing["t0"] - timing["eval_s"])
        ),
        val_loss=mean_nll(model, val_pairs, device, sp),
    )
    row.update(probe(model) if probe is not None else {})
    timing["eval_s"] += time.time() - t_eval
    row["elapsed_s"] = round(time.time() - timing["t0"], 1)
    extra = "".join(
        f" | {k} {v:.3f}" for k, v in row.items() if k.startswith("val_") and k != "val_loss"
    )
    tqdm.write(
        f"step {step:5d} | train loss {row['train_loss']:.3f} | "
        f"val loss {row['val_loss']:.3f}{extra} | "
        f"{row['tokens_per_s']:,} tok/s | {row['elapsed_s']:.0f}s"
    )
    model.train()
    return row


@dataclass(frozen=True)
class SFTTask:
    """What SFT needs about its task: the pairs it trains on, those it validates on, and their
    tokenizer's special ids."""

    train_pairs: list  # encoded (prompt ids, response ids) pairs to train on
    val_pairs: list  # encoded pairs of the validation loss
    specials: data.Specials  # the pairs' tokenizer's special ids


@dataclass(frozen=True)
class SFTRun:
    """One run of `train_sft`, beside the stage's settings (SFTConfig): where it starts, and how its
    training forward executes."""

    seed: int = 0  # the seed of the data order (seed + epoch)
    resume: dict | None = None  # {"step", "optimizer"} of a checkpoint: go on from there
    compile: bool = False  # the training forward through torch.compile


@dataclass(frozen=True)
class SFTHooks:
    """What `train_sft` calls as it goes, each optional."""

    log: Callable | None = None  # log(row) with each evaluation row and each "sft_skip" row
    probe: Callable | None = None  # probe(model) -> a dict of extra metrics for each evaluation row
    on_checkpoint: Callable | None = None  # on_checkpoint(step, optimizer): time for a checkpoint
    stop: Callable | None = None  # stop() -> True ends the run early (Ctrl-C)


def train_sft(
    model,
    task: SFTTask,
    cfg: SFTConfig,
    device,
    run: SFTRun = SFTRun(),
    hooks: SFTHooks = SFTHooks(),
) -> dict:
    """AdamW on L_SFT for cfg.steps steps. Returns the final optimizer, the loss history, the steps
    done and whether hooks.stop ended it early. task: the training and validation pairs and the
    special ids of their tokenizer.

    Every cfg.eval_every steps: validation loss and `hooks.probe(model)` (a dict of extra metrics,
    e.g. exact-match on a fixed validation subset), logged with hooks.log; then
    hooks.on_checkpoint(step, optimizer), which is also called when hooks.stop() turns True
    (Ctrl-C). run.resume: {"step", "optimizer"} of a checkpoint; the data order (from run.seed) and
    learning rate go on from there. A step whose loss or gradient is not finite is skipped (no
    weight changes; an "sft_skip" row is logged), and MAX_BAD in a row stop the run with
    NonFiniteError.

    Under torchrun each rank trains on its share of every batch through DistributedDataParallel
    and rank 0 alone evaluates and logs. run.compile: the training forward through torch.compile."""
    train_pairs, val_pairs, specials = task.train_pairs, task.val_pairs, task.specials
    log, probe, on_checkpoint, stop = hooks.log, hooks.probe, hooks.on_checkpoint, hooks.stop
    seed, resume = run.seed, run.resume
    rank, world = parallel.rank_and_world()
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01, **fused(device)
    )
    start = resume["step"] if resume else 0
    if resume:
        opt.load_state_dict(resume["optimizer"])
    net = parallel.data_parallel(
        model, device, find_unused_parameters=True
    )  # V(x) has no part in SFT
    net = torch.compile(net) if run.compile else net
    model.train()
    history, step, bad, stopped = [], start, 0, False
    timing = dict(t0=time.time(), tokens=0, eval_s=0.0)
    bar = progress(total=cfg.steps, initial=start, desc="SFT", unit="step")
    epoch, skip = divmod(
        start, data.batches_per_epoch(len(train_pairs), cfg.batch_size, world)
    )  # resumed: go on there
    while step < cfg.steps and not stopped:
        for batch in data.batches(
            train_pairs,
            cfg.batch_size,
            specials,
            seed=seed + epoch,
            shuffle=True,
            rank=rank,
            world=world,
            skip=skip,
        ):
            if step >= cfg.steps:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
            loss = sft_loss(net, batch)
            cause, _ = parallel.guarded_step(opt, loss, 1.0)
            bad = bad + 1 if cause else 0
            if cause:
                _skipped(step, cause, bad, log)
            step += 1
            timing["tokens"] += int(batch["src_mask"].sum() + batch["tgt_mask"].sum())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if rank == 0 and (step % cfg.eval_every == 0 or step == cfg.steps):
                history.append(
                    _evaluate(model, loss, step, cfg, val_pairs, specials, device, probe, timing)
                )
                if log is not None:
                    log(history[-1])
            stopped = stop is not None and step < cfg.steps and stop()
            if (
                on_checkpoint is not None
                and step < cfg.steps
                and (stopped or step % cfg.eval_every == 0)
            ):
                on_checkpoint(step, opt)
            if stopped:
                break
        epoch, skip = epoch + 1, 0
    bar.close()
    model.eval()
    return dict(optimizer=opt, history=history, steps=step, stopped=stopped)
