"""interop/export.py: a policy written back as a Hugging Face directory, checked against
transformers (a test-only dependency) as the independent reference.

Every snapshot is a tiny random T5 that transformers builds and saves here, in three head layouts:
T5 v1.0 (ReLU, tied and scaled head), flan-T5-like (gated-GELU, untied unscaled head) and the
gated-GELU T5 that transformers 5 makes (tied, unscaled). Read with snapshot.from_pretrained and
exported untouched, the files hold the original tensors, name for name, and transformers reads the
same T5Config. Fine-tuned here, saved as a cagsr checkpoint and exported, transformers'
T5ForConditionalGeneration gives our logits and AutoTokenizer our ids. A from-scratch model, an
occupied directory and a failed write leave nothing behind. Nothing is downloaded.
"""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

transformers = pytest.importorskip("transformers")
from conftest import digest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402  (transformers brings safetensors)

import data  # noqa: E402
from cli import runs  # noqa: E402
from interop.export import export, export_checkpoint  # noqa: E402
from interop.snapshot import from_pretrained  # noqa: E402
from model import EncoderDecoder, ModelConfig, config_for  # noqa: E402
from sampling import Decoding  # noqa: E402

TEXTS = [
    "Where does Stimdol Mellu live?",
    "Stimdol Mellu lives in Varkona.",
    "Who wrote the letter to Anna?",
    "The letter was written by Orlen Dask in 1921.",
    "the cat sat on the mat and looked at the town",
] * 8
STRINGS = [
    "Where does Stimdol Mellu live?",
    "a literal </s> and <pad> and <extra_id_0> stay text",
    "  spaces,  numbers 1921 and ünïcödé  ",
]


