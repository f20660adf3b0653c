"""A model from outside training: a local Hugging Face T5-family snapshot read exactly into
`model.EncoderDecoder` (config, weights in safetensors or pytorch_model.bin, single or sharded, and
the name mapping), and the memory plan a run of a config needs before anything is allocated
(`--dry-run`). Nothing is downloaded: a snapshot is a directory the user put on disk.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import torch

from model import EncoderDecoder, ModelConfig, count_params


def memory_plan(cfg: ModelConfig, batch: int, src_len: int, tgt_len: int, act_bytes: int = 2) -> dict:
    """Bytes a training run of `cfg` needs, before it allocates anything (`--dry-run`).

    Weights, gradients and the frozen reference policy in float32 (4 bytes per parameter each),
    Adam's two moments (8 bytes per parameter), and an *estimate* of the activations a teacher-forced
    forward keeps for the backward pass on `batch` pairs of (src_len, tgt_len) tokens, `act_bytes`
    per element (2 under bf16 autocast, 4 in float32). The activation count follows this model's
    layers, assuming the fused attention (no (T, S) matrices stored). With A = n_heads * head width
    (the attention's inner width, = D unless d_kv says otherwise) and f = 2 d_ff (4 d_ff for the
    gated FFN: gate, up, GELU, product): per encoder token about 6 D + 4 A + f elements per layer,
    per decoder token about 8 D + 6 A + f per layer, plus the logits (B T V, once in act_bytes and
    once in float32 for the loss). Relative positions add each stack's float32 attention mask with
    the bias folded in, B H S^2 + B H T^2, built once per stack. An untied head is in P."""
    P = count_params(cfg)
    D, A = cfg.d_model, cfg.n_heads * cfg.head_dim
    f = (4 if cfg.ffn == "gated-gelu" else 2) * cfg.d_ff
    enc = batch * src_len * cfg.n_enc_layers * (6 * D + 4 * A + f)
    dec = batch * tgt_len * cfg.n_dec_layers * (8 * D + 6 * A + f)
    logits = batch * tgt_len * cfg.vocab_size
    masks = batch * cfg.n_heads * (src_len ** 2 + tgt_len ** 2) if cfg.position == "relative" else 0
    plan = dict(parameters=P, weights=4 * P, gradients=4 * P, optimizer=8 * P, reference_policy=4 * P,
                activations=(enc + dec + logits) * act_bytes + (logits + masks) * 4)
    plan["total"] = sum(v for k, v in plan.items() if k != "parameters")
    return plan


# --------------------------------------------------------------------------------------------
# Pretrained T5-family snapshots, read from a local directory (nothing is downloaded).
# --------------------------------------------------------------------------------------------

T5_FFN = {"relu": "relu", "gelu": "gelu", "gated-gelu": "gated-gelu", "gated-gelu_new": "gated-gelu"}
"""feed_forward_proj of a T5 config.json -> ModelConfig.ffn ("gated-gelu" is transformers' tanh GELU)."""

T5_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
"""Weights some snapshots store as copies of shared.weight: read only to check that they are copies."""

T5_UNUSED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
"""Weights old snapshots store that T5 never uses (no position bias on cross-attention)."""


def load_hf_config(path) -> dict:
    """The config.json of the snapshot directory `path`, as a dict."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json; from_pretrained reads a local Hugging Face T5 snapshot "
                         f"directory (config.json plus model.safetensors or pytorch_model.bin)")
    return read_json(path / "config.json")


def read_json(path: Path) -> dict:
    """A snapshot's JSON file as a dict; ValueError naming the file when it is not a JSON object."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the snapshot is damaged, copy it again") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: a JSON {type(obj).__name__}, not an object; the snapshot is damaged, copy it again")
    return obj


def config_from_hf(hf_config: dict, **overrides) -> ModelConfig:
    """The ModelConfig of a T5-family config.json (as a dict), ModelConfig fields in `overrides` on top.

    Reads no weights, so `--dry-run` can plan a snapshot from its config alone. The decoder output is
    scaled by d_model^-0.5 iff `scale_decoder_outputs` says so (transformers 5 writes it), else iff
    `tie_word_embeddings` is true (its default: T5 v1.0). The head is tied unless tie_word_embeddings
    is false; `from_pretrained` settles that from the weights (a stored lm_head.weight that differs
    from shared.weight is an untied head). Position limits are 512 (relative positions need no
    table); last_layers is 1. T5's dropout is ignored (0)."""
    model_type = hf_config.get("model_type")
    if model_type not in ("t5", "mt5"):
        raise ValueError(f"model_type {model_type!r} is not supported: from_pretrained reads the T5 family "
                         f"(model_type 't5' or 'mt5')")
    missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers") if k not in hf_config]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    proj = hf_config.get("feed_forward_proj", "relu")
    if proj not in T5_FFN:
        raise ValueError(f"feed_forward_proj {proj!r} is not supported; supported: {', '.join(T5_FFN)}")
    tied = hf_config.get("tie_word_embeddings") is not False
    scale = hf_config.get("scale_decoder_outputs")
    cfg = dict(vocab_size=hf_config["vocab_size"], d_model=hf_config["d_model"], n_heads=hf_config["num_heads"],
               d_kv=hf_config["d_kv"], d_ff=hf_config["d_ff"], n_enc_layers=hf_config["num_layers"],
               n_dec_layers=hf_config.get("num_decoder_layers") or hf_config["num_layers"],
               max_src_len=512, max_tgt_len=512, last_layers=1, norm="rmsnorm",
               norm_eps=hf_config.get("layer_norm_epsilon", 1e-6), position="relative",
               rel_buckets=hf_config.get("relative_attention_num_buckets", 32),
               rel_max_distance=hf_config.get("relative_attention_max_distance", 128), scale_scores=False,
               ffn=T5_FFN[proj], tie_head=tied, scale_head=tied if scale is None else bool(scale))
    unknown = sorted(set(overrides) - {f.name for f in fields(ModelConfig)})
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid fields: "
                         f"{', '.join(sorted(f.name for f in fields(ModelConfig)))}")
    return ModelConfig(**{**cfg, **overrides})


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
            raise ValueError(f"{path / 'model.safetensors.index.json'}: no weight_map; the snapshot is damaged")
        files = [path / name for name in sorted(set(index["weight_map"].values()))]
    elif (path / "pytorch_model.bin").is_file():
        files = [path / "pytorch_model.bin"]
    else:
        raise ValueError(f"{path}: no weights file; expected model.safetensors, model.safetensors.index.json "
                         f"(sharded) or pytorch_model.bin")
    return {k: t.float() if t.is_floating_point() else t for f in files for k, t in read_weights_file(f).items()}


