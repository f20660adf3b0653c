"""A model from outside training: a local Hugging Face snapshot read exactly into one of our
policies.

  T5 family    (model_type "t5", "mt5")       -> model.EncoderDecoder
                                                 (`t5_names`, `load_t5_weights`)
  Llama layout (model_type "llama", "qwen2")  -> decoder.DecoderOnly
                                                 (`decoder_names`, `load_decoder_weights`)

`config_from_hf` reads config.json alone (so `--dry-run` plans a snapshot without its weights);
`read_weights` reads safetensors or pytorch_model.bin, single or sharded; the name maps copy every
weight into our parameter of the same role, checking each shape. `decoder_hf_config` is the way
back: the config.json transformers' LlamaConfig / Qwen2Config reads for a DecoderConfig (export).
Nothing is downloaded: a snapshot is a directory the user put on disk.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from checks import checked_overrides
from data import DECODER_ONLY_TYPES, read_json
from decoder import DecoderConfig, DecoderOnly
from model import EncoderDecoder, ModelConfig

# --------------------------------------------------------------------------------------------
# Snapshots, read from a local directory (nothing is downloaded); the T5 family first.
# --------------------------------------------------------------------------------------------

T5_FFN = {
    "relu": "relu",
    "gelu": "gelu",
    "gated-gelu": "gated-gelu",
    "gated-gelu_new": "gated-gelu",
}
"""feed_forward_proj of a T5 config.json -> ModelConfig.ffn ("gated-gelu" is
transformers' tanh GELU)."""

T5_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
"""Weights some snapshots store as copies of shared.weight:
read only to check that they are copies."""

T5_UNUSED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
"""Weights old snapshots store that T5 never uses (no position bias on cross-attention)."""

T5_TYPES = ("t5", "mt5")
"""The model_types read into model.EncoderDecoder;
data.DECODER_ONLY_TYPES go to decoder.DecoderOnly."""
SUPPORTED_TEXT = (
    f"the T5 family (model_type {' or '.join(map(repr, T5_TYPES))}) and the Llama layout "
    f"(model_type {' or '.join(map(repr, DECODER_ONLY_TYPES))})"
)


def load_hf_config(path) -> dict:
    """The config.json of the snapshot directory `path`, as a dict."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{path}: no config.json; from_pretrained reads a local Hugging Face snapshot "
            "directory (config.json plus model.safetensors or pytorch_model.bin) "
            f"of {SUPPORTED_TEXT}"
        )
    return read_json(path / "config.json")


def config_from_hf(hf_config: dict, **overrides) -> ModelConfig | DecoderConfig:
    """The config of a snapshot's config.json (as a dict), by its model_type: a ModelConfig for the
    T5 family (`t5_config_from_hf`), a DecoderConfig for the Llama layout
    (`decoder_config_from_hf`), fields of that dataclass in `overrides` on top. Reads no weights, so
    `--dry-run` can plan a snapshot from its config alone. ValueError for any other model_type,
    naming the supported ones."""
    model_type = hf_config.get("model_type")
    if model_type in T5_TYPES:
        return t5_config_from_hf(hf_config, **overrides)
    if model_type in DECODER_ONLY_TYPES:
        return decoder_config_from_hf(hf_config, **overrides)
    raise ValueError(
        f"model_type {model_type!r} is not supported: from_pretrained reads {SUPPORTED_TEXT}"
    )


def t5_config_from_hf(hf_config: dict, **overrides) -> ModelConfig:
    """The ModelConfig of a T5-family config.json, ModelConfig fields in `overrides` on top.

    The decoder output is scaled by d_model^-0.5 iff `scale_decoder_outputs` says so (transformers 5
    writes it), else iff `tie_word_embeddings` is true (its default: T5 v1.0). The head is tied
    unless tie_word_embeddings is false; `from_pretrained` settles that from the weights (a stored
    lm_head.weight that differs from shared.weight is an untied head). Position limits are 512
    (relative positions need no table); last_layers is 1. T5's dropout is ignored (0)."""
    missing = [
        k
        for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers")
        if k not in hf_config
    ]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    proj = hf_config.get("feed_forward_proj", "relu")
    if proj not in T5_FFN:
        raise ValueError(
            f"feed_forward_proj {proj!r} is not supported; supported: {', '.join(T5_FFN)}"
        )
    tied = hf_config.get("tie_word_embeddings") is not False
    scale = hf_config.get("scale_decoder_outputs")
    cfg = dict(
        vocab_size=hf_config["vocab_size"],
        d_model=hf_config["d_model"],
        n_heads=hf_config["num_heads"],
        d_kv=hf_config["d_kv"],
        d_ff=hf_config["d_ff"],
        n_enc_layers=hf_config["num_layers"],
        n_dec_layers=hf_config.get("num_decoder_layers") or hf_config["num_layers"],
        max_src_len=512,
        max_tgt_len=512,
        last_layers=1,
        norm="rmsnorm",
        norm_eps=hf_config.get("layer_norm_epsilon", 1e-6),
        position="relative",
        rel_buckets=hf_config.get("relative_attention_num_buckets", 32),
        rel_max_distance=hf_config.get("relative_attention_max_distance", 128),
        scale_scores=False,
        ffn=T5_FFN[proj],
        tie_head=tied,
        scale_head=tied if scale is None else bool(scale),
    )
    return ModelConfig(**{**cfg, **checked_overrides(ModelConfig, overrides)})


def read_weights(path) -> dict:
    """Every tensor of the snapshot directory `path`, floating ones cast to float32 (bf16 and fp16
    snapshots): model.safetensors, sharded safetensors (model.safetensors.index.json), or
    pytorch_model.bin (read with weights_only=True). ValueError naming the file that is missing,
    cut short or not a weights file."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        index = read_json(path / "model.safetensors.index.json")
        if not isinstance(index.get("weight_map"), dict):
            raise ValueError(
                f"{path / 'model.safetensors.index.json'}: no weight_map; the snapshot is damaged"
            )
        files = [path / name for name in sorted(set(index["weight_map"].values()))]
    elif (path / "pytorch_model.bin").is_file():
        files = [path / "pytorch_model.bin"]
    else:
        raise ValueError(
            f"{path}: no weights file; expected model.safetensors, model.safetensors.index.json "
            f"(sharded) or pytorch_model.bin"
        )
    return {
        k: t.float() if t.is_floating_point() else t
        for f in files
        for k, t in read_weights_file(f).items()
    }


def read_weights_file(file: Path) -> dict:
    """The tensors of one .safetensors or pytorch_model.bin file."""
    if not file.is_file():
        raise ValueError(
            f"{file}: missing, though the snapshot's index names it; copy the snapshot again"
        )
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors', zip's and pickle's errors alike: the file is unusable
        reason = " ".join(str(e).split())[:200]
        raise ValueError(
            f"{file}: cannot be read as weights ({type(e).__name__}: {reason}); it was probably "
            "cut short by a download or copy that did not finish: copy the snapshot again"
        ) from None


def t5_names(cfg: ModelConfig) -> dict:
    """Our parameter name -> the T5 weight name(s) it is made of (k and v stack into our fused kv).
    Every parameter but the value head's, which starts fresh."""
    names = {
        "tok_emb.weight": ("shared.weight",),
        "enc_ln.weight": ("encoder.final_layer_norm.weight",),
        "dec_ln.weight": ("decoder.final_layer_norm.weight",),
    }
    if not cfg.tie_head:
        names["lm_head.weight"] = ("lm_head.weight",)
    ff = (
        {"up": "wi", "out": "wo"}
        if cfg.ffn != "gated-gelu"
        else {"gate": "wi_0", "up": "wi_1", "out": "wo"}
    )

    def attn(ours, theirs, owns_bias):
        n = {
            f"{ours}.q.weight": (f"{theirs}.q.weight",),
            f"{ours}.kv.weight": (f"{theirs}.k.weight", f"{theirs}.v.weight"),
            f"{ours}.out.weight": (f"{theirs}.o.weight",),
        }
        if owns_bias and cfg.position == "relative":
            n[f"{ours}.rel_bias.weight"] = (f"{theirs}.relative_attention_bias.weight",)
        return n

    for stack, n_layers, blocks in (
        ("encoder", cfg.n_enc_layers, ("SelfAttention", None, "DenseReluDense")),
        ("decoder", cfg.n_dec_layers, ("SelfAttention", "EncDecAttention", "DenseReluDense")),
    ):
        for i in range(n_layers):
            ours, theirs = f"{stack}.{i}", f"{stack}.block.{i}.layer"
            self_attn = "attn" if stack == "encoder" else "self_attn"
            names.update(attn(f"{ours}.{self_attn}", f"{theirs}.0.SelfAttention", owns_bias=i == 0))
            if stack == "decoder":
                names.update(
                    attn(f"{ours}.cross_attn", f"{theirs}.1.EncDecAttention", owns_bias=False)
                )
            ff_at = 1 if stack == "encoder" else 2
            names.update(
                {
                    f"{ours}.ff.{o}.weight": (f"{theirs}.{ff_at}.DenseReluDense.{t}.weight",)
                    for o, t in ff.items()
                }
            )
            for j in range(ff_at + 1):  # ln1, ln2 (, ln3): one per sub-layer
                names[f"{ours}.ln{j + 1}.weight"] = (f"{theirs}.{j}.layer_norm.weight",)
    return names


def load_t5_weights(model: EncoderDecoder, weights: dict) -> None:
    """Copy the T5 `weights` (name -> float32 tensor) into `model`, after checking that every weight
    the model needs is there with its shape and that no other weight is."""
    params = dict(model.named_parameters())
    names = t5_names(model.cfg)
    assert set(names) == {n for n in params if not n.startswith("value_head.")}, (
        "t5_names is out of date"
    )
    needed = [key for theirs in names.values() for key in theirs]
    absent = [key for key in needed if key not in weights]
    if absent:
        raise ValueError(
            f"missing weight(s) {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}"
        )
    known = (
        set(needed)
        | set(T5_COPIES)
        | set(T5_UNUSED)
        | ({"lm_head.weight"} if model.cfg.tie_head else set())
    )
    extra = sorted(set(weights) - known)
    if extra:
        raise ValueError(
            f"unexpected weight(s) {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}: "
            f"not part of a {model.cfg.n_enc_layers}+{model.cfg.n_dec_layers}-layer T5 with "
            f"ffn={model.cfg.ffn!r}, tie_head={model.cfg.tie_head}"
        )
    for ours, theirs in names.items():
        want = (params[ours].shape[0] // len(theirs), *params[ours].shape[1:])
        for key in theirs:
            if tuple(weights[key].shape) != want:
                raise ValueError(
                    f"weight {key} has shape {tuple(weights[key].shape)}, the config expects {want}"
                )
    for key in T5_COPIES + (("lm_head.weight",) if model.cfg.tie_head else ()):
        if key in weights and not torch.equal(weights[key], weights["shared.weight"]):
            raise ValueError(
                f"weight {key} differs from shared.weight, but this model has one table for it"
            )
    with torch.no_grad():
        for ours, theirs in names.items():
            params[ours].copy_(torch.cat([weights[key] for key in theirs]))


# --------------------------------------------------------------------------------------------
# The Llama layout (Llama, Qwen2) -> decoder.DecoderOnly, and back (decoder_hf_config).
# --------------------------------------------------------------------------------------------

HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""The transformers class of each decoder-only layout (config.json's architectures)."""

HF_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, num_key_value_heads=None),
    "qwen2": dict(max_position_embeddings=32768, num_key_value_heads=32),
}
"""transformers' LlamaConfig / Qwen2Config defaults where config.json may leave a field out and they
differ (num_key_value_heads None = num_attention_heads). rms_norm_eps (1e-6), hidden_act ("silu"),
rope_theta (10000) and tie_word_embeddings (false) default alike in both."""

ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


def decoder_config_from_hf(hf_config: dict, **overrides) -> DecoderConfig:
    """The DecoderConfig of a Llama or Qwen2 config.json,
    DecoderConfig fields in `overrides` on top.

    Read as transformers reads them: num_key_value_heads (grouped-query attention; absent: Llama's
    default, all heads; Qwen2's, 32), head_dim (absent: hidden_size / num_attention_heads),
    rms_norm_eps, tie_word_embeddings (default false; `from_pretrained` also ties a stored lm_head
    equal to the embedding), the rotary positions by `rope_from_hf`. Qwen2 always has q/k/v biases.
    Refused, with the reason: a hidden_act other than silu, Llama's attention_bias or mlp_bias (this
    model has no output or feed-forward biases), Qwen2's use_sliding_window. Position limits are 512
    (rotary positions need no table), last_layers is 1, dropout 0."""
    layout = hf_config["model_type"]
    need = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )
    missing = [k for k in need if k not in hf_config]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    check_decoder_features(hf_config, layout)
    theta, scaling = rope_from_hf(hf_config, layout)
    D, H = hf_config["hidden_size"], hf_config["num_attention_heads"]
    kv = hf_config.get("num_key_value_heads", HF_DEFAULTS[layout]["num_key_value_heads"])
    head_dim = hf_config.get("head_dim") or D // H
    cfg = dict(
        vocab_size=hf_config["vocab_size"],
        d_model=D,
        n_heads=H,
        n_kv_heads=H if kv is None else kv,
        n_layers=hf_config["num_hidden_layers"],
        d_ff=hf_config["intermediate_size"],
        d_kv=None if D % H == 0 and head_dim == D // H else head_dim,
        max_src_len=512,
        max_tgt_len=512,
        last_layers=1,
        dropout=0.0,
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=layout == "qwen2",
        tie_head=bool(hf_config.get("tie_word_embeddings", False)),
        layout=layout,
    )
    return DecoderConfig(**{**cfg, **checked_overrides(DecoderConfig, overrides)})


