"""experiments/baselines.py: corruptions, simulated annotators, the Bradley-Terry loss, the reward
models (§7.3).

The Bradley-Terry loss and its gradient on hand-worked pairs, the simulated annotators' label-noise
rate on 20,000 constructed pairs (within 5 standard errors of 10%), the corruptions, `PairScorer`
unchanged by padding, `ScorerReward` scoring each candidate with its own prompt."""

import math
import random

import pytest
import torch

from experiments import baselines
from experiments.baselines import bradley_terry_loss, corrupt, simulated_preferences
from experiments.evaluation import PairScorer
from model import EncoderDecoder, config_for
from sampling import Rollout

WORDS = "Varo Kelin lives in Tamsa on the river".split()


# ---------------------------------------------------------------------- Bradley-Terry
def test_bradley_terry_loss_on_hand_worked_pairs():
    # r_w - r_l = 0: sigma = 1/2, -log(1/2) = log 2.
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0])).item() == pytest.approx(
        math.log(2)
    )
    # r_w - r_l = log 3: sigma = 3/4, -log(3/4) = log(4/3); r_w - r_l = -log 3: sigma = 1/4,
    # -log(1/4) = log 4. Mean over the two pairs: (log(4/3) + log 4) / 2 = log(16/3) / 2.
    lw = torch.tensor([math.log(3), 0.0])
    ll = torch.tensor([0.0, math.log(3)])
    assert bradley_terry_loss(lw, ll).item() == pytest.approx(math.log(16 / 3) / 2, rel=1e-6)


def test_bradley_terry_gradient_pushes_the_winner_up():
    # d/d r_w of -log sigma(r_w - r_l) = -(1 - sigma(r_w - r_l)) = -1/2 at a tie.
    rw = torch.tensor([0.5], requires_grad=True)
    rl = torch.tensor([0.5], requires_grad=True)
    bradley_terry_loss(rw, rl).backward()
    assert rw.grad.item() == pytest.approx(-0.5) and rl.grad.item() == pytest.approx(0.5)


# ---------------------------------------------------------------------- simulated annotators
def test_simulated_preferences_follow_the_score_without_noise():
    choices, flipped = simulated_preferences(
        [0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.5, 0.3], 0.0, random.Random(0)
    )
    # Pairs 2 and 3 are ties: dropped. Pair 0 prefers a, pair 1 prefers b.
    assert choices == [(0, True), (1, False)] and flipped == 0


def test_label_noise_rate_on_a_constructed_case():
    # 20,000 pairs where a is always better: every label that says b is a flip. With noise 0.1 the
    # share of flips is Binomial(20000, 0.1) / 20000: std sqrt(0.1 * 0.9 / 20000) = 0.0021, so
    # 0.1 +- 0.01 is a ~5 sigma band.
    n = 20_000
    choices, flipped = simulated_preferences([1.0] * n, [0.0] * n, 0.1, random.Random(1))
    says_b = sum(not a for _, a in choices)
    assert says_b == flipped
    assert abs(flipped / n - 0.1) < 0.01
    with pytest.raises(ValueError, match="label noise"):
        simulated_preferences([1.0], [0.0], 0.5, random.Random(0))


# ---------------------------------------------------------------------- corruptions
def test_corruptions():
    rng = random.Random(0)
    shuffled = corrupt(WORDS, "shuffle", rng)
    assert sorted(shuffled) == sorted(WORDS) and shuffled != WORDS
    for _ in range(50):
        t = corrupt(WORDS, "truncate", rng)
        assert t == WORDS[: len(t)] and 1 <= len(t) < len(WORDS)
        r = corrupt(WORDS, "repeat", rng)
        extra = len(r) - len(WORDS)  # a span of n words said 3 times: 2n extra words
        assert extra % 2 == 0 and 2 <= extra <= 8
    assert corrupt(WORDS, "off_topic", rng, other=["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="needs `other`"):
        corrupt(WORDS, "off_topic", rng)
    with pytest.raises(ValueError, match="valid: shuffle, truncate, repeat, off_topic"):
        corrupt(WORDS, "reverse", rng)


def test_synthetic_examples_pair_each_reference_with_a_corruption():
    records = [dict(prompt=f"q{i}", response=f"answer number {i} is here") for i in range(20)]
    ex = baselines.synthetic_examples(records, random.Random(0))
    assert len(ex) == 40
    for i, r in enumerate(records):
        (p1, good, l1), (p2, bad, l2) = ex[2 * i], ex[2 * i + 1]
        assert (
            p1 == p2 == r["prompt"]
            and good == r["response"]
            and (l1, l2) == (1.0, 0.0)
            and bad != good
        )


# ---------------------------------------------------------------------- the reward models
def tiny_policy():
    torch.manual_seed(0)
    return EncoderDecoder(config_for("tiny", vocab_size=50, d_model=32, d_ff=64, n_heads=2))


def test_pair_scorer_ignores_padding_and_starts_from_the_policy():
    policy = tiny_policy()
    scorer = PairScorer.from_policy(policy)
    torch.nn.init.normal_(scorer.head.weight)  # the head starts at zero; give it something to say
    assert torch.equal(scorer.encoder[0].ff.up.weight, policy.encoder[0].ff.up.weight)
    src, resp = torch.tensor([[5, 6, 7, 2]]), torch.tensor([[8, 9, 2]])
    one = scorer(src, src > 0, resp, resp > 0)
    padded_src = torch.tensor([[5, 6, 7, 2, 0, 0]])
    padded_resp = torch.tensor([[8, 9, 2, 0]])
    two = scorer(padded_src, padded_src > 0, padded_resp, padded_resp > 0)
    assert torch.allclose(one, two, atol=1e-6)


def test_scorer_reward_scores_each_candidate_with_its_own_prompt():
    policy = tiny_policy()
    scorer = PairScorer.from_policy(policy)
    torch.nn.init.normal_(scorer.head.weight)
    src = torch.tensor([[5, 6, 2], [7, 2, 0]])
    tokens = torch.tensor(
        [[8, 2, 0], [9, 9, 2], [8, 2, 0], [10, 2, 0]]
    )  # N = 2 candidates per prompt
    mask = tokens > 0
    rollout = Rollout(tokens=tokens, logprobs=torch.zeros(tokens.shape), mask=mask, attn=None)
    got = baselines.ScorerReward(scorer)(src, src > 0, rollout)
    for row in range(4):
        b = row // 2
        want = scorer(
            src[b : b + 1, : 3 - (b == 1)],
            torch.ones(1, 3 - (b == 1), dtype=torch.bool),
            tokens[row : row + 1][:, mask[row]],
            torch.ones(1, int(mask[row].sum()), dtype=torch.bool),
        )
        assert got[row].item() == pytest.approx(want.item(), abs=1e-5)
