"""ppo.py: the PPO objective of §4, its companions, and one rollout + update on a small model.

- A reward it can see (the share of one token) rises under `collect` + `update`.
- The clipped loss against a plain loop, no gradient through tokens clipped on the losing side, PG
  and PPO gradients equal at ratio 1, the group baseline, KL estimates and the adaptive controller
  on hand-worked cases, `abar` and `advantage` by hand; the reward of a rollout equals the reward
  recomputed from a fresh teacher-forced pass; the first epoch's ratio is 1; the value warm-up moves
  only the value head; a non-finite update is never applied.
- Inside `collect`, against computations by hand: the KL-penalised return with a reference model
  that differs (at temperature 0.7), the group baseline on penalised returns then whitening, and
  A = R - V_old(x) with a value head that value-only updates fitted (its loss falls below a fifth).
- Every KL and ratio estimate stays finite with log-probabilities of -120 and -300 after EOS, and
  such an update is applied; the adaptive KL controller moves `kl_coef` inside `ppo.train` exactly
  as its formula says.
- On-policy sampling: the first tokens of 6,000 RL candidates follow softmax(logits / T) from a
  separate teacher-forced pass (total variation under 0.05, every tail token drawn), and
  `ppo.train` refuses top-k and top-p."""

import math

import numpy as np
import pytest
import torch

import data
import model
import ppo
from checks import ConfigError
from model import EncoderDecoder, ModelConfig
from reward import RewardConfig, SalientTokens, compute_reward

# The toy vocabulary keeps our tokenizer's special ids: <pad> 0, <bos> 1 (the decoder's start),
# <eos> 2, <unk> 3.
SP = data.Specials(pad=0, start=1, eos=2, special=(0, 1, 2, 3))


