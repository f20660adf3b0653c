"""The decoder-only policy (decoder.py): the equations of its attention reward (DECISIONS.md §10)
and of rotary positions against hand computations, the interface ppo.py uses (sampler and teacher
forcing agree; a batch equals its prompts one by one, with either padding), and a PPO iteration on
it. Its exactness against transformers' Llama and Qwen2 is tests/test_decoder_snapshot.py."""

import math

import pytest
import torch

import data
import ppo
from decoder import (
    DecoderConfig,
    DecoderOnly,
    apply_rope,
    build_policy,
    config_from_dict,
    grouped_attention,
    policy_config,
    prompt_attention,
    prompt_positions,
    rope_frequencies,
    shared_prompt_attention,
)
from model import EncoderDecoder, token_logprobs
from reward import RewardConfig, SalientTokens
from sampling import Decoding

SP = data.Specials(pad=0, start=1, eos=2, special=(0, 1, 2, 3))


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=61, d_model=32, n_heads=4, n_kv_heads=2, n_layers=3, d_ff=40, last_layers=2
    )
    return DecoderOnly(DecoderConfig(**{**cfg, **kw})).eval()


def prompts():
    """Three prompts of lengths 7, 5 and 4, right-padded to 7 columns."""
    g = torch.Generator().manual_seed(5)
    src = torch.randint(4, 61, (3, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 4 + [0] * 3], dtype=torch.bool)
    return src.masked_fill(~mask, 0), mask


def left_padded(src, mask):
    """The same prompts with the padding moved to the left."""
    out, out_mask = torch.zeros_like(src), torch.zeros_like(mask)
    for b in range(src.size(0)):
        n = int(mask[b].sum())
        out[b, src.size(1) - n :], out_mask[b, src.size(1) - n :] = src[b, :n], True
    return out, out_mask


# ---- the equations -----------------------------------------------------------------------------


def test_prompt_attention_is_the_mean_over_layers_and_heads_renormalised_over_the_prompt():
    # One response step, L' = 2 layers x H = 2 heads, over 3 prompt columns; the rest of each row's
    # mass (to the response) is not in the slice.
    maps = torch.tensor([[[0.2, 0.2, 0.0], [0.4, 0.0, 0.0]], [[0.1, 0.1, 0.2], [0.0, 0.6, 0.2]]])[
        None, :, :, None, :
    ]  # (1, L', H, T=1, S)
    abar, share = prompt_attention(maps)
    mean = torch.tensor([0.7, 0.9, 0.4]) / 4  # by hand: column sums / (L' H)
    assert share.item() == pytest.approx(2.0 / 4)
    torch.testing.assert_close(abar[0, 0], mean / 0.5)
    assert abar.sum().item() == pytest.approx(1.0)
    zero, zero_share = prompt_attention(torch.zeros(1, 1, 1, 2, 3))
    assert torch.equal(zero, torch.zeros(1, 2, 3)) and torch.equal(zero_share, torch.zeros(1, 2))


def test_rotary_positions_rotate_each_pair_by_position_times_frequency():
    cfg = DecoderConfig(vocab_size=10, d_model=8, n_heads=2, n_layers=1, d_ff=8, rope_theta=100.0)
    inv = rope_frequencies(cfg)  # head width 4: 2 frequencies
    torch.testing.assert_close(inv, torch.tensor([1.0, 100.0**-0.5]))
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])[None, None, None]  # (1, 1, 1, 4): pairs (1, 3), (2, 4)
    angles = torch.cat([3 * inv, 3 * inv])[None, None]  # position 3
    out = apply_rope(x, angles.cos(), angles.sin())[0, 0, 0]
    for i, (a, b) in enumerate(((1.0, 3.0), (2.0, 4.0))):
        th = 3 * inv[i].item()
        assert out[i].item() == pytest.approx(a * math.cos(th) - b * math.sin(th), abs=1e-6)
        assert out[i + 2].item() == pytest.approx(a * math.sin(th) + b * math.cos(th), abs=1e-6)


def test_llama3_rope_scaling_keeps_short_wavelengths_and_divides_long_ones():
    scaling = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
    base = DecoderConfig(vocab_size=10, d_model=64, n_heads=2, n_layers=1, d_ff=8)
    plain, scaled = (
        rope_frequencies(base),
        rope_frequencies(DecoderConfig(**{**vars(base), "rope_scaling": scaling})),
    )
    wavelen = 2 * math.pi / plain
    short, long_ = wavelen < 64 / 4, wavelen > 64 / 1
    assert short.any() and long_.any()
    torch.testing.assert_close(scaled[short], plain[short])
    torch.testing.assert_close(scaled[long_], plain[long_] / 8)


