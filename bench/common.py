"""What both CPU benchmarks share: bench/cpu.py (the small workload and the command) and
bench/same_weights.py (one T5-shaped snapshot loaded by both implementations); bench/gpu.py uses
them too.

Timing and memory (`timed`, `measure`: peak RSS through /proc, Linux), the large-matmul rate, the
time a call's own matrix products take (`matmul_floor`), how
each side samples (`rl_temperature`, `hf_sampling`, `samplers`), the optional peer
(`peer_available`), the operator profile (`print_profile`) and the fresh worker process
(`run_worker`: `python -m bench.cpu --worker ...`, run from the repository root).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def peak_reset():
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_kib(field="VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def timed(fn, calls: int, after_warmup=None) -> list[float]:
    fn()  # warm-up
    if after_warmup is not None:
        after_warmup()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(run, calls: int) -> dict:
    """`calls` timed calls of run() after a warm-up, and two peak-memory figures in MiB: the peak
    RSS above the RSS at entry (the built model's), the warm-up call included, so that the
    libraries' first-call set-up counts; and the same from after the warm-up (what each further
    call needs)."""
    peak_reset()
    base = rss_kib()
    mem = {}

    def warmed():
        mem["first"] = (rss_kib("VmHWM") - base) / 1024
        peak_reset()
        mem["base"] = rss_kib()

    times = timed(run, calls, warmed)
    return dict(
        times=times,
        peak_growth_mib=max(mem["first"], (rss_kib("VmHWM") - base) / 1024),
        steady_growth_mib=(rss_kib("VmHWM") - mem["base"]) / 1024,
    )


def matmul_flops(n=2048, calls=5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / statistics.median(timed(lambda: a @ b, calls))


MATMUL_OPS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm")
"""The matrix products of a CPU run, as torch dispatches them: linear layers, the head, `@`, and
attention's explicit products."""
FUSED_ATTENTION = "aten._scaled_dot_product"
"""The prefix of the fused attention kernels (F.scaled_dot_product_attention's CPU flash kernel):
its two matrix products and the softmax between them, in one operator."""


def matmul_floor(run) -> dict:
    """The floor of one call of run(): the seconds its own matrix products take, each timed where it
    runs, inside the call (a TorchDispatchMode around every operator; CPU operators are
    synchronous). Returns {"floor_s": the products (MATMUL_OPS) and the fused attention kernels
    (FUSED_ATTENTION), whose time is mostly their products; "products_s": MATMUL_OPS alone;
    "matmuls": how many products and fused attentions ran; "call_s": the whole call under the
    clock, above an unclocked call's by the clock's own overhead on every operator}."""
    from torch.utils._python_dispatch import TorchDispatchMode

    clock = {"products": 0.0, "attention": 0.0, "calls": 0}

    class MatmulClock(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            kind = (
                "products"
                if name in MATMUL_OPS
                else "attention"
                if name.startswith(FUSED_ATTENTION)
                else None
            )
            if kind is None:
                return func(*args, **(kwargs or {}))
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            clock[kind] += time.perf_counter() - t0
            clock["calls"] += 1
            return out

    t0 = time.perf_counter()
    with MatmulClock():
        run()
    return dict(
        floor_s=clock["products"] + clock["attention"],
        products_s=clock["products"],
        matmuls=clock["calls"],
        call_s=time.perf_counter() - t0,
    )


def rl_temperature(profile: str) -> float:
    """The temperature RL samples at on `profile` (presets.RL_PROFILES): the bench samples as RL
    samples, from the full softmax at that temperature, on both sides."""
    from ppo import PPOConfig
    from presets import RL_PROFILES

    return PPOConfig(**RL_PROFILES["run"][profile]["ppo"]).temperature


def hf_sampling(greedy: bool, temperature: float) -> dict:
    """generate()'s keywords for RL's sampler: the full softmax at `temperature` (top_k=0 turns its
    top-k warper off), or greedy."""
    return (
        dict(do_sample=False) if greedy else dict(do_sample=True, top_k=0, temperature=temperature)
    )


def samplers(vocab: int, temperature: float) -> str:
    """What each side's sampler is, in words."""
    from sampling import CDF_DRAW_FROM

    ours = (
        "the inverse CDF over blocks of sqrt(V) entries, then inside the block, float64"
        if vocab >= CDF_DRAW_FROM
        else "torch.multinomial"
    )
    hf = ", ".join(f"{k}={v}" for k, v in hf_sampling(False, temperature).items())
    return (
        f"both draw from the full softmax at T={temperature}. "
        "Ours: model.sample, softmax then sampling.draw over "
        f"{vocab:,} entries ({ours}), a seeded torch.Generator; HF: generate({hf}) "
        "(softmax, then torch.multinomial: one exponential random number per entry and row), "
        "the global RNG"
    )


NAMES = {"ours": "cagsr (model.py)", "hf": "HF T5 (eager, output_attentions)"}


def peer_available(what: str) -> bool:
    """Whether `transformers` imports; if not, say that `what` is skipped."""
    try:
        import transformers  # noqa: F401

        return True
    except ImportError:
        print(f"transformers is not installed: {what} (pip install transformers)")
        return False


def print_profile(name: str, run, rows=12, shapes=True) -> None:
    """Time one call of run() after a warm-up, then profile a third (torch.profiler, CPU) and print
    its operators by self CPU time and the matrix products' share of the operator time; with
    `shapes`, also the heaviest (operator, input shapes) pairs and the FLOPs the profiler counts in
    the products (mm, addmm, bmm, baddbmm; not those inside the fused scaled_dot_product_attention)
    and their rate. The profiler slows memory-bound operators (copy_, cat) most, and more so when it
    records shapes and FLOPs: the operator time is printed beside the unprofiled call's."""
    from torch.profiler import ProfilerActivity, profile

    wall = timed(run, 1)[0]
    detail = dict(with_flops=shapes, record_shapes=shapes)
    with profile(activities=[ProfilerActivity.CPU], **detail) as prof:
        run()
    print(f"\n{name}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    if shapes:
        print(
            prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total",
                row_limit=rows // 2,
                max_name_column_width=30,
                max_shapes_column_width=70,
            )
        )
    ops = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ops) / 1e6  # seconds
    mm = [e for e in ops if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")]
    flops, mm_s = sum(e.flops for e in mm), sum(e.self_cpu_time_total for e in mm) / 1e6
    rate = f", {flops / 1e12:.2f} TFLOP at {flops / mm_s / 1e9:.0f} GFLOP/s" if shapes else ""
    print(
        f"{name}: one call {wall:.2f} s unprofiled, {total:.2f} s of operator time profiled; "
        f"matrix products ({', '.join(sorted(e.key for e in mm))}): {mm_s:.2f} s "
        f"({mm_s / total:.0%} of the operator time){rate}"
    )


def run_worker(system, task, calls, threads, *extra) -> dict:
    """bench/cpu.py's worker(...) (or bench/same_weights.py's same_weights_worker, with extra =
    --snapshot DIR --shape NAME [--floor]) in a fresh process: `python -m bench.cpu --worker ...`,
    run from the repository root."""
    cmd = [
        sys.executable,
        "-m",
        "bench.cpu",
        "--worker",
        system,
        "--task",
        task,
        "--calls",
        str(calls),
        "--threads",
        str(threads),
        *extra,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if p.returncode != 0:
        raise RuntimeError(f"{system}/{task} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])
