"""The baselines CAGSR is compared with (§7.3) and the rival internal rewards
(experiments/reward_study.py): every reward here is *not* the model's attention.

- Synthetic Preference RL: a reward model trained on automatically generated good/bad labels
  (the reference is good; a shuffled, truncated, repeated or off-topic version of it is bad).
- Human Preference RL (limited), *simulated*: no people can be asked here, so "annotators" compare
  two SFT samples per prompt on 1,000 training prompts by ROUGE-L against the reference, with a
  stated label-noise rate, and a Bradley-Terry reward model is fitted to their choices.

Both reward models are `evaluation.PairScorer`s started from the SFT policy's encoder (as RLHF
reward models start from the SFT model) and are then used by the same PPO loop as CAGSR through
`ScorerReward`. Kept out of reward.py, which holds only the paper's attention reward.

The rival rewards (the second half of the file) are pure functions of one rollout: its tokens, the
policy's logits at the sampled positions (full vocabulary, divided by the sampling temperature,
before top-k/top-p: the distribution the log-probs use) and the recorded Abar.

- self-certainty (Intuitor, arXiv 2505.19590): mean over the response of KL(U || softmax(z_t));
- negative entropy (EM-RL, arXiv 2505.15134): minus the mean token entropy;
- mean token log-probability (trajectory probability, as in TTRL's family of rewards);
- random: Bernoulli(0.5) per candidate, the spurious-reward control (arXiv 2506.10947);
- oracle: the task's correctness against the reference (exact-match on QA, reference_match on
  free-form tasks), the positive control; it reads the answer, so no self-supervised reward
  may use it;
- hybrid (§6, §9): the attention reward plus a weight times a reward model fitted on limited
  (simulated) human preference labels; not self-supervised.

The sampler records the per-token self-certainty and entropy (sampling.Rollout), so a reward never
needs the (B*N, T, V) logits; `self_certainty` and `neg_entropy` below, on logits, call the same
per-token functions (sampling.token_self_certainty, sampling.token_entropy).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

import data
from experiments.evaluation import (
    PairScorer,
    exact_match_of,
    fit_pair_scorer,
    off_topic_index,
    pair_scores,
    pair_tensors,
    prompt_batch,
    rouge_l,
)
from model import token_logprobs
from reward import response_mean
from sampling import Decoding, token_entropy, token_self_certainty

CORRUPTIONS = ("shuffle", "truncate", "repeat", "off_topic")


# --------------------------------------------------------------------------------------------
# Synthetic preference labels
# --------------------------------------------------------------------------------------------


def corrupt(
    words: list[str], kind: str, rng: random.Random, other: list[str] | None = None
) -> list[str]:
    """A bad version of a good response (a list of words):

    shuffle: the same words in another order; truncate: the first 30-70% of the words (at least one
    dropped); repeat: a span of 1-4 words said three times over in place; off_topic: `other`,
    another prompt's reference."""
    if kind == "off_topic":
        if other is None:
            raise ValueError("corrupt(kind='off_topic') needs `other`, another prompt's reference")
        return list(other)
    if kind == "shuffle":
        out = list(words)
        if len(set(words)) > 1:
            while out == words:
                rng.shuffle(out)
        return out
    if kind == "truncate":
        keep = max(1, min(len(words) - 1, round(len(words) * rng.uniform(0.3, 0.7))))
        return words[:keep]
    if kind == "repeat":
        n = rng.randint(1, min(4, len(words)))
        i = rng.randrange(len(words) - n + 1)
        return words[: i + n] + words[i : i + n] * 2 + words[i + n :]
    raise ValueError(f"unknown corruption {kind!r}; valid: {', '.join(CORRUPTIONS)}")


def synthetic_examples(records, rng: random.Random) -> list[tuple[str, str, float]]:
    """(prompt, response, label) per record: the reference with label 1, then one corruption of it
    (kind drawn uniformly from CORRUPTIONS) with label 0."""
    responses = [r["response"] for r in records]
    out = []
    for i, r in enumerate(records):
        kind = rng.choice(CORRUPTIONS)
        other = (
            responses[off_topic_index(i, responses, rng)].split() if kind == "off_topic" else None
        )
        bad = " ".join(corrupt(r["response"].split(), kind, rng, other))
        out += [(r["prompt"], r["response"], 1.0), (r["prompt"], bad, 0.0)]
    return out


# --------------------------------------------------------------------------------------------
# Simulated annotators and the Bradley-Terry model
# --------------------------------------------------------------------------------------------


