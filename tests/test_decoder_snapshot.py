"""snapshot.from_pretrained for the Llama layout: Llama and Qwen2 snapshots load exactly into
decoder.DecoderOnly, against transformers' LlamaForCausalLM / Qwen2ForCausalLM
(test-only dependency).

Every snapshot is a tiny random model built here by transformers and written with save_pretrained
to a temp dir (nothing is downloaded): Llama with grouped-query attention and an untied head;
Llama with Llama 3.1's rope scaling, a tied head and a head width that is not hidden / heads;
Qwen2 (q/k/v biases), sharded. The reference is transformers' own from_pretrained of the same
directory (eager attention, float32), so both read the same files by their own rules.

Alignment (decoder.py's docstring): our forward(src, src_mask, tgt_in) with tgt_in = [BOS] + y[:-1]
gives at row t the logits that predict y_t; with a left-padded prompt of S columns that is
transformers' output at positions S-1 .. S+T-2 of input_ids = cat(src, y), with
attention_mask = cat(src_mask, 1) and position_ids = cumsum(attention_mask) - 1. Our maps
(record="layers") are transformers' eager attention weights of those rows over the prompt columns.
"""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402  (transformers brings safetensors)

from cli.plan import memory_plan  # noqa: E402
from data import Specials  # noqa: E402
from interop.snapshot import (  # noqa: E402
    config_from_hf,
    decoder_hf_config,
    decoder_names,
    from_pretrained,
)
from sampling import Decoding  # noqa: E402

PAD, BOS, EOS = 0, 1, 2
V, D, LAYERS = 61, 32, 2
LENGTHS = [11, 4, 8]  # a batch of prompts of unequal lengths
T = 6  # teacher-forced response length
NEW = 8  # greedy tokens

LLAMA3 = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
"""Llama 3.1's scaling with a short original context, so that it changes the frequencies that
matter at these lengths: wavelengths over 16 positions are stretched 8 times, those between 4 and
16 blended."""