def test_prompt_positions_count_real_tokens_on_either_side():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert prompt_positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


# ---- the interface ppo.py uses -----------------------------------------------------------------


def softmax_attention(q, k, v, allowed):
    """The textbook attention, written out here: softmax(q k^T / sqrt(hd)) over the allowed keys,
    then the weighted values. q, k, v (..., T|K, hd); allowed (..., T, K) bool."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    w = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    return w @ v, w


def test_grouped_attention_equals_repeating_the_key_heads():
    """Query head h reads key head h // g (transformers' repeat_kv), without the repeat."""
    g = torch.Generator().manual_seed(0)
    B, H, G, T, K, hd = 2, 6, 2, 3, 5, 8
    q, k, v = (torch.randn(B, n, t, hd, generator=g) for n, t in ((H, T), (G, K), (G, K)))
    mask = torch.rand(B, 1, T, K, generator=g) > 0.3
    mask[..., -1] = True  # every query has a key
    kr, vr = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
    want_out, want_w = softmax_attention(q, kr, vr, mask.expand(B, H, T, K))
    out, w = grouped_attention(q, k, v, mask, need_weights=True)
    torch.testing.assert_close(out, want_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(w, want_w, atol=1e-6, rtol=0)
    fused, none = grouped_attention(q, k, v, mask)  # SDPA
    assert none is None
    torch.testing.assert_close(fused, want_out, atol=1e-5, rtol=0)


def test_shared_prompt_attention_equals_each_sample_reading_its_own_copy_of_the_prompt():
    """N samples share one copy of the prompt's keys and values; each attends as if it had the
    prompt (padding masked) followed by its own keys, with the key heads repeated."""
    gen = torch.Generator().manual_seed(1)
    B, N, G, g, S, t, hd = 2, 3, 2, 2, 4, 3, 8
    H = G * g
    q = torch.randn(B * N, H, hd, generator=gen)  # one step's queries, sample-major rows
    prompt = tuple(torch.randn(B, G, S, hd, generator=gen) for _ in range(2))
    own = tuple(torch.randn(B, G, N, t, hd, generator=gen) for _ in range(2))
    real = torch.tensor([[True] * 4, [False, True, True, True]])  # the second prompt left-padded
    # the reference: every row's keys laid out in full, heads repeated
    keys, values = (
        torch.cat(
            [p.repeat_interleave(N, 0), o.transpose(1, 2).reshape(B * N, G, t, hd)], 2
        ).repeat_interleave(g, 1)
        for p, o in zip(prompt, own)
    )  # (B*N, H, S + t, hd)
    allowed = torch.cat([real.repeat_interleave(N, 0), torch.ones(B * N, t, dtype=torch.bool)], 1)
    want_out, want_w = softmax_attention(
        q[:, :, None], keys, values, allowed[:, None, None].expand(B * N, H, 1, S + t)
    )
    bias = torch.zeros(B, S).masked_fill(~real, float("-inf"))[:, None, None].expand(B, G, 1, S)
    grouped = q.view(B, N, G, g, hd).transpose(1, 2).reshape(B, G, N * g, hd) / math.sqrt(hd)
    out, w = shared_prompt_attention(grouped, prompt, own, bias.reshape(B * G, 1, S))
    as_rows = lambda x: x.transpose(1, 2).reshape(B * N, H, -1)  # (B, G, N, g, .) -> rows
    torch.testing.assert_close(as_rows(out), want_out[:, :, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(as_rows(w), want_w[:, :, 0, :S], atol=1e-6, rtol=0)


def test_the_sampler_records_what_teacher_forcing_recomputes():
    model, (src, mask) = tiny(qkv_bias=True, tie_head=False), prompts()
    rollout = model.sample(
        src,
        mask,
        Decoding(num_samples=2, max_new_tokens=9, temperature=0.7),
        generator=torch.Generator().manual_seed(1),
        **SP.sample_ids(),
    )
    tgt_in = ppo.decoder_input(rollout.tokens, SP.start)
    logits, abar = model(src, mask, tgt_in, num_samples=2, record="mean", tgt_mask=rollout.mask)
    recomputed = token_logprobs(logits, rollout.tokens, 0.7) * rollout.mask
    torch.testing.assert_close(recomputed, rollout.logprobs, atol=2e-6, rtol=0)
    torch.testing.assert_close(abar, rollout.attn, atol=1e-6, rtol=0)
    sums = rollout.attn[rollout.mask].sum(-1)  # each step sums to 1 over the prompt
    torch.testing.assert_close(sums, torch.ones_like(sums))
    rep = mask.repeat_interleave(2, 0)
    assert rollout.attn.masked_select(~rep[:, None, :]).abs().max() == 0  # never on prompt padding
    share = rollout.prompt_share[rollout.mask]
    assert bool((share > 0).all() and (share <= 1 + 1e-6).all())
    assert torch.allclose(
        rollout.prompt_share[:, 0], torch.ones(6)
    )  # y_0's query is the prompt's last token


@pytest.mark.parametrize("padding", ["right", "left"])
def test_a_batch_samples_as_its_prompts_one_by_one(padding):
    model, (src, mask) = tiny(), prompts()
    if padding == "left":
        src, mask = left_padded(src, mask)
    batch = model.sample(src, mask, Decoding(max_new_tokens=8, greedy=True), **SP.sample_ids())
    for b in range(3):
        one = src[b : b + 1, mask[b]]
        alone = model.sample(
            one,
            torch.ones_like(one, dtype=torch.bool),
            Decoding(max_new_tokens=8, greedy=True),
            **SP.sample_ids(),
        )
        T = alone.tokens.size(1)
        assert torch.equal(alone.tokens[0], batch.tokens[b, :T])
        torch.testing.assert_close(alone.logprobs[0], batch.logprobs[b, :T], atol=2e-6, rtol=0)
        torch.testing.assert_close(alone.attn[0], batch.attn[b, :T][:, mask[b]], atol=1e-6, rtol=0)


def test_left_and_right_padding_give_the_same_logits_and_value():
    model, (src, mask) = tiny(), prompts()
    tgt_in = torch.randint(4, 61, (3, 5), generator=torch.Generator().manual_seed(2))
    right, right_maps = model(src, mask, tgt_in, record="layers")
    lsrc, lmask = left_padded(src, mask)
    left, left_maps = model(lsrc, lmask, tgt_in, record="layers")
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    for b in range(3):
        torch.testing.assert_close(
            left_maps[b][..., lmask[b]], right_maps[b][..., mask[b]], atol=1e-6, rtol=0
        )
    with torch.no_grad():
        model.value_head.out.weight.normal_()
    torch.testing.assert_close(
        model.value(model.encode(lsrc, lmask), lmask), model.value(model.encode(src, mask), mask)
    )


def test_the_first_real_token_and_the_special_tokens_are_the_sinks():
    model = tiny()
    src = torch.tensor([[0, 0, 9, 2, 7], [9, 8, 7, 2, 0]])
    mask = src != 0
    sinks = model.sinks(src, mask, SP.special)
    assert sinks.tolist() == [[False, False, True, True, False], [True, False, False, True, False]]


def test_a_ppo_iteration_on_the_decoder_only_policy_moves_it_and_the_first_ratio_is_one():
    model = tiny()
    src, mask = prompts()
    cfg = ppo.PPOConfig(
        num_samples=2, max_new_tokens=6, minibatches=1, epochs=1, lr=1e-3, temperature=1.0
    )
    salient = SalientTokens(
        torch.ones(61), torch.ones(61, dtype=torch.bool), [f"w{i}" for i in range(61)]
    )
    experience, _ = ppo.collect(
        model,
        model,
        src,
        mask,
        ppo.RLTask([], specials=SP, salient=salient, reward_cfg=RewardConfig()),
        cfg,
        0.0,
        torch.Generator().manual_seed(0),
    )
    assert "prompt_share" in experience.terms and experience.terms["prompt_share"].shape == (6,)
    logits, _ = ppo.PolicyValue(model)(src, mask, experience.tgt_in, 2)
    ratio = (token_logprobs(logits, experience.tokens) - experience.old_logprobs).exp()[
        experience.mask
    ]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    before = [p.detach().clone() for p in model.parameters()]
    stats = ppo.update(model, torch.optim.Adam(model.parameters(), lr=1e-3), experience, cfg)
    assert stats["applied"] == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_configs_round_trip_and_presets_name_their_architecture():
    cfg = policy_config("decoder", "tiny", last_layers=2)
    assert isinstance(build_policy(cfg), DecoderOnly)
    assert config_from_dict(vars(cfg)) == cfg
    assert isinstance(build_policy(policy_config("encoder-decoder", "tiny")), EncoderDecoder)
    with pytest.raises(ValueError, match="decoder-only sizes: tiny, small"):
        policy_config("decoder", "1.3b")
    with pytest.raises(ValueError, match="n_kv_heads"):
        DecoderConfig(n_heads=4, n_kv_heads=3)


def test_the_ppo_loop_does_not_ask_which_model_it_has():
    source = open(ppo.__file__).read()
    assert "DecoderOnly" not in source and "EncoderDecoder" not in source and "arch" not in source