def check_decoder_features(hf_config: dict, layout: str) -> None:
    """ValueError for a Llama / Qwen2 config.json whose model DecoderOnly cannot compute exactly."""
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(
            f"hidden_act {act!r} is not supported: the Llama layout's feed-forward here is SwiGLU, "
            f"hidden_act 'silu'"
        )
    for key in ("attention_bias", "mlp_bias") if layout == "llama" else ():
        if hf_config.get(key):
            raise ValueError(
                f"{key} true is not supported: this model's attention output and feed-forward "
                "have no biases (Llama's default); q/k/v biases alone are Qwen2's layout "
                "(model_type 'qwen2')"
            )
    if layout == "qwen2" and hf_config.get("use_sliding_window"):
        raise ValueError(
            "use_sliding_window true is not supported: DecoderOnly lets every position attend to "
            "the whole prompt (the reward reads that attention), which equals sliding-window "
            "attention only while prompt + response fit in "
            f"sliding_window={hf_config.get('sliding_window')} tokens; "
            "if yours always do, set use_sliding_window false in config.json"
        )


def rope_from_hf(hf_config: dict, layout: str) -> tuple[float, dict | None]:
    """(rope_theta, DecoderConfig.rope_scaling) of a config.json, in either spelling:
    transformers 5's `rope_parameters` {"rope_type", "rope_theta", ...} or older snapshots'
    top-level `rope_theta` and `rope_scaling` {"rope_type" (or "type"), ...}; rope_scaling wins
    when both are there, and the dict's own rope_theta over the top-level one, as in
    transformers. Only the plain rotary positions ("default") and Llama 3.1's "llama3" scaling
    are supported; llama3's original_max_position_embeddings falls back on the top-level one,
    then max_position_embeddings."""
    params = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(
            f"rope parameters {params!r}: not a JSON object; the snapshot's config.json is damaged"
        )
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(
            f"rope parameters per layer type ({', '.join(params)}) are not supported: DecoderOnly "
            f"uses one set of rotary parameters for every layer"
        )
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"rope type {kind!r} is not supported; supported: 'default' (plain rotary positions) "
            "and 'llama3' (Llama 3.1's frequency scaling)"
        )
    partial = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if partial is not None and partial != 1.0:
        raise ValueError(
            f"partial_rotary_factor {partial} is not supported: DecoderOnly rotates every "
            "dimension of a head (1.0)"
        )
    theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    if kind == "default":
        return theta, None
    missing = [k for k in LLAMA3_KEYS if k not in params]
    if missing:
        raise ValueError(f"rope type 'llama3' lacks {', '.join(missing)}")
    original = hf_config.get(
        "original_max_position_embeddings",
        params.get(
            "original_max_position_embeddings",
            hf_config.get(
                "max_position_embeddings", HF_DEFAULTS[layout]["max_position_embeddings"]
            ),
        ),
    )
    return theta, dict(
        rope_type="llama3",
        **{k: float(params[k]) for k in LLAMA3_KEYS},
        original_max_position_embeddings=int(original),
    )


