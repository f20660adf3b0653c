"""A model from outside training: a llama.cpp GGUF file (architecture "llama" or "qwen2") read
exactly into decoder.DecoderOnly, with its tokenizer, special ids and chat template.

  metadata  {arch}.block_count, .embedding_length, ...  -> DecoderConfig (`gguf_config`, through
                                                           snapshot.decoder_config_from_hf)
  tensors   token_embd, blk.N.attn_q, ..., output       -> our parameters (`gguf_names`,
                                                           `gguf_weight`, `load_gguf_weights`)
  tokenizer tokenizer.ggml.tokens, .merges, .token_type -> tokenizers.Tokenizer (`gguf_tokenizer`)
            tokenizer.ggml.bos/eos/padding_token_id     -> data.Specials (`gguf_specials`)
            tokenizer.chat_template                     -> str (`gguf_chat_template`)

Every tensor is dequantized to float32 by the `gguf` package (llama.cpp's own Python reader), so a
quantized file loads as the float model its blocks stand for: the same weights transformers'
`from_pretrained(dir, gguf_file=...)` computes with. llama.cpp's converter interleaves the rows of
each head of Llama's Q and K weights (its rotary kernel turns adjacent pairs; transformers turns
halves); `unpermute_rows` undoes that for "llama", which is the only one of the two it applies to.
Nothing is downloaded; the `gguf` package is needed only here (pip install gguf).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data import Specials, config_specials
from decoder import DecoderConfig, DecoderOnly
from interop.snapshot import decoder_config_from_hf, decoder_names

GGUF_ARCHS = ("llama", "qwen2")
"""general.architecture values read here; both are DecoderOnly's Llama layout."""

PERMUTED_ARCHS = ("llama",)
"""Architectures whose Q and K rows llama.cpp's converter permuted (its LlamaModel.permute; its
Qwen2Model does not): transformers' GGUF loader undoes it for these alone (LlamaTensorProcessor)."""

MAGIC = b"GGUF"

BYTE_LEVEL_SPLITS = {
    "llama3": "llama3",
    "llama-v3": "llama3",
    "llama-bpe": "llama3",
    "falcon3": "llama3",
    "smaug-bpe": "llama3",
    "dbrx": "llama3",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
    "megrez": "qwen2",
    "gpt-4o": "gpt-4o",
    "llama4": "gpt-4o",
}
"""tokenizer.ggml.pre -> which split regex transformers' GGUF converter puts before ByteLevel; any
other value (e.g. SmolLM2's "smollm") keeps GPT-2's ByteLevel regex, as transformers does."""

SPLIT_REGEX = {
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "gpt-4o": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}

CONTROL, USER_DEFINED = 3, 4
"""tokenizer.ggml.token_type values: a special token, and an added token that is not special."""


# --------------------------------------------------------------------------------------------
# The file and its metadata
# --------------------------------------------------------------------------------------------


