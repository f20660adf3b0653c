"""Speed of the project's model next to Hugging Face T5, on fixed workloads (USAGE.md, "Performance").

    python -m bench.cpu                  # every benchmark, CPU, 2 threads; `transformers` optional
    python -m bench.cpu --repeats 2      # fewer interleaved rounds
    python -m bench.cpu --profile        # where one rollout's time goes, by operator
    python -m bench.cpu --same-weights   # only the same-weights comparison (below; minutes)
    python -m bench.cpu --profile --same-weights   # where its rollouts' time goes, by operator

The workload (both systems): d_model 256, 4 + 4 layers, 4 heads, d_ff 1024, vocabulary 8,000, random
weights; rollouts of 16 prompts x 32 tokens, N = 4 samples each, 48 new tokens, sampled as RL samples
(the full softmax at the RL temperature of the `small` preset, 0.5: `rl_temperature`), with the
cross-attention recorded; a training step on 64 x (32 prompt, 48 target) tokens with AdamW.

Each measurement runs in a fresh process (`--worker`), after a warm-up, as the median of several
calls; the two systems alternate round by round. Ratios (capture on/off, 96/48 tokens, greedy/sampled)
are medians of interleaved pairs inside one process, so that a process running slower throughout
cancels out. HF T5 is built with attn_implementation="eager"
(with SDPA it returns empty cross-attentions) and generate(output_attentions=True,
return_dict_in_generate=True), which returns every layer's and head's map at every step.
`transformers` is a benchmark-only dependency: without it, the peer's rows are skipped with a message.

Same weights (the last part of `python -m bench.cpu`, or alone with --same-weights): one random snapshot
shaped like T5-base (d_model 768, 12 + 12 layers, 12 heads, d_kv 64, d_ff 3072, vocabulary 32,128)
in the T5 v1.0 layout (relu FFN, tied head scaled by d_model^-0.5: T5-base's own), built by
transformers with a fixed seed and written by save_pretrained into a temporary directory that
both load: ours by snapshot.from_pretrained, HF by T5ForConditionalGeneration.from_pretrained (eager).
Check: greedy tokens (2 prompts x N = 4, 16 new tokens) equal up to each row's first EOS, and
Abar over the last L' = 3 decoder layers and all heads within 1e-4 (ours: the sampler's Abar; HF:
the mean of generate's maps of those layers and heads). Rollout: 16 prompts x 256 tokens, N = 4
samples, 64 new tokens, sampled as RL samples from a snapshot (the full softmax at the `pretrained`
RL temperature, 1.0), maps recorded, decoder started from pad 0, EOS 1. Sampled outputs differ
(different samplers and random streams, see `samplers`). One rollout takes ~20 s (ours) to ~30 s
(HF) on 2 idle cores, minutes when other processes compete for them, so each system gets
--sw-rounds fresh processes (default 3) of one warm-up and --sw-calls timed calls (default 1):
about 6 minutes in all. tests/test_bench.py runs the same functions on SAME["tiny"]; bench/gpu.py
runs them on CUDA.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

B, S, N, NEW, TRAIN_B, TRAIN_T = 16, 32, 4, 48, 64, 48
DIMS = dict(vocab_size=8000, d_model=256, n_heads=4, n_enc_layers=4, n_dec_layers=4, d_ff=1024)


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


def rl_temperature(profile: str) -> float:
    """The temperature RL samples at on `profile` (presets.RL_PROFILES): the bench samples as RL samples,
    from the full softmax at that temperature, on both sides."""
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
    return (
        f"both draw from the full softmax at T={temperature}. Ours: model.sample, softmax then sampling.draw over "
        f"{vocab:,} entries ({ours}), a seeded torch.Generator; HF: generate({', '.join(f'{k}={v}' for k, v in hf_sampling(False, temperature).items())}) "
        f"(softmax, then torch.multinomial: one exponential random number per entry and row), the global RNG"
    )


def rollout_fn(system, model, new_tokens, record=True, greedy=False):
    import torch

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
                    num_samples=N,
                    max_new_tokens=new_tokens,
                    temperature=temperature,
                    greedy=greedy,
                    record_attention=record,
                    generator=torch.Generator().manual_seed(1),
                    bos_id=1,
                    eos_id=2,
                    pad_id=0,
                )  # the ids of a tokenizer trained here
            assert r.tokens.size(1) == new_tokens or not r.mask[:, -1].any()

        return run

    # HF refuses num_return_sequences > 1 without sampling: greedy runs on the prompts repeated N times.
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
    step: the usual convention for the matmul FLOPs of forward + backward (attention score FLOPs left
    out; they are under 5% at these lengths). For ours it is 2.2% above the exact count of matrix
    products, because it counts the cross-attention keys and values at the target tokens (they run
    on the prompt tokens) and the LayerNorm weights (tests/test_bench.py checks both by FlopCounterMode)."""
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


