"""Tests for reward.py: the CAGSR reward of §3.2 and the decisions of DECISIONS.md §2.

Every expected number is either worked out by hand from the paper's equations (the arithmetic is
in the comments) or computed independently here, with plain loops over numpy arrays:

    coverage(x, y) = 1 / (|y| |I_x|) * sum_t sum_{j in I_x} Abar[t, j]
    entropy(A_t)   = - sum_j Abar[t, j] log Abar[t, j]
    focus(x, y)    = - (1/|y|) * sum_t entropy(A_t)
    R(x, y)        = alpha * coverage + beta * focus - gamma * repeatPenalty(y)

Coverage, focus and the repetition penalty on hand-computed cases; ablations remove exactly their
term; a step that looks only at the attention sink gets the least focus under `--exclude-special`;
every term is finite for empty and one-token responses; the salient-token rules against an
independent reading of the tokens.
"""

import math
import re

import numpy as np
import pytest
import torch

import data
import reward
import synthetic
from reward import RewardConfig, compute_reward, coverage, focus, repeat_penalty

LOG2, LOG4 = math.log(2), math.log(4)


def approx(x):
    return pytest.approx(x, rel=1e-5, abs=1e-6)


def close(got, expected):
    """Tensor comparison for 2-D results (pytest.approx takes flat sequences only)."""
    torch.testing.assert_close(
        got.float(), torch.as_tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6
    )