def decoder_names(cfg: DecoderConfig) -> dict:
    """Our parameter name -> its transformers name (LlamaForCausalLM, Qwen2ForCausalLM),
    for every parameter but the value head's, which starts fresh. lm_head.weight only when
    the head is untied."""
    names = {"tok_emb.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight"}
    if not cfg.tie_head:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}", f"model.layers.{i}"
        names[f"{ours}.ln1.weight"] = f"{theirs}.input_layernorm.weight"
        names[f"{ours}.ln2.weight"] = f"{theirs}.post_attention_layernorm.weight"
        for o, t in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "o_proj")):
            names[f"{ours}.attn.{o}.weight"] = f"{theirs}.self_attn.{t}.weight"
            if cfg.qkv_bias and o != "out":
                names[f"{ours}.attn.{o}.bias"] = f"{theirs}.self_attn.{t}.bias"
        for o, t in (("gate", "gate_proj"), ("up", "up_proj"), ("out", "down_proj")):
            names[f"{ours}.ff.{o}.weight"] = f"{theirs}.mlp.{t}.weight"
    return names


def load_decoder_weights(model: DecoderOnly, weights: dict) -> None:
    """Copy the Llama / Qwen2 `weights` (name -> float32 tensor) into `model`, after checking
    that every weight the model needs is there with its shape and that no other weight is (the
    rotary inv_freq buffers old snapshots store are ignored: they follow from the config)."""
    cfg, params = model.cfg, dict(model.named_parameters())
    names = decoder_names(cfg)
    assert set(names) == {n for n in params if not n.startswith("value_head.")}, (
        "decoder_names is out of date"
    )
    absent = [key for key in names.values() if key not in weights]
    if absent:
        raise ValueError(
            f"missing weight(s) {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}"
        )
    known = set(names.values()) | ({"lm_head.weight"} if cfg.tie_head else set())
    extra = sorted(k for k in set(weights) - known if not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ValueError(
            f"unexpected weight(s) {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}: not "
            f"part of a {cfg.n_layers}-layer {cfg.layout} with qkv_bias={cfg.qkv_bias}, "
            f"tie_head={cfg.tie_head}"
        )
    for ours, key in names.items():
        if tuple(weights[key].shape) != tuple(params[ours].shape):
            raise ValueError(
                f"weight {key} has shape {tuple(weights[key].shape)}, the config expects "
                f"{tuple(params[ours].shape)}"
            )
    if (
        cfg.tie_head
        and "lm_head.weight" in weights
        and not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    ):
        raise ValueError(
            "weight lm_head.weight differs from model.embed_tokens.weight, but this model has one "
            "table for both (config.json's tie_word_embeddings is true, or tie_head=True was "
            "asked); set tie_word_embeddings false in config.json to load it as a separate head"
        )
    with torch.no_grad():
        for ours, key in names.items():
            params[ours].copy_(weights[key])


def decoder_hf_config(cfg: DecoderConfig, specials) -> dict:
    """The config.json (as a dict) of `cfg` for transformers' LlamaConfig or Qwen2Config
    (cfg.layout): the inverse of `decoder_config_from_hf`, with `decoder_names` the weights' names.
    `specials` has the token ids (data.Specials: pad, start, eos); bos_token_id is `start`, or None
    where start is pad (no BOS token). Written both ways for transformers 5 and older readers: the
    rotary parameters (rope_parameters; rope_theta, with rope_scaling for llama3) and the dtype
    (dtype; torch_dtype, which transformers 5 reads with a deprecation notice).
    max_position_embeddings is max_src_len + max_tgt_len, the longest sequence a run made
    (informative: neither rotary type reads it)."""
    if cfg.qkv_bias != (cfg.layout == "qwen2"):
        raise ValueError(
            f"qkv_bias={cfg.qkv_bias} with layout {cfg.layout!r} has no transformers class: "
            "Llama has no q/k/v biases, Qwen2 always has them"
        )
    start = getattr(specials, "start", None)
    scaling = cfg.rope_scaling
    rope = (
        dict(rope_type="default")
        if scaling is None
        else dict(
            rope_type="llama3",
            **{k: scaling[k] for k in (*LLAMA3_KEYS, "original_max_position_embeddings")},
        )
    )
    hf = dict(
        model_type=cfg.layout,
        architectures=[HF_CLASS[cfg.layout]],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_head,
        max_position_embeddings=cfg.max_src_len + cfg.max_tgt_len,
        rope_parameters=dict(rope, rope_theta=cfg.rope_theta),
        rope_theta=cfg.rope_theta,
        bos_token_id=None if start is None or start == specials.pad else start,
        eos_token_id=specials.eos,
        pad_token_id=specials.pad,
        dtype="float32",
        torch_dtype="float32",
        use_cache=True,
    )
    if scaling is not None:
        hf["rope_scaling"] = rope
    hf.update(
        dict(attention_bias=False, mlp_bias=False)
        if cfg.layout == "llama"
        else dict(use_sliding_window=False)
    )
    return hf


# --------------------------------------------------------------------------------------------
# Either family.
# --------------------------------------------------------------------------------------------


def from_pretrained(path, **overrides) -> EncoderDecoder | DecoderOnly:
    """The policy of the snapshot in the local directory `path` (config.json plus model.safetensors,
    sharded safetensors or pytorch_model.bin), by its model_type: an EncoderDecoder for the T5
    family (T5 v1.0, v1.1, flan-T5, mT5), a DecoderOnly for the Llama layout (Llama 2/3, Qwen2).

    The weights load exactly (transformers' T5ForConditionalGeneration / LlamaForCausalLM /
    Qwen2ForCausalLM give the same logits and attention). T5: the head is untied iff lm_head.weight
    is stored and differs from shared.weight. Llama layout: tied iff tie_word_embeddings is true or
    the stored lm_head.weight equals the embedding. The embedding keeps all its rows (flan-T5:
    32,128, more than the tokenizer's pieces). The value head V(x) starts fresh (zero output).
    `overrides` are fields of the config class, e.g. last_layers (L' of §3.2), max_src_len; an
    override that changes the architecture makes the weights not fit (an error).
    """
    cfg = config_from_hf(load_hf_config(path), **overrides)  # model_type and fields checked first
    weights = read_weights(path)
    if isinstance(cfg, DecoderConfig):
        head, emb = weights.get("lm_head.weight"), weights.get("model.embed_tokens.weight")
        equal = (
            head is not None
            and emb is not None
            and head.shape == emb.shape
            and torch.equal(head, emb)
        )
        if "tie_head" not in overrides:
            cfg = replace(cfg, tie_head=cfg.tie_head or equal)
        model = DecoderOnly(cfg)
        load_decoder_weights(model, weights)
        return model
    head, shared = weights.get("lm_head.weight"), weights.get("shared.weight")
    tied = head is None or (
        shared is not None and head.shape == shared.shape and torch.equal(head, shared)
    )
    if "tie_head" not in overrides:
        cfg = replace(cfg, tie_head=tied)
    model = EncoderDecoder(cfg)
    load_t5_weights(model, weights)
    return model
