"""How one token is drawn from a decoding step's logits, for `EncoderDecoder.sample` (model.py).

RL draws from the full softmax at its temperature (DECISIONS.md §3); `--stage sample` and display
may truncate it first with top-k or nucleus (top-p) sampling (§5 names "top-k or nucleus sampling").
`draw` makes the one random choice per row, exactly, at a cost that does not grow with V random
numbers per row for a large vocabulary.
"""

from __future__ import annotations

import math

import torch


def sample_next(logits, top_k=None, top_p=None, generator=None):
    """One token per row from softmax(filter_logits(logits, top_k, top_p)): (B, V) -> (B,) ids.

    With top_k the draw is made among the k highest logits only (torch.topk, then `draw` over k
    entries): the same distribution as masking the other V - k logits to -inf, at k random draws per
    row instead of V. Ties at the k-th logit keep exactly k tokens."""
    if top_k is not None and top_k < logits.size(-1):
        vals, idx = torch.topk(logits, top_k, dim=-1)                       # (B, k), (B, k)
        pick = draw(torch.softmax(filter_logits(vals, top_p=top_p), dim=-1), generator)   # (B,) index into the k
        return idx.gather(-1, pick[:, None]).squeeze(-1)                    # (B,)
    return draw(torch.softmax(filter_logits(logits, top_p=top_p), dim=-1), generator)     # (B,)


CDF_DRAW_FROM = 16_384                         # categories from which `draw` takes the inverse CDF


def draw(probs, generator=None):
    """One index per row of the categorical distributions `probs`, an exact draw: (B, V) -> (B,).
    torch.multinomial costs V exponential draws per row; from CDF_DRAW_FROM categories on, the draw
    is the inverse CDF in two stages, P(block) x P(index | block), over blocks of sqrt(V) entries: one
    uniform picks a block by the cumulative block masses (float64), another an index inside it, so no
    (B, V) float64 array is made and an index of probability 0 is never drawn. Why both: DECISIONS.md §3."""
    B, V = probs.shape
    if V < CDF_DRAW_FROM:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    wide = torch.float32 if probs.device.type == "mps" else torch.float64        # MPS has no float64
    width = math.isqrt(V)
    full = V // width * width
    mass = probs[:, :full].view(B, -1, width).sum(-1, dtype=wide)                 # (B, V // width)
    if full < V:                                                                  # a shorter last block
        mass = torch.cat([mass, probs[:, full:].sum(-1, keepdim=True, dtype=wide)], -1)
    block = inverse_cdf(mass, generator)                                          # (B, 1)
    index = block * width + torch.arange(width, device=probs.device)              # (B, width)
    inside = probs.gather(-1, index.clamp(max=V - 1)).to(wide) * (index < V)     # (B, width); 0 past V
    return (block * width + inverse_cdf(inside, generator)).squeeze(-1)           # (B,)


def inverse_cdf(weights, generator=None):
    """The index i of each row with cumsum(weights)[i-1] <= u < cumsum(weights)[i], u uniform on
    [0, sum(weights)): a draw with probability weights[i] / sum(weights). (B, K) -> (B, 1)."""
    cdf = weights.cumsum(-1)                                                       # (B, K)
    u = torch.rand(cdf.size(0), 1, dtype=cdf.dtype, device=cdf.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=cdf.size(-1) - 1)    # (B, 1)


def filter_logits(logits, top_k=None, top_p=None):
    """Top-k then nucleus (top-p) truncation: logits outside the kept set become -inf. (B, V) -> (B, V).

    top-k keeps the k highest logits; top-p keeps the smallest set of highest-probability tokens
    whose total probability reaches p (always at least one token)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]              # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach p.
        drop_sorted = probs.cumsum(-1) - probs >= top_p                       # (B, V)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
