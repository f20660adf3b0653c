"""snapshot.from_pretrained: T5-family snapshots load exactly, against
transformers' T5 (test-only dependency).

Every snapshot is a tiny random T5 built here and written to a temp dir: nothing is downloaded.
The reference is transformers' own T5ForConditionalGeneration.from_pretrained of the same directory
(eager attention, float32), so both read the same files by their own rules.

Tiny random T5s saved in five conventions (v1.0 with ReLU and a tied, scaled head; flan-style
gated-GELU with an untied head and heads x d_kv != d_model; transformers 5's config flags; unequal
encoder and decoder depths, sharded; weights in bf16) load through `snapshot.from_pretrained` with
logits within 1e-4 relative and every decoder layer's and head's cross-attention within 1e-4 of
`transformers`' eager outputs on a padded batch, and 12 greedy tokens through our KV cache equal an
uncached `transformers` loop; the relative-position buckets equal the reference's; a wrong model
type, a missing, extra or misshapen weight are refused by name.
"""

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402  (transformers brings safetensors)

from cli.plan import memory_plan  # noqa: E402
from interop.snapshot import T5_UNUSED, config_from_hf, from_pretrained  # noqa: E402
from model import count_params, relative_position_bucket  # noqa: E402
from sampling import Decoding  # noqa: E402

PAD, EOS = 0, 1  # T5: PAD is also the decoder's start token
V = 64
EMB_GAIN, BRANCH_GAIN, BIAS_GAIN = 0.1, 8.0, 4.0


def hf_t5(seed=0, **kw):
    """A random transformers T5 with small bucket settings, so that prompts of ~20 tokens reach the
    logarithmic buckets and the last one. T5's init keeps every layer norm at 1: draw them too, so
    a norm weight loaded into the wrong place shows. With T5's init the embedding dominates the
    residual stream and a tied head mostly echoes the input token (greedy decoding repeats the start
    token): the embedding is scaled down and the residual branches' output projections up, and the
    position biases up, so that positions matter."""
    torch.manual_seed(seed)
    args = dict(
        vocab_size=V,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        decoder_start_token_id=PAD,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    model = transformers.T5ForConditionalGeneration._from_config(
        transformers.T5Config(**{**args, **kw}), attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith((".o.weight", ".wo.weight")):
                p.mul_(BRANCH_GAIN)
            elif name == "shared.weight":
                p.mul_(EMB_GAIN)
            elif name.endswith("relative_attention_bias.weight"):
                p.mul_(BIAS_GAIN)
    return model


def edit_config(path, drop=(), **set_):
    cfg = json.loads((path / "config.json").read_text())
    for key in drop:
        cfg.pop(key, None)
    cfg.update(set_)
    (path / "config.json").write_text(json.dumps(cfg))


def snapshot_v10(path):
    """T5 v1.0 as old snapshots store it: relu FFN, only shared.weight (tied, scaled head), no
    scale_decoder_outputs nor tie_word_embeddings in config.json, pytorch_model.bin, and the unused
    cross-attention bias table of the original checkpoints."""
    hf = hf_t5(1, feed_forward_proj="relu")
    hf.save_pretrained(path)
    (path / "model.safetensors").unlink()
    state = {
        k: v.clone()
        for k, v in hf.state_dict().items()
        if k != "lm_head.weight" and "embed_tokens" not in k
    }
    state[T5_UNUSED[0]] = torch.randn(8, 4)
    torch.save(state, path / "pytorch_model.bin")
    edit_config(path, drop=("scale_decoder_outputs", "tie_word_embeddings"))
    return dict(scaled=True, tied=True, n_dec=2)


def snapshot_flan_hub(path):
    """flan-T5 as the hub stores it: gated-gelu, num_heads * d_kv (48) != d_model (32), untied head,
    tie_word_embeddings false, no scale flag, lm_head.weight and copies of the embedding under
    encoder/decoder.embed_tokens.weight."""
    hf = hf_t5(2, feed_forward_proj="gated-gelu", num_heads=3, d_kv=16, tie_word_embeddings=False)
    hf.save_pretrained(path)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["lm_head.weight"] = torch.randn(V, 32)
    assert {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} <= set(state)
    save_file(state, path / "model.safetensors")
    edit_config(path, drop=("scale_decoder_outputs",), tie_word_embeddings=False)
    return dict(scaled=False, tied=False, n_dec=2)


def snapshot_flan_transformers5(path):
    """flan-style as transformers 5's save_pretrained writes it: tie_word_embeddings true,
    scale_decoder_outputs false, lm_head.weight stored (it differs from shared.weight)."""
    hf = hf_t5(3, feed_forward_proj="gated-gelu", num_heads=3, d_kv=16, tie_word_embeddings=False)
    hf.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32))
    hf.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["scale_decoder_outputs"] is False
    assert "lm_head.weight" in load_file(path / "model.safetensors")
    return dict(scaled=False, tied=False, n_dec=2)