def bradley_terry_loss(r_chosen, r_rejected):
    """-log sigma(r(x, y_w) - r(x, y_l)), the Bradley-Terry negative log-likelihood of the
    annotators' choices, averaged over pairs. (P,), (P,) -> scalar."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def simulated_preferences(
    score_a, score_b, noise: float, rng: random.Random
) -> tuple[list[tuple[int, bool]], int]:
    """Simulated annotators (DECISIONS.md §5): for each pair prefer the response with the higher
    score (ROUGE-L against the reference), then flip the choice with probability `noise`. Ties
    carry no preference and are dropped. Returns ([(pair index, a preferred?)] for the kept
    pairs, number of flipped labels)."""
    if not 0.0 <= noise < 0.5:
        raise ValueError(f"label noise must be in [0, 0.5), got {noise}")
    choices, flipped = [], 0
    for i, (a, b) in enumerate(zip(score_a, score_b)):
        if a == b:
            continue
        prefer_a = a > b
        if rng.random() < noise:
            prefer_a, flipped = not prefer_a, flipped + 1
        choices.append((i, prefer_a))
    return choices, flipped


@torch.no_grad()
def sample_pairs(
    policy, tok, records, cfg, device, seed: int, batch_size: int = 128
) -> list[tuple[str, str]]:
    """Two samples per prompt from `policy` with the RL sampling settings of `cfg` (a PPOConfig)."""
    policy.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    out, sp = [], data.specials(tok)
    for i in range(0, len(records), batch_size):
        src, src_mask = prompt_batch(
            tok, [r["prompt"] for r in records[i : i + batch_size]], device, sp
        )
        rollout = policy.sample(
            src,
            src_mask,
            Decoding(
                num_samples=2,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
            ),
            generator=gen,
            record_attention=False,
            **sp.sample_ids(),
        )
        texts = [data.decode(tok, row.tolist(), sp) for row in rollout.tokens.cpu()]
        out += list(zip(texts[0::2], texts[1::2]))
    return out


# --------------------------------------------------------------------------------------------
# Fitting the reward models, and using one as the PPO reward
# --------------------------------------------------------------------------------------------


def _encode(tok, scorer, triples):
    return data.encode_records(
        tok,
        [dict(prompt=p, response=r) for p, r, *_ in triples],
        scorer.cfg.max_src_len,
        scorer.cfg.max_tgt_len,
    )


def train_synthetic_rm(
    policy, tok, records, held_out, device, steps=400, batch_size=64, lr=3e-4, seed=0
) -> tuple[PairScorer, dict]:
    """The Synthetic Preference reward model (§7.3): a PairScorer from the SFT encoder, binary
    cross-entropy on references (1) versus corrupted references (0) of the training `records`, fresh
    corruptions every pass. Returns (scorer, stats); stats["label_accuracy"] is measured on the
    references and fresh corruptions of `held_out` records, which training never sees."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    scorer = PairScorer.from_policy(policy)
    pool: list = []
    sp = data.specials(tok)

    def loss_at(step):
        batch = []
        while len(batch) < batch_size:
            if not pool:
                examples = synthetic_examples(records, rng)
                pool.extend(zip(_encode(tok, scorer, examples), (lab for *_, lab in examples)))
                rng.shuffle(pool)
            batch.append(pool.pop())
        labels = torch.tensor([lab for _, lab in batch], device=device)
        return F.binary_cross_entropy_with_logits(
            scorer(*pair_tensors([p for p, _ in batch], device, sp)), labels
        )

    losses = fit_pair_scorer(scorer, loss_at, steps, lr, desc="synthetic-preference RM")
    examples = synthetic_examples(held_out, random.Random(seed + 1))
    logits = pair_scores(scorer, _encode(tok, scorer, examples), device, sp)
    labels = torch.tensor([lab for *_, lab in examples])
    return scorer, dict(
        final_loss=sum(losses[-20:]) / max(1, len(losses[-20:])),
        label_accuracy=float(((logits > 0).float() == labels).float().mean()),
        held_out_records=len(held_out),
    )


