"""The GPU check: what a GPU run of cagsr costs, measured in one process (README, "Performance").

    python -m bench.gpu         # one CUDA GPU; under 8 minutes on one H100 or H200
    python -m bench.gpu --tiny  # the same code at tiny shapes on the CPU (tests/test_bench_gpu.py)

It prints five parts, in order:
  1. same weights: bench/same_weights.py's random T5-base-shaped snapshot loaded by ours and by HF
     T5, in fp32 (checked: greedy tokens equal and Abar within 1e-4,
     same_weights.same_weights_check) and in bf16 (reported), then one sampled rollout each (RL's
     sampler, same_weights.rollout): seconds, tokens/s, peak memory;
  2. a random model shaped like flan-T5-large (its config.json fields, through
     snapshot.config_from_hf), bf16: one SFT step and one CAGSR iteration (ppo.collect: sample,
     reward, reference pass; then ppo.update): seconds, tokens/s, MFU, peak memory;
  3. the `1.3b` preset (`python cagsr.py --size 1.3b`), bf16: SFT steps, one RL iteration, and one
     rollout with and without Abar recorded;
  4. torch.compile on and off for the PPO update of part 2's model;
  5. the decoder-only policy (decoder.py) on a random model shaped like Qwen2.5-0.5B (its
     config.json fields, through snapshot.config_from_hf), bf16: one SFT step and one CAGSR
     iteration, as part 2.

bf16 is `python cagsr.py`'s: autocast over float32 weights and optimizer (runs.autocast). Each
measurement follows a warm-up of the same work. MFU counts the FLOPs of the linear layers
(`linear_flops`: 2 per multiply-add forward, 3 times that for forward + backward; attention scores
left out) per second, over the chip's dense bf16 peak (BF16_PEAK, by device name; a chip not listed
gets a measured large-matmul rate, and --tiny's CPU its fp32 one). Peak memory: the peak of
torch.cuda.max_memory_allocated above the memory held before the measurement (CPU: peak RSS growth).
`transformers` is needed for part 1 only; without it part 1 is skipped with a message.

A part fails when it raises (torch.compile that cannot compile here included) or, for part 1, when
the fp32 check does not pass (bf16 is reported, not checked: its rounding differs from HF's). A
failed part is named where it fails (its traceback on stderr) and the next parts still run (part 4
needs part 2's model); the last line names every failed part, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback

import torch

import data
import parallel
import ppo
from bench import common, same_weights
from cli import runs
from decoder import DecoderConfig, DecoderOnly
from interop.snapshot import config_from_hf
from model import EncoderDecoder, ModelConfig, config_for
from presets import RL_PROFILES
from reward import RewardConfig, SalientTokens
from sampling import Decoding
from sft import sft_loss

# flan-T5-large's config.json, the fields that shape it (google/flan-t5-large).
FLAN_T5_LARGE = dict(
    model_type="t5",
    vocab_size=32128,
    d_model=1024,
    d_kv=64,
    d_ff=2816,
    num_layers=24,
    num_decoder_layers=24,
    num_heads=16,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)
# Qwen2.5-0.5B's config.json, the fields that shape it (Qwen/Qwen2.5-0.5B).
QWEN25_05B = dict(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    hidden_act="silu",
)
SHAPES = {  # same: same_weights.SAME key; large: part 2's config.json; preset: part 3's;
    # decoder: part 5's; sft: (B, S, T); rl: P prompts x S, N, new
    "gpu": dict(
        same="base",
        large=FLAN_T5_LARGE,
        preset="1.3b",
        decoder=QWEN25_05B,
        sft=(32, 128, 64),
        sft_steps=3,
        rl=dict(prompts=64, S=128, N=4, new=64),
    ),
    "tiny": dict(
        same="tiny",
        large={
            **FLAN_T5_LARGE,
            "vocab_size": 256,
            "d_model": 64,
            "d_kv": 16,
            "d_ff": 128,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
        },
        decoder={
            **QWEN25_05B,
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        preset="tiny",
        sft=(4, 16, 8),
        sft_steps=2,
        rl=dict(prompts=4, S=16, N=2, new=8),
    ),
}
BF16_PEAK = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
"""Dense bf16 tensor-core peak FLOP/s by device-name fragment (the vendors' data sheets, no
sparsity); the first fragment found in torch.cuda.get_device_name() wins."""
T5_SPECIALS = data.Specials(pad=0, start=0, eos=1, special=(0, 1, 2), appends_eos=True)
# a tokenizer trained here
OUR_SPECIALS = data.Specials(pad=0, start=1, eos=2, special=(0, 1, 2, 3))


# --------------------------------------------------------------------------------------------
# Measuring: time, peak memory, FLOPs
# --------------------------------------------------------------------------------------------


def run_measured(fn, device):
    """fn() with the device synchronised before and after:
    (its result, seconds, peak memory growth MiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        common.peak_reset()
        base = common.rss_kib() * 1024
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = common.rss_kib("VmHWM") * 1024
    return out, time.perf_counter() - t0, (peak - base) / 2**20


def per_token_flops(cfg: ModelConfig) -> tuple[int, int, int]:
    """Multiply-adds of the linear layers per token: (encoder, per prompt token: q, k, v, out and
    the feed-forward of every layer; the decoder's cross-attention keys and values, per prompt
    token; the decoder, per response token: self-attention q, k, v, out, cross-attention q, out, the
    feed-forward of every layer, and the head). A DecoderConfig (decoder.py): (its stack per prompt
    token, 0, its stack and head per response token); the first response token comes from the
    prompt's last position, so this counts one stack position per row more than is run."""
    D, inner = cfg.d_model, cfg.n_heads * cfg.head_dim
    # one stack: q, k, v (grouped), out, SwiGLU; response tokens add the head
    if isinstance(cfg, DecoderConfig):
        stack = cfg.n_layers * (
            2 * D * inner + 2 * D * cfg.kv_heads * cfg.head_dim + 3 * D * cfg.d_ff
        )
        return stack, 0, stack + D * cfg.vocab_size
    ffn = (3 if cfg.ffn == "gated-gelu" else 2) * D * cfg.d_ff
    return (
        cfg.n_enc_layers * (4 * D * inner + ffn),
        cfg.n_dec_layers * 2 * D * inner,
        cfg.n_dec_layers * (6 * D * inner + ffn) + D * cfg.vocab_size,
    )


def linear_flops(cfg: ModelConfig, prompt_tokens: int, response_tokens: int) -> int:
    """Forward FLOPs (2 per multiply-add) of every linear layer (`per_token_flops`), for
    `prompt_tokens` encoder positions and `response_tokens` decoder positions. The value head (per
    prompt, not per token) and attention scores are left out."""
    encoder, cross_kv, decoder = per_token_flops(cfg)
    return 2 * ((encoder + cross_kv) * prompt_tokens + decoder * response_tokens)


def encoder_flops(cfg: ModelConfig, prompt_tokens: int) -> int:
    """Forward FLOPs of the encoder's linear layers alone (V(x) encodes the prompts again)."""
    return 2 * per_token_flops(cfg)[0] * prompt_tokens


def chip_peak(device) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from): BF16_PEAK by name, else a measured large matmul (bf16 on
    CUDA, fp32 on the CPU)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peak in BF16_PEAK.items():
            if fragment in name:
                return peak, f"{name}, dense bf16 peak {peak / 1e12:.0f} TFLOP/s (data sheet)"
        n = 8192
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        a @ b  # warm-up: cuBLAS set-up
        _, seconds, _ = run_measured(lambda: [a @ b for _ in range(5)], device)
        return 5 * 2 * n**3 / seconds, f"{name}, measured bf16 matmul {n}^3"
    return common.matmul_flops(), "this CPU, measured fp32 matmul 2048^3 (common.matmul_flops)"


