"""The self-supervised reward of CAGSR, §3.2: coverage + focus - repetition, from the model's own
cross-attention.

    coverage(x, y) = 1 / (|y| |I_x|) * sum_t sum_{j in I_x} Abar[t, j]
    entropy(A_t)   = - sum_j Abar[t, j] log Abar[t, j]          (attention_entropy)
    focus(x, y)    = - (1/|y|) * sum_t entropy(A_t)
    R(x, y)        = alpha * coverage + beta * focus - gamma * repeatPenalty(y)

`Abar` (B, T, S) is what model.py records: the mean over heads and over the last L' decoder layers
(ModelConfig.last_layers) of each response token's attention over the prompt. Every function here
is pure: tensors in, one number per candidate out, shape (B,). Positions where `response_mask` is
False (after EOS) contribute nothing, and |y| counts the masked-in tokens (DECISIONS.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import data
from checks import AT_LEAST_1, FINITE, NON_NEGATIVE, POSITIVE, check_fields, one_of


@dataclass
class RewardConfig:
    alpha: float = 1.0
    """Weight of coverage (§7.2: 1.0)."""
    beta: float = 0.5
    """Weight of focus (§7.2: 0.5)."""
    gamma: float = 1.0
    """Weight of the repetition penalty (§7.2: 1.0)."""
    ngram: int = 2
    """n of the repetition penalty's n-grams (§3.2: bigrams; higher orders are a §6 extension)."""
    repeat_count: bool = False
    """Use the raw count of repeated n-grams instead of the fraction (DECISIONS.md §2: fraction)."""
    salient_method: str = "idf"
    """Heuristic for I_x (§3.2): "idf" (top-k content tokens by IDF) or "ner" (capitalised words not
    at a sentence start, and numbers)."""
    salient_top_k: int = 4
    """How many of a prompt's content tokens the IDF heuristic marks salient."""
    idf_weighted: bool = False
    """Weight each salient token by its IDF in the coverage sum (§3.2 extension)."""
    attn_temperature: float = 1.0
    """Temperature applied to Abar before the entropy (§6 extension): A^(1/tau), renormalised."""
    entropy_floor: float = 0.0
    """Lower bound on each step's entropy (§6, against "artificially spiky" attention): below it,
    sharper attention earns no more focus."""
    exclude_special: bool = False
    """Drop the prompt's special tokens (EOS) from Abar and renormalise (DECISIONS.md §2:
    attention sinks)."""

    def __post_init__(self):
        check_fields(
            self,
            dict(
                alpha=FINITE,
                beta=FINITE,
                gamma=FINITE,
                ngram=AT_LEAST_1,
                salient_method=one_of("idf", "ner"),
                salient_top_k=AT_LEAST_1,
                attn_temperature=POSITIVE,
                entropy_floor=NON_NEGATIVE,
            ),
        )


# What the paper states (§3.2, §7.2): every other RewardConfig field is an option of the project's.
PAPER = dict(alpha=1.0, beta=0.5, gamma=1.0, ngram=2)


def _num_tokens(response_mask):
    """|y| per candidate, at least 1 so an empty response gives 0 terms rather than NaN:
    (B, T) -> (B,)."""
    return response_mask.sum(-1).clamp(min=1).to(torch.float32)


