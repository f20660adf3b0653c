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
