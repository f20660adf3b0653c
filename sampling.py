"""How one token is drawn from a decoding step's logits, and what a rollout records of
each step: the samplers of both policies (`EncoderDecoder.sample` in model.py,
`DecoderOnly.sample` in decoder.py) hand their step's logits to one `Steps`, which draws,
keeps the per-token log-probability, self-certainty, entropy and attention, and stops rows
at EOS, and returns the `Rollout`.

RL draws from the full softmax at its temperature (DECISIONS.md §3); `--stage sample` and display
may truncate it first with top-k or nucleus (top-p) sampling (§5 names "top-k or nucleus sampling").
`draw` makes the one random choice per row, exactly, at a cost that does not grow with V random
numbers per row for a large vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def sample_next(logits, top_k=None, top_p=None, generator=None, probs=None):
    """One token per row from softmax(filter_logits(logits, top_k, top_p)): (B, V) -> (B,) ids.

    With top_k the draw is made among the k highest logits only (torch.topk, then `draw` over k
    entries): the same distribution as masking the other V - k logits to -inf, at k random draws per
    row instead of V. Ties at the k-th logit keep exactly k tokens. probs: softmax(logits) when the
    caller has it; drawn from as it is when nothing is truncated."""
    if top_k is not None and top_k < logits.size(-1):
        vals, idx = torch.topk(logits, top_k, dim=-1)  # (B, k), (B, k)
        pick = draw(
            torch.softmax(filter_logits(vals, top_p=top_p), dim=-1), generator
        )  # (B,) index into the k
        return idx.gather(-1, pick[:, None]).squeeze(-1)  # (B,)
    kept = filter_logits(logits, top_p=top_p)  # `logits` itself when top_p cuts nothing
    if probs is None or kept is not logits:
        probs = torch.softmax(kept, dim=-1)
    return draw(probs, generator)  # (B,)


CDF_DRAW_FROM = 16_384  # categories from which `draw` takes the inverse CDF


def draw(probs, generator=None):
    """One index per row of the categorical distributions `probs`, an exact draw: (B, V) -> (B,).
    torch.multinomial costs V exponential draws per row; from CDF_DRAW_FROM categories on, the draw
    is the inverse CDF in two stages, P(block) x P(index | block), over blocks of sqrt(V)
    entries: one uniform picks a block by the cumulative block masses (float64), another an index
    inside it, so no (B, V) float64 array is made and an index of probability 0 is never drawn.
    Why both: DECISIONS.md §3."""
    B, V = probs.shape
    if V < CDF_DRAW_FROM:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    wide = torch.float32 if probs.device.type == "mps" else torch.float64  # MPS has no float64
    width = math.isqrt(V)
    full = V // width * width
    mass = probs[:, :full].view(B, -1, width).sum(-1, dtype=wide)  # (B, V // width)
    if full < V:  # a shorter last block
        mass = torch.cat([mass, probs[:, full:].sum(-1, keepdim=True, dtype=wide)], -1)
    block = inverse_cdf(mass, generator)  # (B, 1)
    index = block * width + torch.arange(width, device=probs.device)  # (B, width)
    inside = probs.gather(-1, index.clamp(max=V - 1)).to(wide) * (index < V)  # (B, width); 0 past V
    return (block * width + inverse_cdf(inside, generator)).squeeze(-1)  # (B,)


def inverse_cdf(weights, generator=None):
    """The index i of each row with cumsum(weights)[i-1] <= u < cumsum(weights)[i], u uniform on
    [0, sum(weights)): a draw with probability weights[i] / sum(weights). (B, K) -> (B, 1)."""
    cdf = weights.cumsum(-1)  # (B, K)
    u = (
        torch.rand(cdf.size(0), 1, dtype=cdf.dtype, device=cdf.device, generator=generator)
        * cdf[:, -1:]
    )
    return torch.searchsorted(cdf, u, right=True).clamp(max=cdf.size(-1) - 1)  # (B, 1)


def filter_logits(logits, top_k=None, top_p=None):
    """Top-k then nucleus (top-p) truncation: logits outside the kept set become -inf.
    (B, V) -> (B, V).

    top-k keeps the k highest logits; top-p keeps the smallest set of highest-probability tokens
    whose total probability reaches p (always at least one token)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach p.
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # (B, V)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# --------------------------------------------------------------------------------------------
# What one rollout records (§5): the same for every policy.
# --------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """What a policy's `sample` returns for B prompts x N samples (rows b*N .. b*N+N-1)."""

    tokens: torch.Tensor
    """(B*N, T) long: the sampled response, EOS included, PAD after it."""
    logprobs: torch.Tensor
    """(B*N, T) float: log pi(y_t | x, y_<t) under softmax(logits / temperature), 0 after EOS."""
    mask: torch.Tensor
    """(B*N, T) bool: True on the response's tokens up to and including EOS."""
    attn: torch.Tensor | None
    """(B*N, T, S) float: Abar recorded while decoding (§3.2), 0 after EOS and on prompt padding."""
    certainty: torch.Tensor | None = None
    """(B*N, T) float: `token_self_certainty` of softmax(logits / temperature) at each step,
    0 after EOS."""
    entropy: torch.Tensor | None = None
    """(B*N, T) float: `token_entropy` of softmax(logits / temperature) at each step,
    0 after EOS."""
    prompt_share: torch.Tensor | None = None
    """(B*N, T) float: the share of the recorded attention that lay on the prompt before Abar was
    renormalised over it (DECISIONS.md §10): 1 for cross-attention, which sees only the prompt;
    0 after EOS."""