def is_gguf(path) -> bool:
    """`path` is a file that starts with the GGUF magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def read_gguf(path):
    """The `gguf.GGUFReader` of the file `path` (memory-mapped: tensors are read when used).
    ValueError naming the file when it is not a GGUF file or is cut short."""
    try:
        import gguf
    except ImportError:
        raise ValueError(f"{path}: reading a GGUF file needs the gguf package: pip install gguf")
    if not is_gguf(path):
        raise ValueError(
            f"{path}: not a GGUF file (it does not start with the bytes 'GGUF'); "
            "give a .gguf file written by llama.cpp's converter"
        )
    try:
        reader = gguf.GGUFReader(path, "r")
        for t in reader.tensors:  # the last tensor's bytes lie past the end of a cut-short file
            if t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor {t.name} has {t.data.nbytes} of its {t.n_bytes} bytes")
    except Exception as e:  # numpy's, struct's and gguf's errors alike: the file is unusable
        reason = " ".join(str(e).split())[:200]
        raise ValueError(
            f"{path}: cannot be read as GGUF ({type(e).__name__}: {reason}); it was probably cut "
            "short by a download or copy that did not finish: copy the file again"
        ) from None
    return reader


def gguf_metadata(reader) -> dict:
    """Every metadata field of `reader` as a Python value (str, int, float, bool or a list)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def gguf_hf_config(meta: dict, where) -> dict:
    """The config.json (as a dict) a Llama or Qwen2 GGUF's metadata `meta` stands for, read as
    transformers reads it: {arch}.block_count, .embedding_length, .feed_forward_length,
    .attention.head_count(_kv), .attention.layer_norm_rms_epsilon, .rope.freq_base, .vocab_size
    (absent: the number of tokens). A head's width is .attention.key_length, else
    .rope.dimension_count, else embedding_length / head_count. ValueError naming `where` for any
    other architecture, a missing field, or rotary positions DecoderOnly cannot compute."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(
            f"{where}: architecture {arch!r} is not supported; GGUF files of "
            f"{' or '.join(map(repr, GGUF_ARCHS))} (the Llama layout) are read here"
        )
    need = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
    missing = [f"{arch}.{k}" for k in need if f"{arch}.{k}" not in meta]
    if missing:
        raise ValueError(f"{where}: metadata lacks {', '.join(missing)}; the file is damaged")
    check_gguf_features(meta, arch, where)
    D, H = meta[f"{arch}.embedding_length"], meta[f"{arch}.attention.head_count"]
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(
        f"{arch}.rope.dimension_count", D // H
    )
    vocab = meta.get(f"{arch}.vocab_size", len(meta.get("tokenizer.ggml.tokens", ())))
    return dict(
        model_type=arch,
        vocab_size=vocab,
        hidden_size=D,
        intermediate_size=meta[f"{arch}.feed_forward_length"],
        num_hidden_layers=meta[f"{arch}.block_count"],
        num_attention_heads=H,
        num_key_value_heads=meta.get(f"{arch}.attention.head_count_kv", H),
        head_dim=head_dim,
        rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
    )


def check_gguf_features(meta: dict, arch: str, where) -> None:
    """ValueError for metadata whose model DecoderOnly cannot compute exactly: per-layer head
    counts, rotary scaling, a partial rotary width, keys and values of unequal width."""
    for key in ("attention.head_count", "attention.head_count_kv"):
        if isinstance(meta.get(f"{arch}.{key}"), list):
            raise ValueError(
                f"{where}: {arch}.{key} differs per layer; DecoderOnly has one head count"
            )
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(
            f"{where}: rope scaling {scaling!r} is not supported; DecoderOnly reads plain "
            "rotary positions from a GGUF file"
        )
    key, value = (
        meta.get(f"{arch}.attention.key_length"),
        meta.get(f"{arch}.attention.value_length"),
    )
    rotary = meta.get(f"{arch}.rope.dimension_count")
    if key is not None and value not in (None, key):
        raise ValueError(f"{where}: key width {key} and value width {value} differ")
    if key is not None and rotary not in (None, key):
        raise ValueError(
            f"{where}: rotary width {rotary} is not the head width {key}; DecoderOnly rotates "
            "every dimension of a head"
        )


def gguf_config(reader, where, **overrides) -> DecoderConfig:
    """The DecoderConfig of an open GGUF file (`read_gguf`), DecoderConfig fields in `overrides`
    on top. The head is tied iff the file has no output.weight (llama.cpp leaves it out of a tied
    model); `from_gguf` also ties an output.weight equal to the embedding."""
    hf = gguf_hf_config(gguf_metadata(reader), where)
    hf["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    return decoder_config_from_hf(hf, **overrides)


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def supported_types() -> dict:
    """ggml type name -> GGMLQuantizationType, for every type gguf.quants.dequantize unpacks."""
    from gguf import GGMLQuantizationType, quants

    types = [GGMLQuantizationType.F32, GGMLQuantizationType.F16]
    types += list(getattr(quants, "_type_traits", {}))
    return {t.name: t for t in types}


def check_tensor_types(reader, where) -> None:
    """ValueError, before any tensor is read, for a tensor type the gguf package cannot
    dequantize, listing the ones it can."""
    ok = supported_types()
    bad = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type.name not in ok})
    if bad:
        raise ValueError(
            f"{where}: tensor type(s) {', '.join(bad)} cannot be dequantized by the installed gguf "
            f"package (supported: {', '.join(ok)}); upgrade gguf (pip install -U gguf) or "
            "convert the file to one of these types"
        )


GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
"""transformers' module name -> llama.cpp's tensor name (blk.N stands for model.layers.N)."""


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of the tensor transformers calls `hf_name`
    (model.layers.0.mlp.up_proj.weight -> blk.0.ffn_up.weight)."""
    module, kind = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, i, rest = module.split(".", 3)
        return f"blk.{i}.{GGUF_NAMES[rest]}.{kind}"
    return f"{GGUF_NAMES[module]}.{kind}"


def gguf_names(cfg: DecoderConfig) -> dict:
    """Our parameter name -> its GGUF tensor name, for every parameter but the value head's (which
    starts fresh): snapshot.decoder_names, in llama.cpp's names (output.weight only when the head is
    untied, q/k/v biases only with qkv_bias)."""
    return {ours: gguf_name(hf) for ours, hf in decoder_names(cfg).items()}