def test_response_mean_averages_over_each_response_and_never_reads_past_eos():
    # (1 + 2 + 3) / 3 = 2; 4 / 1 = 4; an empty response gives 0. The values past EOS (inf, nan)
    # are never read.
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[1.0, 2.0, 3.0, inf], [4.0, 5.0, nan, nan], [nan, 7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert reward.response_mean(x, mask).tolist() == [2.0, 4.0, 0.0]


# ----------------------------------------------------------------- a hand-made batch
# B = 2 candidates, T = 3 response steps, S = 4 prompt positions.
HAND_ATTN = torch.tensor(
    [
        [
            [0.10, 0.20, 0.30, 0.40],
            [0.25, 0.25, 0.25, 0.25],
            [0.70, 0.10, 0.10, 0.10],
        ],  # after EOS in candidate 0 (mask False): must not count
        [[0.50, 0.50, 0.00, 0.00], [0.00, 0.00, 1.00, 0.00], [0.10, 0.20, 0.30, 0.40]],
    ]
)
HAND_MASK = torch.tensor(
    [
        [True, True, False],  # |y| = 2 (the response stops before T)
        [True, True, True],
    ]
)  # |y| = 3


# --------------------------------------------------------------------------- coverage
def test_coverage_hand_computed_bool_salient():
    salient = torch.tensor(
        [
            [False, True, True, False],  # I_x = {1, 2}, |I_x| = 2
            [True, False, False, True],
        ]
    )  # I_x = {0, 3}, |I_x| = 2
    # candidate 0: t=0: 0.20 + 0.30 = 0.5; t=1: 0.25 + 0.25 = 0.5; t=2 masked out.
    #   coverage = (0.5 + 0.5) / (|y| = 2 * |I_x| = 2) = 1/4
    # candidate 1: t=0: 0.5 + 0 = 0.5; t=1: 0 + 0 = 0; t=2: 0.1 + 0.4 = 0.5.
    #   coverage = (0.5 + 0 + 0.5) / (3 * 2) = 1/6
    assert coverage(HAND_ATTN, salient, HAND_MASK).tolist() == approx([1 / 4, 1 / 6])
    # 0/1 float weights are the same thing (DECISIONS.md §2: the paper's
    # formula when the weights are 0/1).
    assert coverage(HAND_ATTN, salient.float(), HAND_MASK).tolist() == approx([1 / 4, 1 / 6])


def test_coverage_hand_computed_idf_weights():
    # DECISIONS.md §2: sum_t sum_j w_j Abar[t, j] / (|y| * sum_j w_j).
    w = torch.tensor(
        [
            [0.0, 1.0, 3.0, 0.0],  # sum w = 4
            [2.0, 0.0, 0.0, 1.0],
        ]
    )  # sum w = 3
    # candidate 0: t=0: 1*0.20 + 3*0.30 = 1.1; t=1: 1*0.25 + 3*0.25 = 1.0.
    #   coverage = 2.1 / (2 * 4) = 0.2625
    # candidate 1: t=0: 2*0.5 = 1.0; t=1: 0; t=2: 2*0.1 + 1*0.4 = 0.6.
    #   coverage = 1.6 / (3 * 3) = 0.17777...
    assert coverage(HAND_ATTN, w, HAND_MASK).tolist() == approx([2.1 / 8, 1.6 / 9])


def test_coverage_no_salient_token_is_exactly_zero():
    for none in (torch.zeros(2, 4, dtype=torch.bool), torch.zeros(2, 4)):
        cov = coverage(HAND_ATTN, none, HAND_MASK)
        assert torch.isfinite(cov).all()
        assert cov.tolist() == [0.0, 0.0]
    # One prompt without salient tokens does not disturb the other.
    salient = torch.tensor([[False, False, False, False], [True, False, False, True]])
    assert coverage(HAND_ATTN, salient, HAND_MASK).tolist() == approx([0.0, 1 / 6])


def test_coverage_ignores_positions_after_eos():
    salient = torch.tensor([[False, True, True, False], [True, False, False, True]])
    noisy = HAND_ATTN.clone()
    noisy[0, 2] = torch.tensor([0.0, 5.0, 7.0, 0.0])  # garbage where the mask is False
    assert coverage(noisy, salient, HAND_MASK).tolist() == approx([1 / 4, 1 / 6])


# ------------------------------------------------------------------------------ focus
FOCUS_ATTN = torch.tensor(
    [
        [
            [0.25, 0.25, 0.25, 0.25],  # uniform over 4: H = log 4
            [0.00, 0.00, 1.00, 0.00],  # one-hot: H = -1 log 1 - 3 * (0 log 0 = 0) = 0
            [0.50, 0.50, 0.00, 0.00],
        ],  # H = -2 * 0.5 log 0.5 = log 2
        [
            [0.50, 0.50, 0.00, 0.00],  # log 2
            [0.25, 0.25, 0.25, 0.25],  # log 4
            [0.90, 0.10, 0.00, 0.00],
        ],  # after EOS (mask False)
    ]
)
FOCUS_MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_entropy_hand_computed():
    h = reward.attention_entropy(FOCUS_ATTN)
    assert torch.isfinite(h).all()  # 0 log 0 = 0, not NaN
    assert h[0].tolist() == approx([LOG4, 0.0, LOG2])
    assert h[1, :2].tolist() == approx([LOG2, LOG4])


def test_focus_hand_computed():
    # candidate 0: -(log 4 + 0 + log 2) / 3 = -(3 log 2) / 3 = -log 2
    # candidate 1: -(log 2 + log 4) / 2 = -(3 log 2) / 2   (t=2 is after EOS)
    assert focus(FOCUS_ATTN, FOCUS_MASK).tolist() == approx([-LOG2, -1.5 * LOG2])


def test_focus_entropy_floor_clamps_each_step():
    # floor 0.3: the one-hot step counts as 0.3, the others are above it and unchanged.
    # candidate 0: -(log 4 + 0.3 + log 2) / 3;  candidate 1: -(log 2 + log 4) / 2 (both above 0.3)
    got = focus(FOCUS_ATTN, FOCUS_MASK, entropy_floor=0.3)
    assert got.tolist() == approx([-(LOG4 + 0.3 + LOG2) / 3, -1.5 * LOG2])
    # A floor above every step's entropy (max is log 4 = 1.386) makes every step count as the floor.
    assert focus(FOCUS_ATTN, FOCUS_MASK, entropy_floor=2.0).tolist() == approx([-2.0, -2.0])


def _np_entropy(p, tau=1.0):
    """Entropy of one distribution after temperature scaling p^(1/tau) / sum, with 0 log 0 = 0."""
    q = np.asarray(p, dtype=np.float64) ** (1.0 / tau)
    q = q / q.sum()
    nz = q[q > 0]
    return float(-(nz * np.log(nz)).sum())


@pytest.mark.parametrize("tau", [0.5, 2.0, 1.0])
def test_focus_temperature_matches_numpy(tau):
    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(3, 5, 6, generator=g) * 2, -1)
    attn[:, :, -1] = 0.0  # a padded prompt position
    attn = attn / attn.sum(-1, keepdim=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    expected = []
    for b in range(3):
        hs = [_np_entropy(attn[b, t].numpy(), tau) for t in range(5) if mask[b, t]]
        expected.append(-sum(hs) / len(hs))
    assert focus(attn, mask, temperature=tau).tolist() == approx(expected)
    # and the temperature reaches focus through RewardConfig
    terms = compute_reward(
        attn,
        torch.full((3, 5), 7),
        mask,
        torch.ones(3, 6, dtype=torch.bool),
        RewardConfig(attn_temperature=tau),
    )
    assert terms["focus"].tolist() == approx(expected)
    if tau < 1:  # sharper attention, lower entropy, higher focus
        assert (terms["focus"] > focus(attn, mask)).all()


# --------------------------------------------------------------------- repeat penalty
def test_repeat_penalty_hand_computed():
    tokens = torch.tensor(
        [
            [5, 6, 5, 6, 2, 0, 0],  # mask 5: bigrams (5,6)(6,5)(5,6)(6,2)
            [2, 5, 6, 5, 6, 5, 6],  # mask 1: the response is just EOS, no bigram
            [7, 7, 7, 7, 7, 7, 7],  # mask 3: (7,7)(7,7), masked-out 7s ignored
            [5, 6, 5, 6, 5, 6, 5],
        ]
    )  # mask 0: nothing
    mask = torch.zeros(4, 7, dtype=torch.bool)
    for b, n in enumerate((5, 1, 3, 0)):
        mask[b, :n] = True
    # row 0: 4 bigrams, 3 distinct -> (4 - 3) / 4 = 0.25;  raw count 4 - 3 = 1
    # row 1: 0 bigrams -> 0
    # row 2: 2 bigrams, 1 distinct -> (2 - 1) / 2 = 0.5;   raw count 1
    # row 3: 0
    assert repeat_penalty(tokens, mask).tolist() == approx([0.25, 0.0, 0.5, 0.0])
    assert repeat_penalty(tokens, mask, count=True).tolist() == approx([1.0, 0.0, 1.0, 0.0])


def test_repeat_penalty_trigrams():
    tokens = torch.tensor([[5, 6, 5, 6, 5, 6, 2]])
    mask = torch.ones(1, 7, dtype=torch.bool)
    # n=3: (5,6,5)(6,5,6)(5,6,5)(6,5,6)(5,6,2): 5 trigrams, 3 distinct -> 2/5 = 0.4; count 2
    assert repeat_penalty(tokens, mask, n=3).tolist() == approx([0.4])
    assert repeat_penalty(tokens, mask, n=3, count=True).tolist() == approx([2.0])
    # n=2 for comparison: (5,6)(6,5)(5,6)(6,5)(5,6)(6,2): 6 bigrams, 3 distinct -> 3/6 = 0.5
    assert repeat_penalty(tokens, mask, n=2).tolist() == approx([0.5])
    # A response shorter than n has no n-gram: (5, 6) with n=3 -> 0
    assert repeat_penalty(tokens[:, :2], mask[:, :2], n=3).tolist() == [0.0]


# ----------------------------------------------------- the total reward, random inputs
def _random_batch(seed=0, B=4, T=6, S=7):
    """Abar as model.py records it: a distribution over the real prompt positions (0 on prompt
    padding) for each response token up to EOS, 0 after EOS. The prompt's last real token is EOS."""
    g = torch.Generator().manual_seed(seed)
    src_len = torch.tensor([7, 5, 4, 6])[:B]
    resp_len = torch.tensor([6, 3, 1, 0])[:B]
    real = torch.arange(S)[None, :] < src_len[:, None]  # (B, S)
    mask = torch.arange(T)[None, :] < resp_len[:, None]  # (B, T)
    logits = torch.randn(B, T, S, generator=g) * 2
    special = torch.arange(S)[None, :] == (src_len - 1)[:, None]  # EOS of the prompt
    logits = logits + 2.0 * special[:, None, :]  # make EOS a sink
    attn = torch.softmax(logits.masked_fill(~real[:, None, :], float("-inf")), -1)
    attn = attn * mask[:, :, None]
    tokens = torch.randint(4, 8, (B, T), generator=g)  # small range: repeats
    salient = (torch.rand(B, S, generator=g) < 0.5) & real & ~special
    salient[1] = False  # one prompt with none
    return attn, tokens, mask, salient, special, real


def _np_terms(attn, tokens, mask, salient, n=2, tau=1.0, floor=0.0):
    """coverage, focus, repeat per candidate, by the equations, with
    loops (independent of reward.py)."""
    A, tok, m, w = (
        x.double().numpy() if x.is_floating_point() else x.numpy()
        for x in (attn, tokens, mask, salient.double())
    )
    out = {"coverage": [], "focus": [], "repeat": []}
    for b in range(A.shape[0]):
        ts = [t for t in range(A.shape[1]) if m[b, t]]
        ny, wsum = len(ts), w[b].sum()
        cov = sum(w[b, j] * A[b, t, j] for t in ts for j in range(A.shape[2]))
        out["coverage"].append(cov / (ny * wsum) if ny and wsum > 0 else 0.0)
        hs = [max(_np_entropy(A[b, t], tau) if A[b, t].sum() > 0 else 0.0, floor) for t in ts]
        out["focus"].append(-sum(hs) / ny if ny else 0.0)
        y = [int(tok[b, t]) for t in ts]
        grams = [tuple(y[i : i + n]) for i in range(len(y) - n + 1)]
        out["repeat"].append((len(grams) - len(set(grams))) / len(grams) if grams else 0.0)
    return {k: np.array(v) for k, v in out.items()}


def test_compute_reward_paper_weights_match_independent_terms():
    attn, tokens, mask, salient, special, _ = _random_batch()
    ref = _np_terms(attn, tokens, mask, salient)
    assert ref["repeat"].max() > 0 and ref["coverage"].max() > 0  # the batch exercises every term
    terms = compute_reward(
        attn, tokens, mask, salient, RewardConfig()
    )  # alpha 1, beta 0.5, gamma 1
    for k in ("coverage", "focus", "repeat"):
        assert terms[k].tolist() == approx(ref[k].tolist()), k
    expected = 1.0 * ref["coverage"] + 0.5 * ref["focus"] - 1.0 * ref["repeat"]
    assert terms["reward"].tolist() == approx(expected.tolist())
    assert "sink_share" not in terms  # no special mask given, no sink share


@pytest.mark.parametrize(
    "weights",
    [
        dict(alpha=0.0),
        dict(beta=0.0),
        dict(gamma=0.0),
        dict(alpha=0.0, beta=0.0, gamma=0.0),
        dict(alpha=2.0, beta=0.1, gamma=3.0),
    ],
)
def test_compute_reward_ablations_remove_exactly_their_term(weights):
    attn, tokens, mask, salient, _, _ = _random_batch(seed=1)
    ref = _np_terms(attn, tokens, mask, salient)
    cfg = RewardConfig(**weights)
    full = compute_reward(attn, tokens, mask, salient, RewardConfig())
    got = compute_reward(attn, tokens, mask, salient, cfg)
    expected = cfg.alpha * ref["coverage"] + cfg.beta * ref["focus"] - cfg.gamma * ref["repeat"]
    assert got["reward"].tolist() == approx(expected.tolist())
    # the terms themselves do not depend on the weights
    for k in ("coverage", "focus", "repeat"):
        assert got[k].tolist() == approx(full[k].tolist())
    # full - ablated = exactly the removed terms (paper weights 1, 0.5, 1)
    removed = (
        (1.0 - cfg.alpha) * ref["coverage"]
        + (0.5 - cfg.beta) * ref["focus"]
        - (1.0 - cfg.gamma) * ref["repeat"]
    )
    assert (full["reward"] - got["reward"]).tolist() == approx(removed.tolist())


def test_compute_reward_options_reach_the_terms():
    attn, tokens, mask, salient, _, _ = _random_batch(seed=2)
    tokens[0] = torch.tensor([5, 6, 7, 5, 6, 7])  # 4 trigrams, 3 distinct: 1 repeat
    w = salient * torch.linspace(0.5, 3.0, salient.size(1))  # IDF-like weights
    cfg = RewardConfig(ngram=3, repeat_count=True, attn_temperature=0.7, entropy_floor=0.4)
    ref = _np_terms(attn, tokens, mask, w, n=3, tau=0.7, floor=0.4)
    got = compute_reward(attn, tokens, mask, w, cfg)
    assert got["coverage"].tolist() == approx(ref["coverage"].tolist())
    assert got["focus"].tolist() == approx(ref["focus"].tolist())
    # the raw count of repeated trigrams, by hand: count - distinct over the masked-in tokens
    counts = []
    for row, m in zip(tokens.tolist(), mask.tolist()):
        y = [t for t, keep in zip(row, m) if keep]
        grams = [tuple(y[i : i + 3]) for i in range(len(y) - 2)]
        counts.append(float(len(grams) - len(set(grams))))
    assert counts[0] == 1.0 and got["repeat"].tolist() == approx(counts)


def test_sink_share_matches_a_loop():
    attn, tokens, mask, salient, special, _ = _random_batch(seed=3)
    expected = []
    for b in range(attn.size(0)):
        ts = [t for t in range(attn.size(1)) if mask[b, t]]
        mass = [sum(float(attn[b, t, j]) for j in range(attn.size(2)) if special[b, j]) for t in ts]
        expected.append(sum(mass) / len(ts) if ts else 0.0)
    assert max(expected) > 0.1  # the sink takes a visible share
    for exclude in (False, True):  # measured before any exclusion
        terms = compute_reward(
            attn, tokens, mask, salient, RewardConfig(exclude_special=exclude), special
        )
        assert terms["sink_share"].tolist() == approx(expected)
    assert reward.sink_share(attn, special, mask).tolist() == approx(expected)


def test_exclude_special_renormalises_and_changes_focus():
    attn, tokens, mask, salient, special, real = _random_batch(seed=4)
    dropped = reward.drop_special(attn, special)
    keep = real & ~special  # non-special real tokens
    sums = dropped.sum(-1)
    assert sums[mask].tolist() == approx([1.0] * int(mask.sum()))  # every response step
    assert (dropped * ~keep[:, None, :]).abs().max() == 0  # nothing on EOS / padding
    assert (dropped[~mask] == 0).all()  # nothing after EOS
    # independent renormalisation: A[t, j] / sum_{j' non-special} A[t, j'] on the kept positions
    renorm = attn * keep[:, None, :]
    renorm = renorm / renorm.sum(-1, keepdim=True).clamp(min=1e-30)
    ref = _np_terms(renorm, tokens, mask, salient)
    base = compute_reward(attn, tokens, mask, salient, RewardConfig(), special)
    excl = compute_reward(attn, tokens, mask, salient, RewardConfig(exclude_special=True), special)
    assert excl["focus"].tolist() == approx(ref["focus"].tolist())
    assert excl["coverage"].tolist() == approx(ref["coverage"].tolist())
    assert excl["repeat"].tolist() == approx(base["repeat"].tolist())
    has_tokens = mask.any(-1)
    assert (excl["focus"][has_tokens] != base["focus"][has_tokens]).all()


def test_exclude_special_without_special_mask_raises():
    attn, tokens, mask, salient, _, _ = _random_batch()
    with pytest.raises(ValueError, match="special"):
        compute_reward(attn, tokens, mask, salient, RewardConfig(exclude_special=True))


@pytest.mark.parametrize(
    "cfg",
    [
        RewardConfig(),
        RewardConfig(attn_temperature=0.5, entropy_floor=0.3),
        RewardConfig(exclude_special=True, ngram=3, repeat_count=True),
    ],
)
def test_every_term_finite_for_responses_of_length_0_and_1(cfg):
    S, T = 4, 3
    attn = torch.zeros(2, T, S)
    attn[1, 0] = torch.tensor([0.1, 0.6, 0.0, 0.3])  # length 1: only EOS was generated
    tokens = torch.tensor([[0, 0, 0], [2, 0, 0]])  # 2: <eos> of our tokenizer, 0: <pad>
    mask = torch.tensor([[False, False, False], [True, False, False]])
    special = torch.tensor([[False, False, False, True]] * 2)
    for salient in (
        torch.tensor([[True, True, False, False]] * 2),
        torch.tensor([[0.0, 2.0, 1.0, 0.0]] * 2),
    ):
        terms = compute_reward(attn, tokens, mask, salient, cfg, special)
        for k, v in terms.items():
            assert torch.isfinite(v).all(), k
        for k in ("reward", "coverage", "focus", "repeat", "sink_share"):
            assert terms[k][0].item() == 0.0, k  # length 0: every term exactly 0
        assert terms["repeat"][1].item() == 0.0  # one token: no bigram
        assert terms["sink_share"][1].item() == approx(0.3)  # 0.3 on the special position
    # the plain config, length 1, bool salient {0, 1}: coverage = (0.1 + 0.6) / (1 * 2) = 0.35,
    # focus = -H([0.1, 0.6, 0, 0.3])
    terms = compute_reward(
        attn, tokens, mask, torch.tensor([[True, True, False, False]] * 2), RewardConfig()
    )
    assert terms["coverage"][1].item() == approx(0.35)
    assert terms["focus"][1].item() == approx(-_np_entropy([0.1, 0.6, 0.0, 0.3]))


def test_exclude_special_step_all_on_special_tokens_gets_the_least_focus():
    # Prompt: 2 real tokens, 1 special (EOS), 1 padding. Step 0 attends only to EOS: nothing is left
    # after the exclusion, so it becomes uniform over the 2 real non-special tokens,
    # [1/2, 1/2, 0, 0]: entropy log 2 (the most a 2-token distribution can have), coverage of
    # salient {0} = 1/2.
    # Step 1 attends [0.2, 0.6, 0.2, 0] -> [0.25, 0.75, 0, 0]. Step 2 is after EOS: stays zero.
    attn = torch.tensor([[[0.0, 0.0, 1.0, 0.0], [0.2, 0.6, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    special = torch.tensor([[False, False, True, False]])
    prompt_mask = torch.tensor([[True, True, True, False]])
    dropped = reward.drop_special(attn, special, prompt_mask)
    assert dropped[0].flatten().tolist() == approx(
        [0.5, 0.5, 0.0, 0.0, 0.25, 0.75, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    )
    mask = torch.tensor([[True, True, False]])
    terms = compute_reward(
        attn,
        torch.tensor([[5, 2, 0]]),
        mask,
        torch.tensor([[True, False, False, False]]),
        RewardConfig(exclude_special=True),
        special,
        prompt_mask,
    )
    # focus = -(log 2 + H([0.25, 0.75])) / 2; coverage = (0.5 + 0.25) / 2.
    assert terms["focus"].item() == approx(-(math.log(2) + _np_entropy([0.25, 0.75])) / 2)
    assert terms["coverage"].item() == approx(0.375)
    # With the exclusion, attending only to the sink gets less focus than attending to one real
    # token.
    sharp = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    sink = torch.tensor([[[0.0, 0.0, 1.0, 0.0]]])
    f = lambda a: compute_reward(
        a,
        torch.tensor([[2]]),
        torch.tensor([[True]]),
        torch.tensor([[True, False, False, False]]),
        RewardConfig(exclude_special=True),
        special,
        prompt_mask,
    )["focus"].item()
    assert f(sink) < f(sharp)


# ------------------------------------------------------------------- salient: IDF rule
# A hand-built vocabulary of 10 ids: 0..3 special (PAD, BOS, EOS, UNK), 4..7 content words,
# 8, 9 punctuation. Special tokens and punctuation get the *highest* IDF, so a rule that forgot to
# exclude them would pick them first.
IDF = torch.tensor([9.0, 9.0, 9.0, 9.0, 1.0, 2.0, 3.0, 0.5, 8.0, 8.0])
CONTENT = torch.tensor([False] * 4 + [True] * 4 + [False] * 2)
SRC = torch.tensor(
    [
        [4, 5, 8, 6, 7, 2],  # content: 4 (1.0) @0, 5 (2.0) @1, 6 (3.0) @3, 7 (0.5) @4
        [7, 9, 4, 2, 6, 6],
    ]
)  # real: 7 (0.5) @0, 4 (1.0) @2; 6 (3.0) @4,5 is padding
SRC_MASK = torch.tensor([[True] * 6, [True, True, True, True, False, False]])


def test_salient_idf_top_k_content_tokens():
    got = reward.salient_idf(SRC, SRC_MASK, IDF, CONTENT, top_k=2)
    assert got.dtype == torch.bool
    # row 0: the two highest-IDF content tokens are 6 (3.0) @3 and 5 (2.0) @1; not 8 (punct) or EOS
    # row 1: eligible are 7 @0 and 4 @2 only; 6 @4,5 is padding, 9 punctuation, 2 EOS
    assert got.tolist() == [
        [False, True, False, True, False, False],
        [True, False, True, False, False, False],
    ]
    # weighted: the IDF values at the chosen positions, 0 elsewhere
    w = reward.salient_idf(SRC, SRC_MASK, IDF, CONTENT, top_k=2, weighted=True)
    close(w, [[0.0, 2.0, 0.0, 3.0, 0.0, 0.0], [0.5, 0.0, 1.0, 0.0, 0.0, 0.0]])


def test_salient_idf_top_k_above_eligible_returns_the_eligible():
    # top_k = 3: row 0 takes 6 @3, 5 @1, 4 @0; row 1 has only two eligible.
    got = reward.salient_idf(SRC, SRC_MASK, IDF, CONTENT, top_k=3)
    assert got.tolist() == [
        [True, True, False, True, False, False],
        [True, False, True, False, False, False],
    ]
    # top_k beyond the prompt length: every eligible position, nothing else.
    got = reward.salient_idf(SRC, SRC_MASK, IDF, CONTENT, top_k=50)
    assert got.tolist() == [
        [True, True, False, True, True, False],
        [True, False, True, False, False, False],
    ]


def test_salient_idf_ties_take_the_earlier_position():
    src = torch.tensor([[8, 5, 5, 5, 2]])
    got = reward.salient_idf(src, torch.ones(1, 5, dtype=torch.bool), IDF, CONTENT, top_k=2)
    assert got.tolist() == [[False, True, True, False, False]]


def test_salient_idf_prompt_with_no_content_is_empty():
    src = torch.tensor([[8, 9, 2]])
    got = reward.salient_idf(src, torch.ones(1, 3, dtype=torch.bool), IDF, CONTENT, top_k=4)
    assert not got.any()


# -------------------------------------------------------------------- salient: NER rule
@pytest.fixture(scope="module")
def tok_and_salient():
    qa = synthetic.make_qa(n=400)
    tok = data.train_tokenizer(data.record_texts(qa), 600)
    prompt_ids = [data.encode(tok, r["prompt"]) for r in qa]
    return tok, reward.SalientTokens.build(tok, prompt_ids)


# Words in [brackets] are the ones the rule must mark: capitalised and not first in a sentence,
# or containing a digit. The first word of each sentence is never marked unless it has a digit.
NER_CASES = [
    "Where does [Varo] [Kelin] live?",
    "Kelo was born in [1950]. Who is [Tamsa]?",
    # Dria starts the first sentence (not marked) but not the second (marked)
    "Dria [Stoun] lives in [Brakel] and works as a baker. Where does [Dria] [Stoun] live?",
    "Who is [Tamsa]? Tamsa is a baker! Kelo keeps a pet.",
    "[1950] was a year, and [Varo] met [Kelin] in the [3rd] place.",
    "what does varo kelin do?",
]


def _unmark(marked):
    """The text without brackets, and the character spans of the bracketed words."""
    text, spans = "", []
    for piece in re.split(r"(\[[^\]]*\])", marked):
        if piece.startswith("["):
            spans.append((len(text), len(text) + len(piece) - 2))
            piece = piece[1:-1]
        text += piece
    return text, spans


def test_salient_ner_marks_names_and_numbers(tok_and_salient):
    tok, sal = tok_and_salient
    texts = [_unmark(m) for m in NER_CASES]
    sp = data.specials(tok)
    batch = data.collate([(data.encode(tok, t, sp), [sp.eos]) for t, _ in texts], sp)
    src, src_mask = batch["src"], batch["src_mask"]
    got = sal(src, src_mask, RewardConfig(salient_method="ner"))
    assert got.dtype == torch.bool and got.shape == src.shape
    assert (
        got.tolist() == reward.salient_ner(src, src_mask, sal.token_strings, sal.content).tolist()
    )
    for b, (text, spans) in enumerate(texts):
        enc = tok.encode(text)
        n = len(enc.ids)
        assert src[b, :n].tolist() == enc.ids and src[b, n] == tok.token_to_id(data.EOS)
        # expected: the tokens whose character span overlaps a bracketed word
        expected = [
            any(start < w_end and w_start < end for w_start, w_end in spans)
            for start, end in enc.offsets
        ]
        assert got[b, :n].tolist() == expected, (text, [tok.decode([i]) for i in enc.ids])
        assert not got[b, n:].any()  # EOS and padding never
        # and read back: the selected tokens spell exactly the bracketed words, in order
        pieces = [tok.decode([i]) if got[b, j] else " " for j, i in enumerate(enc.ids)]
        assert "".join(pieces).split() == [text[s:e] for s, e in spans]
        for j, i in enumerate(enc.ids):  # punctuation is never salient
            if not any(ch.isalnum() for ch in tok.decode([i])):
                assert not got[b, j]


def test_salient_tokens_dispatch(tok_and_salient):
    tok, sal = tok_and_salient
    texts = ["Where does Varo Kelin live?", "Kelo was born in 1950. Who is Tamsa?"]
    sp = data.specials(tok)
    batch = data.collate([(data.encode(tok, t, sp), [sp.eos]) for t in texts], sp)
    src, src_mask = batch["src"], batch["src_mask"]
    idf = sal(src, src_mask, RewardConfig(salient_method="idf", salient_top_k=3))
    assert idf.tolist() == reward.salient_idf(src, src_mask, sal.idf, sal.content, 3).tolist()
    assert (idf.sum(-1) == 3).all()
    w = sal(src, src_mask, RewardConfig(salient_method="idf", salient_top_k=3, idf_weighted=True))
    close(w, idf * sal.idf[src])
    ner = sal(src, src_mask, RewardConfig(salient_method="ner"))
    assert (
        ner.tolist() == reward.salient_ner(src, src_mask, sal.token_strings, sal.content).tolist()
    )
    wn = sal(src, src_mask, RewardConfig(salient_method="ner", idf_weighted=True))
    close(wn, ner * sal.idf[src])
    with pytest.raises(ValueError, match="salient_method"):
        sal(src, src_mask, RewardConfig(salient_method="tfidf"))