def snapshot_unequal_depths(path):
    """2 encoder and 3 decoder layers, sharded safetensors (model.safetensors.index.json)."""
    hf = hf_t5(4, feed_forward_proj="relu", num_layers=2, num_decoder_layers=3)
    hf.save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file() and not (
        path / "model.safetensors"
    ).exists()
    return dict(scaled=True, tied=True, n_dec=3)


def snapshot_bf16(path):
    """Weights stored in bfloat16 (read as float32; the reference also runs in float32 from the
    same bf16-rounded weights)."""
    hf = hf_t5(5, feed_forward_proj="gated-gelu", num_heads=3, d_kv=16, tie_word_embeddings=False)
    hf.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32))
    hf.to(torch.bfloat16).save_pretrained(path)
    assert all(t.dtype == torch.bfloat16 for t in load_file(path / "model.safetensors").values())
    return dict(scaled=False, tied=False, n_dec=2)


SNAPSHOTS = dict(
    v10=snapshot_v10,
    flan_hub=snapshot_flan_hub,
    flan_transformers5=snapshot_flan_transformers5,
    unequal_depths=snapshot_unequal_depths,
    bf16=snapshot_bf16,
)


def reference(path):
    return transformers.T5ForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    ).eval()


def padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([21, 9, 14])  # past max_distance 16: the last bucket is used
    mask = torch.arange(21)[None, :] < lengths[:, None]  # (3, 21)
    src = torch.randint(2, V, (3, 21), generator=g).masked_fill(~mask, PAD)
    src[torch.arange(3), lengths - 1] = EOS
    tgt_in = torch.randint(2, V, (3, 18), generator=g)
    tgt_in[:, 0] = PAD  # decoder start token
    return src, mask, tgt_in


def hf_greedy(ref, src, mask, steps):
    """Greedy decoding by repeated uncached forward passes of the transformers model."""
    dec = torch.full((src.size(0), 1), PAD, dtype=torch.long)
    with torch.no_grad():
        for _ in range(steps):
            logits = ref(
                input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec, use_cache=False
            ).logits
            dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return dec[:, 1:]


def as_rollout(tokens):
    """What our sampler returns for these greedy tokens: PAD after each row's first EOS, and no
    steps after every row has finished."""
    is_eos = (tokens == EOS).long()
    after = (is_eos.cumsum(1) - is_eos) > 0
    lengths = torch.where(
        is_eos.any(1), is_eos.argmax(1) + 1, torch.full_like(is_eos[:, 0], tokens.size(1))
    )
    return tokens.masked_fill(after, PAD)[:, : int(lengths.max())]


@pytest.mark.parametrize("name", list(SNAPSHOTS))
def test_snapshot_loads_exactly(name, tmp_path):
    meta = SNAPSHOTS[name](tmp_path)
    ref = reference(tmp_path)
    ours = from_pretrained(tmp_path, last_layers=meta["n_dec"]).eval()
    cfg = ours.cfg
    # The file's conventions read the same way by both.
    assert cfg.scale_head == ref.config.scale_decoder_outputs == meta["scaled"]
    assert cfg.tie_head == meta["tied"] == torch.equal(ref.lm_head.weight, ref.shared.weight)
    assert (cfg.n_enc_layers, cfg.n_dec_layers) == (
        ref.config.num_layers,
        ref.config.num_decoder_layers,
    )
    assert ours.value(torch.randn(2, 3, 32), torch.ones(2, 3, dtype=torch.bool)).tolist() == [
        0.0,
        0.0,
    ]

    src, mask, tgt_in = padded_batch()
    with torch.no_grad():
        out = ref(
            input_ids=src,
            attention_mask=mask.long(),
            decoder_input_ids=tgt_in,
            output_attentions=True,
        )
        logits, maps = ours(src, mask, tgt_in, record="layers")
    rel = (logits - out.logits).abs().max() / out.logits.abs().max()
    assert rel < 1e-4, f"logits: max relative difference {rel:.2e}"
    ref_maps = torch.stack(out.cross_attentions, dim=1)  # (B, L, H, T, S)
    assert maps.shape == ref_maps.shape == (3, meta["n_dec"], cfg.n_heads, 18, 21)
    keys = mask[:, None, None, None, :]  # padded prompt keys: 0 in both
    diff = ((maps - ref_maps) * keys).abs().max()
    assert diff < 1e-4, f"cross-attention: max difference {diff:.2e}"
    assert (maps * ~keys).abs().max() == 0

    steps = 12
    want = as_rollout(hf_greedy(ref, src, mask, steps))
    r = ours.sample(
        src,
        mask,
        Decoding(num_samples=2, max_new_tokens=steps, greedy=True),
        bos_id=PAD,
        eos_id=EOS,
        pad_id=PAD,
    )
    assert torch.equal(r.tokens, want.repeat_interleave(2, 0)), (r.tokens, want)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 16), (16, 64)])