def tensor_shape(tensor) -> tuple:
    """The torch shape of a GGUF tensor (ggml lists dimensions innermost first)."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def check_tensors(reader, model: DecoderOnly, where) -> None:
    """ValueError, before any tensor is dequantized, unless the file holds exactly the tensors
    `model` needs, each with its parameter's shape (a tied head ignores an output.weight)."""
    cfg, params = model.cfg, dict(model.named_parameters())
    names, stored = gguf_names(cfg), {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in stored:
        raise ValueError(
            f"{where}: rope_freqs.weight (Llama 3.1's rotary scaling) is not supported; "
            "DecoderOnly reads plain rotary positions from a GGUF file"
        )
    absent = [n for n in names.values() if n not in stored]
    known = set(names.values()) | ({"output.weight"} if cfg.tie_head else set())
    extra = sorted(set(stored) - known)
    for what, keys in (("missing", absent), ("unexpected", extra)):
        if keys:
            raise ValueError(
                f"{where}: {what} tensor(s) {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                f" for a {cfg.n_layers}-layer {cfg.layout} with qkv_bias={cfg.qkv_bias}, "
                f"tie_head={cfg.tie_head}"
            )
    for ours, key in names.items():
        if tensor_shape(stored[key]) != tuple(params[ours].shape):
            raise ValueError(
                f"{where}: tensor {key} has shape {tensor_shape(stored[key])}, the metadata "
                f"expects {tuple(params[ours].shape)}"
            )


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's permutation of a Llama Q or K weight (heads * head_dim, D): within each
    head its converter stored row 2i as i and row 2i+1 as head_dim/2 + i (pairs for its rotary
    kernel); this puts every row back where transformers' rotate-half layout wants it."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_weight(tensor, cfg: DecoderConfig) -> torch.Tensor:
    """One GGUF tensor dequantized to float32 in its torch shape (out, in) or (n,), with a Llama's
    Q and K rows put back in transformers' order (`unpermute_rows`)."""
    from gguf import quants

    data = np.array(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    w = torch.from_numpy(data).reshape(tensor_shape(tensor))
    if cfg.layout in PERMUTED_ARCHS and tensor.name.endswith((".attn_q.weight", ".attn_k.weight")):
        return unpermute_rows(w, cfg.n_heads if ".attn_q." in tensor.name else cfg.kv_heads)
    return w


def load_gguf_weights(model: DecoderOnly, reader) -> None:
    """Copy the tensors of the open GGUF file `reader` into `model` by `gguf_names`, one tensor
    dequantized at a time (`check_tensors` first)."""
    params, stored = dict(model.named_parameters()), {t.name: t for t in reader.tensors}
    with torch.no_grad():
        for ours, key in gguf_names(model.cfg).items():
            params[ours].copy_(gguf_weight(stored[key], model.cfg))


def from_gguf(path, **overrides) -> DecoderOnly:
    """The policy of the llama.cpp GGUF file `path` (architecture "llama" or "qwen2"), every tensor
    dequantized to float32: transformers' `from_pretrained(dir, gguf_file=...)` gives the same
    logits and attention. The head is tied iff the file has no output.weight, as in transformers.
    The value head V(x) starts fresh. `overrides` are DecoderConfig fields, e.g. last_layers; one
    that changes the architecture makes the tensors not fit (an error). The architecture, tensor
    types, names and shapes are all checked before any tensor is dequantized."""
    reader = read_gguf(path)
    cfg = gguf_config(reader, path, **overrides)
    check_tensor_types(reader, path)
    model = DecoderOnly(cfg)
    check_tensors(reader, model, path)
    load_gguf_weights(model, reader)
    return model


# --------------------------------------------------------------------------------------------
# Tokenizer, special ids, chat template
# --------------------------------------------------------------------------------------------


def byte_alphabet() -> dict:
    """GPT-2's byte -> printable character map, in which byte-level BPE spells its tokens."""
    from tokenizers import pre_tokenizers

    chars = pre_tokenizers.ByteLevel.alphabet()
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # bytes spelled as themselves
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b], n = chr(256 + n), n + 1
    assert set(table.values()) == set(chars)
    return table


def gguf_vocab(tokens: list) -> dict:
    """token -> id, every token in the byte alphabet: one stored as plain text (a few converters
    write added tokens so) is respelled byte by byte, as transformers does."""
    table = byte_alphabet()
    alphabet = set(table.values())
    return {
        (t if set(t) <= alphabet else "".join(table[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }


def byte_level_bpe(meta: dict, where):
    """The byte-level BPE (tokenizer.ggml.model "gpt2") of a GGUF's metadata, built as
    transformers' GGUF converter builds it: GPT-2's BPE model and ByteLevel decoder, and a
    pre-tokenizer chosen by tokenizer.ggml.pre (`BYTE_LEVEL_SPLITS`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if "tokenizer.ggml.merges" not in meta:
        raise ValueError(f"{where}: a byte-level vocabulary without tokenizer.ggml.merges")
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(
        models.BPE(
            vocab=gguf_vocab(meta["tokenizer.ggml.tokens"]),
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = BYTE_LEVEL_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    tok.pre_tokenizer = (
        pre_tokenizers.ByteLevel(add_prefix_space=False)
        if split is None
        else pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT_REGEX[split]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def add_gguf_tokens(tok, meta: dict) -> None:
    """Make the tokens the file marks CONTROL special added tokens and those it marks USER_DEFINED
    plain added tokens (both matched whole in a text), then its BOS, EOS, UNK and pad tokens special
    ones, as transformers does. A CONTROL token spelled outside the byte alphabet is a llama.cpp
    mislabel and stays an ordinary token."""
    from tokenizers import AddedToken

    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    alphabet = set(byte_alphabet().values())
    vocab = tok.get_vocab()

    def added(t, special):
        return AddedToken(t, normalized=False, special=special)

    control = [added(t, True) for t, k in zip(tokens, types) if k == CONTROL and set(t) <= alphabet]
    if control:
        tok.add_special_tokens(control)
    user = [added(t, False) for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    named = [special_id(meta, k) for k in ("bos", "eos", "unknown", "padding")]
    tok.add_special_tokens([added(tokens[i], True) for i in named if i is not None])


def special_id(meta: dict, name: str) -> int | None:
    """tokenizer.ggml.{name}_token_id, when the file gives one inside its vocabulary."""
    i = meta.get(f"tokenizer.ggml.{name}_token_id")
    return i if isinstance(i, int) and 0 <= i < len(meta["tokenizer.ggml.tokens"]) else None


def set_post_processor(tok, meta: dict) -> None:
    """BOS before and EOS after every encoding as tokenizer.ggml.add_bos_token / add_eos_token ask
    (both absent: neither), in transformers' TemplateProcessing form."""
    from tokenizers import processors

    tokens = meta["tokenizer.ggml.tokens"]
    ends = []
    for flag, name in (("add_bos_token", "bos"), ("add_eos_token", "eos")):
        i = special_id(meta, name)
        ends.append(
            (tokens[i], i) if meta.get(f"tokenizer.ggml.{flag}") and i is not None else None
        )
    (bos, eos) = ends
    single = f"{bos[0] + ':0 ' if bos else ''}$A:0{' ' + eos[0] + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos[0] + ':1' if bos else ''} $B:1{' ' + eos[0] + ':1' if eos else ''}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[e for e in ends if e]
    )


def gguf_specials(tok, meta: dict, where) -> Specials:
    """The special ids of a GGUF file (DECISIONS.md §10, as `data.config_specials` reads a
    snapshot's config.json): EOS is tokenizer.ggml.eos_token_id; pad is
    tokenizer.ggml.padding_token_id, else EOS; start is the BOS (tokenizer.ggml.bos_token_id) when
    the tokenizer puts it in front of a prompt, else pad. Every token the tokenizer marks special
    joins them."""
    ids = {
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
    }
    try:
        return config_specials(tok, ids, where)
    except ValueError as e:
        raise ValueError(str(e).replace("tokenizer.json", "vocabulary")) from None


def gguf_tokenizer(path, reader=None):
    """The tokenizer of the GGUF file `path` as a `tokenizers.Tokenizer`, equal to the one
    transformers' `AutoTokenizer.from_pretrained(dir, gguf_file=...)` derives (vocabulary, merges,
    pre-tokenizer, added and special tokens, BOS/EOS post-processor), with its special ids
    (`gguf_specials`) attached as `cagsr_specials`, as `data.snapshot_tokenizer` does. Only
    byte-level BPE vocabularies (tokenizer.ggml.model "gpt2": Llama 3, Qwen2, SmolLM2) are read.
    Like every tokenizer here it encodes the text of a special token as text
    (encode_special_tokens)."""
    meta = gguf_metadata(reader if reader is not None else read_gguf(path))
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2" or "tokenizer.ggml.tokens" not in meta:
        raise ValueError(
            f"{path}: tokenizer.ggml.model {kind!r} is not supported; byte-level BPE "
            "vocabularies ('gpt2': Llama 3, Qwen2, SmolLM2) are read from a GGUF file. "
            "For a SentencePiece one, use the model's Hugging Face snapshot directory instead"
        )
    tok = byte_level_bpe(meta, path)
    add_gguf_tokens(tok, meta)
    set_post_processor(tok, meta)
    tok.encode_special_tokens = True  # a literal "<|im_end|>" in user text is text, not EOS
    tok.cagsr_specials = gguf_specials(tok, meta, path)
    return tok


def gguf_chat_template(path, reader=None) -> str | None:
    """The file's tokenizer.chat_template (a Jinja template), or None when it has none."""
    meta = gguf_metadata(reader if reader is not None else read_gguf(path))
    return meta.get("tokenizer.chat_template")
