"""The memory plan: the bytes a training run of a config needs, counted before anything is
allocated (`python cagsr.py --dry-run`, and the refusal of a GPU preset on a CPU)."""

from __future__ import annotations

from decoder import DecoderConfig, count_policy_params
from model import ModelConfig


def memory_plan(
    cfg: ModelConfig | DecoderConfig, batch: int, src_len: int, tgt_len: int, act_bytes: int = 2
) -> dict:
    """Bytes a training run of `cfg` needs, before it allocates anything (`--dry-run`).

    Weights, gradients and the frozen reference policy in float32 (4 bytes per parameter each),
    Adam's two moments (8 bytes per parameter), and an *estimate* of the activations a
    teacher-forced forward keeps for the backward pass on `batch` pairs of (src_len, tgt_len)
    tokens, `act_bytes` per element (2 under bf16 autocast, 4 in float32): `t5_activations` for a
    ModelConfig, `decoder_activations` for a DecoderConfig. Both assume the fused attention (no
    (T, S) matrices stored) and add the logits (B T V, once in act_bytes and once in float32 for the
    loss). P counts every parameter, an untied head and the value head included."""
    activations = decoder_activations if isinstance(cfg, DecoderConfig) else t5_activations
    P, (acts, fp32) = count_policy_params(cfg), activations(cfg, batch, src_len, tgt_len)
    plan = dict(
        parameters=P,
        weights=4 * P,
        gradients=4 * P,
        optimizer=8 * P,
        reference_policy=4 * P,
        activations=acts * act_bytes + fp32 * 4,
    )
    plan["total"] = sum(v for k, v in plan.items() if k != "parameters")
    return plan


def t5_activations(cfg: ModelConfig, batch: int, src_len: int, tgt_len: int) -> tuple[int, int]:
    """(elements in the activation dtype, elements in float32) an EncoderDecoder keeps for backward.

    The count follows this model's layers. With A = n_heads * head width (the attention's inner
    width, = D unless d_kv says otherwise) and f = 2 d_ff (4 d_ff for the gated FFN: gate, up, GELU,
    product): per encoder token about 6 D + 4 A + f elements per layer, per decoder token about
    8 D + 6 A + f per layer, plus the logits B T V. Relative positions add each stack's float32
    attention mask with the bias folded in, B H S^2 + B H T^2, built once per stack."""
    D, A = cfg.d_model, cfg.n_heads * cfg.head_dim
    f = (4 if cfg.ffn == "gated-gelu" else 2) * cfg.d_ff
    enc = batch * src_len * cfg.n_enc_layers * (6 * D + 4 * A + f)
    dec = batch * tgt_len * cfg.n_dec_layers * (8 * D + 6 * A + f)
    logits = batch * tgt_len * cfg.vocab_size
    masks = batch * cfg.n_heads * (src_len**2 + tgt_len**2) if cfg.position == "relative" else 0
    return enc + dec + logits, logits + masks


def decoder_activations(
    cfg: DecoderConfig, batch: int, src_len: int, tgt_len: int
) -> tuple[int, int]:
    """(elements in the activation dtype, elements in float32) a DecoderOnly keeps for backward.

    Prompt and response run through one stack: B (S + T) tokens per layer. With A = n_heads * head
    width, K = n_kv_heads * head width (grouped-query attention: the key/value width) and d_ff the
    SwiGLU width, per token and layer about
        6 D        the residual stream in and after attention, the two RMSNorm outputs, the two
                   sub-layer outputs
      + 4 A        the rotated queries, the keys and values repeated to the H query heads (what the
                   attention reads), the attention output
      + 2 K        the block's own keys and values (kept as the prompt's prefill)
      + 4 d_ff     SwiGLU: gate, up, SiLU(gate), product (as the gated FFN of `t5_activations`)
    plus the logits B T V (the head runs on the response positions only). Masks are boolean; rotary
    positions need no table."""
    D, A, K = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    stack = batch * (src_len + tgt_len) * cfg.n_layers * (6 * D + 4 * A + 2 * K + 4 * cfg.d_ff)
    logits = batch * tgt_len * cfg.vocab_size
    return stack + logits, logits