def test_relative_position_buckets_match_transformers(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-600, 601)[None, :]  # (1, 1201) key position - query position
    theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    ours = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, theirs)
    assert int(ours.max()) == num_buckets - 1 and int(ours.min()) == 0


def test_config_from_hf_plans_a_snapshot_without_its_weights():
    """flan-T5-small's config.json as the hub has it: the plan's parameter count is transformers'
    count of the same architecture (built on the meta device) plus our value head."""
    flan_small = dict(
        model_type="t5",
        d_model=512,
        d_kv=64,
        d_ff=1024,
        num_heads=6,
        num_layers=8,
        num_decoder_layers=8,
        vocab_size=32128,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    cfg = config_from_hf(flan_small, last_layers=3)
    assert (
        cfg.d_model,
        cfg.n_heads,
        cfg.head_dim,
        cfg.ffn,
        cfg.tie_head,
        cfg.scale_head,
        cfg.last_layers,
    ) == (512, 6, 64, "gated-gelu", False, False, 3)
    assert (cfg.max_src_len, cfg.max_tgt_len, cfg.norm, cfg.position, cfg.scale_scores) == (
        512,
        512,
        "rmsnorm",
        "relative",
        False,
    )
    with torch.device("meta"):
        hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**flan_small))
    hf_count = (
        sum(p.numel() for p in hf.parameters()) + hf.lm_head.weight.numel()
    )  # transformers 5 ties it
    value_head = 512 * 512 + 512 + 512 + 1
    assert count_params(cfg) == hf_count + value_head == 76_961_152 + value_head
    assert memory_plan(cfg, batch=2, src_len=64, tgt_len=32)["parameters"] == count_params(cfg)


@pytest.mark.parametrize(
    "flags, scaled, tied",
    [
        (dict(), True, True),  # old v1.0 config.json: no flags
        (dict(tie_word_embeddings=False), False, False),  # hub flan-T5, mT5, T5 v1.1
        (
            dict(tie_word_embeddings=True, scale_decoder_outputs=False),
            False,
            True,
        ),  # transformers 5
        (dict(tie_word_embeddings=True, scale_decoder_outputs=True), True, True),
    ],
)
def test_the_scaling_rule(flags, scaled, tied):
    base = dict(
        model_type="mt5", d_model=8, d_kv=4, d_ff=16, num_heads=2, num_layers=1, vocab_size=10
    )
    cfg = config_from_hf({**base, **flags})
    assert (cfg.scale_head, cfg.tie_head, cfg.ffn, cfg.n_dec_layers) == (scaled, tied, "relu", 1)
    assert math.isclose(cfg.norm_eps, 1e-6)


# ---- errors ------------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path):
    hf_t5(6, feed_forward_proj="relu").save_pretrained(tmp_path)
    from_pretrained(tmp_path)  # loads as saved
    return tmp_path


def rewrite(path, change):
    state = load_file(path / "model.safetensors")
    change(state)
    save_file(state, path / "model.safetensors")


def test_wrong_model_type(good):
    edit_config(good, model_type="bart")
    with pytest.raises(ValueError, match="model_type 'bart' is not supported"):
        from_pretrained(good)


def test_missing_weight(good):
    rewrite(good, lambda s: s.pop("decoder.block.1.layer.2.layer_norm.weight"))
    with pytest.raises(
        ValueError, match=r"missing weight\(s\) decoder\.block\.1\.layer\.2\.layer_norm\.weight"
    ):
        from_pretrained(good)


def test_unexpected_weight(good):
    rewrite(
        good,
        lambda s: s.update({"decoder.block.2.layer.0.SelfAttention.q.weight": torch.zeros(32, 32)}),
    )
    with pytest.raises(
        ValueError,
        match=r"unexpected weight\(s\) decoder\.block\.2\.layer\.0\.SelfAttention\.q\.weight",
    ):
        from_pretrained(good)


def test_shape_mismatch(good):
    rewrite(
        good,
        lambda s: s.update({"encoder.block.0.layer.0.SelfAttention.k.weight": torch.zeros(32, 31)}),
    )
    with pytest.raises(
        ValueError,
        match=r"encoder\.block\.0\.layer\.0\.SelfAttention\.k\.weight has shape "
        r"\(32, 31\), the config expects \(32, 32\)",
    ):
        from_pretrained(good)


def test_embedding_copy_that_differs(good):
    rewrite(good, lambda s: s.update({"encoder.embed_tokens.weight": torch.zeros(V, 32)}))
    with pytest.raises(ValueError, match="encoder.embed_tokens.weight differs from shared.weight"):
        from_pretrained(good)


def test_no_weights_file(good):
    (good / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights file"):
        from_pretrained(good)


def test_no_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        from_pretrained(tmp_path)