SNAPSHOTS = {
    "llama_gqa": (
        "llama",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    ),
    "llama3_tied": (
        "llama",
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            tie_word_embeddings=True,
            rope_parameters=LLAMA3,
        ),
    ),
    "qwen2": (
        "qwen2",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=1000.0),
        ),
    ),
}
CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread, and a busy machine cannot stall them (several
    threads spin-wait for each other on a loaded CPU: 100 times slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomise(model, seed):
    """transformers' init (weights N(0, 0.02), norms 1, biases 0) gives nearly uniform logits, where
    greedy decoding is a coin toss between near-ties, and leaves Qwen2's biases at zero. Draw every
    weight instead, so that logits spread and a weight loaded into the wrong place shows: embedding
    N(0, 1), projections N(0, 1/fan_in), norms U(0.5, 1.5), biases N(0, 0.25)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def write_snapshot(path, layout, kw, seed):
    config_cls, model_cls = (getattr(transformers, n) for n in CLASSES[layout])
    cfg = config_cls(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        **kw,
    )
    model = model_cls(cfg)
    randomise(model, seed)
    model.save_pretrained(path, **(dict(max_shard_size="20KB") if layout == "qwen2" else {}))


def reference(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (name, snapshot dir, transformers' model, ours recording every layer), each snapshot
    written and loaded once."""
    cache = {}

    def get(name):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            layout, kw = SNAPSHOTS[name]
            write_snapshot(path, layout, kw, seed=list(SNAPSHOTS).index(name))
            cache[name] = (
                name,
                path,
                reference(path),
                from_pretrained(path, last_layers=LAYERS).eval(),
            )
        return cache[name]

    return get


@pytest.fixture(scope="module", params=list(SNAPSHOTS))
def loaded(request, built):
    """Each snapshot in turn (see `built`)."""
    return built(request.param)


def prompts(seed=0):
    """The prompts (ids 3.. V-1: no special token) left-padded and right-padded to S columns, their
    masks, and responses (B, T)."""
    g = torch.Generator().manual_seed(seed)
    S = max(LENGTHS)
    rows = [torch.randint(3, V, (n,), generator=g) for n in LENGTHS]
    left = torch.full((len(rows), S), PAD)
    right = torch.full((len(rows), S), PAD)
    for b, r in enumerate(rows):
        left[b, S - len(r) :], right[b, : len(r)] = r, r
    left_mask, right_mask = left != PAD, right != PAD
    return (
        rows,
        (left, left_mask),
        (right, right_mask),
        torch.randint(3, V, (len(rows), T), generator=g),
    )


def tgt_in(resp):
    return torch.cat([torch.full_like(resp[:, :1], BOS), resp[:, :-1]], 1)


def hf_teacher_forced(ref, src, mask, resp):
    """transformers' logits (B, T, V) and attention over the prompt (B, L, H, T, S) at the rows that
    predict resp, for a left-padded src, with positions counting real tokens."""
    S = src.size(1)
    am = torch.cat([mask, torch.ones_like(resp, dtype=torch.bool)], 1).long()
    with torch.no_grad():
        out = ref(
            input_ids=torch.cat([src, resp], 1),
            attention_mask=am,
            position_ids=(am.cumsum(-1) - 1).clamp(min=0),
            output_attentions=True,
        )
    rows = slice(S - 1, S + resp.size(1) - 1)
    return out.logits[:, rows], torch.stack([a[:, :, rows, :S] for a in out.attentions], 1)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---- exact loading ---------------------------------------------------------------------------


def test_the_config_reads_as_transformers_reads_it(loaded):
    name, path, ref, ours = loaded
    c, h = ours.cfg, ref.config
    assert (path / "model.safetensors.index.json").is_file() == (
        name == "qwen2"
    )  # Qwen2's is sharded
    assert (c.layout, c.vocab_size, c.d_model, c.n_layers, c.d_ff) == (
        h.model_type,
        V,
        D,
        LAYERS,
        48,
    )
    assert (c.n_heads, c.kv_heads, c.head_dim) == (
        h.num_attention_heads,
        h.num_key_value_heads,
        getattr(h, "head_dim", None) or D // h.num_attention_heads,
    )
    assert c.tie_head == (ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr())
    assert c.tie_head == (name == "llama3_tied") and c.qkv_bias == (name == "qwen2")
    assert c.rope_theta == h.rope_parameters["rope_theta"]
    assert (c.rope_scaling is not None) == (h.rope_parameters["rope_type"] == "llama3")
    assert torch.allclose(ours.inv_freq, ref.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    if c.qkv_bias:  # the biases are really there and not zero
        assert ours.layers[0].attn.k.bias.abs().min() > 0
    assert ours.value_head.out.weight.abs().max() == 0  # V(x) starts fresh


def test_left_padded_batch_logits_and_every_layers_attention(loaded):
    _, _, ref, ours = loaded
    _, (src, mask), _, resp = prompts()
    want_logits, want_maps = hf_teacher_forced(ref, src, mask, resp)
    with torch.no_grad():
        logits, maps = ours(src, mask, tgt_in(resp), record="layers")
    assert rel(logits, want_logits) < 1e-5
    assert maps.shape == want_maps.shape == (3, LAYERS, 4, T, max(LENGTHS))
    keys = mask[:, None, None, None, :]
    assert float(((maps - want_maps) * keys).abs().max()) < 1e-5
    assert (maps * ~keys).abs().max() == 0  # padding is never a key
    assert float(want_maps.sum(-1).min()) < 0.99  # the maps are raw: part stays on the response


def test_right_padded_prompts_give_the_same_numbers(loaded):
    _, _, ref, ours = loaded
    _, (left, left_mask), (right, right_mask), resp = prompts()
    want_logits, want_maps = hf_teacher_forced(ref, left, left_mask, resp)
    with torch.no_grad():
        logits, maps = ours(right, right_mask, tgt_in(resp), record="layers")
    assert rel(logits, want_logits) < 1e-5
    S = left.size(1)
    for b, n in enumerate(LENGTHS):  # prompt column j on the right = S - n + j on the left
        assert float((maps[b, ..., :n] - want_maps[b, ..., S - n :]).abs().max()) < 1e-5
        assert not maps[b, ..., n:].any()


def test_unpadded_single_prompts(loaded):
    """One prompt at a time, no padding: transformers' default positions (0, 1, ...)."""
    _, _, ref, ours = loaded
    rows, _, _, resp = prompts(1)
    for r, y in zip(rows, resp):
        n = len(r)
        with torch.no_grad():
            out = ref(input_ids=torch.cat([r, y])[None], output_attentions=True)
            logits, maps = ours(
                r[None], torch.ones(1, n, dtype=torch.bool), tgt_in(y[None]), record="layers"
            )
        assert rel(logits, out.logits[:, n - 1 : n + T - 1]) < 1e-5
        want = torch.stack([a[:, :, n - 1 : n + T - 1, :n] for a in out.attentions], 1)
        assert float((maps - want).abs().max()) < 1e-5


def test_greedy_tokens_through_the_kv_cache_equal_generate(loaded):
    """Our KV-cached sampler against transformers' generate: the left-padded batch, the same
    prompts right-padded (ours only; transformers' generate needs left padding), and each prompt
    alone. Both stop a row at EOS and pad it after; our sampler also stops when every row has."""
    _, _, ref, ours = loaded
    rows, (left, left_mask), (right, right_mask), _ = prompts(2)
    ids = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)
    with torch.no_grad():
        want = ref.generate(
            left,
            attention_mask=left_mask.long(),
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )[:, left.size(1) :]
    assert want.size(1) > 2 and len({tuple(w.tolist()) for w in want}) > 1  # not one degenerate row
    got = ours.sample(
        left, left_mask, Decoding(num_samples=2, max_new_tokens=NEW, greedy=True), **ids
    ).tokens
    assert torch.equal(got, want.repeat_interleave(2, 0)), (got, want)
    got = ours.sample(right, right_mask, Decoding(max_new_tokens=NEW, greedy=True), **ids).tokens
    assert torch.equal(got, want)
    for r in rows:
        with torch.no_grad():
            one = ref.generate(
                r[None], max_new_tokens=NEW, do_sample=False, eos_token_id=EOS, pad_token_id=PAD
            )[:, len(r) :]
        got = ours.sample(
            r[None],
            torch.ones(1, len(r), dtype=torch.bool),
            Decoding(max_new_tokens=NEW, greedy=True),
            **ids,
        ).tokens
        assert torch.equal(got, one), (got, one)


def test_llama3_rope_scaling_matters(built):
    """Without the llama3 scaling the logits are not transformers' (so the match above reads it)."""
    _, path, ref, _ = built("llama3_tied")
    _, (src, mask), _, resp = prompts()
    want, _ = hf_teacher_forced(ref, src, mask, resp)
    plain = from_pretrained(path, rope_scaling=None).eval()
    with torch.no_grad():
        logits, _ = plain(src, mask, tgt_in(resp))
    assert rel(logits, want) > 1e-2


def test_the_older_rope_spelling_reads_the_same(loaded, tmp_path):
    """rope_theta and rope_scaling {"type": ...} at the top level (snapshots written before
    transformers 5): the same config, and the same logits as transformers reading that file."""
    name, path, _, ours = loaded
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    hf = json.loads((path / "config.json").read_text())
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    hf["rope_scaling"] = rope if rope["type"] == "llama3" else None
    (tmp_path / "config.json").write_text(json.dumps(hf))
    old = from_pretrained(tmp_path, last_layers=LAYERS).eval()
    assert old.cfg == ours.cfg
    _, (src, mask), _, resp = prompts()
    want, _ = hf_teacher_forced(reference(tmp_path), src, mask, resp)
    with torch.no_grad():
        assert rel(old(src, mask, tgt_in(resp))[0], want) < 1e-5


# ---- back to transformers: decoder_hf_config and decoder_names --------------------------------


def test_decoder_hf_config_and_names_round_trip_through_transformers(loaded, tmp_path):
    """Our model written as config.json (decoder_hf_config) and safetensors named by decoder_names
    loads in transformers as the snapshot it came from: the same class and token ids, a config that
    reads back to ours, and the original snapshot's logits."""
    name, _, ref, ours = loaded
    sp = Specials(pad=PAD, start=BOS, eos=EOS, special=(PAD, BOS, EOS))
    hf = decoder_hf_config(ours.cfg, sp)
    back = transformers.AutoConfig.for_model(**hf)
    assert type(back).__name__ == CLASSES[ours.cfg.layout][0]
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (BOS, EOS, PAD)
    assert config_from_hf(back.to_dict(), last_layers=LAYERS) == ours.cfg
    assert config_from_hf(json.loads(json.dumps(hf)), last_layers=LAYERS) == ours.cfg
    params = dict(ours.named_parameters())
    save_file(
        {
            theirs: params[mine].detach().contiguous()
            for mine, theirs in decoder_names(ours.cfg).items()
        },
        tmp_path / "model.safetensors",
    )
    (tmp_path / "config.json").write_text(json.dumps(hf))
    exported = reference(tmp_path)
    assert type(exported).__name__ == CLASSES[ours.cfg.layout][1] == hf["architectures"][0]
    _, (src, mask), _, resp = prompts()
    want, _ = hf_teacher_forced(ref, src, mask, resp)
    assert rel(hf_teacher_forced(exported, src, mask, resp)[0], want) < 1e-5


def test_decoder_names_are_transformers_names():
    """Every transformers parameter of a Qwen2 (biases) and of an untied Llama is named once, and
    nothing else (transformers' own state dicts, not a list written here)."""
    for layout, kw in (("qwen2", {}), ("llama", dict(tie_word_embeddings=False))):
        config_cls, model_cls = (getattr(transformers, n) for n in CLASSES[layout])
        hf_cfg = config_cls(
            vocab_size=V,
            hidden_size=D,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            **kw,
        )
        with torch.device("meta"):
            theirs = {k for k in model_cls(hf_cfg).state_dict() if not k.endswith("inv_freq")}
        names = decoder_names(config_from_hf(hf_cfg.to_dict()))
        assert sorted(names.values()) == sorted(theirs)


# ---- the plan from config.json alone -----------------------------------------------------------


def test_memory_plan_of_a_decoder_config_by_hand():
    """D 8, A = 2 heads x 4 = 8, K = 1 kv head x 4 = 4, d_ff 16: per token and layer 6*8 + 4*8 + 2*4
    + 4*16 = 152 elements; 3 x (5 + 4) tokens x 2 layers = 8208; logits 3*4*100 = 1200, in bf16 and
    again in float32. P is transformers' LlamaForCausalLM count plus our value head
    (D^2 + 2D + 1)."""
    hf = dict(
        model_type="llama",
        vocab_size=100,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    cfg = config_from_hf(hf)
    with torch.device("meta"):
        n = sum(
            p.numel()
            for p in transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf)).parameters()
        )
    plan = memory_plan(cfg, batch=3, src_len=5, tgt_len=4, act_bytes=2)
    assert plan["parameters"] == n + 8 * 8 + 2 * 8 + 1
    assert plan["activations"] == (8208 + 1200) * 2 + 1200 * 4
    assert plan["total"] == 20 * plan["parameters"] + plan["activations"]


