"""Metrics that judge a response against its reference (§7.4). Never used as a reward.

Kept apart from reward.py on purpose: the CAGSR reward sees only the model's own attention, and
these metrics see only text; keeping them in separate files keeps that boundary visible.
"""

from __future__ import annotations

import re

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
