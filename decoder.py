"""The decoder-only policy of CAGSR: prompt and response in one causal sequence
(Llama / Qwen2 layout).

§3.1 builds the reward for "the decoder only or encoder-decoder configurations": in both, the
generated tokens attend to the prompt. A decoder-only model has no cross-attention; its analogue
(DECISIONS.md §10) is the self-attention of the position that produces each response token over
the prompt positions, averaged over the last L' layers and the heads, and renormalised over the
prompt:

    P_t[j]  = (1/(L' H)) * sum_{l, h} A_t^(l, h)[j]   j in the prompt    (raw, before renormalising)
    share_t = sum_j P_t[j]                             the attention that stays on the prompt
    Abar[t, j] = P_t[j] / share_t

The position that produces y_t is the prompt's last token for t = 0 and y_{t-1} after, the same
alignment as the encoder-decoder's decoder query at step t. So `DecoderOnly` offers ppo.py exactly
the encoder-decoder's interface, and ppo.py never asks which model it has:

    encode(src, src_mask)  -> Prefill: the prompt's keys/values per layer and its last state
    decode(prefill, src_mask, tgt_in, N, record)  -> logits (B*N, T, V), maps
    value(prefill, src_mask) -> V(x) (B,), from the prompt's last (final-normed) state
    sample(src, src_mask, N, ...) -> sampling.Rollout, with the KV cache

tgt_in is [start] + y[:-1], as for the encoder-decoder; its first column stands for the prompt's
last token, which the prefill has already run, and is not read. Prompts may be padded on either
side: positions count real tokens (position ids = cumsum(mask) - 1) and padding is never a key, so
a batch equals its prompts one by one. Shapes: B prompts, N samples each, S prompt columns,
T response length, H query heads, G key/value heads (grouped-query attention), D width,
V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import AT_LEAST_1, BOOL, POSITIVE, ConfigError, check_fields, checked_overrides, one_of
from data import DECODER_ONLY_TYPES
from model import (
    EncoderDecoder,
    ModelConfig,
    Policy,
    RMSNorm,
    ValueHead,
    attention,
    config_for,
    special_mask,
)
from presets import DECODER_SIZES, SIZES
from sampling import Decoding, Steps, check_sampling


@dataclass
class DecoderConfig:
    vocab_size: int = 3000
    """Vocabulary size. The preset's value is the BPE target; a run uses its tokenizer's size."""
    d_model: int = 128
    """Width D of the residual stream."""
    n_heads: int = 4
    """Query heads H."""
    n_kv_heads: int | None = None
    """Key/value heads G (grouped-query attention; Llama 3, Qwen2); None = n_heads."""
    n_layers: int = 4
    """Transformer blocks."""
    d_ff: int = 448
    """Hidden width of the SwiGLU feed-forward block."""
    d_kv: int | None = None
    """Width of one head; None = d_model // n_heads."""
    max_src_len: int = 128
    """Longest prompt, in tokens (a limit only: rotary positions need no table)."""
    max_tgt_len: int = 128
    """Longest response, in tokens including its EOS."""
    last_layers: int = 1
    """L' of §3.2: how many of the last blocks record their attention to the prompt."""
    dropout: float = 0.0
    """Residual dropout. RL turns it off during rollouts and updates anyway."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon (rms_norm_eps)."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies (rope_theta)."""
    rope_scaling: dict | None = None
    """None, or Llama 3.1's {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2)."""
    tie_head: bool = True
    """Logits = h @ tok_emb^T (tied); False = a separate lm_head."""
    layout: str = "llama"
    """The transformers model_type of this layout, for export: one of data.DECODER_ONLY_TYPES."""
    arch: str = "decoder"
    """Marks a decoder-only config in a checkpoint's model_config."""

    def __post_init__(self):
        check_fields(
            self,
            {
                name: AT_LEAST_1
                for name in (
                    "vocab_size",
                    "d_model",
                    "n_heads",
                    "n_layers",
                    "d_ff",
                    "max_src_len",
                    "max_tgt_len",
                )
            },
        )
        check_fields(
            self,
            dict(
                dropout=(lambda v: 0 <= v < 1, "in [0, 1)"),
                norm_eps=POSITIVE,
                rope_theta=POSITIVE,
                qkv_bias=BOOL,
                tie_head=BOOL,
                layout=one_of(*DECODER_ONLY_TYPES),
                arch=one_of("decoder"),
            ),
        )
        if self.d_kv is None and self.d_model % self.n_heads:
            raise ConfigError(
                "d_model", self.d_model, f"divisible by n_heads={self.n_heads}", related="n_heads"
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                "n_kv_heads",
                self.n_kv_heads,
                f"a divisor of n_heads={self.n_heads}",
                related="n_heads",
            )
        if self.head_dim % 2:
            raise ConfigError(
                "d_kv", self.head_dim, "even (rotary positions turn pairs of dimensions)"
            )
        if not 1 <= self.last_layers <= self.n_layers:
            raise ConfigError(
                "last_layers",
                self.last_layers,
                f"in 1..n_layers={self.n_layers} (L' of §3.2)",
                related="n_layers",
            )
        scaling = self.rope_scaling
        if scaling is not None and (
            scaling.get("rope_type", scaling.get("type")) != "llama3"
            or not all(
                k in scaling
                for k in (
                    "factor",
                    "low_freq_factor",
                    "high_freq_factor",
                    "original_max_position_embeddings",
                )
            )
        ):
            raise ConfigError(
                "rope_scaling",
                scaling,
                "None or a complete llama3 rope_scaling (rope_type 'llama3', "
                "factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)",
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads if self.d_kv is None else self.d_kv

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


ARCHS = ("encoder-decoder", "decoder")
"""The policies: model.EncoderDecoder (the paper's §7.2 model) and DecoderOnly (§3.1's
other configuration)."""


def policy_config(arch: str, size: str, **overrides):
    """The preset `size` of architecture `arch`, with `overrides` (field=value) on top."""
    if arch == "encoder-decoder":
        return config_for(size, **overrides)
    if arch != "decoder":
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHS)}")
    if size not in DECODER_SIZES:
        raise ValueError(
            f"no decoder-only preset {size!r}; decoder-only sizes: {', '.join(DECODER_SIZES)} "
            f"(the encoder-decoder has {', '.join(SIZES)})"
        )
    return replace(
        DecoderConfig(**DECODER_SIZES[size]), **checked_overrides(DecoderConfig, overrides)
    )


