"""model.py and sampling.py: attention, the recorded cross-attention Abar (§3.2), the KV-cached
sampler, presets.

Cached sampling reproduces the teacher-forced log-probabilities and `Abar` within 1e-5; `Abar` is
the mean of the per-layer, per-head maps and sums to 1 over real prompt tokens; padding a batch
changes no row; top-k/top-p never sample outside their sets, and the top-k sampler's frequencies
over 40,000 draws match the truncated softmax within 5 standard deviations, as do those of the
inverse-CDF draw of large vocabularies; every preset's
parameter count matches a closed-form count. Scale: gradient checkpointing gives the same
gradients; under bf16 autocast the recorded `Abar` and the log-probabilities stay float32 and
`Abar` still sums to 1."""

import math

import pytest
import torch

from checks import ConfigError
from cli.plan import memory_plan
from model import (
    EncoderDecoder,
    ModelConfig,
    abar,
    additive_mask,
    attention,
    config_for,
    count_params,
    relative_position_bucket,
    rms_norm,
    token_logprobs,
)
from presets import SIZES
from sampling import CDF_DRAW_FROM, Decoding, draw, filter_logits, sample_next

BOS, EOS, PAD = 1, 2, 0  # the ids of our tokenizer (data.train_tokenizer)
IDS = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)  # EncoderDecoder.sample's keywords for them
T5_IDS = dict(bos_id=0, eos_id=1, pad_id=0)  # T5's: the decoder starts from pad, EOS is 1


def small_model(seed=0, vocab_size=11, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab_size,
        d_model=32,
        n_heads=4,
        n_enc_layers=2,
        n_dec_layers=3,
        d_ff=64,
        max_src_len=16,
        max_tgt_len=24,
        last_layers=2,
        **kw,
    )
    model = EncoderDecoder(cfg).eval()
    # Lift the output scale so the sampler sees peaked, input-dependent
    # distributions (and EOS often).
    with torch.no_grad():
        model.dec_ln.weight.mul_(8)
    return model


def padded_prompts(lengths, vocab_size=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    src = torch.randint(3, vocab_size, (len(lengths), S), generator=g)
    mask = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]
    return src.masked_fill(~mask, PAD), mask


def teacher_forced(model, src, src_mask, rollout, N, temperature, start=BOS):
    tgt_in = torch.cat([torch.full_like(rollout.tokens[:, :1], start), rollout.tokens[:, :-1]], 1)
    logits, abar = model(src, src_mask, tgt_in, num_samples=N, record="mean", tgt_mask=rollout.mask)
    lp = token_logprobs(logits, rollout.tokens, temperature) * rollout.mask
    return lp, abar


# ---- attention ---------------------------------------------------------------------------


def test_explicit_attention_equals_fused_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    for causal, m in ((False, mask), (True, None)):
        fused, none = attention(q, k, v, mask=m, is_causal=causal)
        explicit, w = attention(q, k, v, mask=m, is_causal=causal, need_weights=True)
        assert none is None
        torch.testing.assert_close(explicit, fused, atol=1e-6, rtol=1e-5)
        # And against the textbook formula written out once more.
        scores = q @ k.transpose(-2, -1) / math.sqrt(8)
        if causal:
            scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
        else:
            scores = scores.masked_fill(~m, float("-inf"))
        torch.testing.assert_close(w, scores.softmax(-1), atol=1e-6, rtol=1e-5)
    assert w[0].triu(1).abs().max() == 0  # causal: nothing above the diagonal


def test_weights_only_from_recording_layers():
    model = small_model()
    recording = [layer.cross_attn.records for layer in model.decoder]
    assert recording == [False, True, True]  # last_layers = L' = 2 of 3
    assert not any(layer.attn.records for layer in model.encoder)
    x = torch.randn(1, 4, 32)
    k, v = model.decoder[0].cross_attn.project_kv(x)
    with pytest.raises(RuntimeError, match="last_layers"):
        model.decoder[0].cross_attn(x, k, v, need_weights=True)
    with pytest.raises(RuntimeError, match="last_layers"):
        model.encoder[0].attn(x, k, v, need_weights=True)


# ---- Abar of §3.2 ------------------------------------------------------------------------