# --------------------------------------------------------------------------------------------
# Part 1: same weights against HF T5
# --------------------------------------------------------------------------------------------


class CheckFailed(Exception):
    """A part ran but its check did not pass (part 1's fp32 comparison)."""


def same_weights_part(shape: dict, device) -> bool:
    """The same-weights comparison of bench/same_weights.py on `device`, in fp32 and bf16.
    False: skipped (no transformers); CheckFailed when fp32's greedy tokens differ or Abar is not
    within 1e-4."""
    if not common.peer_available("part 1 (same weights against HF T5) is skipped"):
        return False
    name, w = shape["same"], same_weights.SAME[shape["same"]]
    path = tempfile.mkdtemp(prefix="bench-gpu-t5-")
    try:
        same_weights.make_snapshot(path, name)
        print(
            f"\n1. same weights: bench/same_weights.py's random T5 snapshot '{name}' (d_model "
            f"{w['t5']['d_model']}, {w['t5']['num_layers']}+{w['t5']['num_decoder_layers']} "
            f"layers), rollout {w['B']} prompts x {w['S']} tokens, N={w['N']}, "
            f"{w['new']} new tokens, Abar recorded, "
            f"{common.samplers(w['t5']['vocab_size'], common.rl_temperature('pretrained'))}"
        )
        for precision in ("fp32", "bf16"):
            check = same_weights.same_weights_check(
                path, name, torch.get_num_threads(), device, precision
            )
            print(
                f"   {precision}: greedy {check['tokens']} positions, tokens equal: "
                f"{check['tokens_equal']}; Abar max |ours - HF| {check['max_map_diff']:.1e}"
            )
            if precision == "fp32" and not (
                check["tokens_equal"] and check["max_map_diff"] <= 1e-4
            ):
                raise CheckFailed(
                    "fp32 against HF T5 on the same weights: greedy tokens must be equal and Abar "
                    "within 1e-4"
                )
            for system in ("ours", "hf"):
                run = same_weights.same_weights_run(system, path, name, device, precision)
                run()  # warm-up
                _, seconds, peak = run_measured(run, device)
                print(
                    f"   {precision} {common.NAMES[system]:34s} {seconds:7.3f} s  "
                    f"{w['B'] * w['N'] * w['new'] / seconds:9.0f} tok/s  peak {peak:9.1f} MiB"
                )
    finally:
        shutil.rmtree(path)
    return True


