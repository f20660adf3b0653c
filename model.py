"""The policy of CAGSR: a compact encoder-decoder Transformer that exposes its cross-attention.

Paper: "A Self-Supervised Reinforcement Learning Approach for Fine-Tuning Large Language Models
Using Cross-Attention Signals" (Kiruluta, Lemos, Burity, 2025, arXiv 2502.10482).

§3.1: at decoding step t and decoder layer l the model computes a cross-attention vector
A_t^(l) in R^|x|, the distribution of that step's query over the prompt positions. §3.2 builds the
reward from the mean of those vectors over the last L' decoder layers (and over heads):

    Abar[t, j] = (1/L') * sum_{l = L-L'+1 .. L} A_t^(l)[j]

So this file does three things a generic seq2seq model does not:
  * the last `last_layers` (= L') decoder layers compute their cross-attention with an explicit
    softmax and can hand the weights back; every other attention uses the fused
    F.scaled_dot_product_attention, and asking it for weights is an error;
  * the teacher-forced forward pass and the KV-cached sampler both return `Abar`, shape (B, T, S),
    never stored on `self`;
  * a value head V(x) on the mean-pooled encoder states (§7.2: "shares the underlying layers").

Shapes: B batch of prompts, N samples per prompt, S prompt length, T response length, H heads,
L layers, D width, V vocabulary. Rows of a B*N batch are ordered so that the N samples of prompt b
are rows b*N .. b*N+N-1 (DECISIONS.md §1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checks import AT_LEAST_1, BOOL, POSITIVE, ConfigError, check_fields, checked_overrides, one_of
from presets import SIZES
from sampling import Decoding, Rollout, Steps, check_sampling

# --------------------------------------------------------------------------------------------
# Configuration: one dataclass, one dict of sizes.
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    vocab_size: int = 3000
    """Vocabulary size. The preset's value is the BPE target; a run uses its tokenizer's size."""
    d_model: int = 128
    """Width D of every residual stream."""
    n_heads: int = 4
    """Attention heads H per attention block."""
    n_enc_layers: int = 2
    """Encoder layers."""
    n_dec_layers: int = 2
    """Decoder layers L."""
    d_ff: int = 512
    """Hidden width of the feed-forward blocks."""
    max_src_len: int = 128
    """Longest prompt, in tokens including its EOS (the size of the learned absolute position table;
    a limit only with relative positions)."""
    max_tgt_len: int = 128
    """Longest response, in tokens including its EOS."""
    last_layers: int = 1
    """L' of §3.2: how many of the last decoder layers record cross-attention (1 or 3 in
    the paper)."""
    dropout: float = 0.0
    """Residual dropout. RL turns it off during rollouts and updates anyway."""
    # The architecture variants below default to the from-scratch model; `from_pretrained`
    # sets T5's.
    norm: str = "layernorm"
    """"layernorm" (bias-free LayerNorm, its own eps 1e-5) or "rmsnorm"
    (T5: x / rms(x) * weight, no mean, no bias)."""
    norm_eps: float = 1e-6
    """Epsilon of "rmsnorm" (T5's layer_norm_epsilon); "layernorm" ignores it."""
    position: str = "absolute"
    """"absolute" (learned enc_pos / dec_pos tables) or "relative" (T5's bucketed relative
    position bias)."""
    rel_buckets: int = 32
    """Buckets of the relative position bias (T5's relative_attention_num_buckets)."""
    rel_max_distance: int = 128
    """Relative distance from which positions share the last bucket
    (T5's relative_attention_max_distance)."""
    scale_scores: bool = True
    """Divide the attention scores by sqrt(head width); T5 does not (its initialisation absorbs
    the scale)."""
    d_kv: int | None = None
    """Width of one attention head; None = d_model // n_heads. n_heads * d_kv may differ
    from d_model."""
    ffn: str = "gelu"
    """Feed-forward block: "gelu" out(gelu(up x)), "relu" (T5 v1.0) out(relu(up x)), or "gated-gelu"
    (T5 v1.1, flan-T5, mT5) out(gelu_tanh(gate x) * up x)."""
    tie_head: bool = True
    """Logits = h @ tok_emb^T (tied); False = a separate lm_head (flan-T5, mT5)."""
    scale_head: bool = False
    """Multiply the decoder output by d_model^-0.5 before the head (T5 v1.0, whose head is tied)."""

    def __post_init__(self):
        check_fields(
            self,
            {
                name: AT_LEAST_1
                for name in (
                    "vocab_size",
                    "d_model",
                    "n_heads",
                    "n_enc_layers",
                    "n_dec_layers",
                    "d_ff",
                    "max_src_len",
                    "max_tgt_len",
                    "rel_buckets",
                    "rel_max_distance",
                )
            },
        )
        check_fields(
            self,
            dict(
                dropout=(lambda v: 0 <= v < 1, "in [0, 1)"),
                norm_eps=POSITIVE,
                norm=one_of("layernorm", "rmsnorm"),
                position=one_of("absolute", "relative"),
                ffn=one_of("gelu", "relu", "gated-gelu"),
                scale_scores=BOOL,
                tie_head=BOOL,
                scale_head=BOOL,
                d_kv=(lambda v: v is None or AT_LEAST_1[0](v), "None or " + AT_LEAST_1[1]),
            ),
        )
        if self.rel_buckets < 4:  # 2 exact + 2 log buckets per side
            raise ConfigError("rel_buckets", self.rel_buckets, "at least 4")
        if self.rel_max_distance <= self.rel_buckets // 2:
            raise ConfigError(
                "rel_max_distance",
                self.rel_max_distance,
                f"greater than rel_buckets // 2 = {self.rel_buckets // 2} (the exact distances)",
            )
        if self.d_kv is None and self.d_model % self.n_heads:
            raise ConfigError(
                "d_model", self.d_model, f"divisible by n_heads={self.n_heads}", related="n_heads"
            )
        if not 1 <= self.last_layers <= self.n_dec_layers:
            raise ConfigError(
                "last_layers",
                self.last_layers,
                f"in 1..n_dec_layers={self.n_dec_layers} (L' of §3.2)",
                related="n_dec_layers",
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head: d_kv, else d_model // n_heads."""
        return self.d_model // self.n_heads if self.d_kv is None else self.d_kv


def config_for(size: str, **overrides) -> ModelConfig:
    """The preset `size`, with explicit `overrides` (field=value) applied on top.

    Unknown sizes or fields are errors that list the valid ones: a model is never a silent mix.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    return replace(ModelConfig(**SIZES[size]), **checked_overrides(ModelConfig, overrides))


# --------------------------------------------------------------------------------------------
# Attention: one function, weights on request.
# --------------------------------------------------------------------------------------------


def attention(q, k, v, mask=None, is_causal=False, need_weights=False, scale=None):
    """Scaled dot-product attention softmax(q k^T * scale + mask) v, returning (out, weights).

    q: (B, H, Tq, hd); k, v: (B, H, Tk, hd); mask broadcastable to (B, H, Tq, Tk): bool, True where
    a query may attend, or float, added to the scores (a relative position bias with -inf where a
    query may not attend, from `additive_mask`). scale: None = 1/sqrt(hd); T5 uses 1.0.
    With need_weights=False this is the fused F.scaled_dot_product_attention and weights is None;
    with need_weights=True it is the explicit softmax, written out so the recorded weights are
    exactly the ones applied to v.
    """
    if not need_weights:
        if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)  # bf16 autocast: SDPA wants one dtype
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale
        )
        return out, None
    hd = q.size(-1)
    scores = q @ k.transpose(-2, -1)  # (B, H, Tq, Tk)
    scores = scores / math.sqrt(hd) if scale is None else scores * scale
    if is_causal:
        Tq, Tk = scores.shape[-2:]
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        mask = causal if mask is None else mask & causal
    if mask is not None and mask.is_floating_point():
        scores = scores + mask
    elif mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # Softmax in float32 so recorded maps sum to 1 to float32 precision even under bf16 autocast.
    weights = torch.softmax(scores.float(), dim=-1)  # (B, H, Tq, Tk)
    out = weights.to(v.dtype) @ v  # (B, H, Tq, hd)
    return out, weights


def relative_position_bucket(rel, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket of each relative position rel = key position - query position
    (Raffel et al. 2020, §2.1; the arithmetic of transformers'
    T5Attention._relative_position_bucket, bit for bit).

    Half the buckets hold the exact distances 0 .. max_exact-1, the other half logarithmically wider
    bins up to max_distance, beyond which every distance shares the last bucket. Bidirectional (the
    encoder): keys after the query use a second set of num_buckets // 2 buckets. Unidirectional (the
    decoder): keys after the query fall in bucket 0, like distance 0, so a causal mask is
    still needed.
    rel: long tensor (any shape) -> long tensor of buckets in [0, num_buckets), same shape.
    """
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.min(rel, torch.zeros_like(rel))  # distance into the past, >= 0
    max_exact = num_buckets // 2
    # The log in float32, as the reference: float64 can move a distance at a bin edge to the
    # next bucket.
    large = max_exact + (
        torch.log(rel.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(rel < max_exact, rel, large)


def additive_mask(bias, mask=None, is_causal=False):
    """The float mask `attention` adds to the scores: the relative position bias (1, H, Tq, Tk), and
    -inf where the bool key mask (B, 1, 1, Tk) or causality (key after query, queries being the
    last Tq of Tk positions) forbids attending. -> (B or 1, H, Tq, Tk)."""
    Tq, Tk = bias.shape[-2:]
    allowed = mask
    if is_causal:
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=bias.device).tril(Tk - Tq)  # (Tq, Tk)
        allowed = causal if allowed is None else allowed & causal
    if allowed is None:
        return bias
    return torch.where(
        allowed, bias, torch.full((), float("-inf"), dtype=bias.dtype, device=bias.device)
    )


def rms_norm(x, weight, eps: float):
    """T5's layer norm (Raffel et al. 2020, §2.1): x / sqrt(mean(x^2) + eps) * weight, no mean
    subtraction and no bias; the mean of squares in float32 even for half-precision x. (..., D)."""
    variance = x.float().pow(2).mean(-1, keepdim=True)  # (..., 1)
    return weight * (x * torch.rsqrt(variance + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """`rms_norm` with a learned weight (starts at ones)."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The normalisation `cfg.norm` names, over d_model."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, bias=False)


def abar(maps):
    """Abar of §3.2: the mean of the recorded cross-attention over the last L' decoder layers and
    over heads, Abar[t, j] = (1/L') sum_l A_t^(l)[j] (§3.1 allows one head or the mean over heads;
    DECISIONS.md §1). maps (B, L', H, T, S) -> (B, T, S)."""
    return maps.mean(dim=(1, 2))


def special_mask(src, src_mask, special_ids):
    """(B, S) bool: the prompt's special tokens (data.Specials.special: EOS, UNK, T5's
    sentinels, ...), the usual attention sinks (DECISIONS.md §2)."""
    return torch.isin(src, torch.tensor(special_ids, device=src.device)) & src_mask


def mean_pool(x, mask):
    """Mean of x over the positions where mask is True: (B, S, D), (B, S) -> (B, D)."""
    m = mask.unsqueeze(-1).to(x.dtype)  # (B, S, 1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)  # (B, D)


class MultiHeadAttention(nn.Module):
    """Multi-head attention. `records=True` marks the cross-attention of the last L' decoder
    layers (§3.2): only those may be asked for their weights. `relative_bias=True` gives it the
    stack's table of relative position biases (T5: the first layer's self-attention owns it, the
    other layers of the stack reuse the bias it computes)."""

    def __init__(self, cfg: ModelConfig, records: bool = False, relative_bias: bool = False):
        super().__init__()
        self.n_heads, self.d_head, self.records = cfg.n_heads, cfg.head_dim, records
        self.scale = None if cfg.scale_scores else 1.0  # None: 1/sqrt(d_head)
        inner = cfg.n_heads * cfg.head_dim  # may differ from d_model
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * inner, bias=False)
        self.out = nn.Linear(inner, cfg.d_model, bias=False)
        if relative_bias:
            self.rel_bias = nn.Embedding(cfg.rel_buckets, cfg.n_heads)
            self.rel_buckets, self.rel_max_distance = cfg.rel_buckets, cfg.rel_max_distance

    def heads(self, x):  # (B, T, H*hd) -> (B, H, T, hd)
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_head).transpose(1, 2)

    def position_bias(self, q_pos, k_len: int, bidirectional: bool):
        """The relative position bias of queries at positions q_pos (Tq,) against keys at positions
        0 .. k_len-1, one value per head from this block's table: (1, H, Tq, Tk)."""
        rel = torch.arange(k_len, device=q_pos.device)[None, :] - q_pos[:, None]  # (Tq, Tk)
        buckets = relative_position_bucket(
            rel, bidirectional, self.rel_buckets, self.rel_max_distance
        )
        return self.rel_bias(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, Tq, Tk)

    def project_kv(self, x):
        """Keys and values of `x`, each (B, H, T, hd). Cross-attention calls this once per prompt. A
        recording block lays them out contiguously then, once: its explicit products q k^T
        and weights v (`attention`) would otherwise copy these transposed views at every
        decoding step."""
        k, v = (self.heads(t) for t in self.kv(x).chunk(2, dim=-1))
        return (k.contiguous(), v.contiguous()) if self.records else (k, v)

    def forward(self, x, k, v, mask=None, is_causal=False, need_weights=False):
        """x: (B', Tq, D) queries; k, v: (B, H, Tk, hd) with B' = B * G.

        When B' is a multiple G of B (G = N samples per prompt), the G query rows of prompt b are
        folded into one longer query sequence against that prompt's keys: the keys and values are
        never copied N times. Returns (out (B', Tq, D), weights (B', H, Tq, Tk) or None).
        """
        if need_weights and not self.records:
            raise RuntimeError(
                "this attention block does not record its weights: only the cross-attention of the "
                "last `last_layers` decoder layers does (ModelConfig.last_layers, L' of §3.2)"
            )
        Bq, Tq, _ = x.shape
        B = k.size(0)
        G = Bq // B
        assert Bq == B * G, f"query batch {Bq} is not a multiple of key batch {B}"
        assert G == 1 or not is_causal, (
            "folding samples into one query sequence is for cross-attention only"
        )
        q = self.heads(self.q(x).reshape(B, G * Tq, -1))  # (B, H, G*Tq, hd)
        y, w = attention(
            q, k, v, mask=mask, is_causal=is_causal, need_weights=need_weights, scale=self.scale
        )
        y = y.transpose(1, 2).reshape(Bq, Tq, -1)  # (B', Tq, H*hd)
        if w is not None:
            H, Tk = w.size(1), w.size(-1)
            w = w.view(B, H, G, Tq, Tk).transpose(1, 2).reshape(Bq, H, Tq, Tk)  # (B', H, Tq, Tk)
        return self.out(y), w


class FeedForward(nn.Module):
    """cfg.ffn: "gelu" out(gelu(up x)); "relu" out(relu(up x)) (T5 v1.0); "gated-gelu"
    out(gelu_tanh(gate x) * up x) (T5 v1.1, flan-T5, mT5: GELU with the tanh approximation)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.ffn
        if cfg.ffn == "gated-gelu":
            self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):  # (..., D) -> (..., D)
        if self.kind == "gated-gelu":
            return self.out(F.gelu(self.gate(x), approximate="tanh") * self.up(x))
        return self.out(F.relu(self.up(x)) if self.kind == "relu" else F.gelu(self.up(x)))


class EncoderLayer(nn.Module):
    """Pre-norm: x + SelfAttn(LN(x)), then x + FF(LN(x))."""

    def __init__(self, cfg: ModelConfig, relative_bias: bool = False):
        super().__init__()
        self.ln1, self.ln2 = make_norm(cfg), make_norm(cfg)
        self.attn, self.ff = MultiHeadAttention(cfg, relative_bias=relative_bias), FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask):
        """mask: bool (B, 1, 1, S), or float (B, H, S, S) with the relative position bias
        folded in."""
        h = self.ln1(x)
        k, v = self.attn.project_kv(h)
        x = x + self.drop(self.attn(h, k, v, mask=mask)[0])
        return x + self.drop(self.ff(self.ln2(x)))


class DecoderLayer(nn.Module):
    """Pre-norm: causal self-attention, cross-attention to the prompt, feed-forward."""

    def __init__(self, cfg: ModelConfig, records: bool, relative_bias: bool = False):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = (make_norm(cfg) for _ in range(3))
        self.self_attn = MultiHeadAttention(cfg, relative_bias=relative_bias)
        self.cross_attn = MultiHeadAttention(cfg, records=records)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cross_kv, src_mask, need_weights=False, cache=None, pos=0, self_mask=None):
        """x: (B', T, D). cross_kv: this layer's prompt keys/values, each (B, H, S, hd).
        cache: None (teacher forcing, causal mask) or (k, v) buffers (B', H, Tmax, hd) that this
        call fills at positions pos .. pos+T-1 and then attends over 0 .. pos+T-1.
        self_mask: None, or the float mask of the self-attention (relative positions: the bias of
        queries pos .. pos+T-1 against keys 0 .. pos+T-1, causal mask folded in),
        (1, H, T, pos+T)."""
        h = self.ln1(x)
        k, v = self.self_attn.project_kv(h)
        if cache is None:
            a, _ = self.self_attn(h, k, v, mask=self_mask, is_causal=self_mask is None)
        else:
            ck, cv = cache
            assert x.size(1) == 1, "the KV cache is filled one token at a time"
            ck[:, :, pos : pos + 1], cv[:, :, pos : pos + 1] = k, v
            # The one new query sees every cached position, so no causal mask is needed.
            a, _ = self.self_attn(h, ck[:, :, : pos + 1], cv[:, :, : pos + 1], mask=self_mask)
        x = x + self.drop(a)
        a, w = self.cross_attn(self.ln2(x), *cross_kv, mask=src_mask, need_weights=need_weights)
        x = x + self.drop(a)
        return x + self.drop(self.ff(self.ln3(x))), w


class ValueHead(nn.Module):
    """V(x) of §4 and §7.2: a small feed-forward head on the shared layers. Input: one pooled state
    of the prompt (here the mean of the encoder states over the real prompt tokens; the decoder-only
    policy's last prompt state, DECISIONS.md §10). Its last layer starts at zero, so V(x) = 0 at
    first and the first advantages are the raw rewards (Huang et al., N implementation details
    of RLHF)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.hidden = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, 1)

    def forward(self, pooled):  # (B, D) -> (B,)
        return self.out(torch.tanh(self.hidden(pooled))).squeeze(-1)  # (B,)


# --------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------


class Policy(nn.Module):
    """What both policies share (EncoderDecoder here, decoder.DecoderOnly): nanoGPT's weight init,
    the gradient-checkpointing switch, and the parameter count."""

    def __init__(self):
        super().__init__()
        # Activation (gradient) checkpointing: a run-time switch (`--grad-checkpoint`), not part of
        # the architecture. When on, every layer of a pass that builds a graph keeps only its input
        # and recomputes the rest during the backward pass.
        self.gradient_checkpointing = False

    def _layer(self, layer, *args, **kwargs):
        """layer(*args, **kwargs), through torch.utils.checkpoint when checkpointing is on and
        gradients are being recorded."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False, **kwargs)
        return layer(*args, **kwargs)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """All parameters, tied embedding counted once, value head included."""
        return sum(p.numel() for p in self.parameters())


class EncoderDecoder(Policy):
    """Pre-norm encoder-decoder Transformer with tied embeddings (T5/BART-like, §7.2). The
    ModelConfig's architecture fields also make it the T5 family (`from_pretrained`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        relative = cfg.position == "relative"
        self.tok_emb = nn.Embedding(cfg.vocab_size, D)  # shared: encoder, decoder, (tied) LM head
        self.enc_pos = None if relative else nn.Embedding(cfg.max_src_len, D)
        self.dec_pos = None if relative else nn.Embedding(cfg.max_tgt_len, D)
        # Relative positions: one bias table per stack, in its first layer's self-attention.
        self.encoder = nn.ModuleList(
            EncoderLayer(cfg, relative_bias=relative and i == 0) for i in range(cfg.n_enc_layers)
        )
        first_recording = cfg.n_dec_layers - cfg.last_layers  # layers L-L'+1 .. L record (§3.2)
        self.decoder = nn.ModuleList(
            DecoderLayer(cfg, records=i >= first_recording, relative_bias=relative and i == 0)
            for i in range(cfg.n_dec_layers)
        )
        self.enc_ln, self.dec_ln = make_norm(cfg), make_norm(cfg)
        self.lm_head = None if cfg.tie_head else nn.Linear(D, cfg.vocab_size, bias=False)
        self.value_head = ValueHead(D)
        self.drop = nn.Dropout(cfg.dropout)
        self.apply(self._init_weights)
        # nanoGPT's scaled init of the projections that write into the residual stream, one per
        # residual branch: 2 per encoder layer, 3 per decoder layer.
        for stack, branches in (
            (self.encoder, 2 * cfg.n_enc_layers),
            (self.decoder, 3 * cfg.n_dec_layers),
        ):
            for name, p in stack.named_parameters():
                if name.endswith("out.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(branches))
        nn.init.zeros_(self.value_head.out.weight)
        nn.init.zeros_(self.value_head.out.bias)

    def head(self, h):
        """Logits of the final decoder states: (B', T, D) -> (B', T, V). T5 v1.0 scales h by
        d_model^-0.5 first (scale_head); the head is tok_emb^T when tied, else lm_head."""
        if self.cfg.scale_head:
            h = h * self.cfg.d_model**-0.5
        return h @ self.tok_emb.weight.t() if self.lm_head is None else self.lm_head(h)

    # ---- encoder ---------------------------------------------------------------------------

    def encode(self, src, src_mask):
        """src: (B, S) token ids, src_mask: (B, S) bool (True = real token) -> memory (B, S, D)."""
        B, S = src.shape
        if S > self.cfg.max_src_len:
            raise ValueError(f"prompt length {S} exceeds max_src_len={self.cfg.max_src_len}")
        pos = torch.arange(S, device=src.device)
        key_mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        if self.enc_pos is None:  # relative: bidirectional bias
            x = self.drop(self.tok_emb(src))  # (B, S, D)
            mask = additive_mask(
                self.encoder[0].attn.position_bias(pos, S, bidirectional=True), key_mask
            )
        else:
            x = self.drop(self.tok_emb(src) + self.enc_pos(pos))  # (B, S, D)
            mask = key_mask
        for layer in self.encoder:
            x = self._layer(layer, x, mask)
        return self.enc_ln(x)  # (B, S, D)

    def value(self, memory, src_mask):
        """V(x), one scalar per prompt: (B, S, D), (B, S) -> (B,)."""
        return self.value_head(mean_pool(memory, src_mask))  # (B,)

    def sinks(self, src, src_mask, special_ids):
        """(B, S) bool: the prompt positions whose attention counts as sink_share: its
        special tokens."""
        return special_mask(src, src_mask, special_ids)

    def cross_kv(self, memory):
        """Each decoder layer's cross-attention keys and values, computed once per prompt."""
        return [layer.cross_attn.project_kv(memory) for layer in self.decoder]

    # ---- decoder ---------------------------------------------------------------------------

    def _decode(self, y, cross_kv, src_mask, record, caches=None, pos=0):
        """Run the decoder stack on y (B', T) starting at position `pos`.
        Returns logits (B', T, V) and the recorded cross-attention of the last L' layers:
        None, Abar (B', T, S) for record="mean", or (B', L', H, T, S) for "layers"."""
        if record not in (None, "mean", "layers"):
            raise ValueError(f"record must be None, 'mean' or 'layers', got {record!r}")
        T = y.size(1)
        if pos + T > self.cfg.max_tgt_len:
            raise ValueError(
                f"response length {pos + T} exceeds max_tgt_len={self.cfg.max_tgt_len}"
            )
        positions = torch.arange(pos, pos + T, device=y.device)
        if self.dec_pos is None:  # relative: causal bias, rows pos .. pos+T-1
            x = self.drop(self.tok_emb(y))  # (B', T, D)
            bias = self.decoder[0].self_attn.position_bias(positions, pos + T, bidirectional=False)
            self_mask = additive_mask(bias, is_causal=True)  # (1, H, T, pos+T)
        else:
            x = self.drop(self.tok_emb(y) + self.dec_pos(positions))  # (B', T, D)
            self_mask = None
        key_mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        maps = []
        for i, layer in enumerate(self.decoder):
            need = record is not None and layer.cross_attn.records
            if caches is None:
                x, w = self._layer(
                    layer, x, cross_kv[i], key_mask, need_weights=need, pos=pos, self_mask=self_mask
                )
            else:  # sampling: no graph, KV cache
                x, w = layer(
                    x,
                    cross_kv[i],
                    key_mask,
                    need_weights=need,
                    cache=caches[i],
                    pos=pos,
                    self_mask=self_mask,
                )
            if w is not None:
                maps.append(w)  # (B', H, T, S)
        logits = self.head(self.dec_ln(x))  # (B', T, V)
        if record is None:
            return logits, None
        maps = torch.stack(maps, dim=1)  # (B', L', H, T, S)
        return logits, (abar(maps) if record == "mean" else maps)

    def decode(self, memory, src_mask, tgt_in, num_samples=1, record=None, tgt_mask=None):
        """Teacher-forced decoder pass.

        memory (B, S, D), src_mask (B, S) from `encode`; tgt_in (B*N, T) = [BOS] + response[:-1];
        N = num_samples responses per prompt (rows b*N .. b*N+N-1). record, the cross-attention to
        return: None, "mean" for Abar of §3.2 (B*N, T, S), or "layers" for every recording layer and
        head (B*N, L', H, T, S). tgt_mask (B*N, T), when given, zeroes the maps at padding positions
        after EOS. Returns (logits (B*N, T, V), the recorded maps or None).
        """
        if tgt_in.size(0) != memory.size(0) * num_samples:
            raise ValueError(
                f"tgt_in has {tgt_in.size(0)} rows; expected B*N = {memory.size(0)}*{num_samples} "
                f"(the N responses of prompt b are rows b*N .. b*N+N-1)"
            )
        logits, maps = self._decode(tgt_in, self.cross_kv(memory), src_mask, record)
        if maps is not None and tgt_mask is not None:
            m = tgt_mask.to(maps.dtype)
            maps = maps * (m[:, :, None] if record == "mean" else m[:, None, None, :, None])
        return logits, maps

    def forward(self, src, src_mask, tgt_in, num_samples=1, record=None, tgt_mask=None):
        """encode + decode: (logits (B*N, T, V), the recorded maps or None). See `decode`."""
        return self.decode(
            self.encode(src, src_mask), src_mask, tgt_in, num_samples, record, tgt_mask
        )

    # ---- sampling --------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        src,
        src_mask,
        decoding: Decoding = Decoding(),
        record_attention=True,
        generator=None,
        *,
        bos_id,
        eos_id,
        pad_id,
    ) -> Rollout:
        """Sample N candidate responses per prompt (§5, Figure 1) with a KV cache.

        The encoder runs once per prompt and each layer's cross-attention keys/values are computed
        once; the decoder's self-attention keys/values are cached, so each step costs one token.
        Each row stops at its own EOS; decoding stops when every row has. decoding: N, the longest
        response, the temperature, top-k / top-p, greedy (sampling.Decoding). top_k / top_p
        (nucleus) truncate the distribution that is sampled from, but the recorded
        log-probability is always log softmax(logits / temperature) of the sampled token over the
        whole vocabulary (DECISIONS.md §3), which is what a teacher-forced pass recomputes.
        greedy=True takes the argmax. bos_id (the decoder's first input: BOS, or pad for T5),
        eos_id and pad_id are the tokenizer's (data.Specials.sample_ids()); they have no default,
        since they differ between tokenizers.
        """
        check_sampling(decoding.temperature, decoding.top_k, decoding.top_p)
        max_new_tokens = min(decoding.max_new_tokens, self.cfg.max_tgt_len)
        B, S = src.shape
        BN, dev = B * decoding.num_samples, src.device
        memory = self.encode(src, src_mask)  # (B, S, D), once per prompt
        cross_kv = self.cross_kv(memory)  # per layer, (B, H, S, hd) each
        hd = self.cfg.head_dim
        caches = [
            (
                memory.new_empty(BN, self.cfg.n_heads, max_new_tokens, hd),
                memory.new_empty(BN, self.cfg.n_heads, max_new_tokens, hd),
            )
            for _ in self.decoder
        ]
        y = torch.full((BN, 1), bos_id, dtype=torch.long, device=dev)  # decoder input at step t
        steps = Steps(
            BN,
            dev,
            temperature=decoding.temperature,
            top_k=decoding.top_k,
            top_p=decoding.top_p,
            greedy=decoding.greedy,
            generator=generator,
            eos_id=eos_id,
            pad_id=pad_id,
            record=record_attention,
        )
        for t in range(max_new_tokens):
            logits, abar = self._decode(
                y, cross_kv, src_mask, "mean" if record_attention else None, caches=caches, pos=t
            )
            nxt = steps.step(logits[:, -1], abar[:, -1] if record_attention else None)  # (BN,)
            if steps.finished():
                break
            y = nxt[:, None]
        return steps.rollout()


def token_logprobs(logits, targets, temperature=1.0):
    """log softmax(logits / temperature)[target] per position: (B, T, V), (B, T) -> (B, T).

    The same quantity the sampler records (DECISIONS.md §3), so on the sampled tokens the first PPO
    epoch's ratio is exactly 1."""
    return (
        torch.log_softmax(logits.float() / temperature, dim=-1)
        .gather(-1, targets.unsqueeze(-1))
        .squeeze(-1)
    )


def count_params(cfg: ModelConfig) -> int:
    """Parameters of the model `cfg` describes, built on the meta device (no memory allocated)."""
    with torch.device("meta"):
        return EncoderDecoder(cfg).num_params()


if __name__ == "__main__":
    # `python model.py` prints the table of presets in the README.
    print("| size | d_model | heads | enc+dec layers | d_ff | vocab | parameters |")
    print("|---|---|---|---|---|---|---|")
    for name in SIZES:
        c = config_for(name)
        print(
            f"| `{name}` | {c.d_model} | {c.n_heads} | {c.n_enc_layers}+{c.n_dec_layers} | "
            f"{c.d_ff} | {c.vocab_size:,} | {count_params(c):,} |"
        )
