"""Judging a policy (§7.4): metrics of a response against its reference, perplexity, the prompt
relevance classifier (a `PairScorer`), and the scoring of a policy that every stage reports
(greedy answers, the reward terms of fixed-seed samples, the before/after report).

Nothing here is ever used as the CAGSR reward. Kept apart from reward.py on purpose: the reward
sees only the model's own attention, and these metrics see only text; keeping them in separate
files keeps that boundary visible. (`sampled_terms` reports the reward's terms, computed by
ppo.sample_and_score, next to the metrics.)
"""

from __future__ import annotations

import math
import random
import re

import torch
import torch.nn.functional as F
from torch import nn

import data
import parallel
import ppo
from model import EncoderDecoder, EncoderLayer, ModelConfig, mean_pool
from sampling import Decoding
from sft import mean_nll

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-case, and every run of non-alphanumeric characters separates tokens (no stemming):
    the tokenization of the ROUGE-1.5.5 re-implementations."""
    return _WORD.findall(text.lower())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two texts have the same `words` (case and punctuation ignored), else 0.0."""
    return float(words(prediction) == words(reference))


def lcs(c: list[str], r: list[str]) -> int:
    """Length of the longest common subsequence of two word lists."""
    prev = [0] * (len(r) + 1)  # prev[j]: LCS length of the words of c so far and r[:j]
    for ci in c:
        cur = [0]
        for j, rj in enumerate(r, start=1):
            cur.append(prev[j - 1] + 1 if ci == rj else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure (§7.4: the paper scores responses by ROUGE-L against references): the F1 of
    LCS precision LCS/|candidate| and recall LCS/|reference|, over `words`. 0.0 when either side
    has no words or nothing in common."""
    c, r = words(candidate), words(reference)
    common = lcs(c, r) if c and r else 0
    if common == 0:
        return 0.0
    precision, recall = common / len(c), common / len(r)
    return 2 * precision * recall / (precision + recall)


def reference_match(candidate: str, reference: str) -> float:
    """LCS / max(|candidate|, |reference|) over `words`: the smaller of ROUGE-L's precision and
    recall. The correctness of a free-form task (instruct) and its oracle (DECISIONS.md §9): unlike
    F1, leaving a word out costs as much as getting it wrong (recall), and padding costs too
    (precision), so neither is a way to win it. 1.0 only for the reference's words in order; 0.0
    with no words."""
    c, r = words(candidate), words(reference)
    return lcs(c, r) / max(len(c), len(r)) if c and r else 0.0


def contains_span(text_words: list[str], span: str) -> bool:
    """Whether the `words` of `span` occur in `text_words` in a row."""
    w = words(span)
    return bool(w) and any(
        text_words[i : i + len(w)] == w for i in range(len(text_words) - len(w) + 1)
    )


def key_span_match(prediction: str, key: str, wrong_key: str) -> float:
    """The correctness of a free-form answer on qa-grounded (DECISIONS.md §13): 1.0 when it says the
    asked fact's key span (the city, the year, ...: synthetic._key) and not the distractor's, else
    0.0. Words as `words` (case and punctuation ignored), each span's words in a row. When the two
    spans are the same words, saying the key is enough."""
    w = words(prediction)
    says_wrong = words(wrong_key) != words(key) and contains_span(w, wrong_key)
    return float(contains_span(w, key) and not says_wrong)


CORRECTNESS = {
    "exact_match": exact_match,
    "reference_match": reference_match,
    "key_span": key_span_match,
}
"""The task's correctness, one per task: exact-match for the tiny policies' short answers (the QA
datasets), key_span_match for a pretrained model's free-form answers on qa-grounded,
reference_match for free-form responses (instruct, a user's JSONL)."""


def correctness_name(dataset: str, pretrained: bool = False) -> str:
    """The name of `dataset`'s correctness measure (a key of CORRECTNESS); `pretrained`: the policy
    is a pretrained model, which answers in its own words."""
    if pretrained and data.dataset_name(dataset) == "qa-grounded":
        return "key_span"
    return "exact_match" if data.is_qa(dataset) else "reference_match"


def correctness_function(dataset: str, pretrained: bool = False):
    """`dataset`'s correctness measure of a candidate against its record:
    correct(prediction, record) -> 0.0 or 1.0 (reference_match: a fraction)."""
    name = correctness_name(dataset, pretrained)
    if name == "key_span":
        return lambda prediction, rec: key_span_match(prediction, rec["key"], rec["wrong_key"])
    measure = CORRECTNESS[name]
    return lambda prediction, rec: measure(prediction, rec["response"])


def exact_match_of(prediction: str, record: dict) -> float:
    """exact_match against a record's reference: the default correctness of the QA tasks."""
    return exact_match(prediction, record["response"])


# --------------------------------------------------------------------------------------------
# Perplexity of the policy on held-out references (§7.4)
# --------------------------------------------------------------------------------------------


def perplexity(model, pairs, device, sp: data.Specials) -> float:
    """exp(mean token NLL) of the references (§7.4: perplexity on a held-out set)."""
    return math.exp(mean_nll(model, pairs, device, sp))


# --------------------------------------------------------------------------------------------
# Prompt relevance (§7.4): an on-topic/off-topic classifier, an evaluator only
# --------------------------------------------------------------------------------------------


class PairScorer(nn.Module):
    """One scalar per (prompt, response) pair: a Transformer encoder over the two texts side by side
    (prompt tokens, then response tokens; each with its own learned positions, so the padding of a
    batch changes nothing), mean-pooled over real tokens, then a linear head.

    Never part of CAGSR. It is the evaluation's relevance classifier (§7.4) and the reward model of
    the preference baselines (§7.3). `from_policy` starts it from an SFT model's embeddings and
    encoder, as RLHF reward models start from the SFT model."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, D)
        self.src_pos = nn.Embedding(cfg.max_src_len, D)  # prompt positions
        self.resp_pos = nn.Embedding(cfg.max_tgt_len, D)  # response positions
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_enc_layers))
        self.ln = nn.LayerNorm(D, bias=False)
        self.head = nn.Linear(D, 1)
        self.apply(EncoderDecoder._init_weights)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @staticmethod
    def config_of(policy_cfg) -> ModelConfig:
        """The scorer's config for a policy's: the policy's own for an encoder-decoder; for a
        decoder-only policy (decoder.py), which has no encoder, its width, heads and lengths with 2
        encoder layers (DECISIONS.md §10)."""
        if isinstance(policy_cfg, ModelConfig):
            return policy_cfg
        c = policy_cfg
        return ModelConfig(
            vocab_size=c.vocab_size,
            d_model=c.d_model,
            n_heads=c.n_heads,
            n_enc_layers=2,
            n_dec_layers=1,
            d_ff=4 * c.d_model,
            max_src_len=c.max_src_len,
            max_tgt_len=c.max_tgt_len,
        )

    @classmethod
    def from_policy(cls, policy) -> "PairScorer":
        """A scorer with the policy's embeddings, positions and encoder layers copied (not shared).
        A decoder-only policy has no encoder or position tables: only its token embeddings are
        copied into a scorer of `config_of` its config, the rest starts fresh."""
        device = next(policy.parameters()).device
        scorer = cls(cls.config_of(policy.cfg)).to(device)
        scorer.tok_emb.load_state_dict(policy.tok_emb.state_dict())
        if not isinstance(policy.cfg, ModelConfig):
            return scorer
        scorer.src_pos.load_state_dict(policy.enc_pos.state_dict())
        scorer.resp_pos.load_state_dict(policy.dec_pos.state_dict())
        scorer.encoder.load_state_dict(policy.encoder.state_dict())
        return scorer

    def forward(self, src, src_mask, resp, resp_mask):
        """src (B, S), src_mask (B, S), resp (B, T), resp_mask (B, T) -> logits (B,)."""
        S, T = src.size(1), resp.size(1)
        if S > self.cfg.max_src_len or T > self.cfg.max_tgt_len:
            raise ValueError(
                f"pair of lengths {S}+{T} exceeds this scorer's max_src_len={self.cfg.max_src_len} "
                f"/ max_tgt_len={self.cfg.max_tgt_len}"
            )
        x = torch.cat(
            [
                self.tok_emb(src) + self.src_pos(torch.arange(S, device=src.device)),
                self.tok_emb(resp) + self.resp_pos(torch.arange(T, device=src.device)),
            ],
            dim=1,
        )  # (B, S+T, D)
        mask = torch.cat([src_mask, resp_mask], dim=1)  # (B, S+T)
        for layer in self.encoder:
            x = layer(x, mask[:, None, None, :])
        pooled = mean_pool(self.ln(x), mask)  # (B, D)
        return self.head(pooled).squeeze(-1)  # (B,)


def pair_tensors(pairs, device, sp: data.Specials):
    """(prompt ids, response ids) pairs -> src, src_mask, resp, resp_mask on `device`
    (PairScorer's inputs)."""
    b = data.collate(pairs, sp)
    return (
        b["src"].to(device),
        b["src_mask"].to(device),
        b["tgt_out"].to(device),
        b["tgt_mask"].to(device),
    )


@torch.no_grad()
def pair_scores(scorer, pairs, device, sp: data.Specials, batch_size=256) -> torch.Tensor:
    """The scorer's logit for every (prompt ids, response ids) pair: (len(pairs),) on the CPU."""
    scorer.eval()
    out = [
        scorer(*pair_tensors(pairs[i : i + batch_size], device, sp)).float().cpu()
        for i in range(0, len(pairs), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0)


def fit_pair_scorer(scorer, loss_at, steps: int, lr: float, desc: str) -> list[float]:
    """AdamW on `loss_at(step)` (a scalar computed with `scorer`) for `steps` steps, with a
    progress bar. A non-finite loss stops training with an error instead of being applied.
    Returns the losses."""
    opt = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=0.01)
    scorer.train()
    losses = []
    for step in parallel.progress(range(steps), desc=desc, unit="step", leave=False):
        loss = loss_at(step)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{desc}: loss is {float(loss)} at step {step}; lower the learning rate"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(scorer.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    scorer.eval()
    return losses


def off_topic_index(i: int, responses: list[str], rng: random.Random) -> int:
    """A random j whose response text differs from response i's:
    (prompt i, response j) is off topic."""
    if len(set(responses)) < 2:
        raise ValueError("off-topic pairs need at least two different responses")
    while True:
        j = rng.randrange(len(responses))
        if responses[j] != responses[i]:
            return j


def off_topic(responses: list[str], rng: random.Random) -> list[int]:
    """`off_topic_index` for every i."""
    return [off_topic_index(i, responses, rng) for i in range(len(responses))]


def train_relevance(
    tok, records, cfg: ModelConfig, device, steps=600, batch_size=64, lr=1e-3, seed=0
):
    """The relevance classifier of §7.4, a from-scratch PairScorer: (prompt, its reference) is
    on-topic (1), (prompt, another prompt's reference) off-topic (0), binary cross-entropy,
    fresh off-topic pairings every step. Train it on prompts no reward model sees (the
    validation split)."""
    pairs = data.encode_records(tok, records, cfg.max_src_len, cfg.max_tgt_len)
    responses, sp = [r["response"] for r in records], data.specials(tok)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    scorer = PairScorer(cfg).to(device)

    def loss_at(step):
        idx = [rng.randrange(len(pairs)) for _ in range(batch_size // 2)]
        other = [off_topic_index(i, responses, rng) for i in idx]
        batch = [pairs[i] for i in idx] + [(pairs[i][0], pairs[j][1]) for i, j in zip(idx, other)]
        labels = torch.tensor([1.0] * len(idx) + [0.0] * len(idx), device=device)
        return F.binary_cross_entropy_with_logits(scorer(*pair_tensors(batch, device, sp)), labels)

    fit_pair_scorer(scorer, loss_at, steps, lr, desc="relevance classifier")
    return scorer


def relevance(scorer, tok, prompts: list[str], responses: list[str], device) -> list[float]:
    """Prompt relevance in [0, 1] (§7.4): the classifier's probability that
    `response` is on topic."""
    pairs = data.encode_records(
        tok,
        [dict(prompt=p, response=r) for p, r in zip(prompts, responses)],
        scorer.cfg.max_src_len,
        scorer.cfg.max_tgt_len,
    )  # too long: an error, never cut
    return torch.sigmoid(pair_scores(scorer, pairs, device, data.specials(tok))).tolist()


def relevance_accuracy(scorer, tok, records, device, seed=0) -> dict:
    """Held-out quality of the classifier on `records` (the test split): `pairwise`, the share of
    prompts whose own reference scores above another prompt's reference; `accuracy`, the share of
    the 2 * len(records) pairs (on- and off-topic) classified right at probability 0.5."""
    prompts = [r["prompt"] for r in records]
    responses = [r["response"] for r in records]
    other = off_topic(responses, random.Random(seed))
    on = relevance(scorer, tok, prompts, responses, device)
    off = relevance(scorer, tok, prompts, [responses[j] for j in other], device)
    n = max(1, len(records))
    return dict(
        pairwise=sum(a > b for a, b in zip(on, off)) / n,
        accuracy=(sum(a > 0.5 for a in on) + sum(b <= 0.5 for b in off)) / (2 * n),
    )


# --------------------------------------------------------------------------------------------
# Scoring a policy: greedy answers, the reward terms of fixed-seed samples, the report
# --------------------------------------------------------------------------------------------


def prompt_batch(tok, prompts: list[str], device, sp: data.Specials):
    """Encode and pad prompts (sp: the tokenizer's special ids):
    (src (B, S), src_mask (B, S)) on `device`."""
    src, src_mask = data.collate_prompts([data.encode(tok, p, sp) for p in prompts], sp)
    return src.to(device), src_mask.to(device)


@torch.no_grad()
def answer(model, tok, prompts: list[str], device, max_new_tokens=64, batch_size=128) -> list[str]:
    """Greedy answers to `prompts`, decoded to text."""
    model.eval()
    out, sp = [], data.specials(tok)
    for i in range(0, len(prompts), batch_size):
        r = model.sample(
            *prompt_batch(tok, prompts[i : i + batch_size], device, sp),
            Decoding(max_new_tokens=max_new_tokens, greedy=True),
            record_attention=False,
            **sp.sample_ids(),
        )
        out += [data.decode(tok, row.tolist(), sp) for row in r.tokens.cpu()]
    return out


def greedy_scores(model, tok, records, device, max_new_tokens=64) -> tuple[list[str], float, float]:
    """Greedy answers to the records' prompts, their mean exact-match and mean ROUGE-L (§7.4)."""
    preds = answer(
        model, tok, [r["prompt"] for r in records], device, max_new_tokens=max_new_tokens
    )
    n = max(1, len(records))
    return (
        preds,
        sum(exact_match(p, r["response"]) for p, r in zip(preds, records)) / n,
        sum(rouge_l(p, r["response"]) for p, r in zip(preds, records)) / n,
    )


def sample_correctness(
    texts: list[str], records: list[dict], n: int, correct=exact_match_of
) -> tuple[float, float]:
    """(mean correctness of the samples, mean over prompts of the best of each prompt's n samples):
    texts and their records hold n consecutive candidates per prompt. With exact-match the second is
    pass@n, the share of prompts that at least one sample answers right."""
    scores = torch.tensor(
        [correct(t, rec) for t, rec in zip(texts, records)], dtype=torch.float64
    ).view(-1, n)
    return float(scores.mean()), float(scores.max(dim=1).values.mean())


@torch.no_grad()
def sampled_terms(
    model,
    tok,
    records,
    salient,
    reward_cfg,
    ppo_cfg,
    device,
    seed=1234,
    batch_size=64,
    correct=exact_match_of,
) -> dict:
    """The mean reward and reward terms of N candidates per prompt sampled with a fixed seed at the
    RL temperature (so two checkpoints are compared on the same random numbers), and how correct
    those samples are: `sampled_correct` and `pass_at_n` (`sample_correctness` with `correct`)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    sums, count, sp, N = {}, 0, data.specials(tok), ppo_cfg.num_samples
    texts, scored = [], []
    for i in range(0, len(records), batch_size):
        batch = records[i : i + batch_size]
        src, src_mask = prompt_batch(tok, [r["prompt"] for r in batch], device, sp)
        rollout, terms, _, _ = ppo.sample_and_score(
            model, src, src_mask, salient, reward_cfg, ppo_cfg, sp, gen
        )
        texts += [data.decode(tok, row.tolist(), sp) for row in rollout.tokens.cpu()]
        scored += [r for r in batch for _ in range(N)]
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
        count += len(terms["reward"])
    out = {k: v / count for k, v in sums.items()}
    out["sampled_correct"], out["pass_at_n"] = sample_correctness(texts, scored, N, correct)
    return out


def evaluate_policy(
    model, tok, records, salient, reward_cfg, ppo_cfg, device, seed=1234, correct=exact_match_of
) -> dict:
    """A fixed evaluation: `sampled_terms`, plus exact-match, ROUGE-L and the task's correctness
    (`correct`) of the greedy answers against the references (§7.4)."""
    out = sampled_terms(
        model, tok, records, salient, reward_cfg, ppo_cfg, device, seed, correct=correct
    )
    preds, out["exact_match"], out["rouge_l"] = greedy_scores(
        model, tok, records, device, ppo_cfg.max_new_tokens
    )
    out["correct"] = sum(correct(p, r) for p, r in zip(preds, records)) / max(1, len(records))
    return out


@torch.no_grad()
def candidates(
    model, tok, prompts, salient, reward_cfg, ppo_cfg, device, num_samples, seed=99
) -> list:
    """[(prompt, [(text, terms of that candidate)] * N)] for printing."""
    sp = data.specials(tok)
    src, src_mask = prompt_batch(tok, prompts, device, sp)
    rollout, terms, _, _ = ppo.sample_and_score(
        model,
        src,
        src_mask,
        salient,
        reward_cfg,
        ppo_cfg,
        sp,
        torch.Generator(device=device).manual_seed(seed),
        num_samples=num_samples,
    )
    rows = [
        (
            data.decode(tok, rollout.tokens[i].tolist(), sp),
            {k: float(v[i]) for k, v in terms.items()},
        )
        for i in range(rollout.tokens.size(0))
    ]
    return [(p, rows[b * num_samples : (b + 1) * num_samples]) for b, p in enumerate(prompts)]


def format_candidate(text, t) -> str:
    """One candidate with its reward and the terms R is made of (§3.2)."""
    return (
        f"R {t['reward']:+.3f} (coverage {t['coverage']:.3f}, focus {t['focus']:+.3f}, "
        f"repeat {t['repeat']:.3f}) "
        f"| sink {t['sink_share']:.2f} prompt {t['prompt_share']:.2f} | {text}"
    )


REPORT_KEYS = (
    "reward",
    "coverage",
    "focus",
    "repeat",
    "sink_share",
    "prompt_share",
    "length",
    "exact_match",
    "rouge_l",
    "correct",
    "sampled_correct",
    "pass_at_n",
)


def print_report(
    before: dict,
    after: dict,
    shown_before: list,
    shown_after: list,
    num_test: int,
    num_samples: int,
    correctness: str = "exact_match",
) -> None:
    """The end of the RL stage: the shown candidates before and after RL, then every metric of
    REPORT_KEYS on the test prompts before and after."""
    print("\nCandidates before -> after RL (2 samples each, fixed seed):")
    for (prompt, b), (_, a) in zip(shown_before, shown_after):
        print(f"  prompt: {prompt}")
        for text, t in b:
            print(f"    before  {format_candidate(text, t)}")
        for text, t in a:
            print(f"    after   {format_candidate(text, t)}")
    print(
        f"\n{'metric':15s} {'before RL':>10s} {'after RL':>10s}   (test split, {num_test} prompts; "
        f"reward terms, sampled_correct and pass_at_n on {num_samples} fixed-seed samples per "
        "prompt at the RL temperature; exact_match, rouge_l and correct on greedy answers; "
        f"correct: {correctness})"
    )
    for k in REPORT_KEYS:
        print(f"{k:15s} {before[k]:10.4f} {after[k]:10.4f}")
