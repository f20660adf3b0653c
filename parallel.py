"""Data parallelism under `torchrun`, shared by SFT and RL, the one guarded optimizer step (and
the non-finite guard around it), and the pieces every training loop shares: the fused Adam step on
CUDA and the rank-0 progress bar.

torch's DistributedDataParallel averages the gradients; the functions here are the few other
places where the ranks must agree (skip decisions, Ctrl-C, logged numbers, random streams, the
weights after a stage). In a single process each one is the plain version, so the training loops
call them unconditionally.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm


def check_split(flag: str, n: int, world: int) -> None:
    """A batch of `n` (set by `flag`) is shared out evenly over `world` processes, or
    a ValueError."""
    if n % world:
        raise ValueError(
            f"{flag} {n} cannot be split evenly over {world} processes: "
            f"choose a multiple of {world}"
        )


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) unless torch.distributed
    is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init(
    device_request: str | None, single_process: str | None = None
) -> tuple[int, int, torch.device | None]:
    """Data parallelism under `torchrun --nproc_per_node K cagsr.py ...`, which sets WORLD_SIZE,
    RANK and LOCAL_RANK: one process per GPU (NCCL), or K CPU processes (gloo) with --device cpu or
    no GPU.
    single_process: what the run is when it must not run under torchrun ("--dry-run", ...),
    else None.
    Returns (rank, world, device); (0, 1, None) without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    if single_process is not None:
        raise SystemExit(
            f"{single_process} runs in one process; run it with python, not torchrun "
            f"(WORLD_SIZE={world})"
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and (device_request is None or device_request.startswith("cuda")):
        if local >= torch.cuda.device_count():
            raise SystemExit(
                f"torchrun started {world} processes on this node but only "
                f"{torch.cuda.device_count()} GPU(s) are visible; "
                f"use --nproc_per_node {torch.cuda.device_count()}"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    if rank > 0:  # one voice: rank 0 prints, logs and checkpoints
        sys.stdout = open(os.devnull, "w")
    print(f"data parallel: {world} processes ({backend}), this is rank {rank} on {device}")
    return rank, world, device


def close() -> None:
    """End the process group, if there is one."""
    if rank_and_world()[1] > 1:
        dist.destroy_process_group()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over all ranks (x itself in one process)."""
    if rank_and_world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def all_finite(x: torch.Tensor) -> bool:
    """True when x is finite on every rank: the ranks decide together to skip an update, or one of
    them would wait forever in DDP's gradient all-reduce."""
    bad = (~torch.isfinite(x)).sum().to(torch.float32).reshape(1)
    return bool(all_sum(bad) == 0)


def _collective_device() -> torch.device:
    """Where small all-reduced tensors live: the GPU under NCCL, the CPU under gloo."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def any_rank(flag: bool) -> bool:
    """True when `flag` is True on any rank (Ctrl-C reaches the ranks at different moments)."""
    if rank_and_world()[1] == 1:
        return flag
    return bool(all_sum(torch.tensor([float(flag)], device=_collective_device())) > 0)


def mean_over_ranks(row: dict) -> dict:
    """A log row with every float averaged over the ranks (each holds an equal shard, so the mean
    of the ranks' means is the mean over the whole batch). Integers, flags and text are left as
    they are."""
    if rank_and_world()[1] == 1:
        return row
    keys = [k for k, v in row.items() if isinstance(v, float)]
    if not keys:
        return row
    total = all_sum(
        torch.tensor([row[k] for k in keys], dtype=torch.float64, device=_collective_device())
    )
    return {**row, **{k: float(v) / rank_and_world()[1] for k, v in zip(keys, total.tolist())}}


def all_gather_states(gen: torch.Generator) -> list[torch.Tensor]:
    """Every rank's state of `gen` (each rank samples with its own stream), in rank order, so one
    checkpoint can put every rank back where it was. One process: [its state]."""
    state = gen.get_state()
    if rank_and_world()[1] == 1:
        return [state]
    states = [None] * rank_and_world()[1]
    dist.all_gather_object(states, state)
    return states


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (obj itself in one process)."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def data_parallel(module, device, find_unused_parameters=False):
    """`module` wrapped in DistributedDataParallel when running under torchrun, else unchanged.
    Wrapping broadcasts rank 0's weights, so every rank starts from the same model."""
    if rank_and_world()[1] == 1:
        return module
    device = torch.device(device)
    return DistributedDataParallel(
        module,
        device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def replicas_agree(model) -> float:
    """Largest difference between ranks of per-tensor float64 checksums (sum and sum of squares) of
    the weights: 0.0 when every rank holds the same model, which data parallelism must keep true.
    One process: 0.0."""
    rank, world = rank_and_world()
    if world == 1:
        return 0.0
    sums = torch.stack(
        [
            torch.stack([p.detach().double().sum(), p.detach().double().pow(2).sum()])
            for p in model.parameters()
        ]
    ).flatten()
    gathered = [torch.empty_like(sums) for _ in range(world)]
    dist.all_gather(gathered, sums)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def check_replicas(model, stage: str) -> None:
    """After a data-parallel stage: every rank must hold the same weights (`replicas_agree`)."""
    world = rank_and_world()[1]
    if world == 1:
        return
    diff = replicas_agree(model)
    if diff != 0.0:
        raise RuntimeError(
            f"after {stage}, the weights differ between ranks (checksum difference {diff:g}): "
            f"data parallelism is broken; do not use this run"
        )
    print(
        f"after {stage}: all {world} ranks hold identical weights "
        "(per-tensor checksums agree exactly)"
    )


class NonFiniteError(RuntimeError):
    """Updates were skipped MAX_BAD iterations (or SFT steps) in a row because something was
    not finite."""


MAX_BAD = 3


def fused(device) -> dict:
    """The fused (one-kernel) Adam/AdamW step on CUDA; the default elsewhere."""
    return dict(fused=True) if torch.device(device).type == "cuda" else {}


def progress(iterable=None, **kw):
    """A tqdm progress bar (dynamic width, redrawn at most once a second), drawn by rank 0 only. No
    other `disable` is passed, so TQDM_DISABLE=1 and the other TQDM_* environment settings apply."""
    if rank_and_world()[0] > 0:
        kw["disable"] = True
    return tqdm(iterable, dynamic_ncols=True, mininterval=1.0, **kw)


def guarded_step(optimizer, loss, max_grad_norm: float) -> tuple[str | None, torch.Tensor | None]:
    """One optimizer step that nothing non-finite reaches: backward, clip the gradient norm to
    `max_grad_norm` (0 = no clipping), step. Skipped, with every gradient cleared, when the loss is
    not finite on some rank or the gradient norm is not finite. Returns (cause, grad norm): cause is
    None when the step was applied, else "loss" or "gradient"."""
    optimizer.zero_grad(set_to_none=True)
    if not all_finite(loss):
        return "loss", None
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(
        params, max_grad_norm if max_grad_norm > 0 else float("inf")
    )
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return "gradient", norm
    optimizer.step()
    return None, norm