# --------------------------------------------------------------------------------------------
# Parts 2-4: SFT steps and CAGSR iterations on random weights
# --------------------------------------------------------------------------------------------


def random_pairs(n: int, src_len: int, tgt_len: int, vocab: int, sp: data.Specials, seed=0) -> list:
    """n (prompt, response) pairs of random non-special ids, each response ending in EOS."""
    g = torch.Generator().manual_seed(seed)
    low = max(sp.special) + 1
    ids = lambda k: torch.randint(low, vocab, (k,), generator=g).tolist()
    return [(ids(src_len), ids(tgt_len - 1) + [sp.eos]) for _ in range(n)]


def sft_part(model, shape: dict, sp: data.Specials, device, peak: float, steps: int) -> dict:
    """`steps` timed SFT steps (L_SFT, AdamW, clipping: sft.py's step) after one warm-up step."""
    B, S, T = shape["sft"]
    batch = {
        k: v.to(device)
        for k, v in data.collate(random_pairs(B, S, T, model.cfg.vocab_size, sp), sp).items()
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **parallel.fused(device))
    model.train()

    def step():
        with runs.autocast(device, "bf16"):
            loss = sft_loss(model, batch)
        return parallel.guarded_step(opt, loss, 1.0)

    step()
    _, seconds, mem = run_measured(lambda: [step() for _ in range(steps)], device)
    model.eval()
    per_step = seconds / steps
    flops = 3 * linear_flops(model.cfg, B * S, B * T)
    return dict(
        step_s=per_step,
        tokens_per_s=B * (S + T) / per_step,
        mfu=flops / per_step / peak,
        peak_mib=mem,
    )


def rl_setup(model, shape: dict, sp: data.Specials, device, profile: str):
    """What one CAGSR iteration needs on random weights: the frozen reference and Adam
    (runs.rl_start), the task (random prompts, I_x from their IDF, the paper's reward), one batch of
    its prompts, and the PPO settings of `profile`."""
    rl, V = shape["rl"], model.cfg.vocab_size
    cfg = ppo.PPOConfig(
        **{
            **RL_PROFILES["run"][profile]["ppo"],
            "prompts_per_iter": rl["prompts"],
            "num_samples": rl["N"],
            "max_new_tokens": rl["new"],
        }
    )
    prompts = [p for p, _ in random_pairs(rl["prompts"], rl["S"], 2, V, sp, seed=1)]
    salient = SalientTokens(data.idf(prompts, V), torch.ones(V, dtype=torch.bool), [""] * V)
    ref, opt = runs.rl_start(model, model.state_dict(), cfg.lr, device)
    src, src_mask = (t.to(device) for t in next(ppo.prompt_batches(prompts, rl["prompts"], 0, sp)))
    task = ppo.RLTask(prompts, specials=sp, salient=salient, reward_cfg=RewardConfig())
    return dict(ref=ref, opt=opt, cfg=cfg, task=task, src=src, src_mask=src_mask)


