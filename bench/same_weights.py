"""Same weights: one random T5-base-shaped snapshot, loaded by our model and by Hugging Face T5.

    python -m bench.cpu --same-weights             # only this comparison (minutes)
    python -m bench.cpu --profile --same-weights   # where its rollouts' time goes, by operator

Same weights (the last part of `python -m bench.cpu`, or alone with --same-weights): one random
snapshot shaped like T5-base (d_model 768, 12 + 12 layers, 12 heads, d_kv 64, d_ff 3072, vocabulary
32,128) in the T5 v1.0 layout (relu FFN, tied head scaled by d_model^-0.5: T5-base's own), built by
transformers with a fixed seed and written by save_pretrained into a temporary directory that both
load: ours by snapshot.from_pretrained, HF by T5ForConditionalGeneration.from_pretrained (eager).
Check: greedy tokens (2 prompts x N = 4, 16 new tokens) equal up to each row's first EOS, and Abar
over the last L' = 3 decoder layers and all heads within 1e-4 (ours: the sampler's Abar; HF: the
mean of generate's maps of those layers and heads). Rollout: 16 prompts x 256 tokens, N = 4 samples,
64 new tokens, sampled as RL samples from a snapshot (the full softmax at the `pretrained` RL
temperature, 1.0), maps recorded, decoder started from pad 0, EOS 1. Sampled outputs differ
(different samplers and random streams, see `samplers`). One rollout takes ~20 s (ours) to ~30 s
(HF) on 2 idle cores, minutes when other processes compete for them, so each system gets --sw-rounds
fresh processes (default 3) of one warm-up and --sw-calls timed calls (default 1): about 6 minutes
in all. tests/test_bench.py runs the same functions on SAME["tiny"]; bench/gpu.py runs them on CUDA.

The command is bench/cpu.py's: it runs this comparison (`same_weights`, `profile_same_weights`) and
its worker processes (`python -m bench.cpu --worker SYSTEM --task same_weights`, which call
`same_weights_worker`). Timing, memory and the samplers come from bench/common.py.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile

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

PAD, EOS = 0, 1  # T5: pad 0 (also the decoder's start), EOS 1; ids 0-2 are special
# snapshot shape (T5Config fields), rollout B x S, N, new tokens, L',
# greedy check (prompts, new tokens)
SAME = {
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
    """Write a random T5 v1.0-layout snapshot (relu FFN, tied head scaled by d_model^-0.5:
    T5-base's own layout) of SAME[shape]'s size into the directory `path` with transformers'
    save_pretrained.

    Built by transformers with torch.manual_seed(seed) and T5's init, then, as in
    tests/test_pretrained.py, the shared embedding x0.1 and every residual branch's output
    projection (o, wo) x8: with T5's init alone the embedding dominates the residual stream and the
    tied head echoes the decoder's input, so that greedy decoding repeats the start token and the
    check below would compare nothing but pad ids."""
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
    EOS. HF: generate's output (sequences (B*n, 1+T), every step's, layer's and head's
    cross-attention map); when sampling it makes all `new` tokens (min_new_tokens), greedy stops as
    ours does.
    precision: "fp32" or "bf16" (autocast, runs.autocast); None = the device's default."""
    import torch

    from cli.runs import autocast
    from sampling import Decoding

    temperature = rl_temperature("pretrained")
    with torch.no_grad(), autocast(src.device, precision):
        if system == "ours":
            return model.sample(
                src,
                mask,
                Decoding(num_samples=n, max_new_tokens=new, temperature=temperature, greedy=greedy),
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
    """Greedy decoding by both implementations of the snapshot in `path`,
    SAME[shape]["check"] prompts x N, compared up to each row's first EOS: tokens_equal,
    the positions compared (tokens), the distinct token ids among them, the rows that
    ended in EOS, and the max |ours - HF| of Abar over the last L' layers and all heads
    (max_map_diff). On `device`, at `precision` (t5_rollout)."""
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
    """run(): SAME[shape]'s sampled rollout by `system`, from the snapshot in `path` (loaded now
    onto `device`); it checks that all `new` tokens were made, since tokens/s counts B*N*new."""
    w = SAME[shape]
    model = load_snapshot(system, path, shape, device)
    src, mask = t5_prompts(w["B"], shape, device=device)

    def run():
        out = t5_rollout(system, model, src, mask, w["N"], w["new"], precision=precision)
        steps = out.tokens.size(1) if system == "ours" else out.sequences.size(1) - 1
        assert steps == w["new"], f"{system} stopped after {steps} of {w['new']} new tokens"

    return run


def same_weights_worker(system: str, path, shape: str, calls: int, threads: int) -> dict:
    """Times and peak memory (`measure`, above the loaded model) of same_weights_run, in this
    process."""
    import torch

    torch.set_num_threads(threads)
    return dict(
        system=system, task="same_weights", **measure(same_weights_run(system, path, shape), calls)
    )


def profile_same_weights(threads: int, shape="base") -> int:
    """Where one same-weights rollout's time goes, by operator, for each system, from one
    snapshot."""
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
            f"\nlarge-matmul FLOP/s on this machine ({threads} threads, fp32 2048^3): "
            f"{matmul_flops() / 1e9:.1f} GFLOP/s"
        )
    finally:
        shutil.rmtree(path)
    return 0


def same_weights(args, shape="base") -> None:
    """The same-weights comparison: one snapshot (make_snapshot) in a temporary directory, the
    greedy check in this process, then args.sw_rounds interleaved fresh processes per system, each
    one warm-up and args.sw_calls timed rollouts; the directory is deleted at the end."""
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
        "\nsame weights: one random T5 v1.0-layout snapshot (relu, tied head), "
        f"d_model {t5['d_model']}, "
        f"{t5['num_layers']}+{t5['num_decoder_layers']} layers, {t5['num_heads']} heads, "
        f"d_kv {t5['d_kv']}, "
        f"d_ff {t5['d_ff']}, vocab {t5['vocab_size']}, "
        "written by save_pretrained and loaded by both"
    )
    print(
        f"check (greedy, {w['check'][0]} prompts x N={w['N']}, {check['new']} new tokens, "
        "compared up to each row's "
        f"first EOS: {check['tokens']} positions, {check['distinct']} distinct ids, "
        f"{check['eos_rows']} of "
        f"{check['rows']} rows ended): tokens equal: "
        f"{check['tokens_equal']}; Abar over the last {w['last_layers']} layers and all heads, "
        "max |ours - HF| "
        f"{check['max_map_diff']:.1e} "
        f"({'within' if check['max_map_diff'] <= 1e-4 else 'NOT within'} 1e-4)"
    )
    print(
        "samplers (sampled outputs differ by construction): "
        f"{samplers(t5['vocab_size'], rl_temperature('pretrained'))}"
    )
    print(
        f"rollout: {w['B']} prompts x {w['S']} tokens, N={w['N']}, {w['new']} new tokens, "
        "full softmax at "
        f"T={rl_temperature('pretrained')}, "
        f"cross-attention recorded; {args.threads} threads; "
        f"{args.sw_rounds} fresh process(es) per system x "
        f"{args.sw_calls} timed call(s) after one warm-up\n"
    )
    print(
        f"{'':34s} {'rollout s':>9s} {'min':>6s} {'max':>6s} {'tok/s':>7s} "
        f"{'peak MiB':>8s} {'(least)':>8s} "
        f"{'warm MiB':>8s}"
    )
    rows = {}
    for system, rs in results.items():
        times, peaks = [x for r in rs for x in r["times"]], [r["peak_growth_mib"] for r in rs]
        t = statistics.median(times)
        rows[system] = (w["B"] * w["N"] * w["new"] / t, max(peaks), min(peaks))
        print(
            f"{NAMES[system]:34s} {t:9.2f} {min(times):6.2f} {max(times):6.2f} "
            f"{rows[system][0]:7.1f} "
            f"{max(peaks):8.1f} {min(peaks):8.1f} {max(r['steady_growth_mib'] for r in rs):8.1f}"
        )
    (to, mo, lo), (th, mh, lh) = rows["ours"], rows["hf"]
    print(
        f"ours / HF: tokens/s x{to / th:.2f}, peak memory growth x{mo / mh:.2f} "
        "(the largest of each system's "
        f"processes; the least: x{lo / lh:.2f})"
    )