def random_batch(seed=0, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    new = old + torch.randn(B, T, generator=g) * 0.3
    adv = torch.randn(B, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return new, old, adv, mask


# ---- the objective ------------------------------------------------------------------------


def test_ppo_policy_loss_matches_an_independent_computation():
    new, old, adv, mask = random_batch()
    eps = 0.2
    # Independent: a plain loop over valid tokens, in float64 numpy.
    terms = []
    for b in range(new.shape[0]):
        for t in range(new.shape[1]):
            if mask[b, t]:
                r = math.exp(float(new[b, t]) - float(old[b, t]))
                a = float(adv[b])
                terms.append(min(r * a, min(max(r, 1 - eps), 1 + eps) * a))
    expected = -np.mean(terms)
    assert float(ppo.ppo_policy_loss(new, old, adv, mask, eps)) == pytest.approx(expected, rel=1e-5)


def test_no_gradient_through_tokens_clipped_on_the_losing_side():
    old = torch.zeros(4, 1)
    # ratio e^0.5 = 1.65 > 1.2 with A > 0: clipped, no gradient.
    # ratio e^-0.5 = 0.61 < 0.8 with A < 0: clipped, no gradient.
    # ratio 1.65 with A < 0 and ratio 0.61 with A > 0: the unclipped term is the minimum, so the
    # gradient flows (PPO only stops the update from going further in the good direction).
    new = torch.tensor([[0.5], [-0.5], [0.5], [-0.5]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    mask = torch.ones(4, 1, dtype=torch.bool)
    ppo.ppo_policy_loss(new, old, adv, mask, 0.2).backward()
    g = new.grad.flatten()
    assert g[0] == 0 and g[1] == 0
    # d/dx of -(e^x * A)/4 at x: -A e^x / 4
    assert float(g[2]) == pytest.approx(math.exp(0.5) / 4, rel=1e-6)
    assert float(g[3]) == pytest.approx(-math.exp(-0.5) / 4, rel=1e-6)


def test_pg_and_ppo_gradients_agree_when_the_ratio_is_one():
    _, old, adv, mask = random_batch(seed=1)
    a = old.clone().requires_grad_(True)
    b = old.clone().requires_grad_(True)
    ppo.ppo_policy_loss(a, old, adv, mask, 0.2).backward()
    ppo.pg_loss(b, adv, mask).backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert a.grad.abs().sum() > 0


def test_approx_kl_is_the_k3_estimate_of_kl_from_the_sampling_policy():
    """approx_kl = mean over valid tokens of (r_t - 1) - log r_t, r_t = pi / pi_old: by hand at
    r = 0.5 and 2 (a masked token left out); and on many tokens drawn from pi_old, its mean is
    KL(pi_old || pi) = sum_y pi_old(y) log(pi_old(y) / pi(y)) of two small categoricals."""
    lp = torch.log(torch.tensor([[0.25, 0.4, 0.9]]))
    old = torch.log(torch.tensor([[0.5, 0.2, 0.1]]))
    mask = torch.tensor([[True, True, False]])
    by_hand = ((0.5 - 1 - math.log(0.5)) + (2 - 1 - math.log(2))) / 2
    assert float(ppo.approx_kl(lp, old, mask)) == pytest.approx(by_hand, rel=1e-6)
    p_old, p_new = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    y = torch.multinomial(
        p_old, 200_000, replacement=True, generator=torch.Generator().manual_seed(0)
    )[None]
    estimate = float(
        ppo.approx_kl(p_new.log()[y], p_old.log()[y], torch.ones_like(y, dtype=torch.bool))
    )
    exact = float((p_old * (p_old / p_new).log()).sum())
    assert estimate == pytest.approx(exact, rel=0.02)


def test_value_loss_group_baseline_and_whitening():
    assert float(
        ppo.value_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0]))
    ) == pytest.approx((1 + 4) / 2)
    # prompt 0: rewards 1, 2, 6 -> the others' means (2+6)/2, (1+6)/2, (1+2)/2; prompt 1: 0, 0, 3
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    assert ppo.group_baseline(r, 3).tolist() == [4.0, 3.5, 1.5, 1.5, 1.5, 0.0]
    w = ppo.whiten(torch.tensor([1.0, 2.0, 3.0, 10.0]))
    assert float(w.mean()) == pytest.approx(0, abs=1e-6) and float(
        w.std(unbiased=False)
    ) == pytest.approx(1, rel=1e-5)


def test_advantage_by_hand():
    """A = R - b(x), §4, one number per candidate. Two prompts x N = 2 candidates: returns
    1, 3 | 0, 4, V_old(x) = 0.5 for prompt 0 and 2 for prompt 1 (repeated over its candidates)."""
    returns = torch.tensor([1.0, 3.0, 0.0, 4.0])
    values = torch.tensor([0.5, 0.5, 2.0, 2.0])
    assert ppo.advantage(returns, values, "value", 2).tolist() == [0.5, 2.5, -2.0, 2.0]
    # group: each candidate minus the other candidate of its prompt: 1 - 3, 3 - 1, 0 - 4, 4 - 0
    assert ppo.advantage(returns, values, "group", 2).tolist() == [-2.0, 2.0, -4.0, 4.0]
    none = ppo.advantage(returns, values, "none", 2)
    assert none.tolist() == [1.0, 3.0, 0.0, 4.0] and none.data_ptr() != returns.data_ptr()


def test_kl_estimates_and_diagnostics_on_hand_worked_cases():
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0]])
    mask = torch.tensor([[True, True, False]])
    # k1 summed over the 2 valid tokens: (-1 + 1.5) + (-2 + 2) = 0.5
    assert ppo.kl_to_reference(lp.detach(), ref, mask).tolist() == [0.5]
    # k3 per token with d = ref - lp: d = -0.5 -> e^-0.5 - 1 + 0.5; d = 0 -> 0; mean over 2 tokens
    assert float(ppo.k3_kl(lp.detach(), ref, mask)) == pytest.approx(
        (math.exp(-0.5) - 0.5) / 2, rel=1e-6
    )
    assert float(ppo.approx_kl(lp, lp, mask)) == 0
    # ratios e^0.1 (inside 1 +- 0.2) and e^0.3 (outside): half the valid tokens clip
    assert (
        float(ppo.clip_fraction(torch.tensor([[0.1, 0.3, 5.0]]), torch.zeros(1, 3), mask, 0.2))
        == 0.5
    )
    t = torch.tensor([1.0, 2.0, 3.0])
    assert ppo.explained_variance(t, t) == 1.0
    assert ppo.explained_variance(torch.full((3,), 2.0), t) == pytest.approx(0.0)