def rl_iteration(model, setup: dict, device, policy=None) -> dict:
    """One CAGSR iteration (§5): ppo.collect (sample with Abar, reward, reference pass, V(x)), then
    ppo.update, each measured. Returns the experience and the figures."""
    s, gen = setup, torch.Generator(device=device).manual_seed(0)
    with runs.autocast(device, "bf16"):
        (experience, split), collect_s, collect_mem = run_measured(
            lambda: ppo.collect(
                model, s["ref"], s["src"], s["src_mask"], s["task"], s["cfg"], 0.0, gen
            ),
            device,
        )
        _, update_s, update_mem = run_measured(
            lambda: ppo.update(
                model,
                s["opt"],
                experience,
                s["cfg"],
                policy=policy,
                generator=torch.Generator().manual_seed(0),
            ),
            device,
        )
    return dict(
        experience=experience,
        sample_s=split["sample_s"],
        collect_s=collect_s,
        update_s=update_s,
        peak_mib=max(collect_mem, update_mem),
    )


def rl_figures(model, it: dict, epochs: int, peak: float) -> dict:
    """Seconds, tokens/s and MFU of one measured iteration (`rl_iteration`)
    of `epochs` PPO epochs."""
    cfg, exp = model.cfg, it["experience"]
    P, S = exp.src.shape
    BN, T = exp.tokens.shape
    forward = linear_flops(cfg, P * S, BN * T)
    # sample, reference, V(x), update
    flops = 2 * forward + encoder_flops(cfg, P * S) + epochs * 3 * forward
    total = it["collect_s"] + it["update_s"]
    return dict(
        iteration_s=total,
        sample_s=it["sample_s"],
        rest_of_collect_s=it["collect_s"] - it["sample_s"],
        update_s=it["update_s"],
        tokens_per_s=BN * T / total,
        mfu=flops / total / peak,
        sample_mfu=forward / it["sample_s"] / peak,
        peak_mib=it["peak_mib"],
        rows=BN,
        new=T,
    )


def measured_iteration(model, setup, device, peak, policy=None) -> dict:
    """One warm-up iteration, then one measured: `rl_figures`."""
    rl_iteration(model, setup, device, policy)
    it = rl_iteration(model, setup, device, policy)
    return rl_figures(model, it, setup["cfg"].epochs, peak)


def millions(model) -> str:
    return f"{model.num_params() / 1e6:,.1f}M"


def print_sft(label: str, sft: dict) -> None:
    print(
        f"   SFT step: {sft['step_s']:.3f} s, {sft['tokens_per_s']:,.0f} tokens/s, "
        f"MFU {sft['mfu']:.1%}, peak {sft['peak_mib']:,.0f} MiB ({label})"
    )


def print_rl(rl: dict) -> None:
    print(
        f"   CAGSR iteration ({rl['rows']} candidates x {rl['new']} tokens): "
        f"{rl['iteration_s']:.3f} s = sample {rl['sample_s']:.3f} s + reward, reference pass and "
        f"V(x) {rl['rest_of_collect_s']:.3f} s + PPO update {rl['update_s']:.3f} s; "
        f"{rl['tokens_per_s']:,.0f} sampled tokens/s; MFU {rl['mfu']:.1%} (sampling alone "
        f"{rl['sample_mfu']:.1%}); peak {rl['peak_mib']:,.0f} MiB"
    )


def large_part(shape: dict, device, peak: float) -> tuple:
    """Part 2: flan-T5-large's shape, one SFT step and one CAGSR iteration. Returns (model, RL
    setup, the iteration's figures)."""
    cfg = config_from_hf(shape["large"], last_layers=1)
    model = EncoderDecoder(cfg).to(device)
    print(
        f"\n2. flan-T5-large's shape, random weights ({millions(model)} parameters), bf16 autocast"
    )
    B, S, T = shape["sft"]
    print_sft(
        f"{B} pairs x ({S} + {T}) tokens", sft_part(model, shape, T5_SPECIALS, device, peak, 1)
    )
    setup = rl_setup(model, shape, T5_SPECIALS, device, "pretrained")
    eager = measured_iteration(model, setup, device, peak)
    print_rl(eager)
    return model, setup, eager


def preset_part(shape: dict, device, peak: float) -> None:
    """Part 3: the preset of `python cagsr.py --size ...`:
    SFT steps, one RL iteration, Abar's cost."""
    name = shape["preset"]
    model = EncoderDecoder(config_for(name)).to(device)
    print(f"\n3. --size {name} ({millions(model)} parameters), bf16 autocast")
    B, S, T = shape["sft"]
    print_sft(
        f"{shape['sft_steps']} steps of {B} pairs x ({S} + {T}) tokens",
        sft_part(model, shape, OUR_SPECIALS, device, peak, shape["sft_steps"]),
    )
    setup = rl_setup(model, shape, OUR_SPECIALS, device, name)
    print_rl(measured_iteration(model, setup, device, peak))
    rl = shape["rl"]
    seconds = {}
    for record in (True, False):

        def rollout():
            with torch.no_grad(), runs.autocast(device, "bf16"):
                return model.sample(
                    setup["src"],
                    setup["src_mask"],
                    Decoding(num_samples=rl["N"], max_new_tokens=rl["new"]),
                    record_attention=record,
                    generator=torch.Generator(device=device).manual_seed(0),
                    **OUR_SPECIALS.sample_ids(),
                )

        rollout()
        _, seconds[record], _ = run_measured(rollout, device)
    print(
        f"   rollout with Abar recorded {seconds[True]:.3f} s, without {seconds[False]:.3f} s "
        f"(x{seconds[True] / seconds[False]:.2f})"
    )


