"""The README's headline numbers are the committed tables': each is recomputed here from its JSON in
results/ (with the tables' own functions: reward_study.seed_level, the ablation summary) and must
appear, formatted as the README writes it, after the words that say what it is. A re-run that moves
a number fails this test until the README says the new one."""

import functools
import json
import re
from pathlib import Path

import pytest

from experiments import reward_study

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"


def readme_text() -> str:
    """README.md with its line breaks and Markdown emphasis gone and its minus signs ASCII, so that
    a phrase matches however the paragraph wraps."""
    text = (ROOT / "README.md").read_text().replace("−", "-").replace("**", "")
    return re.sub(r"\s+", " ", text)


@functools.cache
def table(stem: str) -> dict:
    """results/<stem>.json, read once."""
    return json.loads((RESULTS / f"{stem}.json").read_text())


def points(d: dict) -> str:
    """A difference in points with its interval: +9.6 [+7.1, +12.1]."""
    return f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"


def rewards(name: str, row: str, against: str) -> str:
    """Row `row`'s correctness against the start ("vs_start") or random ("vs_random") in
    results/rewards_<name>.json, with its interval over seeds and prompts."""
    result = table(f"rewards_{name}")
    names = tuple(dict.fromkeys((row, "sft", "random")))
    return points(reward_study.seed_level(result, "correct", names)[row][against])


def ablation(name: str, row: str) -> str:
    """Row `row`'s greedy correctness against random in results/ablations_<name>.json."""
    return points(table(f"ablations_{name}")["rows"][row]["greedy_vs_random"])


def share(name: str, row: str, measure: str) -> str:
    """An ablation row's share of answers (in %) with its interval: 16.8% [14.2, 19.4]."""
    m = table(f"ablations_{name}")["rows"][row][measure]
    return f"{100 * m['mean']:.1f}% [{100 * m['lo']:.1f}, {100 * m['hi']:.1f}]"


QA, DEC, SMOL = "qa-grounded", "qa-grounded-decoder", "qa-grounded-smollm2-135m-instruct"
HEADLINES = [
    # (the words before the number in README.md, how the number is read from results/)
    ("raises exact-match on `qa-grounded` by", lambda: rewards(QA, "oracle", "vs_start")),
    ("and beats the random reward by", lambda: rewards(QA, "oracle", "vs_random")),
    ("table: against the random reward,", lambda: rewards(QA, "cagsr", "vs_random")),
    ("points of exact-match on `qa-grounded`,", lambda: rewards("instruct", "cagsr", "vs_random")),
    ("points of reference match on `instruct`, and", lambda: rewards(DEC, "cagsr", "vs_random")),
    ("cost as much as R (against random,", lambda: ablation(QA, "coverage")),
    (f"{ablation(QA, 'coverage')} and", lambda: ablation(QA, "focus")),
    ("On the decoder-only policy focus carries it (", lambda: ablation(DEC, "focus")),
    ("only a KL penalty to SFT protects correctness* (", lambda: ablation(QA, "kl")),
    ("against random on the encoder-decoder,", lambda: ablation(DEC, "kl")),
    ("removes coverage's damage (", lambda: ablation(QA, "oracle_coverage")),
    ("as often as random does, but", lambda: share(QA, "cagsr", "independent")),
    (
        "the mean token log-probability costs no more than random (",
        lambda: rewards(QA, "logprob", "vs_random"),
    ),
    (
        "the oracle control raises greedy correctness by",
        lambda: rewards(SMOL, "oracle", "vs_start"),
    ),
    ("The attention reward lowers it by", lambda: rewards(SMOL, "cagsr", "vs_start")),
    ("and self-certainty by", lambda: rewards(SMOL, "self_certainty", "vs_start")),
]


@pytest.mark.parametrize("words, number", HEADLINES, ids=[w for w, _ in HEADLINES])
def test_the_readme_says_the_committed_number(words, number):
    expected = words + ("" if words.endswith("(") else " ") + number()
    assert expected in readme_text(), (
        f"README.md should say {expected!r}: the number recomputed from results/ has moved, or "
        "the sentence was reworded"
    )