def train_bt_rm(
    policy,
    tok,
    records,
    ppo_cfg,
    device,
    num_prompts=1000,
    noise=0.1,
    steps=300,
    batch_size=64,
    lr=3e-4,
    seed=0,
) -> tuple[PairScorer, dict]:
    """The (simulated) Human Preference reward model (§7.3): two SFT samples on each of
    `num_prompts` training prompts, preferred by ROUGE-L against the reference with label
    noise `noise` (`simulated_preferences`), a Bradley-Terry PairScorer from the SFT encoder
    fitted to the choices. Returns (scorer, stats: prompts, pairs kept after ties, flipped
    labels, fit accuracy)."""
    rng = random.Random(seed)
    chosen_records = rng.sample(records, min(num_prompts, len(records)))
    samples = sample_pairs(policy, tok, chosen_records, ppo_cfg, device, seed)
    ra = [rouge_l(a, r["response"]) for (a, _), r in zip(samples, chosen_records)]
    rb = [rouge_l(b, r["response"]) for (_, b), r in zip(samples, chosen_records)]
    choices, flipped = simulated_preferences(ra, rb, noise, rng)
    stats = dict(
        prompts=len(chosen_records),
        pairs=len(choices),
        ties_dropped=len(chosen_records) - len(choices),
        flipped=flipped,
        noise=noise,
    )
    if not choices:
        raise ValueError(
            "the simulated annotators found no pair with a preference (all ties); "
            "more prompts or a higher sampling temperature are needed"
        )
    torch.manual_seed(seed)
    scorer = PairScorer.from_policy(policy)
    win, lose = [], []
    for i, prefer_a in choices:
        p, (a, b) = chosen_records[i]["prompt"], samples[i]
        win.append((p, a if prefer_a else b))
        lose.append((p, b if prefer_a else a))
    win_ids, lose_ids, sp = (
        _encode(tok, scorer, win),
        _encode(tok, scorer, lose),
        data.specials(tok),
    )

    def loss_at(step):
        idx = [rng.randrange(len(win_ids)) for _ in range(batch_size)]
        return bradley_terry_loss(
            scorer(*pair_tensors([win_ids[i] for i in idx], device, sp)),
            scorer(*pair_tensors([lose_ids[i] for i in idx], device, sp)),
        )

    fit_pair_scorer(scorer, loss_at, steps, lr, desc="simulated-human BT RM")
    wins = pair_scores(scorer, win_ids, device, sp) > pair_scores(scorer, lose_ids, device, sp)
    stats["fit_accuracy"] = float(wins.float().mean())
    return scorer, stats


class ScorerReward:
    """A PairScorer as the PPO reward: its logit for (prompt, candidate), one number per candidate,
    given to `ppo.train` as `ppo.RLTask(..., reward_fn=...)` in place of the attention reward."""

    def __init__(self, scorer: PairScorer):
        self.scorer = scorer.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(
        self, src, src_mask, rollout, terms=None
    ):  # (B, S), (B, S), Rollout of B*N -> (B*N,)
        N = rollout.tokens.size(0) // src.size(0)
        return self.scorer(
            src.repeat_interleave(N, 0),
            src_mask.repeat_interleave(N, 0),
            rollout.tokens,
            rollout.mask,
        ).float()


# --------------------------------------------------------------------------------------------
# Rival internal rewards: pure functions (the equations) ...
# --------------------------------------------------------------------------------------------


def self_certainty(logits, response_mask):
    """Self-certainty (Intuitor): mean over response tokens of
    KL(U || softmax(z_t)) = logsumexp(z_t) - mean_j z_t,j - log V.
    logits: full-vocabulary logits / temperature. (B, T, V), (B, T) -> (B,)."""
    return response_mean(token_self_certainty(logits), response_mask)


def neg_entropy(logits, response_mask):
    """Minus the mean entropy of softmax(z_t) over response tokens (EM-RL's reward).
    (B, T, V), (B, T) -> (B,)."""
    return -response_mean(token_entropy(logits), response_mask)


def mean_logprob(logits, tokens, response_mask):
    """Mean log softmax(z_t)[y_t] over response tokens (trajectory probability per token).
    (B, T, V), (B, T), (B, T) -> (B,)."""
    return response_mean(token_logprobs(logits, tokens), response_mask)


# --------------------------------------------------------------------------------------------
# ... and the same rewards from a rollout, as PPO rewards (ppo.sample_and_score's reward_fn)
# --------------------------------------------------------------------------------------------


class RolloutReward:
    """A rival reward from what the sampler recorded: "self_certainty", "neg_entropy" or "logprob".
    Equal to the pure function above on the teacher-forced logits of the same tokens (tested)."""

    KINDS = ("self_certainty", "neg_entropy", "logprob")

    def __init__(self, kind: str):
        if kind not in self.KINDS:
            raise ValueError(f"unknown rollout reward {kind!r}; valid: {', '.join(self.KINDS)}")
        self.kind = kind

    def __call__(self, src, src_mask, rollout, terms=None):  # Rollout of B*N -> (B*N,)
        if self.kind == "self_certainty":
            return response_mean(rollout.certainty, rollout.mask)
        if self.kind == "neg_entropy":
            return -response_mean(rollout.entropy, rollout.mask)
        return response_mean(rollout.logprobs, rollout.mask)


class TermReward:
    """One term of the attention reward alone, as a reward (the pretrained rewards study's variant
    row): "coverage", "focus", "neg_repeat" (minus the repetition penalty) or "prompt_share",
    read from the attention reward's terms of the same candidates (ppo.score_rollout)."""

    TERMS = {
        "coverage": ("coverage", 1.0),
        "focus": ("focus", 1.0),
        "neg_repeat": ("repeat", -1.0),
        "prompt_share": ("prompt_share", 1.0),
    }

    def __init__(self, kind: str):
        if kind not in self.TERMS:
            raise ValueError(f"unknown reward term {kind!r}; valid: {', '.join(self.TERMS)}")
        self.term, self.sign = self.TERMS[kind]

    def __call__(self, src, src_mask, rollout, terms):  # terms of B*N -> (B*N,)
        return self.sign * terms[self.term]