def matmul_flops(n=2048, calls=5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / statistics.median(timed(lambda: a @ b, calls))


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


def measure(run, calls: int) -> dict:
    """`calls` timed calls of run() after a warm-up, and two peak-memory figures in MiB: the peak RSS
    above the RSS at entry (the built model's), the warm-up call included, so that the libraries'
    first-call set-up counts; and the same from after the warm-up (what each further call needs)."""
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


# --------------------------------------------------------------------------------------------
# Same weights: one random T5 snapshot, loaded by both implementations
# --------------------------------------------------------------------------------------------

PAD, EOS = 0, 1  # T5: pad 0 (also the decoder's start), EOS 1; ids 0-2 are special
SAME = {  # snapshot shape (T5Config fields), rollout B x S, N, new tokens, L', greedy check (prompts, new tokens)
    "base": dict(
        t5=dict(
            vocab_size=32128,
            d_model=768,
            d_kv=64,
            d_ff=3072,
            num_layers=12,
            num_decoder_layers=12,
            num_heads=12,
        ),
        B=16,
        S=256,
        N=4,
        new=64,
        last_layers=3,
        check=(2, 16),
    ),
    "tiny": dict(
        t5=dict(
            vocab_size=200,
            d_model=64,
            d_kv=16,
            d_ff=256,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
        ),
        B=2,
        S=16,
        N=2,
        new=8,
        last_layers=2,
        check=(2, 8),
    ),
}


def make_snapshot(path, shape="base", seed=0):
    """Write a random T5 v1.0-layout snapshot (relu FFN, tied head scaled by d_model^-0.5: T5-base's own
    layout) of SAME[shape]'s size into the directory `path` with transformers' save_pretrained.

    Built by transformers with torch.manual_seed(seed) and T5's init, then, as in
    tests/test_pretrained.py, the shared embedding x0.1 and every residual branch's output projection
    (o, wo) x8: with T5's init alone the embedding dominates the residual stream and the tied head
    echoes the decoder's input, so that greedy decoding repeats the start token and the check below
    would compare nothing but pad ids."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(seed)
    cfg = T5Config(
        **SAME[shape]["t5"],
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        decoder_start_token_id=PAD,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    model = T5ForConditionalGeneration._from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        model.shared.weight.mul_(0.1)
        for name, p in model.named_parameters():
            if name.endswith((".o.weight", ".wo.weight")):
                p.mul_(8.0)
    model.save_pretrained(path)


def load_snapshot(system: str, path, shape="base", device="cpu"):
    """The snapshot in `path`, loaded by `system` onto `device`: ours by snapshot.from_pretrained
    (recording the last L' decoder layers), HF by T5ForConditionalGeneration.from_pretrained, eager
    attention; float32 weights (bf16 runs under autocast, as `python cagsr.py --precision bf16`)."""
    import torch

    if system == "ours":
        from interop.snapshot import from_pretrained

        return from_pretrained(path, last_layers=SAME[shape]["last_layers"]).to(device).eval()
    from transformers import T5ForConditionalGeneration
    from transformers.utils import logging

    logging.disable_progress_bar()
    return (
        T5ForConditionalGeneration.from_pretrained(
            path, attn_implementation="eager", dtype=torch.float32
        )
        .to(device)
        .eval()
    )


def t5_prompts(b: int, shape="base", seed=0, device="cpu"):
    """b random prompts of SAME[shape]["S"] ids in [3, vocab) (no special id, no padding):
    src (b, S) long, mask (b, S) bool."""
    import torch

    S, V = SAME[shape]["S"], SAME[shape]["t5"]["vocab_size"]
    src = torch.randint(3, V, (b, S), generator=torch.Generator().manual_seed(seed))
    return src.to(device), torch.ones(b, S, dtype=torch.bool, device=device)


def t5_rollout(system: str, model, src, mask, n: int, new: int, greedy=False, precision=None):
    """n responses of `new` tokens per prompt, cross-attention recorded. src, mask (B, S).
    Ours: a Rollout (tokens (B*n, T), attn = Abar (B*n, T, S)); it stops when every row has sampled
    EOS. HF: generate's output (sequences (B*n, 1+T), every step's, layer's and head's cross-attention
    map); when sampling it makes all `new` tokens (min_new_tokens), greedy stops as ours does.
    precision: "fp32" or "bf16" (autocast, runs.autocast); None = the device's default."""
    import torch

    from cli.runs import autocast

    temperature = rl_temperature("pretrained")
    with torch.no_grad(), autocast(src.device, precision):
        if system == "ours":
            return model.sample(
                src,
                mask,
                num_samples=n,
                max_new_tokens=new,
                temperature=temperature,
                greedy=greedy,
                record_attention=True,
                generator=torch.Generator(device=src.device).manual_seed(1),
                bos_id=PAD,
                eos_id=EOS,
                pad_id=PAD,
            )
        if greedy:  # HF refuses num_return_sequences > 1 without sampling
            src, mask, n = src.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), 1
        return model.generate(
            input_ids=src,
            attention_mask=mask.long(),
            **hf_sampling(greedy, temperature),
            num_return_sequences=n,
            min_new_tokens=None if greedy else new,
            max_new_tokens=new,
            output_attentions=True,
            return_dict_in_generate=True,
        )