def test_adaptive_kl_controller():
    c = ppo.AdaptiveKLController(0.1, target=1.0, horizon=100)
    # KL 2x target: error clipped to +0.2, times 50 samples / horizon 100 -> coef * 1.1
    assert c.update(2.0, 50) == pytest.approx(0.11)
    # KL 0.9 of target: error -0.1 -> * 0.95
    assert c.update(0.9, 50) == pytest.approx(0.11 * 0.95)


@pytest.mark.parametrize("greedy", [False, True])
def test_a_step_shares_one_softmax_and_reproduces_each_formula_apart(greedy):
    """`Steps.step` computes the softmax and the logsumexp once for the draw, the log-probability,
    the certainty and the entropy; each equals, bit for bit, its formula computed on its own."""
    from sampling import Steps, sample_next, token_entropy, token_self_certainty

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 20_000, generator=g) * 4  # above CDF_DRAW_FROM: the two-stage draw
    steps = Steps(
        5,
        "cpu",
        temperature=0.7,
        top_k=None,
        top_p=None,
        greedy=greedy,
        generator=torch.Generator().manual_seed(3),
        eos_id=-1,
        pad_id=0,
        record=False,
    )
    tokens = steps.step(logits)
    z = logits / 0.7
    want = z.argmax(-1) if greedy else sample_next(z, generator=torch.Generator().manual_seed(3))
    assert torch.equal(tokens, want)
    r = steps.rollout()
    picked = z.gather(-1, want[:, None])[:, 0]
    assert torch.equal(r.logprobs[:, 0], picked - torch.logsumexp(z, -1))
    log_softmax = torch.log_softmax(z, -1).gather(-1, want[:, None])[:, 0]  # a second route
    torch.testing.assert_close(r.logprobs[:, 0], log_softmax, atol=1e-5, rtol=0)
    assert torch.equal(r.certainty[:, 0], token_self_certainty(z))
    assert torch.equal(r.entropy[:, 0], token_entropy(z))


def test_token_entropy_of_uniform_logits_is_log_v():
    logits = torch.zeros(2, 3, 8)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert float(ppo.mean_entropy(logits, mask)) == pytest.approx(math.log(8), rel=1e-6)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(algo="dpo"), "algo"),
        (dict(baseline="group", num_samples=1), "num_samples"),
        (dict(num_samples=0), "num_samples"),
        (dict(lr=float("nan")), "lr"),
        (dict(lr=-1e-4), "lr"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(prompts_per_iter=64, minibatches=3), "minibatches"),
        (dict(kl_target=1.0, kl_coef=0.0), "kl_target"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(clip_eps=float("inf")), "clip_eps"),
    ],
)
def test_config_is_checked(kw, field):
    with pytest.raises(ConfigError) as e:
        ppo.PPOConfig(**kw)
    assert e.value.field == field
    ppo.PPOConfig(
        kl_target=1.0, kl_coef=0.1, prompts_per_iter=64, minibatches=4
    )  # the legal neighbours


# ---- one rollout and update on a small model ----------------------------------------------


def small_policy(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=12,
        d_model=32,
        n_heads=4,
        n_enc_layers=1,
        n_dec_layers=2,
        d_ff=64,
        max_src_len=12,
        max_tgt_len=16,
        last_layers=2,
    )
    m = EncoderDecoder(cfg).eval()
    with torch.no_grad():
        m.dec_ln.weight.mul_(6)
    return m