def config_from_dict(d: dict):
    """A checkpoint's model_config back into its dataclass: DecoderConfig when it says
    arch "decoder"."""
    return DecoderConfig(**d) if d.get("arch") == "decoder" else ModelConfig(**d)


def build_policy(cfg) -> nn.Module:
    """The policy `cfg` describes: DecoderOnly for a DecoderConfig, else EncoderDecoder."""
    return DecoderOnly(cfg) if isinstance(cfg, DecoderConfig) else EncoderDecoder(cfg)


def count_policy_params(cfg) -> int:
    """Parameters of the policy `cfg` describes, built on the meta device (no memory allocated)."""
    with torch.device("meta"):
        return build_policy(cfg).num_params()


# --------------------------------------------------------------------------------------------
# Rotary positions (Su et al. 2021) and the attention to the prompt (DECISIONS.md §10):
# pure functions.
# --------------------------------------------------------------------------------------------


def rope_frequencies(cfg: DecoderConfig) -> torch.Tensor:
    """The rotary inverse frequencies theta^(-2i/d), i < d/2 (d = head width), in float32; with a
    "llama3" rope_scaling, long wavelengths are divided by `factor` and the band between
    low_freq_factor and high_freq_factor is interpolated (Llama 3.1). -> (d/2,)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    old = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / s["low_freq_factor"], old / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s["factor"], inv)
    smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions, inv_freq):
    """cos and sin of the rotation angles position * frequency, each (B, T, d) in float32 (the d/2
    frequencies twice, the layout `rotate_half` pairs). positions: (B, T) long."""
    angles = positions[..., None].float() * inv_freq.float()  # (B, T, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, d)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+d/2}) of every head by its angle:
    (B, H, T, d) -> (B, H, T, d)."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # rotate_half
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, d)
    return x * cos + rotated * sin


def prompt_attention(maps):
    """Abar and the prompt share of §3.2's decoder-only analogue (DECISIONS.md §10): maps
    (..., L', H, T, S) are the recorded attention of each response token's producing position
    over the prompt columns, before any renormalisation. P = their mean over layers and
    heads; share = sum_j P[j]; Abar = P / share (0 where share is 0). -> Abar (..., T, S),
    share (..., T)."""
    mean = maps.mean(dim=(-4, -3))  # (..., T, S)
    share = mean.sum(-1)  # (..., T)
    safe = torch.where(share > 0, share, torch.ones_like(share))
    return mean / safe[..., None], share


def prompt_positions(src_mask):
    """Rotary position of every prompt column: the number of real tokens before it, so left or
    right padding moves no real token's position. (B, S) bool -> (B, S) long."""
    return (src_mask.long().cumsum(-1) - 1).clamp(min=0)


def prefill_mask(src_mask):
    """(B, 1, S, S) bool, True where prompt column i may attend to column j: j <= i and j real. Each
    column also sees itself, so a padding row stays finite (nothing reads it)."""
    S = src_mask.size(1)
    causal = torch.ones(S, S, dtype=torch.bool, device=src_mask.device).tril()
    own = torch.eye(S, dtype=torch.bool, device=src_mask.device)
    return (causal & (src_mask[:, None, :] | own))[:, None]  # (B, 1, S, S)


def grouped_attention(q, k, v, mask, need_weights=False):
    """Grouped-query attention without repeating the key/value heads: query head h reads key head
    h // g (g = H / G, transformers' repeat_kv order), so each key head's g query heads are folded
    into its rows and attend as one. q (B, H, T, hd); k, v (B, G, K, hd); mask (B, 1, T, K) bool,
    True where a query may attend. -> out (B, H, T, hd), weights (B, H, T, K) or None
    (model.attention: the fused SDPA, or the explicit softmax when need_weights)."""
    B, H, T, hd = q.shape
    G, K = k.size(1), k.size(2)
    g = H // G
    folded = mask[:, :, None].expand(B, 1, g, T, K).reshape(B, 1, g * T, K)
    out, w = attention(q.reshape(B, G, g * T, hd), k, v, mask=folded, need_weights=need_weights)
    return out.view(B, H, T, hd), None if w is None else w.view(B, H, T, K)


def shared_prompt_attention(q, prompt, own, prompt_bias):
    """One decoding step of N samples of each of B prompts, whose keys are the prompt's, held once
    for its N samples, and each sample's own response so far; one softmax over both.

    q (B, G, N*g, hd): each key head's queries, scaled by 1/sqrt(hd): for each of the N samples in
    turn, the g query heads that read it (transformers' repeat_kv order); prompt: (keys, values)
    (B, G, S, hd); own: (keys, values) (B, G, N, t, hd); prompt_bias (B*G, 1, S): 0 on the prompt's
    tokens, -inf on its padding. -> out (B, G, N, g, hd), and the weights on the prompt columns
    (B, G, N, g, S), each row normalised over the prompt and its own keys together (the raw
    attention of DECISIONS.md §10)."""
    B, G, Ng, hd = q.shape
    N, S = own[0].size(2), prompt[0].size(2)
    on_prompt = torch.baddbmm(
        prompt_bias, q.view(B * G, Ng, hd), prompt[0].view(B * G, S, hd).transpose(1, 2)
    )  # (B*G, N*g, S)
    on_own = q.view(B, G, N, Ng // N, hd) @ own[0].transpose(-1, -2)  # (B, G, N, g, t)
    w = torch.softmax(torch.cat([on_prompt.view(B, G, N, -1, S), on_own], -1).float(), -1)
    values = prompt[1].dtype
    out = (w[..., :S].to(values).reshape(B * G, Ng, S) @ prompt[1].view(B * G, S, hd)).view(
        B, G, N, -1, hd
    )
    return out + w[..., S:].to(values) @ own[1], w[..., :S]


# --------------------------------------------------------------------------------------------
# The blocks.
# --------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Grouped-query causal self-attention with rotary positions (Llama; Qwen2 adds q/k/v biases).
    `records=True` marks the last L' blocks: only those may be asked for their weights."""

    def __init__(self, cfg: DecoderConfig, records: bool = False):
        super().__init__()
        self.n_heads, self.kv_heads, self.d_head, self.records = (
            cfg.n_heads,
            cfg.kv_heads,
            cfg.head_dim,
            records,
        )
        self.q = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def heads(self, x, n):  # (B, T, n*hd) -> (B, n, T, hd)
        B, T, _ = x.shape
        return x.view(B, T, n, self.d_head).transpose(1, 2)

    def project(self, x, cos, sin, q_angles=None):
        """x (B, T, D) at rotary angles cos/sin (B, T, hd) -> q (B, H, T, hd), k and v
        (B, G, T, hd). q_angles: other (cos, sin) for the queries (the sampler's, pre-scaled)."""
        q_cos, q_sin = (cos, sin) if q_angles is None else q_angles
        q = apply_rope(self.heads(self.q(x), self.n_heads), q_cos, q_sin)
        k = apply_rope(self.heads(self.k(x), self.kv_heads), cos, sin)
        return q, k, self.heads(self.v(x), self.kv_heads)

    def check_records(self, need_weights):
        if need_weights and not self.records:
            raise RuntimeError(
                "this block does not record its weights: only the last `last_layers` blocks do "
                "(DecoderConfig.last_layers, L' of §3.2)"
            )

    def forward(self, x, cos, sin, mask, past=None, need_weights=False, weight_rows=None):
        """x (B, T, D) at rotary angles cos/sin (B, T, hd); mask bool (B, 1, T, K), True where a
        query may attend, over the K keys: `past` (k, v) (B, G, K-T, hd), then x's own. The
        weights, when needed: of every row, (B, H, T, K); or, given weight_rows (B,) long, of that
        one row of each sequence, (B, H, 1, K), while every row runs through the fused SDPA.
        Returns (out (B, T, D), x's own (k, v) (B, G, T, hd) each, weights or None)."""
        self.check_records(need_weights)
        q, k, v = self.project(x, cos, sin)
        keys, values = (
            (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        )
        every_row = need_weights and weight_rows is None
        y, w = grouped_attention(q, keys, values, mask, need_weights=every_row)
        if need_weights and weight_rows is not None:
            rows = torch.arange(x.size(0), device=x.device)
            w = grouped_attention(
                q[rows, :, weight_rows][:, :, None],
                keys,
                values,
                mask[rows, :, weight_rows][:, :, None],
                need_weights=True,
            )[1]  # (B, H, 1, K)
        B, T = x.shape[:2]
        return self.out(y.transpose(1, 2).reshape(B, T, -1)), (k, v), w

    def step(self, x, angles, prompt, own, t, prompt_bias, need_weights=False):
        """One sampling step of B prompts x N samples: x (B*N, 1, D); angles: the rotary (cos,
        sin) (B*N, 1, hd) of the keys, then of the queries, those scaled by 1/sqrt(hd); prompt:
        the prompt's (keys, values) (B, G, S, hd), shared by its N samples; own: this block's
        cache of the samples' keys and values (B, G, N, Tmax, hd), filled here at column t and
        read up to it; prompt_bias (B*G, 1, S), see `shared_prompt_attention`. Returns (out
        (B*N, 1, D), the weights on the prompt columns (B*N, H, S) or None)."""
        self.check_records(need_weights)
        B, N, G, hd = own[0].size(0), own[0].size(2), self.kv_heads, self.d_head
        cos, sin, cos_q, sin_q = angles
        q, k, v = self.project(x, cos, sin, (cos_q, sin_q))  # (BN, H, 1, hd), (BN, G, 1, hd)
        own[0][:, :, :, t] = k.view(B, N, G, hd).transpose(1, 2)
        own[1][:, :, :, t] = v.view(B, N, G, hd).transpose(1, 2)
        q = q.view(B, N, G, -1, hd).transpose(1, 2).reshape(B, G, -1, hd)  # (B, G, N*g, hd)
        keys, values = own[0][:, :, :, : t + 1], own[1][:, :, :, : t + 1]
        y, w = shared_prompt_attention(q, prompt, (keys, values), prompt_bias)
        y = self.out(y.transpose(1, 2).reshape(B * N, 1, -1))
        if not need_weights:
            return y, None
        return y, w.transpose(1, 2).reshape(B * N, self.n_heads, -1)  # (BN, H, S)


class SwiGLU(nn.Module):
    """The Llama/Qwen2 feed-forward: out(silu(gate x) * up x)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):  # (..., D) -> (..., D)
        return self.out(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm: x + SelfAttn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, cfg: DecoderConfig, records: bool):
        super().__init__()
        self.ln1, self.ln2 = RMSNorm(cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn, self.ff = SelfAttention(cfg, records), SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, past=None, need_weights=False, weight_rows=None):
        """See `SelfAttention.forward`; returns (x (B, T, D), own (k, v), weights or None)."""
        a, kv, w = self.attn(self.ln1(x), cos, sin, mask, past, need_weights, weight_rows)
        x = x + self.drop(a)
        return x + self.drop(self.ff(self.ln2(x))), kv, w

    def step(self, x, angles, prompt, own, t, prompt_bias, need_weights=False):
        """See `SelfAttention.step`; returns (x (B*N, 1, D), the prompt weights or None)."""
        a, w = self.attn.step(self.ln1(x), angles, prompt, own, t, prompt_bias, need_weights)
        x = x + a
        return x + self.ff(self.ln2(x)), w


@dataclass
class Prefill:
    """What `DecoderOnly.encode` computes once per prompt: the encoder-decoder's memory, here."""

    keys: list  # per block, (B, G, S, hd), rotated
    values: list  # per block, (B, G, S, hd)
    last: torch.Tensor  # (B, D): the final-normed state of the prompt's last real token
    last_maps: (
        torch.Tensor | None
    )  # (B, L', H, S): its attention in the recording blocks, when recorded
    lengths: torch.Tensor  # (B,) long: real prompt tokens

    def detach(self) -> "Prefill":
        """The same states cut from the graph (the value warm-up trains V(x) alone)."""
        cut = lambda t: None if t is None else t.detach()
        return Prefill(
            [k.detach() for k in self.keys],
            [v.detach() for v in self.values],
            self.last.detach(),
            cut(self.last_maps),
            self.lengths,
        )

    def repeat(self, n: int) -> "Prefill":
        """Each prompt's states n times, rows b*n .. b*n+n-1 (DECISIONS.md §1)."""
        rep = lambda t: None if t is None else t.repeat_interleave(n, 0)
        return Prefill(
            [rep(k) for k in self.keys],
            [rep(v) for v in self.values],
            rep(self.last),
            rep(self.last_maps),
            rep(self.lengths),
        )


# --------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------


class DecoderOnly(Policy):
    """Pre-norm decoder-only Transformer: RMSNorm, rotary positions, grouped-query attention, SwiGLU
    (the Llama layout; Qwen2 with q/k/v biases), and a value head on the prompt's last state."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        first_recording = cfg.n_layers - cfg.last_layers  # blocks L-L'+1 .. L record (§3.2)
        self.layers = nn.ModuleList(
            Block(cfg, records=i >= first_recording) for i in range(cfg.n_layers)
        )
        self.ln_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_head else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.value_head = ValueHead(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.layers.named_parameters():  # nanoGPT's scaled residual init
            if name.endswith("out.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        nn.init.zeros_(self.value_head.out.weight)
        nn.init.zeros_(self.value_head.out.bias)

    def head(self, h):
        """Logits of final-normed states: (..., D) -> (..., V)."""
        return h @ self.tok_emb.weight.t() if self.lm_head is None else self.lm_head(h)

    def _stack(self, x, positions, mask, past=None, record=False, weight_rows=None):
        """Every block on x (B, T, D) at `positions` (B, T). past: per block, see
        `SelfAttention.forward`. Returns (final-normed states (B, T, D), each block's own (k, v),
        the recording blocks' weights, each (B, H, T, K), or (B, H, 1, K) of weight_rows alone)."""
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        own, maps = [], []
        for i, block in enumerate(self.layers):
            need = record and block.attn.records
            kw = dict(
                past=None if past is None else past[i], need_weights=need, weight_rows=weight_rows
            )
            x, kv, w = self._layer(block, x, cos, sin, mask, **kw)
            own.append(kv)
            if w is not None:
                maps.append(w)
        return self.ln_f(x), own, maps

    # ---- the prompt ------------------------------------------------------------------------

    def encode(self, src, src_mask, record=False) -> Prefill:
        """Run the prompt src (B, S) once (src_mask (B, S), True on real tokens; either side may be
        padded). record: also keep the recording blocks' attention of the last real token, the
        position that produces the first response token."""
        B, S = src.shape
        if S > self.cfg.max_src_len:
            raise ValueError(f"prompt length {S} exceeds max_src_len={self.cfg.max_src_len}")
        if not bool(src_mask.any(-1).all()):
            raise ValueError(
                "every prompt needs at least one real token (a row of src_mask is all False)"
            )
        last = (
            src_mask.size(1) - 1 - src_mask.flip(-1).long().argmax(-1)
        )  # (B,) column of the last real token
        h, own, maps = self._stack(
            self.drop(self.tok_emb(src)),
            prompt_positions(src_mask),
            prefill_mask(src_mask),
            record=record,
            weight_rows=last,  # the recording blocks' weights of that row alone
        )
        rows = torch.arange(B, device=src.device)
        last_maps = torch.stack([w[:, :, 0] for w in maps], 1) if record else None  # (B, L', H, S)
        return Prefill(
            [k for k, _ in own], [v for _, v in own], h[rows, last], last_maps, src_mask.sum(-1)
        )

    def sinks(self, src, src_mask, special_ids):
        """(B, S) bool: the prompt positions whose attention counts as sink_share: its special
        tokens and its first real token, where a causal model parks the attention it does not
        need (DECISIONS.md §10)."""
        first = src_mask.long().argmax(-1)  # (B,) column of the first real token
        return special_mask(src, src_mask, special_ids) | F.one_hot(first, src.size(1)).bool()

    def value(self, prefill: Prefill, src_mask):
        """V(x), one scalar per prompt, from the prompt's last state (DECISIONS.md §10): -> (B,)."""
        return self.value_head(prefill.last)

    # ---- the response, teacher-forced ------------------------------------------------------

    def decode(self, prefill: Prefill, src_mask, tgt_in, num_samples=1, record=None, tgt_mask=None):
        """Teacher-forced pass over the responses after `prefill` (see the module docstring).

        tgt_in (B*N, T) = [start] + y[:-1]; its first column is not read (the prompt's last token,
        already in the prefill, produces y_0). record: None; "mean" for Abar renormalised over the
        prompt (B*N, T, S); "layers" for the raw attention over the prompt columns of every
        recording block and head, (B*N, L', H, T, S), before renormalising (what transformers'
        attention weights hold in the prompt's columns). tgt_mask (B*N, T) zeroes the maps
        after EOS.
        Returns (logits (B*N, T, V), maps or None)."""
        if record not in (None, "mean", "layers"):
            raise ValueError(f"record must be None, 'mean' or 'layers', got {record!r}")
        B, S = src_mask.shape
        BN, T = tgt_in.shape
        if BN != B * num_samples:
            raise ValueError(f"tgt_in has {BN} rows; expected B*N = {B}*{num_samples}")
        if T > self.cfg.max_tgt_len:
            raise ValueError(f"response length {T} exceeds max_tgt_len={self.cfg.max_tgt_len}")
        if record is not None and prefill.last_maps is None:
            raise ValueError("decode(record=...) needs a prefill from encode(..., record=True)")
        pre = prefill.repeat(num_samples)
        logits, rows = (
            [self.head(pre.last)[:, None]],
            [pre.last_maps],
        )  # y_0: the prompt's last token
        if T > 1:
            ahead = torch.ones(T - 1, T - 1, dtype=torch.bool, device=tgt_in.device).tril()
            mask = torch.cat(
                [
                    src_mask.repeat_interleave(num_samples, 0)[:, None, None, :].expand(
                        -1, 1, T - 1, S
                    ),
                    ahead.expand(BN, 1, T - 1, T - 1),
                ],
                dim=-1,
            )  # (BN, 1, T-1, S+T-1)
            positions = pre.lengths[:, None] + torch.arange(
                T - 1, device=tgt_in.device
            )  # (BN, T-1)
            h, _, maps = self._stack(
                self.drop(self.tok_emb(tgt_in[:, 1:])),
                positions,
                mask,
                past=list(zip(pre.keys, pre.values)),
                record=record is not None,
            )
            logits.append(self.head(h))
            if record is not None:
                rows.append(torch.stack([w[..., :S] for w in maps], 1))  # (BN, L', H, T-1, S)
        logits = torch.cat(logits, 1)  # (BN, T, V)
        if record is None:
            return logits, None
        maps = torch.cat([rows[0][:, :, :, None], *rows[1:]], dim=3)  # (BN, L', H, T, S)
        if tgt_mask is not None:
            maps = maps * tgt_mask.to(maps.dtype)[:, None, None, :, None]
        return logits, (prompt_attention(maps)[0] if record == "mean" else maps)

    def forward(self, src, src_mask, tgt_in, num_samples=1, record=None, tgt_mask=None):
        """encode + decode: (logits (B*N, T, V), the recorded maps or None). See `decode`."""
        prefill = self.encode(src, src_mask, record=record is not None)
        return self.decode(prefill, src_mask, tgt_in, num_samples, record, tgt_mask)

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
    ):
        """Sample N responses per prompt with a KV cache: the encoder-decoder's `sample`, argument
        for argument (bos_id is not read: the prompt's last token produces the first response
        token). The prompt runs once, and its keys and values are held once for its N samples
        (`shared_prompt_attention`); each step then costs one token per sample. Returns a
        sampling.Rollout whose prompt_share is each step's attention on the prompt before Abar
        was renormalised over it."""
        check_sampling(decoding.temperature, decoding.top_k, decoding.top_p)
        N = decoding.num_samples
        max_new_tokens = min(decoding.max_new_tokens, self.cfg.max_tgt_len)
        B, BN = src.size(0), src.size(0) * N
        pre = self.encode(src, src_mask, record=record_attention)
        prompt = [  # per block, (B, G, S, hd) each, laid out once for the steps' products
            (k.contiguous(), v.contiguous()) for k, v in zip(pre.keys, pre.values)
        ]
        own = [
            tuple(k.new_empty(B, k.size(1), N, max_new_tokens, k.size(3)) for _ in range(2))
            for k in pre.keys
        ]  # per block, the samples' keys and values (B, G, N, Tmax, hd)
        lengths = pre.lengths.repeat_interleave(N)  # (BN,)
        G = self.cfg.kv_heads
        prompt_bias = (
            torch.zeros(B, 1, 1, src.size(1), dtype=pre.keys[0].dtype, device=src.device)
            .masked_fill(~src_mask[:, None, None], float("-inf"))
            .expand(B, G, 1, -1)
            .reshape(B * G, 1, -1)
        )  # (B*G, 1, S): prompt padding is never a key
        scale = 1 / math.sqrt(self.cfg.head_dim)
        steps = Steps(
            BN,
            src.device,
            temperature=decoding.temperature,
            top_k=decoding.top_k,
            top_p=decoding.top_p,
            greedy=decoding.greedy,
            generator=generator,
            eos_id=eos_id,
            pad_id=pad_id,
            record=record_attention,
        )
        last = pre.last.repeat_interleave(N, 0)  # (BN, D)
        logits = self.head(last)  # step 0: the prompt's last token
        maps = pre.last_maps.repeat_interleave(N, 0) if record_attention else None
        for t in range(max_new_tokens):
            abar = share = None
            if record_attention:  # (BN, L', H, 1, S) -> (BN, S), (BN,)
                abar, share = (x[:, 0] for x in prompt_attention(maps[:, :, :, None]))
            nxt = steps.step(logits, abar, share)
            if steps.finished() or t == max_new_tokens - 1:
                break
            x = self.tok_emb(nxt[:, None])  # (BN, 1, D)
            cos, sin = rope_cos_sin((lengths + t)[:, None], self.inv_freq)
            angles = (cos, sin, cos * scale, sin * scale)
            blocks = []
            for block, kv, cache in zip(self.layers, prompt, own):
                need = record_attention and block.attn.records
                x, w = block.step(x, angles, kv, cache, t, prompt_bias, need)
                if need:
                    blocks.append(w)
            logits = self.head(self.ln_f(x)[:, -1])  # (BN, V)
            maps = torch.stack(blocks, 1) if record_attention else None  # (BN, L', H, S)
        return steps.rollout()


if __name__ == "__main__":
    # `python decoder.py` prints the table of decoder-only presets in the README.
    print("| size | d_model | heads (key/value) | layers | d_ff | vocab | parameters |")
    print("|---|---|---|---|---|---|---|")
    for name in DECODER_SIZES:
        c = policy_config("decoder", name)
        print(
            f"| `{name}` | {c.d_model} | {c.n_heads} ({c.kv_heads}) | {c.n_layers} | {c.d_ff} | "
            f"{c.vocab_size:,} | {count_policy_params(c):,} |"
        )