def tokens_and_abar(system: str, out, last_layers: int, width: int):
    """A rollout's tokens (B*N, width), pad after the first EOS and past its end, and Abar
    (B*N, width, S), the cross-attention averaged over the last `last_layers` layers and all heads,
    0 after the first EOS. HF's maps come per step as (B*N, H, 1, S) per layer."""
    import torch

    if system == "ours":
        tokens, maps = out.tokens, out.attn
    else:
        tokens = out.sequences[:, 1:]  # without the start token
        maps = torch.stack(
            [
                torch.stack(step[-last_layers:], 1).mean((1, 2))[:, 0]  # (B*N, S) per step
                for step in out.cross_attentions
            ],
            1,
        )
    is_eos = (tokens == EOS).long()
    live = (is_eos.cumsum(1) - is_eos) == 0  # up to and including EOS
    pad = width - tokens.size(1)
    tokens = torch.nn.functional.pad(tokens.masked_fill(~live, PAD), (0, pad), value=PAD)
    maps = torch.nn.functional.pad(maps * live[..., None], (0, 0, 0, pad))
    return tokens, maps


def same_weights_check(path, shape="base", threads=2, device="cpu", precision=None) -> dict:
    """Greedy decoding by both implementations of the snapshot in `path`, SAME[shape]["check"] prompts
    x N, compared up to each row's first EOS: tokens_equal, the positions compared (tokens), the
    distinct token ids among them, the rows that ended in EOS, and the max |ours - HF| of Abar over
    the last L' layers and all heads (max_map_diff). On `device`, at `precision` (t5_rollout)."""
    import torch

    torch.set_num_threads(threads)
    w = SAME[shape]
    (b, new), L = w["check"], w["last_layers"]
    src, mask = t5_prompts(b, shape, seed=1, device=device)
    (t_o, a_o), (t_h, a_h) = (
        tokens_and_abar(
            system,
            t5_rollout(
                system,
                load_snapshot(system, path, shape, device),
                src,
                mask,
                w["N"],
                new,
                True,
                precision,
            ),
            L,
            new,
        )
        for system in ("ours", "hf")
    )
    is_eos = (t_h == EOS).long()
    compared = int(((is_eos.cumsum(1) - is_eos) == 0).sum())
    return dict(
        tokens_equal=torch.equal(t_o, t_h),
        tokens=compared,
        rows=t_h.size(0),
        new=new,
        distinct=int(t_h.unique().numel()),
        eos_rows=int(is_eos.any(1).sum()),
        max_map_diff=float((a_o - a_h).abs().max()),
    )