def setup_rollout(baseline="value", sp=SP, **kw):
    policy = small_policy()
    ref = small_policy()
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, 12, (3, 6), generator=g)
    src[2, 4:] = 0
    src[:, 3] = 2  # an EOS inside the prompt: a special token
    src_mask = src != 0
    idf = torch.linspace(0.1, 2.0, 12)
    content = torch.arange(12) >= 4
    salient = SalientTokens(idf, content, [f" t{i}" for i in range(12)])
    cfg = ppo.PPOConfig(
        num_samples=3, prompts_per_iter=3, max_new_tokens=10, baseline=baseline, lr=1e-3, **kw
    )
    experience, _ = ppo.collect(
        policy,
        ref,
        src,
        src_mask,
        ppo.RLTask([], specials=sp, salient=salient, reward_cfg=RewardConfig()),
        cfg,
        kl_coef=0.1,
        generator=torch.Generator().manual_seed(1),
    )
    return policy, ref, experience, cfg, salient


def test_reward_is_computed_on_the_attention_the_policy_really_had():
    policy, ref, experience, cfg, salient = setup_rollout()
    # The decoder input stored with the rollout: BOS (1), then the
    # sampled tokens shifted right by one.
    tgt_in = torch.cat([torch.ones_like(experience.tokens[:, :1]), experience.tokens[:, :-1]], 1)
    assert torch.equal(experience.tgt_in, tgt_in) and torch.equal(
        ppo.decoder_input(experience.tokens, SP.start), tgt_in
    )
    # The prompt's special tokens are its EOS at position 3 (src holds no
    # other id below 4; pads are masked).
    special = torch.zeros_like(experience.src_mask)
    special[:, 3] = True
    assert torch.equal(model.special_mask(experience.src, experience.src_mask, SP.special), special)
    # A fresh teacher-forced pass over the sampled responses gives the
    # same Abar, hence the same reward.
    _, abar = policy(
        experience.src,
        experience.src_mask,
        tgt_in,
        num_samples=3,
        record="mean",
        tgt_mask=experience.mask,
    )
    rep = lambda x: x.repeat_interleave(3, 0)
    fresh = compute_reward(
        abar,
        experience.tokens,
        experience.mask,
        rep(salient(experience.src, experience.src_mask, RewardConfig())),
        RewardConfig(),
        special=rep(special),
    )
    for k in ("reward", "coverage", "focus", "repeat", "sink_share"):
        torch.testing.assert_close(experience.terms[k], fresh[k], atol=1e-5, rtol=0)
    # The experience's pieces: returns = R - kl_coef * KL to the frozen
    # SFT copy; A = returns - V_old(x)
    torch.testing.assert_close(
        experience.returns, experience.terms["reward"] - 0.1 * experience.terms["kl_ref"]
    )
    torch.testing.assert_close(experience.advantages, experience.returns - experience.values)
    assert (experience.terms["sink_share"] > 0).all()


# T5's convention: the decoder starts from pad (0). The update must feed the decoder the rollout's
# own input (experience.tgt_in), or the first epoch's ratio would not be 1.
T5_LIKE = data.Specials(pad=0, start=0, eos=2, special=(0, 1, 2, 3))


@pytest.mark.parametrize("sp", [SP, T5_LIKE], ids=["bos-start", "pad-start"])
def test_first_epoch_ratio_is_one_and_an_update_moves_the_policy(sp):
    policy, _, experience, cfg, _ = setup_rollout(baseline="group", sp=sp)
    assert (experience.tgt_in[:, 0] == sp.start).all() and torch.equal(
        experience.tgt_in[:, 1:], experience.tokens[:, :-1]
    )
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    stats = ppo.update(policy, opt, experience, cfg)
    # ratio 1 up to float32 rounding: exp(d) - 1 - d with |d| < 1e-6 is noise of order 1e-8
    assert stats["approx_kl"] < 1e-7 and stats["clipfrac"] == 0
    assert stats["skipped"] == 0
    assert any(
        not torch.equal(before[k], v)
        for k, v in policy.state_dict().items()
        if "value_head" not in k
    )


def test_value_warmup_moves_only_the_value_head():
    policy, _, experience, cfg, _ = setup_rollout()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    ppo.update(policy, opt, experience, cfg, value_only=True)
    after = policy.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("value_head.") for k in changed)


