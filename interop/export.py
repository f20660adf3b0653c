"""The round trip back to transformers: a policy fine-tuned here, written as a Hugging Face
directory that `AutoModelForSeq2SeqLM.from_pretrained(DIR)` (T5) or
`AutoModelForCausalLM.from_pretrained(DIR)` (Llama, Qwen2) and
`AutoTokenizer.from_pretrained(DIR)` load with no network (DECISIONS.md §11).

    export(model, tok, sp, out_dir)     a model in memory, its tokenizer and its special ids
                                        (data.Specials)
    export_checkpoint(path, out_dir)    a checkpoint written by cagsr.py (a run's sft.pt or rl.pt)

An EncoderDecoder with T5's layout (what `snapshot.from_pretrained` builds: RMSNorm, relative
position buckets, unscaled scores, a ReLU, GELU or gated-GELU feed-forward) becomes a
T5ForConditionalGeneration: config.json (the inverse of `snapshot.config_from_hf`),
model.safetensors (the inverse of `snapshot.t5_names`), generation_config.json, tokenizer.json and
tokenizer_config.json. The value head V(x) is not part of any transformers model and is left out. A
from-scratch EncoderDecoder (learned absolute positions, bias-free LayerNorm, scaled scores) fits
no transformers class and is refused, saying why. A DecoderOnly (decoder.py: a Llama or Qwen2
snapshot, or a decoder-only preset, which is the Llama layout) becomes a LlamaForCausalLM or
Qwen2ForCausalLM (`decoder_files`).

The directory is written whole or not at all: every file goes into a temporary sibling
directory, which is renamed to `out_dir` once complete. An `out_dir` that already holds files
is refused and left untouched.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

import torch

import data
from decoder import DecoderOnly
from interop.snapshot import HF_CLASS, decoder_hf_config, decoder_names, t5_names
from model import EncoderDecoder, ModelConfig

T5_LAYOUT = dict(norm="rmsnorm", position="relative", scale_scores=False)
"""The ModelConfig fields a T5ForConditionalGeneration fixes (snapshot.config_from_hf sets them)."""

T5_PROJ = {"relu": "relu", "gelu": "gelu", "gated-gelu": "gated-gelu"}
"""ModelConfig.ffn -> T5's feed_forward_proj (the inverse of snapshot.T5_FFN;
transformers reads "gelu" as the exact GELU, "gated-gelu" as the gated tanh GELU, as
model.FeedForward computes them)."""

NOT_T5 = dict(
    position=(
        "learned absolute position tables (position='absolute'; T5 has relative position buckets)"
    ),
    norm="bias-free LayerNorm (norm='layernorm'; T5 has RMSNorm)",
    scale_scores="attention scores scaled by 1/sqrt(head width) (scale_scores=True; T5's are not)",
)
"""What a from-scratch EncoderDecoder has instead of each T5_LAYOUT field: why no
transformers class holds it."""

FFN_TEXT = {
    "gelu": "a plain GELU feed-forward",
    "relu": "a ReLU feed-forward",
    "gated-gelu": "a gated-GELU feed-forward",
}


# --------------------------------------------------------------------------------------------
# The tokenizer: the same for every model kind
# --------------------------------------------------------------------------------------------


def tokenizer_files(
    tok, sp: data.Specials, vocab_size: int, model_max_length: int | None = None
) -> dict:
    """tokenizer.json (the tokenizer as cagsr stores it, data.tokenizer_to_str) and a
    tokenizer_config.json that makes AutoTokenizer load it as a PreTrainedTokenizerFast naming
    the special tokens of `sp` (DECISIONS.md §8: the ids belong to the tokenizer).
    split_special_tokens: a literal "</s>" or "<eos>" in a text is text, as it is here
    (data.tokenizer_from_str), so both encode every string to the same ids. The chat template the
    tokenizer carries (data.ChatTemplate) goes in as chat_template, with split_special_tokens off:
    a templated prompt's markers are specials (DECISIONS.md §12), so apply_chat_template gives our
    prompt ids. A tokenizer with more
    ids than the model's `vocab_size` embedding rows is not the model's: ValueError."""
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.get_vocab_size()} ids but the model's embedding only "
            f"{vocab_size} rows: pass the tokenizer the model was trained with"
        )
    if max(sp.pad, sp.start, sp.eos) >= tok.get_vocab_size():
        raise ValueError(
            f"the special ids {sp} are not all ids of the tokenizer ({tok.get_vocab_size()} ids): "
            f"pass data.specials(tok) of this tokenizer"
        )
    config = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        pad_token=tok.id_to_token(sp.pad),
        eos_token=tok.id_to_token(sp.eos),
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )
    if sp.start != sp.pad:  # ours: <bos>; T5 starts the decoder from pad
        config["bos_token"] = tok.id_to_token(sp.start)
    if tok.token_to_id(data.UNK) is not None:
        config["unk_token"] = data.UNK
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    chat = getattr(tok, "cagsr_chat", None)
    if chat is not None:  # the template its prompts went through; apply_chat_template reads it
        config["chat_template"] = chat.source
        # a rendered prompt's markers are specials here (data.encode): so they must be there
        config["split_special_tokens"] = False
    return {"tokenizer.json": data.tokenizer_to_str(tok), "tokenizer_config.json": as_json(config)}


def as_json(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


# --------------------------------------------------------------------------------------------
# T5: an EncoderDecoder with T5's layout
# --------------------------------------------------------------------------------------------


def check_t5_layout(cfg: ModelConfig) -> None:
    """ValueError, saying why, unless `cfg` has T5's layout (T5_LAYOUT, a T5_PROJ feed-forward)."""
    reasons = [NOT_T5[field] for field, value in T5_LAYOUT.items() if getattr(cfg, field) != value]
    if cfg.ffn not in T5_PROJ:
        reasons.append(
            f"{FFN_TEXT.get(cfg.ffn, repr(cfg.ffn))} (ffn={cfg.ffn!r}; "
            "T5 has relu, gelu or gated-gelu)"
        )
    elif reasons:
        reasons.append(f"with {FFN_TEXT[cfg.ffn]} (ffn={cfg.ffn!r})")
    if reasons:
        raise ValueError(
            "this EncoderDecoder cannot be exported to transformers: no transformers class has its "
            f"layout ({'; '.join(reasons)}), so there is no model to load its weights into. "
            f"{what_exports()} "
            "A from-scratch model stays a cagsr checkpoint (runs.load_checkpoint)."
        )