def test_abar_is_mean_of_recorded_layers_and_heads_and_a_distribution_over_real_prompt_tokens():
    model = small_model()
    src, src_mask = padded_prompts([6, 3, 5])
    tgt_in = torch.randint(3, 11, (3, 4))
    logits, abar = model(src, src_mask, tgt_in, record="mean")
    _, maps = model(src, src_mask, tgt_in, record="layers")
    assert logits.shape == (3, 4, 11) and abar.shape == (3, 4, 6) and maps.shape == (3, 2, 4, 4, 6)
    # Abar[t, j] = 1/L' sum_l (1/H sum_h A)  with L' = 2, H = 4
    torch.testing.assert_close(abar, maps.sum(dim=(1, 2)) / (2 * 4))
    torch.testing.assert_close(abar.sum(-1), torch.ones(3, 4), atol=1e-6, rtol=0)
    assert abar.masked_select(~src_mask[:, None, :].expand_as(abar)).abs().max() == 0
    # No attention requested: no maps.
    assert model(src, src_mask, tgt_in)[1] is None


def test_abar_by_hand():
    """§3.2, Abar[t, j] = (1/L') sum_l A_t^(l)[j], here also averaged over heads. One candidate,
    L' = 2 layers x H = 2 heads, T = 1 step, S = 3 prompt positions; the four maps and their mean
    by hand: (0.5 + 0.1 + 0.2 + 0.6) / 4 = 0.35, (0.5 + 0.9 + 0.2 + 0.0) / 4 = 0.4,
    (0 + 0 + 0.6 + 0.4) / 4 = 0.25."""
    maps = torch.tensor(
        [
            [
                [[[0.5, 0.5, 0.0]], [[0.1, 0.9, 0.0]]],  # layer L-1: heads 1, 2
                [[[0.2, 0.2, 0.6]], [[0.6, 0.0, 0.4]]],
            ]
        ]
    )  # layer L:   heads 1, 2
    assert maps.shape == (1, 2, 2, 1, 3)  # (B, L', H, T, S)
    torch.testing.assert_close(abar(maps), torch.tensor([[[0.35, 0.4, 0.25]]]))  # (B, T, S)


def test_padding_a_batch_does_not_change_any_row():
    model = small_model()
    src, src_mask = padded_prompts([7, 2, 4])
    tgt_in = torch.randint(3, 11, (3, 5))
    tgt_len = torch.tensor([5, 2, 3])
    logits, abar = model(src, src_mask, tgt_in, record="mean")
    for b in range(3):
        s, t = int(src_mask[b].sum()), int(tgt_len[b])
        lone_logits, lone_abar = model(
            src[b : b + 1, :s], src_mask[b : b + 1, :s], tgt_in[b : b + 1, :t], record="mean"
        )
        torch.testing.assert_close(logits[b, :t], lone_logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(abar[b, :t, :s], lone_abar[0], atol=1e-5, rtol=1e-5)


# ---- the sampler ---------------------------------------------------------------------------


@pytest.mark.parametrize("ids", [IDS, T5_IDS], ids=["ours", "t5"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=4),
        dict(top_p=0.8),
        dict(greedy=True, temperature=1.3),
    ],
)
def test_cached_sampling_reproduces_teacher_forced_pass(kw, ids):
    model = small_model()
    src, src_mask = padded_prompts([6, 3, 5])
    N = 3
    g = torch.Generator().manual_seed(0)
    r = model.sample(
        src, src_mask, Decoding(num_samples=N, max_new_tokens=20, **kw), generator=g, **ids
    )
    assert r.tokens.shape[0] == 9 and r.attn.shape == (9, r.tokens.shape[1], 6)
    # the teacher-forced decoder input starts from the sampler's first input, bos_id
    lp, abar = teacher_forced(
        model, src, src_mask, r, N, kw.get("temperature", 1.0), start=ids["bos_id"]
    )
    torch.testing.assert_close(r.logprobs, lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.attn, abar, atol=1e-5, rtol=0)
    # Rows of prompt b are b*N .. b*N+N-1: their attention is zero exactly on b's padding.
    for row in range(9):
        b = row // N
        real = r.mask[row]
        torch.testing.assert_close(
            r.attn[row][real].sum(-1), torch.ones(int(real.sum())), atol=1e-6, rtol=0
        )
        assert r.attn[row][:, ~src_mask[b]].abs().sum() == 0