def test_a_non_finite_update_is_skipped_and_never_applied():
    policy, _, experience, cfg, _ = setup_rollout()
    experience.advantages[0] = float("nan")
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    stats = ppo.update(policy, opt, experience, cfg)
    assert stats["skipped"] == 1
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_the_loop_raises_a_reward_it_can_see():
    """The machinery end to end, on a reward whose optimum is known: the share of token 7 in the
    response. collect + update must drive it from chance (~1/12) to most of the response; a sign
    error anywhere (advantage, ratio, baseline) would drive it down."""
    policy, ref = small_policy(), small_policy()
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, 12, (8, 6), generator=g)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    salient = SalientTokens(torch.ones(12), torch.arange(12) >= 4, [f" t{i}" for i in range(12)])
    cfg = ppo.PPOConfig(
        num_samples=4,
        prompts_per_iter=8,
        max_new_tokens=8,
        baseline="group",
        lr=1e-3,
        top_k=None,
        epochs=2,
    )
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(1)

    def share_of_7(src, src_mask, r, terms):  # the reward, given to collect
        return ((r.tokens == 7) & r.mask).sum(1).float() / r.mask.sum(1)

    shares = []
    for _ in range(12):
        experience, _ = ppo.collect(
            policy,
            ref,
            src,
            src_mask,
            ppo.RLTask(
                [], specials=SP, salient=salient, reward_cfg=RewardConfig(), reward_fn=share_of_7
            ),
            cfg,
            0.0,
            gen,
        )
        ppo.update(policy, opt, experience, cfg)
        shares.append(float(experience.terms["reward"].mean()))
    assert shares[0] < 0.2 and shares[-1] > 0.8, shares


# ---- collect's returns and advantages against computations by hand -----------------------------


def teacher_forced_logprobs(model, experience, temperature):
    """log softmax(logits / T)[y_t] of every sampled token, one (prompt, candidate) at a time."""
    out = torch.zeros(experience.tokens.shape)
    for row in range(experience.tokens.size(0)):
        b = row // 3
        n = int(experience.mask[row].sum())
        y = experience.tokens[row, :n][None]
        logits, _ = model(
            experience.src[b : b + 1],
            experience.src_mask[b : b + 1],
            torch.cat([torch.ones_like(y[:, :1]), y[:, :-1]], 1),
        )
        out[row, :n] = (
            torch.log_softmax(logits[0].double() / temperature, -1)
            .gather(-1, y[0, :, None])[:, 0]
            .float()
        )
    return out