def t5_weights(model: EncoderDecoder) -> dict:
    """The weights of `model` under T5's names, as T5ForConditionalGeneration's save_pretrained
    writes them: the inverse of snapshot.t5_names (our fused kv splits back into k and v). The
    embedding is stored once, as shared.weight (transformers ties encoder.embed_tokens and
    decoder.embed_tokens to it); lm_head.weight is stored when the head is untied, or tied but
    unscaled (see `t5_config`). Tensors share no storage (safetensors refuses that): k and v
    are copies. The value head is left out."""
    cfg, params = model.cfg, {n: p.detach() for n, p in model.named_parameters()}
    names = t5_names(cfg)
    ours = {n for n in params if not n.startswith("value_head.")}
    if set(names) != ours:
        raise ValueError(
            f"the model's parameters are not a {cfg.n_enc_layers}+{cfg.n_dec_layers}-layer T5's "
            f"(unknown: {sorted(ours - set(names))[:5]}, "
            f"missing: {sorted(set(names) - ours)[:5]}): "
            f"export takes an EncoderDecoder built by model.py from its ModelConfig"
        )
    weights = {}
    for name, theirs in names.items():
        tensor = params[name].cpu()
        parts = tensor.chunk(len(theirs)) if len(theirs) > 1 else (tensor,)
        for key, part in zip(theirs, parts):
            weights[key] = part.clone() if len(theirs) > 1 else part
    if cfg.tie_head and not cfg.scale_head:
        weights["lm_head.weight"] = weights["shared.weight"].clone()
    return weights