def t5_tokenizer() -> Tokenizer:
    """A T5-style tokenizer: Unigram pieces, "▁" word starts, </s> appended
    by the post-processor, a sentinel."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(
        TEXTS,
        trainers.UnigramTrainer(
            vocab_size=120,
            special_tokens=["<pad>", "</s>", "<unk>"],
            unk_token="<unk>",
            show_progress=False,
        ),
    )
    tok.add_special_tokens(["<extra_id_0>"])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return data.tokenizer_from_str(tok.to_str())


def v10(cfg):
    """T5 v1.0: ReLU, the head tied to the embedding and scaled by d_model^-0.5."""
    return transformers.T5ForConditionalGeneration(
        transformers.T5Config(**cfg, feed_forward_proj="relu")
    )


def flan(cfg):
    """flan-T5-like: gated-GELU, an untied and unscaled head (lm_head.weight stored)."""
    hf = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**cfg, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    )
    hf.lm_head.weight = torch.nn.Parameter(torch.randn(cfg["vocab_size"], cfg["d_model"]))
    return hf


def v11_transformers5(cfg):
    """gated-GELU as transformers 5 builds it: the head tied
    (transformers 5 ties every T5) but unscaled."""
    return transformers.T5ForConditionalGeneration(
        transformers.T5Config(**cfg, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    )


LAYOUTS = dict(
    v10=(v10, True, True),
    flan=(flan, False, False),
    v11_transformers5=(v11_transformers5, True, False),
)
"""name -> (builder, tied head, scaled head) as snapshot.from_pretrained must read them."""


@pytest.fixture(scope="module")
def tok():
    return t5_tokenizer()


def t5_snapshot(path, layout, tok):
    """A random T5 of `layout` saved by transformers in `path`, with the tokenizer.json of `tok`."""
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=tok.get_vocab_size() + 28,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=3,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    LAYOUTS[layout][0](cfg).save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return path


def hf_model(path):
    return transformers.T5ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def batch(tok, texts, start):
    """Padded prompts (with their </s>) and a teacher-forced decoder input starting from `start`."""
    sp = data.specials(tok)
    src, mask = data.collate_prompts([data.encode(tok, t, sp) for t in texts], sp)
    tgt_in = torch.cat([torch.full((len(texts), 1), start), src[:, :-1].flip(1).clamp(min=2)], 1)
    return src, mask, tgt_in


def fine_tune(model, tok, steps=3):
    """A few Adam steps on the teacher-forced cross-entropy of the model's
    own prompts: every weight moves."""
    src, mask, tgt_in = batch(tok, TEXTS[:4], data.specials(tok).start)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits, _ = model(src, mask, tgt_in)
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), torch.roll(tgt_in, -1, 1).flatten()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ---- exported untouched: the snapshot's own tensors and config -----------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_an_untouched_snapshot_exports_to_its_own_tensors(layout, tok, tmp_path):
    snap = t5_snapshot(tmp_path / "snap", layout, tok)
    model = from_pretrained(snap)
    assert (model.cfg.tie_head, model.cfg.scale_head) == LAYOUTS[layout][1:]
    out = export(model, tok, data.specials(tok), tmp_path / "out")
    original, exported = load_file(snap / "model.safetensors"), load_file(out / "model.safetensors")
    assert "value_head.out.weight" not in exported and not any(
        k.startswith("value_head") for k in exported
    )
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    extra = set(exported) - set(original)
    if (
        layout == "v11_transformers5"
    ):  # tied but unscaled: the head is stored as a copy (export.t5_config)
        assert extra == {"lm_head.weight"} and torch.equal(
            exported["lm_head.weight"], original["shared.weight"]
        )
    else:
        assert extra == set()
    ignore = {"transformers_version", "dropout_rate", "_name_or_path"}
    theirs, ours = (transformers.T5Config.from_pretrained(p).to_dict() for p in (snap, out))
    assert {k: v for k, v in ours.items() if k not in ignore} == {
        k: v for k, v in theirs.items() if k not in ignore
    }
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


# ---- fine-tuned, through a checkpoint: transformers' logits and tokenizer ------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_fine_tuned_checkpoint_loads_in_transformers_with_our_logits(layout, tok, tmp_path):
    snap = t5_snapshot(tmp_path / "snap", layout, tok)
    model = fine_tune(from_pretrained(snap, last_layers=2), tok)
    sp = data.specials(tok)
    ckpt = tmp_path / "rl.pt"
    runs.save_checkpoint(
        ckpt,
        model,
        tok,
        torch.ones(model.cfg.vocab_size),
        size="pretrained",
        dataset="qa",
        stage="rl",
    )
    out = export_checkpoint(ckpt, tmp_path / "hf")

    before, after = load_file(snap / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(not torch.equal(before[k], after[k]) for k in before), (
        "fine-tuning left a weight unchanged"
    )
    ref = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(ref).__name__ == "T5ForConditionalGeneration"
    assert ref.config.scale_decoder_outputs == LAYOUTS[layout][2]
    assert (
        (
            ref.generation_config.decoder_start_token_id,
            ref.generation_config.eos_token_id,
            ref.generation_config.pad_token_id,
        )
        == (sp.start, sp.eos, sp.pad)
        == (0, 1, 0)
    )
    src, mask, tgt_in = batch(tok, STRINGS, sp.start)
    with torch.no_grad():
        ours, _ = model(src, mask, tgt_in)
        theirs = ref(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt_in).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    assert (hf_tok.pad_token_id, hf_tok.eos_token_id, hf_tok.unk_token_id) == (0, 1, 2)
    for text in STRINGS:
        ids = hf_tok(text)["input_ids"]
        assert ids == tok.encode(text).ids == data.encode(tok, text, sp) and ids[-1] == sp.eos, text
        assert hf_tok.decode(ids) == tok.decode(ids, skip_special_tokens=False)
    assert (
        from_pretrained(out, last_layers=2).cfg == model.cfg
    )  # our own loader reads the export back as it was


def test_a_t5_layout_model_with_our_tokenizer_generates_as_transformers_does(tmp_path):
    """A T5-layout EncoderDecoder built here (plain GELU, untied head) with a byte-level BPE
    tokenizer whose decoder starts from <bos>: transformers' greedy generate, starting from the
    exported generation config, picks our sampler's tokens."""
    tok = data.train_tokenizer(TEXTS, 300)
    sp = data.specials(tok)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        d_model=32,
        n_heads=2,
        n_enc_layers=2,
        n_dec_layers=1,
        d_ff=64,
        norm="rmsnorm",
        position="relative",
        scale_scores=False,
        ffn="gelu",
        tie_head=False,
    )
    model = fine_tune(EncoderDecoder(cfg), tok)
    out = export(model, tok, sp, tmp_path / "hf")
    ref = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (
        (hf_tok.pad_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id)
        == (sp.pad, sp.start, sp.eos)
        == (0, 1, 2)
    )
    for text in STRINGS + ["a literal <eos> and <bos> stay text"]:
        assert hf_tok(text)["input_ids"] == tok.encode(text).ids, text
    src, mask, tgt_in = batch(tok, STRINGS, sp.start)
    with torch.no_grad():
        torch.testing.assert_close(
            ref(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt_in).logits,
            model(src, mask, tgt_in)[0],
            atol=1e-5,
            rtol=1e-5,
        )
        generated = ref.generate(
            input_ids=src, attention_mask=mask.long(), max_new_tokens=8, do_sample=False
        )
    assert (generated[:, 0] == sp.start).all()
    rollout = model.sample(src, mask, Decoding(max_new_tokens=8, greedy=True), **sp.sample_ids())
    assert torch.equal(generated[:, 1 : rollout.tokens.size(1) + 1], rollout.tokens)