def read_weights_file(file: Path) -> dict:
    """The tensors of one .safetensors or pytorch_model.bin file."""
    if not file.is_file():
        raise ValueError(f"{file}: missing, though the snapshot's index names it; copy the snapshot again")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:                   # safetensors', zip's and pickle's errors alike: the file is unusable
        reason = " ".join(str(e).split())[:200]
        raise ValueError(f"{file}: cannot be read as weights ({type(e).__name__}: {reason}); it was probably cut "
                         f"short by a download or copy that did not finish: copy the snapshot again") from None


def t5_names(cfg: ModelConfig) -> dict:
    """Our parameter name -> the T5 weight name(s) it is made of (k and v stack into our fused kv).
    Every parameter but the value head's, which starts fresh."""
    names = {"tok_emb.weight": ("shared.weight",), "enc_ln.weight": ("encoder.final_layer_norm.weight",),
             "dec_ln.weight": ("decoder.final_layer_norm.weight",)}
    if not cfg.tie_head:
        names["lm_head.weight"] = ("lm_head.weight",)
    ff = {"up": "wi", "out": "wo"} if cfg.ffn != "gated-gelu" else {"gate": "wi_0", "up": "wi_1", "out": "wo"}

    def attn(ours, theirs, owns_bias):
        n = {f"{ours}.q.weight": (f"{theirs}.q.weight",), f"{ours}.kv.weight": (f"{theirs}.k.weight", f"{theirs}.v.weight"),
             f"{ours}.out.weight": (f"{theirs}.o.weight",)}
        if owns_bias and cfg.position == "relative":
            n[f"{ours}.rel_bias.weight"] = (f"{theirs}.relative_attention_bias.weight",)
        return n

    for stack, n_layers, blocks in (("encoder", cfg.n_enc_layers, ("SelfAttention", None, "DenseReluDense")),
                                    ("decoder", cfg.n_dec_layers, ("SelfAttention", "EncDecAttention", "DenseReluDense"))):
        for i in range(n_layers):
            ours, theirs = f"{stack}.{i}", f"{stack}.block.{i}.layer"
            self_attn = "attn" if stack == "encoder" else "self_attn"
            names.update(attn(f"{ours}.{self_attn}", f"{theirs}.0.SelfAttention", owns_bias=i == 0))
            if stack == "decoder":
                names.update(attn(f"{ours}.cross_attn", f"{theirs}.1.EncDecAttention", owns_bias=False))
            ff_at = 1 if stack == "encoder" else 2
            names.update({f"{ours}.ff.{o}.weight": (f"{theirs}.{ff_at}.DenseReluDense.{t}.weight",) for o, t in ff.items()})
            for j in range(ff_at + 1):                                     # ln1, ln2 (, ln3): one per sub-layer
                names[f"{ours}.ln{j + 1}.weight"] = (f"{theirs}.{j}.layer_norm.weight",)
    return names