def t5_config(cfg: ModelConfig, sp: data.Specials, dtype: torch.dtype) -> dict:
    """config.json of a T5ForConditionalGeneration: the inverse of snapshot.config_from_hf.

    Head and scaling: scale_decoder_outputs says whether the decoder output is scaled by
    d_model^-0.5 (transformers 5 reads it); tie_word_embeddings is written as transformers 4 reads
    it, one flag for both (true: tied and scaled, T5 v1.0; false: untied and unscaled, T5 v1.1 and
    flan-T5). A tied but unscaled head (a T5 v1.1 made by transformers 5, which ties every T5) is
    written untied with lm_head.weight a copy of shared.weight, so both versions read it right;
    transformers 5 and snapshot.from_pretrained see the equal tables and tie them again. Only an
    untied scaled head, which no published T5 has, needs transformers 5. dropout_rate is the
    model's dropout (0 here, where snapshot.config_from_hf ignores T5's 0.1)."""
    return dict(
        architectures=["T5ForConditionalGeneration"],
        model_type="t5",
        is_encoder_decoder=True,
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.head_dim,
        d_ff=cfg.d_ff,
        num_heads=cfg.n_heads,
        num_layers=cfg.n_enc_layers,
        num_decoder_layers=cfg.n_dec_layers,
        feed_forward_proj=T5_PROJ[cfg.ffn],
        relative_attention_num_buckets=cfg.rel_buckets,
        relative_attention_max_distance=cfg.rel_max_distance,
        layer_norm_epsilon=cfg.norm_eps,
        dropout_rate=cfg.dropout,
        tie_word_embeddings=cfg.scale_head,
        scale_decoder_outputs=cfg.scale_head,
        pad_token_id=sp.pad,
        eos_token_id=sp.eos,
        decoder_start_token_id=sp.start,
        use_cache=True,
        dtype=str(dtype).removeprefix("torch."),
    )


def t5_files(model: EncoderDecoder, tok, sp: data.Specials) -> dict:
    """Every file of the T5 directory, built in memory (nothing is written yet): file name ->
    text, or a dict of tensors for a .safetensors file. ValueError when the model is not T5's
    layout or `sp` not its tokenizer's."""
    cfg = model.cfg
    check_t5_layout(cfg)
    tokenizer = tokenizer_files(tok, sp, cfg.vocab_size, cfg.max_src_len)
    weights = t5_weights(model)
    generation = dict(decoder_start_token_id=sp.start, eos_token_id=sp.eos, pad_token_id=sp.pad)
    return {
        "config.json": as_json(t5_config(cfg, sp, weights["shared.weight"].dtype)),
        "generation_config.json": as_json(generation),
        "model.safetensors": weights,
        **tokenizer,
    }


# --------------------------------------------------------------------------------------------
# Llama / Qwen2: a DecoderOnly (a snapshot's, or a decoder-only preset's: the Llama layout)
# --------------------------------------------------------------------------------------------


def decoder_files(model: DecoderOnly, tok, sp: data.Specials) -> dict:
    """Every file of the LlamaForCausalLM / Qwen2ForCausalLM directory of `model` (cfg.layout),
    built in memory: config.json (snapshot.decoder_hf_config, the inverse of its
    config_from_hf), the weights under their transformers names (snapshot.decoder_names;
    lm_head.weight only when untied), a generation config with the special ids, and the
    tokenizer files. The value head is left out (DECISIONS.md §11)."""
    cfg = model.cfg
    tokenizer = tokenizer_files(tok, sp, cfg.vocab_size, cfg.max_src_len + cfg.max_tgt_len)
    params = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()}
    weights = {theirs: params[ours].clone() for ours, theirs in decoder_names(cfg).items()}
    config = decoder_hf_config(cfg, sp)
    generation = dict(bos_token_id=config["bos_token_id"], eos_token_id=sp.eos, pad_token_id=sp.pad)
    return {
        "config.json": as_json(config),
        "generation_config.json": as_json(generation),
        "model.safetensors": weights,
        **tokenizer,
    }