def response_mean(x, response_mask):
    """Mean of a per-token quantity over each response's tokens (EOS included), the (1/|y|) sum_t of
    §3.2; positions past EOS are never read, so a non-finite value there cannot leak in (inf * 0
    would be NaN). An empty response gives 0. (B, T), (B, T) bool -> (B,)."""
    kept = torch.where(response_mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum(-1) / response_mask.sum(-1).clamp(min=1).to(x.dtype)


def coverage(attn, salient_mask, response_mask):
    """Coverage term, §3.2: the mean over response tokens of the attention mass on I_x, per
    salient token.

    attn (B, T, S) = Abar; salient_mask (B, S): bool mask of I_x, or float weights w_j (IDF
    weighting, DECISIONS.md §2: sum_t sum_j w_j Abar[t, j] / (|y| sum_j w_j), the paper's formula
    for 0/1 weights); response_mask (B, T) bool. A prompt with no salient token gets 0. -> (B,)
    """
    w = salient_mask.to(attn.dtype)  # (B, S)
    mass = (attn * w[:, None, :]).sum(-1)  # (B, T)
    mass = (mass * response_mask).sum(-1)  # (B,)
    size = w.sum(-1)  # |I_x| or sum_j w_j
    return torch.where(
        size > 0,
        mass / (_num_tokens(response_mask) * size.clamp(min=1e-12)),
        torch.zeros_like(mass),
    )


def attention_entropy(attn, temperature=1.0):
    """Entropy of each step's attention distribution Abar[t] over the prompt (not of the token
    distribution: that is sampling.token_entropy), with 0 log 0 = 0: (B, T, S) -> (B, T).

    temperature != 1 rescales the distribution first (A^(1/tau), renormalised; §6 extension)."""
    if temperature != 1.0:
        attn = attn.clamp(min=0) ** (1.0 / temperature)
        attn = attn / attn.sum(-1, keepdim=True).clamp(min=1e-12)
    plogp = torch.where(attn > 0, attn * torch.log(attn.clamp(min=1e-30)), torch.zeros_like(attn))
    return -plogp.sum(-1)


def focus(attn, response_mask, temperature=1.0, entropy_floor=0.0):
    """Focus term, §3.2: minus the mean over response tokens of the attention entropy.

    attn (B, T, S), response_mask (B, T) -> (B,). With entropy_floor > 0 each step's entropy is
    clamped from below (§6), so attention sharper than the floor earns nothing more."""
    h = attention_entropy(attn, temperature).clamp(min=entropy_floor)  # (B, T)
    return -response_mean(h, response_mask)


def repeat_penalty(tokens, response_mask, n=2, count=False):
    """Repetition penalty, §3.2: the share of the response's n-grams that repeat an earlier n-gram
    of the same response, (count - distinct) / count, in [0, 1); 0 when it has no n-gram.
    count=True gives the raw number of repeats (count - distinct) instead (DECISIONS.md §2).

    tokens (B, T) long, response_mask (B, T) bool -> (B,). n-grams are taken over the masked-in
    tokens, EOS included (the response as generated)."""
    out = torch.zeros(tokens.size(0))
    for b, (row, m) in enumerate(zip(tokens.tolist(), response_mask.tolist())):
        y = [tok for tok, keep in zip(row, m) if keep]
        grams = [tuple(y[i : i + n]) for i in range(len(y) - n + 1)]
        if grams:
            repeats = len(grams) - len(set(grams))
            out[b] = repeats if count else repeats / len(grams)
    return out.to(tokens.device)


# --------------------------------------------------------------------------------------------
# Salient prompt tokens I_x (§3.2): IDF or a cheap named-entity rule. Never special tokens or
# punctuation (DECISIONS.md §2).
# --------------------------------------------------------------------------------------------


def salient_idf(src, src_mask, idf, content, top_k, weighted=False):
    """The top_k prompt positions by IDF among content tokens: (B, S) bool, or the IDF of the chosen
    positions as float weights when `weighted` (§3.2 extension).

    src, src_mask (B, S); idf (V,) over the training prompts; content (V,) bool
    (data.content_token_mask). Ties are broken by position (earlier first), so the choice
    is deterministic."""
    eligible = content.to(src.device)[src] & src_mask  # (B, S)
    score = torch.where(
        eligible, idf.to(src.device)[src], torch.full(src.shape, -1.0, device=src.device)
    )
    S = src.size(1)
    # A tiny position term makes ties deterministic without reordering distinct scores.
    tiebreak = torch.arange(S, device=src.device) * 1e-6
    top = torch.topk(score - tiebreak, min(top_k, S), dim=-1).indices  # (B, k)
    chosen = torch.zeros_like(src_mask).scatter(-1, top, True) & eligible  # (B, S)
    return chosen * idf.to(src.device)[src] if weighted else chosen


def salient_ner(src, src_mask, token_strings, content):
    """The cheap named-entity rule of DECISIONS.md §2: every token of a capitalised word that does
    not start a sentence, and of any word containing a digit. No external model. -> (B, S) bool.

    token_strings: the text of each vocabulary id (data.token_texts: a token that begins a new word
    begins with a space, SentencePiece's "▁" included); content (V,) bool: tokens with a letter or
    digit (data.content_token_mask)."""
    out = torch.zeros_like(src_mask)
    for b, (row, m) in enumerate(zip(src.tolist(), src_mask.tolist())):
        text, words, current = "", [], None  # words: (positions, starts a sentence?)
        for j, tok in enumerate(row):
            if not m[j]:
                continue
            piece = token_strings[tok]
            if not content[tok]:  # punctuation, spaces, special tokens end a word
                current = None
            elif current is None or piece[:1].isspace():
                before = text.rstrip()
                current = [j]
                words.append((current, before == "" or before[-1] in ".?!"))
            else:
                current.append(j)
            text += piece
        for positions, sentence_start in words:
            word = "".join(token_strings[row[j]] for j in positions).strip()
            if (word[:1].isupper() and not sentence_start) or any(ch.isdigit() for ch in word):
                out[b, positions] = True
    return out


class SalientTokens:
    """I_x for a batch of prompts, with the statistics it needs (IDF over the training prompts,
    which tokens are content, their text). Built once per run:
    `SalientTokens.build(tok, prompt_ids)`."""

    def __init__(self, idf, content, token_strings):
        self.idf, self.content, self.token_strings = idf, content, token_strings

    @classmethod
    def build(cls, tok, train_prompt_ids):
        """From the tokenizer and the encoded training prompts (the IDF statistics of §3.2)."""
        return cls.from_idf(tok, data.idf(train_prompt_ids, tok.get_vocab_size()))

    @classmethod
    def from_idf(cls, tok, idf):
        """From the tokenizer and an IDF table computed earlier (e.g. stored in a checkpoint)."""
        texts = data.token_texts(tok)
        return cls(idf, data.content_token_mask(tok, texts=texts), texts)

    def __call__(self, src, src_mask, cfg: RewardConfig, sinks=None):
        """(B, S): bool mask of I_x, or float IDF weights when cfg.idf_weighted. sinks (B, S) bool:
        the positions the policy parks attention on (its `sinks`), never salient (DECISIONS.md
        §10: the decoder-only policy's first real token)."""
        if sinks is not None:
            src_mask = src_mask & ~sinks
        if cfg.salient_method == "idf":
            return salient_idf(
                src, src_mask, self.idf, self.content, cfg.salient_top_k, cfg.idf_weighted
            )
        if cfg.salient_method == "ner":
            chosen = salient_ner(src, src_mask, self.token_strings, self.content)
            return chosen * self.idf.to(src.device)[src] if cfg.idf_weighted else chosen
        raise ValueError(
            f"RewardConfig.salient_method must be 'idf' or 'ner', got {cfg.salient_method!r}"
        )


# --------------------------------------------------------------------------------------------
# Special tokens as attention sinks (DECISIONS.md §2), and the total reward.
# --------------------------------------------------------------------------------------------


def sink_share(attn, special, response_mask):
    """Mean over response tokens of the attention mass on the prompt's special tokens: (B,).

    attn (B, T, S), special (B, S) bool. The first place reward hacking shows (DECISIONS.md §2)."""
    mass = (attn * special[:, None, :].to(attn.dtype)).sum(-1)  # (B, T)
    return response_mean(mass, response_mask)


def drop_special(attn, special, prompt_mask=None):
    """Abar without the prompt's special tokens, renormalised over the rest: (B, T, S).

    special (B, S) bool; prompt_mask (B, S) bool, True on real prompt tokens (None: every position
    is real). A step whose attention was *all* on special tokens carries no information about the
    rest of the prompt, so it becomes the uniform distribution over the real non-special tokens:
    chance-level coverage and the least focus, never the best (a sink-only step must not look
    sharp). Steps with no attention at all (after EOS) stay zero."""
    keep = ~special if prompt_mask is None else prompt_mask & ~special  # (B, S)
    kept = attn * keep[:, None, :].to(attn.dtype)  # (B, T, S)
    total = kept.sum(-1, keepdim=True)  # (B, T, 1)
    uniform = keep[:, None, :].to(attn.dtype) / keep.sum(-1)[:, None, None].clamp(min=1)
    sink_only = (total == 0) & (attn.sum(-1, keepdim=True) > 0)
    return torch.where(
        total > 0,
        kept / total.clamp(min=1e-12),
        torch.where(sink_only, uniform, torch.zeros_like(kept)),
    )


def compute_reward(
    attn, tokens, response_mask, salient_mask, cfg: RewardConfig, special=None, prompt_mask=None
):
    """R(x, y) of §3.2 and each of its terms, one value per candidate.

    attn (B, T, S) Abar; tokens (B, T); response_mask (B, T) bool; salient_mask (B, S) from
    SalientTokens (I_x); special (B, S) bool marks the prompt's special tokens (needed for the sink
    share and for cfg.exclude_special); prompt_mask (B, S) the real prompt tokens (for
    exclude_special; see drop_special). Returns a dict of (B,) tensors: reward, coverage, focus,
    repeat, and sink_share (measured on the attention as recorded, before any exclusion)."""
    terms = {}
    if special is not None:
        terms["sink_share"] = sink_share(attn, special, response_mask)
    if cfg.exclude_special:
        if special is None:
            raise ValueError("RewardConfig.exclude_special needs the prompt's special-token mask")
        attn = drop_special(attn, special, prompt_mask)
    terms["coverage"] = coverage(attn, salient_mask, response_mask)
    terms["focus"] = focus(attn, response_mask, cfg.attn_temperature, cfg.entropy_floor)
    terms["repeat"] = repeat_penalty(tokens, response_mask, cfg.ngram, cfg.repeat_count).to(
        attn.dtype
    )
    terms["reward"] = (
        cfg.alpha * terms["coverage"] + cfg.beta * terms["focus"] - cfg.gamma * terms["repeat"]
    )
    return terms