# ---- refused -----------------------------------------------------------------------------------

LLAMA = dict(
    model_type="llama",
    vocab_size=V,
    hidden_size=D,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(model_type="gpt2"),
            r"model_type 'gpt2' is not supported: .*'t5'.*'mt5'.*'llama'.*'qwen2'",
        ),
        (
            dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4)),
            r"rope type 'yarn' is not supported",
        ),
        (
            dict(rope_theta=1e4, rope_scaling=dict(type="linear", factor=2.0)),
            r"rope type 'linear' is not supported",
        ),
        (
            dict(rope_parameters=dict(rope_type="llama3", factor=8.0)),
            r"'llama3' lacks low_freq_factor, high_freq_factor",
        ),
        (
            dict(rope_parameters=dict(full_attention=dict(rope_type="default"))),
            r"rope parameters per layer type",
        ),
        (
            dict(model_type="qwen2", use_sliding_window=True, sliding_window=64),
            r"use_sliding_window true is not supported: .*sliding_window=64",
        ),
        (dict(attention_bias=True), r"attention_bias true is not supported"),
        (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
        (dict(partial_rotary_factor=0.5), r"partial_rotary_factor 0.5 is not supported"),
    ],
)
def test_refused_configs(change, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf({**LLAMA, **change})


def test_unknown_override_lists_the_fields():
    with pytest.raises(
        ValueError,
        match=r"unknown DecoderConfig field\(s\) \['n_enc_layers'\]; valid fields: .*"
        r"n_kv_heads",
    ):
        config_from_hf(LLAMA, n_enc_layers=2)


def test_config_defaults_are_transformers_defaults():
    """Fields config.json leaves out read as transformers' classes fill them in."""
    for model_type, cls in (
        ("llama", transformers.LlamaConfig),
        ("qwen2", transformers.Qwen2Config),
    ):
        hf = dict(LLAMA, model_type=model_type, num_attention_heads=32, hidden_size=64)
        full = cls(**{k: v for k, v in hf.items() if k != "model_type"})
        ours = config_from_hf(hf)
        assert (ours.kv_heads, ours.tie_head, ours.norm_eps, ours.rope_theta) == (
            full.num_key_value_heads,
            full.tie_word_embeddings,
            full.rms_norm_eps,
            full.rope_parameters["rope_theta"],
        )


@pytest.fixture
def copy_of(built, tmp_path):
    """A writable copy of the untied Llama snapshot."""
    _, path, _, _ = built("llama_gqa")
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    return tmp_path


def rewrite(path, change):
    state = load_file(path / "model.safetensors")
    change(state)
    save_file(state, path / "model.safetensors")


def test_missing_weight_is_named(copy_of):
    rewrite(copy_of, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        ValueError, match=r"missing weight\(s\) model\.layers\.1\.mlp\.up_proj\.weight"
    ):
        from_pretrained(copy_of)


def test_unexpected_weight_is_named_and_rotary_buffers_are_ignored(copy_of):
    rewrite(
        copy_of, lambda s: s.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})
    )
    from_pretrained(copy_of)  # old snapshots store it: ignored
    rewrite(copy_of, lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}))
    with pytest.raises(
        ValueError,
        match=r"unexpected weight\(s\) model\.layers\.0\.self_attn\.q_proj\.bias: not part "
        r"of a 2-layer llama with qkv_bias=False",
    ):
        from_pretrained(copy_of)


def test_misshapen_weight_is_named(copy_of):
    rewrite(
        copy_of, lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 32)})
    )
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(32, 32\), "
        r"the config expects \(16, 32\)",
    ):
        from_pretrained(copy_of)


def test_the_head_ties_by_the_weights(copy_of):
    """A stored lm_head equal to the embedding is a tied head; one that differs while config.json
    says tie_word_embeddings true is refused (transformers would silently drop it)."""
    rewrite(copy_of, lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"].clone()}))
    assert from_pretrained(copy_of).cfg.tie_head
    rewrite(copy_of, lambda s: s.update({"lm_head.weight": torch.randn(V, D)}))
    hf = json.loads((copy_of / "config.json").read_text())
    (copy_of / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        from_pretrained(copy_of)