def decoder_part(shape: dict, device, peak: float) -> None:
    """Part 5: the decoder-only policy on Qwen2.5-0.5B's shape:
    one SFT step and one CAGSR iteration."""
    model = DecoderOnly(config_from_hf(shape["decoder"], last_layers=1)).to(device)
    print(
        f"\n5. Qwen2.5-0.5B's shape, decoder-only (decoder.py), random weights "
        f"({millions(model)} parameters), bf16 autocast"
    )
    B, S, T = shape["sft"]
    print_sft(
        f"{B} pairs x ({S} + {T}) tokens", sft_part(model, shape, OUR_SPECIALS, device, peak, 1)
    )
    print_rl(
        measured_iteration(
            model, rl_setup(model, shape, OUR_SPECIALS, device, "pretrained"), device, peak
        )
    )


def compile_part(model, setup, eager: dict, device, peak: float) -> None:
    """Part 4: the PPO update through torch.compile (as `--compile`), against part 2's eager one.
    Where torch.compile cannot compile (no C++ compiler, an unsupported operation), it raises: the
    part fails."""
    print("\n4. torch.compile for the PPO update (part 2's model)")
    compiled = torch.compile(ppo.PolicyValue(model))
    first = rl_iteration(model, setup, device, compiled)["update_s"]
    steady = measured_iteration(model, setup, device, peak, compiled)
    print(
        f"   update: eager {eager['update_s']:.3f} s; compiled {steady['update_s']:.3f} s "
        f"(x{eager['update_s'] / steady['update_s']:.2f}); "
        f"the first compiled update, compiling, {first:.1f} s"
    )


PARTS = {  # how the check names each part where it fails and in its last line
    1: "part 1 (same weights)",
    2: "part 2 (flan-T5-large's shape)",
    3: "part 3 (the preset)",
    4: "part 4 (torch.compile)",
    5: "part 5 (decoder-only)",
}


def run_part(failed: list, name: str, fn, *args):
    """fn(*args), the part `name` of the check. Where it raises, the part has failed: its traceback
    goes to stderr, a line `FAILED: name: error` to stdout, `name` into `failed`, and None is
    returned, so that the next parts still run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 -- one part's failure must not hide the others'
        sys.stdout.flush()
        traceback.print_exc()
        print(f"   FAILED: {name}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        failed.append(name)
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--tiny", action="store_true", help="tiny shapes on the CPU (the test's; no GPU needed)"
    )
    ap.add_argument("--skip-compile", action="store_true", help="leave out part 4 (torch.compile)")
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device; run it on a GPU, or with --tiny on the CPU")
    device = torch.device("cpu" if args.tiny else "cuda")
    shape = SHAPES["tiny" if args.tiny else "gpu"]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    peak, source = chip_peak(device)
    print(f"cagsr GPU check on {source}; torch {torch.__version__}")
    failed, skipped = [], []
    if run_part(failed, PARTS[1], same_weights_part, shape, device) is False:
        skipped.append(f"{PARTS[1]}: no transformers")
    large = run_part(failed, PARTS[2], large_part, shape, device, peak)
    run_part(failed, PARTS[3], preset_part, shape, device, peak)
    if args.skip_compile:
        skipped.append(f"{PARTS[4]}: --skip-compile")
    elif large is None:
        print(f"\n4. torch.compile: not run\n   FAILED: {PARTS[4]}: it needs part 2's model")
        failed.append(PARTS[4])
    else:
        run_part(failed, PARTS[4], compile_part, *large, device, peak)
    run_part(failed, PARTS[5], decoder_part, shape, device, peak)
    print(
        f"\nthe whole check: {time.perf_counter() - t0:.0f} s; "
        + (f"FAILED: {', '.join(failed)}" if failed else "every part that ran passed")
        + (f" (skipped: {'; '.join(skipped)})" if skipped else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