@pytest.mark.parametrize("ids", [IDS, T5_IDS], ids=["ours", "t5"])
def test_each_row_stops_at_its_own_eos(ids):
    EOS, PAD = ids["eos_id"], ids["pad_id"]
    model = small_model(vocab_size=5)  # EOS is 1 of 5 tokens: rows finish at different steps
    src, src_mask = padded_prompts([4, 4], vocab_size=5)
    r = model.sample(
        src,
        src_mask,
        Decoding(num_samples=8, max_new_tokens=24),
        generator=torch.Generator().manual_seed(3),
        **ids,
    )
    lengths = r.mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "test needs rows of different lengths"
    for row in range(16):
        n = int(lengths[row])
        eos_at = (r.tokens[row] == EOS).nonzero()
        if len(eos_at):  # finished: mask covers up to and including EOS
            assert int(eos_at[0]) == n - 1
        else:  # ran to max_new_tokens without EOS
            assert n == r.tokens.shape[1] == 24
        assert r.mask[row, :n].all() and not r.mask[row, n:].any()
        assert (r.tokens[row, n:] == PAD).all()
        assert (r.logprobs[row, n:] == 0).all() and (r.attn[row, n:] == 0).all()
        assert (r.logprobs[row, :n] < 0).all()
    assert r.tokens.shape[1] == int(lengths.max())  # stops once every row has finished


def test_top_k_and_top_p_never_sample_outside_their_sets():
    model = small_model(vocab_size=20)
    src, src_mask = padded_prompts([5, 3], vocab_size=20)
    for kw in (dict(top_k=3), dict(top_p=0.5), dict(top_k=5, top_p=0.7)):
        r = model.sample(
            src,
            src_mask,
            Decoding(num_samples=16, max_new_tokens=10, temperature=1.5, **kw),
            generator=torch.Generator().manual_seed(1),
            **IDS,
        )
        tgt_in = torch.cat([torch.full_like(r.tokens[:, :1], BOS), r.tokens[:, :-1]], 1)
        logits = model(src, src_mask, tgt_in, num_samples=16)[0] / 1.5  # (B*N, T, V)
        for row, t in r.mask.nonzero().tolist():
            z = logits[row, t]
            order = z.argsort(descending=True).tolist()
            allowed = set(order[: kw.get("top_k", 20)])
            if (
                "top_p" in kw
            ):  # smallest prefix (of the top-k renormalised) whose probability reaches p
                keep = order[: kw.get("top_k", 20)]
                p = torch.softmax(z[keep], -1).tolist()
                total, nucleus = 0.0, set()
                for tok, pi in zip(keep, p):
                    nucleus.add(tok)
                    total += pi
                    if total >= kw["top_p"]:
                        break
                allowed &= nucleus
            assert int(r.tokens[row, t]) in allowed, (kw, row, t)


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_k=4, top_p=0.6), dict(top_p=0.7), dict()])
def test_sample_next_draws_from_the_truncated_softmax(kw):
    # Frequencies of 40,000 draws against softmax(filter_logits(...)), the distribution the
    # top-k shortcut must reproduce: within 5 binomial standard deviations for every token.
    logits = torch.log(torch.tensor([0.30, 0.05, 0.25, 0.02, 0.18, 0.20])).expand(40_000, 6)
    want = torch.softmax(filter_logits(logits[:1], **kw), -1)[0]
    got = sample_next(logits, generator=torch.Generator().manual_seed(0), **kw)
    freq = torch.bincount(got, minlength=6).double() / len(got)
    sd = (want.double() * (1 - want.double()) / len(got)).sqrt()
    assert ((freq - want.double()).abs() <= 5 * sd + 1e-12).all(), (kw, freq, want)
    assert (freq[want == 0] == 0).all()