def token_self_certainty(logits, lse=None):
    """Self-certainty of one next-token distribution (Intuitor, arXiv 2505.19590):
    KL(U || softmax(z)) = logsumexp(z) - mean_j z_j - log V, in nats; 0 for a uniform distribution,
    large when peaked. z: the full-vocabulary logits / temperature, never truncated or -inf (T5's
    padded vocabulary rows are ordinary logits). lse: logsumexp(z) when already computed.
    (..., V) -> (...)."""
    z = logits.float()
    lse = torch.logsumexp(z, -1) if lse is None else lse
    return lse - z.mean(-1) - math.log(z.size(-1))


def token_entropy(logits, lse=None, probs=None):
    """Entropy H(softmax(z)) = logsumexp(z) - sum_j p_j z_j of one next-token distribution, in nats
    (EM-RL, arXiv 2505.15134, minimises it). z: logits / temperature, as in `token_self_certainty`;
    lse, probs: logsumexp(z) and softmax(z) when already computed. (..., V) -> (...)."""
    z = logits.float()
    lse = torch.logsumexp(z, -1) if lse is None else lse
    probs = torch.softmax(z, -1) if probs is None else probs
    return lse - (probs * z).sum(-1)


@dataclass(frozen=True)
class Decoding:
    """How a policy's `sample` decodes, the same for both policies: N candidates per prompt, each
    drawn token by token from softmax(logits / temperature), truncated first by top-k and top-p
    when given, or the argmax when greedy. `check_sampling` refuses a setting nothing can be drawn
    from."""

    num_samples: int = 1
    """N, the candidates per prompt (rows b*N .. b*N+N-1 of the Rollout)."""
    max_new_tokens: int = 64
    """The longest response in tokens, EOS included (at most the model's max_tgt_len)."""
    temperature: float = 1.0
    """T of softmax(logits / T): the distribution drawn from, that of the
    recorded log-probabilities."""
    top_k: int | None = None
    """Draw among the k highest logits only; None = off."""
    top_p: float | None = None
    """Nucleus sampling: draw among the fewest tokens whose probability reaches p; None = off."""
    greedy: bool = False
    """Take the argmax at every step instead of drawing."""


def check_sampling(temperature, top_k=None, top_p=None) -> None:
    """ValueError for a sampler setting no distribution can be drawn from, before any work: both
    policies' `sample` call it first."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use greedy=True for argmax)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


class Steps:
    """The bookkeeping of one KV-cached rollout of BN rows, step by step.
    `step(logits, abar, share)` draws the next token of every row from the step's logits (greedy:
    the argmax; else `sample_next` with top_k / top_p), records log softmax(logits / temperature) of
    it over the whole vocabulary (DECISIONS.md §3), its self-certainty and entropy, the step's Abar
    (BN, S) and prompt share (BN,), and marks rows done at EOS; rows already done get pad and zeros.
    `rollout()` stacks them into a `Rollout`."""

    def __init__(
        self, BN, device, *, temperature, top_k, top_p, greedy, generator, eos_id, pad_id, record
    ):
        self.temperature, self.top_k, self.top_p, self.greedy = temperature, top_k, top_p, greedy
        self.generator, self.eos_id, self.pad_id, self.record = generator, eos_id, pad_id, record
        self.done = torch.zeros(BN, dtype=torch.bool, device=device)
        self.lists = {
            k: []
            for k in ("tokens", "logprobs", "mask", "attn", "certainty", "entropy", "prompt_share")
        }

    def step(self, logits, abar=None, share=None):
        """logits (BN, V) of this step; abar (BN, S) when recording; share (BN,) or None (= 1).
        Returns the next input (BN,): the drawn tokens, pad on finished rows."""
        logits = logits.float() / self.temperature  # (BN, V)
        # One softmax and one logsumexp over the vocabulary serve the draw, the log-probability,
        # the certainty and the entropy: the same operations on the same logits as computing each
        # apart, so the same numbers.
        probs, lse = torch.softmax(logits, -1), torch.logsumexp(logits, -1)  # (BN, V), (BN,)
        nxt = (
            logits.argmax(-1)
            if self.greedy
            else sample_next(logits, self.top_k, self.top_p, self.generator, probs)
        )
        live = ~self.done
        nxt = torch.where(live, nxt, torch.full_like(nxt, self.pad_id))
        # log softmax(logits)[nxt] over the whole vocabulary, without a (BN, V) log-softmax tensor.
        lp = logits.gather(-1, nxt[:, None]).squeeze(-1) - lse  # (BN,)
        keep = self.lists
        keep["tokens"].append(nxt)
        keep["logprobs"].append(torch.where(live, lp, torch.zeros_like(lp)))
        keep["mask"].append(live)
        keep["certainty"].append(
            token_self_certainty(logits, lse) * live
        )  # (BN,): one number per token, never
        keep["entropy"].append(token_entropy(logits, lse, probs) * live)  # a (BN, T, V) tensor
        keep["prompt_share"].append(live.float() if share is None else share.float() * live)
        if self.record:
            keep["attn"].append(abar * live[:, None])  # (BN, S)
        self.done = self.done | (nxt == self.eos_id)
        return nxt

    def finished(self) -> bool:
        return bool(self.done.all())

    def rollout(self) -> Rollout:
        out = {
            k: torch.stack(v, 1) if v else None for k, v in self.lists.items()
        }  # each (BN, T) or (BN, T, S)
        return Rollout(**out)