# --------------------------------------------------------------------------------------------
# The model kinds that export: one writer per model class
# --------------------------------------------------------------------------------------------

EXPORTERS: dict[type, tuple[Callable, str]] = {
    EncoderDecoder: (
        t5_files,
        "a T5-family encoder-decoder (a snapshot loaded with --init DIR, "
        "snapshot.from_pretrained, and fine-tuned here) as a T5ForConditionalGeneration",
    ),
    DecoderOnly: (
        decoder_files,
        f"a decoder-only policy (a Llama or Qwen2 snapshot, or --arch decoder) as a "
        f"{' or '.join(HF_CLASS.values())}",
    ),
}
"""Model class -> (writer: (model, tok, sp) -> the directory's files, what it exports).
`export` picks the writer of the model's class; what each one says it exports is the
list a refusal prints."""


def what_exports() -> str:
    """The sentence a refusal ends with: every kind of model that exports."""
    return f"What exports: {'; '.join(text for _, text in EXPORTERS.values())}."


# --------------------------------------------------------------------------------------------
# Writing the directory
# --------------------------------------------------------------------------------------------


def check_out_dir(out: Path) -> None:
    """ValueError unless `out` is absent or an empty directory:
    nothing there is ever overwritten."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; export writes a directory: give a new directory path")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(
            f"{out} already holds files; export writes a new directory and overwrites nothing: "
            f"give an empty or new directory, or move those files away"
        )


def write_files(files: dict, out: Path) -> None:
    """Write `files` (name -> text, or a dict of tensors for a .safetensors file) into a
    temporary sibling of `out`, then rename it to `out`: a failure at any point leaves no
    half-written directory."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.export-tmp"
    tmp.mkdir()  # exclusive: never another export's directory
    try:
        for name, content in files.items():
            if isinstance(content, str):
                (tmp / name).write_text(content, encoding="utf-8")
            else:
                save_file(content, tmp / name, metadata={"format": "pt"})
        check_out_dir(out)  # still free: nothing appeared while writing
        os.replace(tmp, out)  # onto an absent or empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export(model, tok, sp: data.Specials, out_dir) -> Path:
    """Write `model` with its tokenizer `tok` and special ids `sp` (data.specials(tok)) as a Hugging
    Face directory `out_dir` (created; refused if it holds files) that transformers loads with no
    network: AutoModelForSeq2SeqLM.from_pretrained(out_dir) and
    AutoTokenizer.from_pretrained(out_dir).

    Which files depends on the model's class (EXPORTERS); for an EncoderDecoder of T5's layout see
    `t5_files`. The value head V(x) is not exported: no transformers model has one. A model that no
    transformers class can hold (a from-scratch EncoderDecoder) is a ValueError saying why and what
    exports. Returns the directory's path."""
    out = Path(out_dir)
    check_out_dir(out)
    writer = next((w for cls, (w, _) in EXPORTERS.items() if isinstance(model, cls)), None)
    if writer is None:
        raise ValueError(
            f"no exporter for a {type(model).__name__}: export takes a policy built by cagsr. "
            f"{what_exports()}"
        )
    write_files(writer(model, tok, sp), out)
    return out


def export_checkpoint(path, out_dir) -> Path:
    """export() the policy of a checkpoint file written by cagsr.py (a run's sft.pt or rl.pt),
    with the tokenizer and special ids stored in it (runs.load_checkpoint). Returns the
    directory's path."""
    from cli import runs  # the run plumbing (tqdm, numpy) only when needed

    model, tok, _ = runs.load_checkpoint(path, "cpu", "--init")
    return export(model, tok, data.specials(tok), out_dir)