def test_inverse_cdf_draw_of_a_large_vocabulary_follows_the_distribution():
    # From CDF_DRAW_FROM entries on, `draw` is the inverse CDF over blocks of sqrt(V) entries, then
    # inside the block. 40,000 draws over CDF_DRAW_FROM + 100 entries (blocks of 128, and a last,
    # shorter block of 100): six hold 0.9 of the mass, one of them in the last block, 1,000 others
    # share 0.1, the rest (the last 49 among them) have probability 0 and are never drawn.
    # Frequencies within 5 binomial standard deviations.
    V = CDF_DRAW_FROM + 100
    heavy = torch.tensor([3, 17, 5_000, 9_000, V - 200, V - 50])
    probs = torch.zeros(V)
    probs[heavy] = torch.tensor([0.30, 0.05, 0.25, 0.02, 0.18, 0.10])
    probs[100:1100] = 0.1 / 1000
    gen = torch.Generator().manual_seed(0)
    got = torch.cat([draw(probs.expand(4_000, V), gen) for _ in range(10)])  # (40000,)
    counts = torch.bincount(got, minlength=V).double()
    assert counts.sum() == 40_000 and (counts[probs == 0] == 0).all()
    freq = torch.cat([counts[heavy], counts[100:1100].sum()[None]]) / 40_000
    want = torch.tensor([0.30, 0.05, 0.25, 0.02, 0.18, 0.10, 0.1], dtype=torch.float64)
    assert ((freq - want).abs() <= 5 * (want * (1 - want) / 40_000).sqrt()).all(), freq


def test_filter_logits_on_a_hand_worked_case():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, False, True, False]]
    # p=0.8: 0.5 < 0.8, 0.5+0.3 = 0.8 reaches it -> {0, 2}; p=0.81 needs 0.15 too -> {0, 2, 3}
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, False, True, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).tolist() == [
        [True, False, False, False]
    ]


def test_seeded_sampling_is_reproducible():
    model = small_model(vocab_size=20)
    src, src_mask = padded_prompts([5, 3], vocab_size=20)
    run = lambda seed: model.sample(
        src,
        src_mask,
        Decoding(num_samples=4, max_new_tokens=12, temperature=2.0),
        generator=torch.Generator().manual_seed(seed),
        **IDS,
    )
    a, b, c = run(7), run(7), run(8)
    assert (
        torch.equal(a.tokens, b.tokens)
        and torch.equal(a.logprobs, b.logprobs)
        and torch.equal(a.attn, b.attn)
    )
    assert not torch.equal(a.tokens, c.tokens)


def test_sampling_without_recording_returns_no_attention_and_the_same_tokens():
    model = small_model(vocab_size=20)
    src, src_mask = padded_prompts([5, 3], vocab_size=20)
    a = model.sample(
        src, src_mask, Decoding(num_samples=2), generator=torch.Generator().manual_seed(0), **IDS
    )
    b = model.sample(
        src,
        src_mask,
        Decoding(num_samples=2),
        generator=torch.Generator().manual_seed(0),
        record_attention=False,
        **IDS,
    )
    assert b.attn is None and torch.equal(a.tokens, b.tokens)


def test_sample_has_no_default_special_ids():
    """The ids differ between tokenizers (ours: BOS 1, EOS 2; T5: start = pad 0, EOS 1), so the
    sampler takes them only by keyword and has no default to fall back on silently."""
    model = small_model()
    src, src_mask = padded_prompts([3])
    for missing in IDS:
        with pytest.raises(TypeError, match=missing):
            model.sample(src, src_mask, **{k: v for k, v in IDS.items() if k != missing})
    with pytest.raises(TypeError):
        model.sample(src, src_mask, Decoding(), True, None, BOS, EOS, PAD)  # not positionally


# ---- value head --------------------------------------------------------------------------


def test_value_head_starts_at_zero_and_ignores_padding():
    model = small_model()
    src, src_mask = padded_prompts([6, 3])
    memory = model.encode(src, src_mask)
    assert model.value(memory, src_mask).tolist() == [0.0, 0.0]
    torch.nn.init.normal_(model.value_head.out.weight)
    v = model.value(memory, src_mask)
    # Independent computation: mean of the real rows, through the MLP.
    pooled = torch.stack([memory[0, :6].mean(0), memory[1, :3].mean(0)])
    h = model.value_head
    torch.testing.assert_close(v, h.out(torch.tanh(h.hidden(pooled))).squeeze(-1))
    lone = model.value(model.encode(src[1:, :3], src_mask[1:, :3]), src_mask[1:, :3])
    torch.testing.assert_close(v[1:], lone, atol=1e-5, rtol=1e-5)


# ---- presets -------------------------------------------------------------------------------