def load_t5_weights(model: EncoderDecoder, weights: dict) -> None:
    """Copy the T5 `weights` (name -> float32 tensor) into `model`, after checking that every weight
    the model needs is there with its shape and that no other weight is."""
    params = dict(model.named_parameters())
    names = t5_names(model.cfg)
    assert set(names) == {n for n in params if not n.startswith("value_head.")}, "t5_names is out of date"
    needed = [key for theirs in names.values() for key in theirs]
    absent = [key for key in needed if key not in weights]
    if absent:
        raise ValueError(f"missing weight(s) {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}")
    known = set(needed) | set(T5_COPIES) | set(T5_UNUSED) | ({"lm_head.weight"} if model.cfg.tie_head else set())
    extra = sorted(set(weights) - known)
    if extra:
        raise ValueError(f"unexpected weight(s) {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}: "
                         f"not part of a {model.cfg.n_enc_layers}+{model.cfg.n_dec_layers}-layer T5 with "
                         f"ffn={model.cfg.ffn!r}, tie_head={model.cfg.tie_head}")
    for ours, theirs in names.items():
        want = (params[ours].shape[0] // len(theirs), *params[ours].shape[1:])
        for key in theirs:
            if tuple(weights[key].shape) != want:
                raise ValueError(f"weight {key} has shape {tuple(weights[key].shape)}, the config expects {want}")
    for key in T5_COPIES + (("lm_head.weight",) if model.cfg.tie_head else ()):
        if key in weights and not torch.equal(weights[key], weights["shared.weight"]):
            raise ValueError(f"weight {key} differs from shared.weight, but this model has one table for it")
    with torch.no_grad():
        for ours, theirs in names.items():
            params[ours].copy_(torch.cat([weights[key] for key in theirs]))


def from_pretrained(path, **overrides) -> EncoderDecoder:
    """The EncoderDecoder of the T5-family snapshot (T5 v1.0, v1.1, flan-T5, mT5) in the local
    directory `path`: config.json plus model.safetensors, sharded safetensors or pytorch_model.bin.

    The weights load exactly (transformers' T5ForConditionalGeneration gives the same logits and
    cross-attention). The head is untied iff lm_head.weight is stored and differs from shared.weight;
    the embedding keeps all its rows (flan-T5: 32,128, more than the tokenizer's pieces). The value
    head V(x) starts fresh (zero output). `overrides` are ModelConfig fields, e.g. last_layers (L' of
    §3.2), max_src_len; an override that changes the architecture makes the weights not fit (an error).
    """
    cfg = config_from_hf(load_hf_config(path), **overrides)       # model_type and fields checked first
    weights = read_weights(path)
    head, shared = weights.get("lm_head.weight"), weights.get("shared.weight")
    tied = head is None or (shared is not None and head.shape == shared.shape and torch.equal(head, shared))
    if "tie_head" not in overrides:
        cfg = replace(cfg, tie_head=tied)
    model = EncoderDecoder(cfg)
    load_t5_weights(model, weights)
    return model
