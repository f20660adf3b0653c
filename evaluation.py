"""Metrics that judge a response against its reference (§7.4). Never used as a reward.

Kept apart from reward.py on purpose: the CAGSR reward sees only the model's own attention, and
these metrics see only text; keeping them in separate files keeps that boundary visible.
"""

from __future__ import annotations

import math
import random
import re

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import data
from model import ModelConfig, PairScorer

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-case, and every run of non-alphanumeric characters separates tokens (no stemming):
    the tokenization of the ROUGE-1.5.5 re-implementations."""
    return _WORD.findall(text.lower())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two texts have the same `words` (case and punctuation ignored), else 0.0."""
    return float(words(prediction) == words(reference))


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure (§7.4: the paper scores responses by ROUGE-L against references): the F1 of
    LCS precision LCS/|candidate| and recall LCS/|reference|, over `words`. 0.0 when either side
    has no words or nothing in common."""
    c, r = words(candidate), words(reference)
    if not c or not r:
        return 0.0
    prev = [0] * (len(r) + 1)                      # prev[j]: LCS length of the words of c so far and r[:j]
    for ci in c:
        cur = [0]
        for j, rj in enumerate(r, start=1):
            cur.append(prev[j - 1] + 1 if ci == rj else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------
# Perplexity of the policy on held-out references (§7.4)
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def mean_nll(model, pairs, device, batch_size=128) -> float:
    """Token-weighted mean negative log-likelihood (nats) of the responses of `pairs` (encoded
    (prompt ids, response ids)) under `model`, teacher-forced. Perplexity is exp of this."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in data.batches(pairs, batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits, _ = model(batch["src"], batch["src_mask"], batch["tgt_in"])           # (B, T, V)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), batch["tgt_out"].flatten(), reduction="none")
        total += float((nll * batch["tgt_mask"].flatten()).sum())
        count += int(batch["tgt_mask"].sum())
    model.train(was_training)
    return total / max(1, count)


def perplexity(model, pairs, device) -> float:
    """exp(mean token NLL) of the references (§7.4: perplexity on a held-out set)."""
    return math.exp(mean_nll(model, pairs, device))


# --------------------------------------------------------------------------------------------
# Prompt relevance (§7.4): an on-topic/off-topic classifier, an evaluator only
# --------------------------------------------------------------------------------------------

def pair_tensors(pairs, device):
    """(prompt ids, response ids) pairs -> src, src_mask, resp, resp_mask on `device` (PairScorer's inputs)."""
    b = data.collate(pairs)
    return b["src"].to(device), b["src_mask"].to(device), b["tgt_out"].to(device), b["tgt_mask"].to(device)


@torch.no_grad()
def pair_scores(scorer, pairs, device, batch_size=256) -> torch.Tensor:
    """The scorer's logit for every (prompt ids, response ids) pair: (len(pairs),) on the CPU."""
    scorer.eval()
    out = [scorer(*pair_tensors(pairs[i:i + batch_size], device)).float().cpu()
           for i in range(0, len(pairs), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def fit_pair_scorer(scorer, loss_at, steps: int, lr: float, desc: str) -> list[float]:
    """AdamW on `loss_at(step)` (a scalar computed with `scorer`) for `steps` steps, with a progress
    bar. A non-finite loss stops training with an error instead of being applied. Returns the losses."""
    opt = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=0.01)
    scorer.train()
    losses = []
    for step in tqdm(range(steps), desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0, leave=False):
        loss = loss_at(step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {float(loss)} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(scorer.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    scorer.eval()
    return losses


def off_topic_index(i: int, responses: list[str], rng: random.Random) -> int:
    """A random j whose response text differs from response i's: (prompt i, response j) is off topic."""
    if len(set(responses)) < 2:
        raise ValueError("off-topic pairs need at least two different responses")
    while True:
        j = rng.randrange(len(responses))
        if responses[j] != responses[i]:
            return j


def off_topic(responses: list[str], rng: random.Random) -> list[int]:
    """`off_topic_index` for every i."""
    return [off_topic_index(i, responses, rng) for i in range(len(responses))]


def train_relevance(tok, records, cfg: ModelConfig, device, steps=600, batch_size=64, lr=1e-3, seed=0):
    """The relevance classifier of §7.4, a from-scratch PairScorer: (prompt, its reference) is
    on-topic (1), (prompt, another prompt's reference) off-topic (0), binary cross-entropy, fresh
    off-topic pairings every step. Train it on prompts no reward model sees (the validation split)."""
    pairs = data.encode_records(tok, records, cfg.max_src_len, cfg.max_tgt_len)
    responses = [r["response"] for r in records]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    scorer = PairScorer(cfg).to(device)

    def loss_at(step):
        idx = [rng.randrange(len(pairs)) for _ in range(batch_size // 2)]
        other = [off_topic_index(i, responses, rng) for i in idx]
        batch = [pairs[i] for i in idx] + [(pairs[i][0], pairs[j][1]) for i, j in zip(idx, other)]
        labels = torch.tensor([1.0] * len(idx) + [0.0] * len(idx), device=device)
        return F.binary_cross_entropy_with_logits(scorer(*pair_tensors(batch, device)), labels)

    fit_pair_scorer(scorer, loss_at, steps, lr, desc="relevance classifier")
    return scorer


def relevance(scorer, tok, prompts: list[str], responses: list[str], device) -> list[float]:
    """Prompt relevance in [0, 1] (§7.4): the classifier's probability that `response` is on topic."""
    pairs = data.encode_records(tok, [dict(prompt=p, response=r) for p, r in zip(prompts, responses)],
                                scorer.cfg.max_src_len, scorer.cfg.max_tgt_len)      # too long: an error, never cut
    return torch.sigmoid(pair_scores(scorer, pairs, device)).tolist()


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
    return dict(pairwise=sum(a > b for a, b in zip(on, off)) / n,
                accuracy=(sum(a > 0.5 for a in on) + sum(b <= 0.5 for b in off)) / (2 * n))