def same_weights_run(system: str, path, shape="base", device="cpu", precision=None):
    """run(): SAME[shape]'s sampled rollout by `system`, from the snapshot in `path` (loaded now onto
    `device`); it checks that all `new` tokens were made, since tokens/s counts B*N*new."""
    w = SAME[shape]
    model = load_snapshot(system, path, shape, device)
    src, mask = t5_prompts(w["B"], shape, device=device)

    def run():
        out = t5_rollout(system, model, src, mask, w["N"], w["new"], precision=precision)
        steps = out.tokens.size(1) if system == "ours" else out.sequences.size(1) - 1
        assert steps == w["new"], f"{system} stopped after {steps} of {w['new']} new tokens"

    return run


def same_weights_worker(system: str, path, shape: str, calls: int, threads: int) -> dict:
    """Times and peak memory (`measure`, above the loaded model) of same_weights_run, in this process."""
    import torch

    torch.set_num_threads(threads)
    return dict(
        system=system, task="same_weights", **measure(same_weights_run(system, path, shape), calls)
    )


def print_profile(name: str, run, rows=12) -> None:
    """Time one call of run() after a warm-up, then profile a third (torch.profiler, CPU) and print
    its operators by self CPU time, the heaviest (operator, input shapes) pairs, and the matrix
    products' share: the FLOPs the profiler counts (mm, addmm, bmm; not those inside the fused
    scaled_dot_product_attention), their time and rate. The profiler slows memory-bound operators
    (copy_, cat) most: the operator time is printed beside the unprofiled call's."""
    from torch.profiler import ProfilerActivity, profile

    wall = timed(run, 1)[0]
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        run()
    print(f"\n{name}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
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
    print(
        f"{name}: one call {wall:.2f} s unprofiled, {total:.2f} s of operator time profiled; matrix products "
        f"({', '.join(sorted(e.key for e in mm))}): {flops / 1e12:.2f} TFLOP in {mm_s:.2f} s "
        f"({mm_s / total:.0%} of the operator time), {flops / mm_s / 1e9:.0f} GFLOP/s"
    )


def peer_available(what: str) -> bool:
    """Whether `transformers` imports; if not, say that `what` is skipped."""
    try:
        import transformers  # noqa: F401

        return True
    except ImportError:
        print(f"transformers is not installed: {what} (pip install transformers)")
        return False


def profile_rollout(threads: int) -> int:
    """Where one rollout's time goes, by operator (torch.profiler), for each system."""
    import torch

    torch.set_num_threads(threads)
    systems = ["ours"] + (["hf"] if peer_available("profiling our model only") else [])
    for system in systems:
        print_profile(system, rollout_fn(system, build(system), NEW))
    return 0


def profile_same_weights(threads: int, shape="base") -> int:
    """Where one same-weights rollout's time goes, by operator, for each system, from one snapshot."""
    import torch

    if not peer_available(
        "the same-weights profile is skipped (the snapshot is built by transformers)"
    ):
        return 0
    torch.set_num_threads(threads)
    path = tempfile.mkdtemp(prefix="bench-t5-")
    try:
        make_snapshot(path, shape)
        for system in ("ours", "hf"):
            print_profile(
                f"{system}, same weights ({shape})", same_weights_run(system, path, shape)
            )
        print(
            f"\nlarge-matmul FLOP/s on this machine ({threads} threads, fp32 2048^3): {matmul_flops() / 1e9:.1f} GFLOP/s"
        )
    finally:
        shutil.rmtree(path)
    return 0


def run_worker(system, task, calls, threads, *extra) -> dict:
    """worker(...) (or same_weights_worker, with extra = --snapshot DIR --shape NAME) in a fresh process."""
    cmd = [
        sys.executable,
        __file__,
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
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{system}/{task} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


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
        f"\nworkload: d_model 256, 4+4 layers, 4 heads, d_ff 1024, vocab 8000; rollout {B} prompts x {S} tokens, "
        f"N={N}, {NEW} new tokens, full softmax at T={rl_temperature('small')}, cross-attention recorded; training {TRAIN_B} x ({S}+{TRAIN_T}) tokens, "
        f"AdamW; {args.threads} threads; medians over {args.repeats} fresh processes x {args.calls} calls\n"
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


NAMES = {"ours": "cagsr (model.py)", "hf": "HF T5 (eager, output_attentions)"}


def print_small(rows, args, pairs, peak) -> None:
    print(
        f"{'':34s} {'rollout s':>9s} {'cand/s':>7s} {'tok/s':>7s} {'peak MiB':>8s} {'warm MiB':>8s} {'96/48':>6s} "
        f"{'train s':>8s} {'train tok/s':>11s} {'FLOP/s share':>12s}"
    )
    for r in rows:
        print(
            f"{NAMES[r['system']]:34s} {r['rollout_s']:9.3f} {r['candidates_per_s']:7.1f} {r['tokens_per_s']:7.0f} "
            f"{r['rollout_peak_growth_mib']:8.1f} {r['rollout_steady_growth_mib']:8.1f} {r['growth_96_over_48']:6.2f} {r['train_step_s']:8.3f} "
            f"{r['train_tokens_per_s']:11.0f} {r['train_flops_share']:12.1%}"
        )
    if len(rows) == 2:
        o, h = rows
        print(
            f"\nours / HF: rollout tokens/s x{o['tokens_per_s'] / h['tokens_per_s']:.2f}, rollout peak memory growth "
            f"x{o['rollout_peak_growth_mib'] / max(h['rollout_peak_growth_mib'], 1e-9):.2f} (after the warm-up: "
            f"x{o['rollout_steady_growth_mib'] / max(h['rollout_steady_growth_mib'], 1e-9):.2f}), "
            f"training tokens/s x{o['train_tokens_per_s'] / h['train_tokens_per_s']:.2f}"
        )
    for r in rows:
        print(
            f"{NAMES[r['system']]}: sampling costs {r['sampler_share']:.1%} of the rollout "
            f"(1 - greedy time / sampling time, same length; median of {args.pairs} interleaved pairs)"
        )
    print(
        "peak MiB: peak RSS above the RSS of the built model, the warm-up call included (libraries' first-call "
        "set-up counts); warm MiB: the same from after the warm-up; the largest over the processes"
    )
    print(f"samplers: {samplers(DIMS['vocab_size'], rl_temperature('small'))}")
    print(
        f"recording Abar: median rollout time ratio with/without {statistics.median(pairs):.3f} "
        f"(min {min(pairs):.3f}, max {max(pairs):.3f}, {len(pairs)} interleaved pairs)"
    )
    print(
        f"large-matmul FLOP/s on this machine ({args.threads} threads, fp32 2048^3): {peak / 1e9:.1f} GFLOP/s"
    )


def same_weights(args, shape="base") -> None:
    """The same-weights comparison: one snapshot (make_snapshot) in a temporary directory, the greedy
    check in this process, then args.sw_rounds interleaved fresh processes per system, each one
    warm-up and args.sw_calls timed rollouts; the directory is deleted at the end."""
    if not peer_available(
        "the same-weights comparison is skipped (its snapshot is built by transformers)"
    ):
        return
    path = tempfile.mkdtemp(prefix="bench-t5-")
    try:
        make_snapshot(path, shape)
        check = same_weights_check(path, shape, args.threads)
        results = {}
        for _ in range(args.sw_rounds):
            for system in ("ours", "hf"):  # interleaved: ours, hf, ours, hf, ...
                r = run_worker(
                    system,
                    "same_weights",
                    args.sw_calls,
                    args.threads,
                    "--snapshot",
                    path,
                    "--shape",
                    shape,
                )
                results.setdefault(system, []).append(r)
    finally:
        shutil.rmtree(path)
    print_same_weights(check, results, args, shape)


def print_same_weights(check: dict, results: dict, args, shape: str) -> None:
    """The same-weights figures: the check, then the rollout time (median, min, max over the timed
    calls), tokens/s (B*N*new / median time) and peak growth (the largest over the processes) of
    both systems, and ours / HF."""
    w, t5 = SAME[shape], SAME[shape]["t5"]
    print(
        f"\nsame weights: one random T5 v1.0-layout snapshot (relu, tied head), d_model {t5['d_model']}, "
        f"{t5['num_layers']}+{t5['num_decoder_layers']} layers, {t5['num_heads']} heads, d_kv {t5['d_kv']}, "
        f"d_ff {t5['d_ff']}, vocab {t5['vocab_size']}, written by save_pretrained and loaded by both"
    )
    print(
        f"check (greedy, {w['check'][0]} prompts x N={w['N']}, {check['new']} new tokens, compared up to each row's "
        f"first EOS: {check['tokens']} positions, {check['distinct']} distinct ids, {check['eos_rows']} of "
        f"{check['rows']} rows ended): tokens equal: "
        f"{check['tokens_equal']}; Abar over the last {w['last_layers']} layers and all heads, max |ours - HF| "
        f"{check['max_map_diff']:.1e} ({'within' if check['max_map_diff'] <= 1e-4 else 'NOT within'} 1e-4)"
    )
    print(
        f"samplers (sampled outputs differ by construction): {samplers(t5['vocab_size'], rl_temperature('pretrained'))}"
    )
    print(
        f"rollout: {w['B']} prompts x {w['S']} tokens, N={w['N']}, {w['new']} new tokens, full softmax at "
        f"T={rl_temperature('pretrained')}, "
        f"cross-attention recorded; {args.threads} threads; {args.sw_rounds} fresh process(es) per system x "
        f"{args.sw_calls} timed call(s) after one warm-up\n"
    )
    print(
        f"{'':34s} {'rollout s':>9s} {'min':>6s} {'max':>6s} {'tok/s':>7s} {'peak MiB':>8s} {'(least)':>8s} "
        f"{'warm MiB':>8s}"
    )
    rows = {}
    for system, rs in results.items():
        times, peaks = [x for r in rs for x in r["times"]], [r["peak_growth_mib"] for r in rs]
        t = statistics.median(times)
        rows[system] = (w["B"] * w["N"] * w["new"] / t, max(peaks), min(peaks))
        print(
            f"{NAMES[system]:34s} {t:9.2f} {min(times):6.2f} {max(times):6.2f} {rows[system][0]:7.1f} "
            f"{max(peaks):8.1f} {min(peaks):8.1f} {max(r['steady_growth_mib'] for r in rs):8.1f}"
        )
    (to, mo, lo), (th, mh, lh) = rows["ours"], rows["hf"]
    print(
        f"ours / HF: tokens/s x{to / th:.2f}, peak memory growth x{mo / mh:.2f} (the largest of each system's "
        f"processes; the least: x{lo / lh:.2f})"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--task", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--snapshot", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="base", help=argparse.SUPPRESS)
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
        help="only the same-weights comparison (a random T5-base-shaped snapshot loaded by both; minutes)",
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
        "--profile",
        action="store_true",
        help="only profile one rollout per system (torch.profiler): where the time goes, sampler "
        "included; with --same-weights, the same-weights rollout",
    )
    args = ap.parse_args(argv)
    if args.profile:
        return (
            profile_same_weights(args.threads)
            if args.same_weights
            else profile_rollout(args.threads)
        )
    if args.worker:
        out = (
            same_weights_worker(args.worker, args.snapshot, args.shape, args.calls, args.threads)
            if args.task == "same_weights"
            else worker(args.worker, args.task, args.calls, args.threads)
        )
        print(json.dumps(out))
        return 0
    if not args.same_weights:
        small_bench(args)
    same_weights(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