def closed_form_params(c: ModelConfig) -> int:
    """Count by hand: embeddings, per-layer blocks (bias-free linears and
    LayerNorms), value head."""
    D, F_ = c.d_model, c.d_ff
    emb = c.vocab_size * D + (c.max_src_len + c.max_tgt_len) * D
    enc = c.n_enc_layers * (4 * D * D + 2 * D * F_ + 2 * D)  # q, kv, out; up, out; 2 LN
    dec = c.n_dec_layers * (8 * D * D + 2 * D * F_ + 3 * D)  # self + cross attention; FF; 3 LN
    value = D * D + D + D + 1
    return emb + enc + dec + 2 * D + value  # + final encoder and decoder LN


@pytest.mark.parametrize("size", list(SIZES))
def test_parameter_count_of_every_preset(size):
    cfg = config_for(size)
    n = count_params(cfg)  # on the meta device: the 1.3b preset allocates nothing
    assert n == closed_form_params(cfg)
    bounds = {
        "tiny": (1e6, 2e6),
        "small": (4e6, 20e6),
        "base": (2e7, 1.5e8),
        "1.3b": (1.2e9, 1.4e9),
    }
    lo, hi = bounds[size]
    assert lo <= n <= hi, f"{size}: {n:,}"


def test_meta_device_build_allocates_nothing():
    with torch.device("meta"):
        m = EncoderDecoder(config_for("1.3b"))
    assert all(p.is_meta for p in m.parameters())