class RandomReward:
    """Bernoulli(0.5) per candidate from its own seeded stream: the spurious-reward control."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, src, src_mask, rollout, terms=None):  # Rollout of B*N -> (B*N,)
        n = rollout.tokens.size(0)
        return torch.bernoulli(torch.full((n,), 0.5), generator=self.gen).to(rollout.tokens.device)


class OracleReward:
    """The task's correctness of each candidate against its prompt's record: the positive control
    (it reads the answer). correct(prediction, record): evaluation.correctness_function's,
    exact-match on the QA tasks, key spans for a pretrained model on qa-grounded, reference_match
    on free-form ones; none can be won by leaving the answer out (DECISIONS.md §9, §13).
    references: {prompt token ids (tuple, as encoded): [records]}; the best score counts."""

    def __init__(self, tok, references: dict, correct=exact_match_of):
        self.tok, self.sp, self.references, self.correct = (
            tok,
            data.specials(tok),
            references,
            correct,
        )

    @classmethod
    def from_records(cls, tok, records, correct=exact_match_of):
        refs: dict = {}
        sp = data.specials(tok)
        for rec in records:
            refs.setdefault(tuple(data.encode(tok, rec["prompt"], sp)), []).append(rec)
        return cls(tok, refs, correct)

    def texts(self, src, src_mask, rollout) -> list[tuple[str, list[dict]]]:
        """(candidate text, its prompt's records) per candidate."""
        N = rollout.tokens.size(0) // src.size(0)
        out = []
        for i, row in enumerate(rollout.tokens.cpu()):
            b = i // N
            key = tuple(src[b][src_mask[b]].tolist())
            if key not in self.references:
                raise KeyError(f"oracle reward: prompt {b} of the batch has no reference")
            out.append((data.decode(self.tok, row.tolist(), self.sp), self.references[key]))
        return out

    def scores(self, texts: list[tuple[str, list[dict]]]) -> list[float]:
        """The best correctness of each candidate against its records (`texts`' pairs)."""
        return [max(self.correct(text, rec) for rec in recs) for text, recs in texts]

    def __call__(self, src, src_mask, rollout, terms=None):  # Rollout of B*N -> (B*N,)
        return torch.tensor(
            self.scores(self.texts(src, src_mask, rollout)), device=rollout.tokens.device
        )


class HybridReward:
    """§6 and §9's combination: the attention reward (terms["reward"] of ppo.sample_and_score) plus
    `weight` times a reward model fitted on limited human preference labels (simulated here:
    train_bt_rm). Not self-supervised."""

    def __init__(self, scorer: PairScorer, weight: float):
        self.rm, self.weight = ScorerReward(scorer), weight

    def __call__(self, src, src_mask, rollout, terms):  # Rollout of B*N, attention terms -> (B*N,)
        return terms["reward"] + self.weight * self.rm(src, src_mask, rollout)


# --------------------------------------------------------------------------------------------
# The registry behind --reward NAME (the command line and the experiments)
# --------------------------------------------------------------------------------------------

REWARD_NAMES = (
    "attention",
    "self-certainty",
    "neg-entropy",
    "logprob",
    "random",
    "oracle",
    "hybrid",
)
"""--reward NAME: the paper's attention reward (§3.2, the default), the rival internal rewards, the
random and oracle controls, and the hybrid (not self-supervised)."""


def make_reward(
    name: str,
    *,
    tok=None,
    records=None,
    seed: int = 0,
    correct=exact_match_of,
    rm: PairScorer | None = None,
    hybrid_weight: float = 1.0,
):
    """The RL task's reward_fn (ppo.RLTask) for `--reward name`; None for "attention"
    (ppo.sample_and_score's own reward).
    records: the training records (the oracle's clean references); correct: the task's
    correctness (the oracle); rm: the hybrid's preference reward model (train_bt_rm); seed:
    the random control's."""
    if name == "attention":
        return None
    if name in ("self-certainty", "neg-entropy", "logprob"):
        return RolloutReward(name.replace("-", "_"))
    if name == "random":
        return RandomReward(seed)
    if name == "oracle":
        return OracleReward.from_records(tok, records, correct)
    if name == "hybrid":
        if rm is None:
            raise ValueError("the hybrid reward needs its preference reward model (train_bt_rm)")
        return HybridReward(rm, hybrid_weight)
    raise ValueError(f"unknown reward {name!r}; valid: {', '.join(REWARD_NAMES)}")