def test_kl_penalised_return_in_collect_against_a_reference_that_differs():
    """returns = R - kl_coef * sum_t (log pi(y_t) - log pi_sft(y_t)),
    both at the sampling temperature."""
    policy, _, _, _, salient = setup_rollout()
    ref = small_policy(seed=5)  # another model: the KL is far from 0
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, 12, (3, 6), generator=g)
    cfg = ppo.PPOConfig(
        num_samples=3, prompts_per_iter=3, max_new_tokens=10, baseline="none", temperature=0.7
    )
    experience, _ = ppo.collect(
        policy,
        ref,
        src,
        src != 0,
        ppo.RLTask([], specials=SP, salient=salient, reward_cfg=RewardConfig()),
        cfg,
        kl_coef=0.5,
        generator=torch.Generator().manual_seed(1),
    )
    with torch.no_grad():
        kl = (
            teacher_forced_logprobs(policy, experience, 0.7)
            - teacher_forced_logprobs(ref, experience, 0.7)
        ).sum(1)
    assert kl.abs().min() > 0.05  # the two models really differ
    torch.testing.assert_close(experience.terms["kl_ref"], kl, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        experience.returns, experience.terms["reward"] - 0.5 * kl, atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(experience.advantages, experience.returns)  # baseline "none": A = R


def test_group_baseline_on_penalised_returns_then_whitening_inside_collect():
    policy, _, _, _, salient = setup_rollout()
    ref = small_policy(seed=5)
    src = torch.randint(4, 12, (4, 6), generator=torch.Generator().manual_seed(2))
    cfg = ppo.PPOConfig(
        num_samples=3, prompts_per_iter=4, max_new_tokens=10, baseline="group", whiten=True
    )
    experience, _ = ppo.collect(
        policy,
        ref,
        src,
        src != 0,
        ppo.RLTask([], specials=SP, salient=salient, reward_cfg=RewardConfig()),
        cfg,
        kl_coef=0.3,
        generator=torch.Generator().manual_seed(3),
    )
    returns = (experience.terms["reward"] - 0.3 * experience.terms["kl_ref"]).double().tolist()
    centred = []
    for b in range(4):  # each candidate minus its 2 siblings' mean
        group = returns[3 * b : 3 * b + 3]
        centred += [r - (sum(group) - r) / 2 for r in group]
    mean = sum(centred) / len(centred)
    std = math.sqrt(sum((c - mean) ** 2 for c in centred) / len(centred))
    expected = torch.tensor([(c - mean) / (std + 1e-8) for c in centred], dtype=torch.float64)
    torch.testing.assert_close(experience.advantages.double(), expected, atol=1e-5, rtol=1e-5)


def test_advantage_uses_a_trained_value_head_and_the_value_regression_lowers_its_loss():
    """A = R - V_old(x) with V fitted: after value-only updates (which lower the
    value loss), V(x) is far from 0 and the advantages are the returns minus V
    computed by hand from the head's weights."""
    policy, _, experience, cfg, salient = setup_rollout(baseline="value")
    opt = torch.optim.Adam(policy.parameters(), lr=3e-2)
    losses = [
        ppo.update(policy, opt, experience, cfg, value_only=True)["value_loss"] for _ in range(30)
    ]
    assert losses[-1] < 0.2 * losses[0]
    new, _ = ppo.collect(
        policy,
        small_policy(),
        experience.src,
        experience.src_mask,
        ppo.RLTask([], specials=SP, salient=salient, reward_cfg=RewardConfig()),
        cfg,
        kl_coef=0.1,
        generator=torch.Generator().manual_seed(4),
    )
    with torch.no_grad():
        memory = policy.encode(experience.src, experience.src_mask)  # (B, S, D)
        head = policy.value_head
        v = []
        for b in range(experience.src.size(0)):  # mean over real prompt tokens, MLP by hand
            pooled = memory[b, experience.src_mask[b]].mean(0)
            v.append(
                float(
                    head.out.weight[0] @ torch.tanh(head.hidden.weight @ pooled + head.hidden.bias)
                    + head.out.bias[0]
                )
            )
    values = torch.tensor(v).repeat_interleave(3)
    assert values.abs().min() > 0.05
    torch.testing.assert_close(new.values, values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new.advantages, new.returns - values, atol=1e-5, rtol=1e-5)


def test_masking_comes_before_exp_at_positions_after_eos():
    """After EOS the log-probability of PAD can be below -88 (seen: -120), where exp(difference)
    overflows; every estimate masks first, so the loss and its gradient stay finite and equal the
    values over the valid tokens alone."""
    lp = torch.tensor([[-0.5, -1.0, -120.0, -300.0]], requires_grad=True)
    ref = torch.tensor([[-0.7, -0.4, 0.0, 0.0]])
    old = torch.tensor([[-0.6, -1.1, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False, False]])
    d = [-0.7 + 0.5, -0.4 + 1.0]  # log pi_ref - log pi on the two valid tokens
    assert float(ppo.k3_kl(lp.detach(), ref, mask)) == pytest.approx(
        sum(math.exp(x) - 1 - x for x in d) / 2, rel=1e-6
    )
    assert ppo.kl_to_reference(lp.detach(), ref, mask).tolist() == pytest.approx([0.2 - 0.6])
    r = [math.exp(0.1), math.exp(0.1)]  # ratios on the valid tokens
    assert float(ppo.approx_kl(lp.detach(), old, mask)) == pytest.approx(
        sum(x - 1 - math.log(x) for x in r) / 2, rel=1e-5
    )
    assert float(ppo.clip_fraction(lp.detach(), old, mask, 0.2)) == 0.0
    loss = ppo.ppo_policy_loss(lp, old, torch.tensor([2.0]), mask) + 0.0 * ppo.k3_kl(lp, ref, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all() and (lp.grad[0, 2:] == 0).all()


def test_an_update_with_extreme_log_probs_after_eos_is_applied_when_k3_is_off():
    policy, _, experience, cfg, _ = setup_rollout(baseline="group")
    experience.ref_logprobs = torch.where(
        experience.mask, experience.ref_logprobs, torch.full_like(experience.ref_logprobs, -1e4)
    )
    assert (~experience.mask).any()
    stats = ppo.update(
        policy, torch.optim.Adam(policy.parameters(), lr=cfg.lr), experience, cfg
    )  # kl_k3_coef 0
    assert stats["skipped"] == 0 and stats["applied"] == 1 and math.isfinite(stats["k3_kl"])


def test_the_adaptive_kl_controller_moves_kl_coef_inside_the_loop():
    """Each logged kl_coef is the previous one moved by the controller (Ziegler et al.): times
    1 + clip(KL / target - 1, -0.2, 0.2) * samples / horizon, from the KL that iteration logged."""
    policy, ref = small_policy(), small_policy(seed=5)
    prompts = [[4 + (i * 5 + j) % 8 for j in range(4)] + [2] for i in range(12)]
    salient = SalientTokens(torch.ones(12), torch.arange(12) >= 4, [f" t{i}" for i in range(12)])
    cfg = ppo.PPOConfig(
        prompts_per_iter=4,
        num_samples=2,
        max_new_tokens=6,
        baseline="group",
        lr=1e-3,
        kl_coef=0.2,
        kl_target=0.5,
        kl_horizon=40,
    )
    rows = ppo.train(
        policy,
        ref,
        torch.optim.Adam(policy.parameters(), lr=1e-3),
        ppo.RLTask(prompts, specials=SP, salient=salient, reward_cfg=RewardConfig()),
        cfg,
        ppo.RLRun(4, seed=0),
    )
    coef = 0.2
    for row in rows:
        assert row["kl_coef"] == pytest.approx(coef)
        coef *= 1 + min(max(row["kl_ref"] / 0.5 - 1, -0.2), 0.2) * 8 / 40
    assert len({round(r["kl_coef"], 9) for r in rows}) == 4  # it moved every iteration


# ---- on-policy sampling (DECISIONS.md §3) ----------------------------------------------------


def test_an_rl_rollout_draws_from_the_full_softmax_at_the_rl_temperature():
    """The first tokens of 6,000 RL candidates, against softmax(logits / T) from a
    separate teacher-forced pass: total-variation distance under 0.05 (its expectation
    here is about 0.02)."""
    policy, T, n = small_policy(), 0.7, 6000
    src = torch.tensor([[5, 6, 7, 8, 2]])
    cfg = ppo.PPOConfig(num_samples=n, prompts_per_iter=1, max_new_tokens=1, temperature=T)
    salient = SalientTokens(torch.ones(12), torch.arange(12) >= 4, [f" t{i}" for i in range(12)])
    rollout, *_ = ppo.sample_and_score(
        policy, src, src > 0, salient, RewardConfig(), cfg, SP, torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        logits, _ = policy(src, src > 0, torch.tensor([[SP.start]]))  # (1, 1, V)
    expected = torch.softmax(logits[0, 0].double() / T, -1).numpy()
    counts = np.bincount(rollout.tokens[:, 0].numpy(), minlength=12) / n
    assert 0.5 * np.abs(counts - expected).sum() < 0.05
    assert (
        counts[expected < 0.01] > 0
    ).all()  # the tail (5 ids under 1%, 11+ draws expected each) is drawn


@pytest.mark.parametrize("kw", [dict(top_k=50), dict(top_p=0.9)])
def test_rl_refuses_top_k_and_top_p(kw):
    cfg = ppo.PPOConfig(**kw)  # legal for --stage sample ...
    with pytest.raises(ConfigError, match="none in RL"):  # ... refused by RL before any work
        ppo.train(
            small_policy(),
            small_policy(),
            None,
            ppo.RLTask([[5, 6, 2]], specials=SP, salient=None, reward_cfg=RewardConfig()),
            cfg,
            ppo.RLRun(1),
        )