# ---- refusals: nothing is written ----------------------------------------------------------------


def test_a_from_scratch_model_is_refused_with_the_reason(tmp_path, checkpoint):
    tok = data.train_tokenizer(TEXTS, 300)
    model = EncoderDecoder(config_for("tiny", vocab_size=300))
    with pytest.raises(ValueError) as refused:
        export(model, tok, data.specials(tok), tmp_path / "out")
    message = str(refused.value)
    for reason in (
        "no transformers class has its layout",
        "learned absolute position tables",
        "position='absolute'",
        "bias-free LayerNorm",
        "norm='layernorm'",
        "plain GELU feed-forward",
        "What exports: a T5-family",
        "a decoder-only policy",
    ):
        assert reason in message, (reason, message)
    with pytest.raises(ValueError, match="learned absolute position tables"):
        export_checkpoint(checkpoint, tmp_path / "out")  # a run's checkpoint of a tiny model
    with pytest.raises(ValueError, match="no exporter for a Linear.*What exports: a T5-family"):
        export(torch.nn.Linear(2, 2), tok, data.specials(tok), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "sft.pt"
    ]  # no directory, no temporary left


@pytest.fixture(scope="module")
def t5_model(tok, tmp_path_factory):
    return from_pretrained(t5_snapshot(tmp_path_factory.mktemp("snap"), "flan", tok))


def test_a_directory_that_holds_files_is_refused_and_left_untouched(t5_model, tok, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "notes").mkdir()
    (out / "notes" / "a.txt").write_text("mine")
    before = digest(out)
    with pytest.raises(
        ValueError,
        match="already holds files; export writes a new directory and overwrites nothing",
    ):
        export(t5_model, tok, data.specials(tok), out)
    assert digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        export(t5_model, tok, data.specials(tok), tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        json.loads((export(t5_model, tok, data.specials(tok), empty) / "config.json").read_text())[
            "d_kv"
        ]
        == 8
    )


def test_a_failed_write_leaves_no_directory(t5_model, tok, tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export(t5_model, tok, data.specials(tok), tmp_path / "nested" / "out")
    assert [p.name for p in tmp_path.rglob("*")] == ["nested"]  # the parent only, nothing inside