def test_presets_and_overrides_are_checked():
    assert config_for("tiny", last_layers=2).last_layers == 2
    with pytest.raises(ValueError, match="valid sizes: tiny, small, base, 1.3b"):
        config_for("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        config_for("tiny", n_layer=3)
    with pytest.raises(ValueError, match="last_layers"):
        config_for("tiny", last_layers=3)


def test_overlong_inputs_are_errors():
    model = small_model()
    with pytest.raises(ValueError, match="max_src_len"):
        model.encode(torch.ones(1, 17, dtype=torch.long), torch.ones(1, 17, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_tgt_len"):
        model(*padded_prompts([3]), torch.ones(1, 25, dtype=torch.long))


# ---------------------------------------------------------------------- scale: memory and precision
def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    m = EncoderDecoder(
        config_for("tiny", vocab_size=50, d_model=32, d_ff=64, n_heads=2, last_layers=2)
    )
    src = torch.randint(4, 50, (3, 7))
    tgt = torch.randint(4, 50, (3, 5))
    mask = torch.ones(3, 7, dtype=torch.bool)
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        logits, abar = m(src, mask, tgt, record="mean")
        (logits.logsumexp(-1).mean() + abar.pow(2).sum()).backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_bf16_autocast_keeps_the_recorded_attention_and_log_probs_in_float32():
    # The CPU stands in for CUDA here: the same autocast rules pick bf16 matmuls on both.
    torch.manual_seed(0)
    m = EncoderDecoder(config_for("tiny", vocab_size=50, d_model=32, d_ff=64, n_heads=2)).eval()
    src = torch.randint(4, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    tgt = torch.randint(4, 50, (2, 5))
    ref, _ = m(src, mask, tgt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = m.sample(
            src,
            mask,
            Decoding(num_samples=2, max_new_tokens=5),
            generator=torch.Generator().manual_seed(0),
            **IDS,
        )
        logits, _ = m(src, mask, tgt)
    assert r.attn.dtype == torch.float32 and r.logprobs.dtype == torch.float32
    sums = r.attn.sum(-1)[r.mask]
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - ref).abs().max() < 0.05 * ref.abs().max()


# ---------------------------------------------------------------------------- T5-family options
# The defaults are the from-scratch model above; from_pretrained
# (tests/test_pretrained.py) sets T5's.


def test_default_model_is_unchanged():
    """The README's `tiny` preset: 1,352,449 parameters, and the same
    names as before the T5 options."""
    m = EncoderDecoder(config_for("tiny"))
    V_, D, F_, P = 3000, 128, 512, 128  # vocabulary, width, FFN width, positions
    enc = 2 * (2 * D + 4 * D * D + 2 * D * F_)  # 2 LayerNorms (no bias), q, kv, out, up, out
    dec = 2 * (3 * D + 8 * D * D + 2 * D * F_)  # 3 LayerNorms, self- and cross-attention, FFN
    value = D * D + D + D + 1  # V(x): hidden layer and output, with biases
    by_hand = V_ * D + 2 * P * D + enc + dec + 2 * D + value  # tied head: no extra matrix
    assert m.num_params() == by_hand == 1_352_449
    assert count_params(config_for("tiny")) == by_hand  # on the meta device
    attn = ["q.weight", "kv.weight", "out.weight"]
    enc = [
        f"encoder.{i}.{n}"
        for i in range(2)
        for n in [
            "ln1.weight",
            "ln2.weight",
            *(f"attn.{a}" for a in attn),
            "ff.up.weight",
            "ff.out.weight",
        ]
    ]
    dec = [
        f"decoder.{i}.{n}"
        for i in range(2)
        for n in [
            "ln1.weight",
            "ln2.weight",
            "ln3.weight",
            *(f"self_attn.{a}" for a in attn),
            *(f"cross_attn.{a}" for a in attn),
            "ff.up.weight",
            "ff.out.weight",
        ]
    ]
    assert [n for n, _ in m.named_parameters()] == [
        "tok_emb.weight",
        "enc_pos.weight",
        "dec_pos.weight",
        *enc,
        *dec,
        "enc_ln.weight",
        "dec_ln.weight",
        "value_head.hidden.weight",
        "value_head.hidden.bias",
        "value_head.out.weight",
        "value_head.out.bias",
    ]
    assert m.lm_head is None and isinstance(m.enc_ln, torch.nn.LayerNorm) and m.enc_ln.eps == 1e-5


T5_LIKE = [
    # flan-T5 / T5 v1.1: RMS norm, relative positions, no score scaling, 4 heads of 12
    # (48 != d_model 32), gated GELU, untied head; small buckets so that ~20 positions reach the
    # last one.
    dict(
        norm="rmsnorm",
        position="relative",
        scale_scores=False,
        d_kv=12,
        ffn="gated-gelu",
        tie_head=False,
        rel_buckets=8,
        rel_max_distance=16,
    ),
    # T5 v1.0: ReLU, tied and scaled head.
    dict(
        norm="rmsnorm",
        position="relative",
        scale_scores=False,
        ffn="relu",
        scale_head=True,
        rel_buckets=8,
        rel_max_distance=16,
    ),
]


def t5_like(kw):
    model = small_model(**kw)
    with torch.no_grad():  # position biases that matter
        for layer in (model.encoder[0].attn, model.decoder[0].self_attn):
            torch.nn.init.normal_(layer.rel_bias.weight, std=2.0)
    return model


@pytest.mark.parametrize("kw", T5_LIKE)
def test_t5_options_cached_sampling_reproduces_teacher_forced_pass(kw):
    model = t5_like(kw)
    src, src_mask = padded_prompts([14, 3, 9])
    r = model.sample(
        src,
        src_mask,
        Decoding(num_samples=3, max_new_tokens=20, temperature=1.0),
        generator=torch.Generator().manual_seed(0),
        **IDS,
    )
    assert r.tokens.shape[1] > 3
    lp, abar_ = teacher_forced(model, src, src_mask, r, 3, 1.0)
    torch.testing.assert_close(r.logprobs, lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.attn, abar_, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", T5_LIKE)
def test_t5_options_padding_a_batch_does_not_change_any_row(kw):
    model = t5_like(kw)
    src, src_mask = padded_prompts([14, 2, 9])
    tgt_in = torch.randint(3, 11, (3, 18))
    logits, maps = model(src, src_mask, tgt_in, record="layers")
    for b in range(3):
        s = int(src_mask[b].sum())
        lone_logits, lone_maps = model(
            src[b : b + 1, :s], src_mask[b : b + 1, :s], tgt_in[b : b + 1], record="layers"
        )
        torch.testing.assert_close(logits[b], lone_logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(maps[b, ..., :s], lone_maps[0], atol=1e-5, rtol=1e-5)


def test_t5_options_modules_and_parameter_count():
    """One bias table per stack (its first layer's self-attention), no absolute positions, the
    attention's inner width n_heads * d_kv, gated FFN, untied head: counted by hand."""
    cfg = ModelConfig(
        vocab_size=11, d_model=32, n_heads=4, n_enc_layers=2, n_dec_layers=3, d_ff=64, **T5_LIKE[0]
    )
    m = EncoderDecoder(cfg)
    assert m.enc_pos is None and m.dec_pos is None
    owners = sorted(n for n, _ in m.named_parameters() if "rel_bias" in n)
    assert owners == ["decoder.0.self_attn.rel_bias.weight", "encoder.0.attn.rel_bias.weight"]
    D, A, F_, V_, H = 32, 48, 64, 11, 4
    enc = 2 * (4 * D * A + 3 * D * F_ + 2 * D)  # q, kv, out; gate, up, out; 2 RMS norms
    dec = 3 * (8 * D * A + 3 * D * F_ + 3 * D)
    value = D * D + D + D + 1
    assert (
        m.num_params()
        == count_params(cfg)
        == V_ * D + enc + dec + 2 * D + 2 * 8 * H + V_ * D + value
    )
    # The memory plan follows the inner width A and the gated FFN (4 d_ff), plus the relative masks.
    plan = memory_plan(cfg, batch=3, src_len=5, tgt_len=4, act_bytes=2)
    acts = 3 * 5 * 2 * (6 * D + 4 * A + 4 * F_) + 3 * 4 * 3 * (8 * D + 6 * A + 4 * F_)
    assert plan["activations"] == (acts + 3 * 4 * V_) * 2 + (3 * 4 * V_ + 3 * H * (25 + 16)) * 4


def test_rms_norm_by_hand():
    x = torch.tensor([[3.0, -4.0]])  # mean of squares 12.5
    w = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(rms_norm(x, w, 0.0), torch.tensor([[3.0, -8.0]]) / math.sqrt(12.5))


def test_relative_buckets_by_hand():
    """num_buckets 8, max_distance 16. Decoder (unidirectional): distances 0..3 exact; 4..15 in
    buckets 4 + floor(log(d/4) / log(4) * 4): 4-5 -> 4, 6-7 -> 5, 8-11 -> 6, 12-15 -> 7, and 16
    on -> 7; keys after the query -> 0. Encoder (bidirectional): 4 buckets a side (keys after the
    query in 4..7), 0 and 1 exact, then 2 + floor(log(d/2) / log(8) * 2): 2-6 -> 2, 7 on -> 3."""
    rel = -torch.tensor([0, 1, 3, 4, 5, 6, 8, 11, 12, 15, 16, 100])
    assert relative_position_bucket(rel, False, 8, 16).tolist() == [
        0,
        1,
        3,
        4,
        4,
        5,
        6,
        6,
        7,
        7,
        7,
        7,
    ]
    assert relative_position_bucket(torch.tensor([1, 5]), False, 8, 16).tolist() == [0, 0]
    assert relative_position_bucket(
        torch.tensor([0, -1, 1, 2, 3, 4, 7, 8, 100]), True, 8, 16
    ).tolist() == [0, 1, 5, 6, 6, 6, 7, 7, 7]


def test_biased_attention_explicit_equals_fused_and_by_hand():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    bias = torch.randn(1, 3, 5, 5, generator=g)
    keys = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    keys[1, ..., 3:] = False
    for m in (additive_mask(bias, keys), additive_mask(bias, is_causal=True)):
        fused, _ = attention(q, k, v, mask=m, scale=1.0)
        explicit, w = attention(q, k, v, mask=m, need_weights=True, scale=1.0)
        torch.testing.assert_close(explicit, fused, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            w, (q @ k.transpose(-2, -1) + m).softmax(-1), atol=1e-6, rtol=1e-5
        )
    assert w[0].triu(1).abs().max() == 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("norm", "batchnorm"),
        ("position", "rotary"),
        ("ffn", "swiglu"),
        ("d_kv", 0),
        ("norm_eps", 0.0),
        ("tie_head", 1),
        ("rel_buckets", 0),
        ("rel_buckets", 3),
        ("rel_max_distance", 16),
    ],
)
def test_t5_option_values_are_checked(field, value):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{field: value})


def test_d_model_need_not_divide_by_heads_with_d_kv():
    assert ModelConfig(d_model=30, n_heads=4, d_kv=8).head_dim == 8
    with pytest.raises(ConfigError, match="divisible by n_heads=4"):
        ModelConfig(d_model=30, n_heads=4)
