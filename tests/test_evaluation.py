"""Tests for evaluation.py: ROUGE-L and exact match (§7.4), on hand-worked pairs."""
import pytest

import evaluation
from evaluation import exact_match, rouge_l


# ---------------------------------------------------------------------------- ROUGE-L
def test_rouge_l_identical_is_one():
    # LCS = 6 = |c| = |r|: P = R = 1, F = 1.
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)


def test_rouge_l_one_word_substituted():
    # c = the cat sat on the mat, r = the cat is on the mat: LCS = "the cat on the mat" = 5.
    # P = 5/6, R = 5/6, F = 2PR/(P+R) = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)


def test_rouge_l_lin_2004_examples():
    # Lin (2004), ROUGE, §3.1: reference "police killed the gunman".
    # "police kill the gunman": LCS = police the gunman = 3, P = R = 3/4, F = 3/4.
    assert rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(3 / 4)
    # "the gunman kill police": LCS = the gunman = 2 (police comes after, not before), P = R = 2/4, F = 1/2.
    assert rouge_l("the gunman kill police", "police killed the gunman") == pytest.approx(1 / 2)


def test_rouge_l_different_lengths():
    # c = the cat (2 words), r = the cat sat on the mat (6): LCS = 2.
    # P = 2/2 = 1, R = 2/6 = 1/3, F = 2 * 1 * 1/3 / (1 + 1/3) = (2/3) / (4/3) = 1/2.
    assert rouge_l("the cat", "the cat sat on the mat") == pytest.approx(0.5)
    # c = a b c d (4), r = a x c y d z (6): LCS = a c d = 3.
    # P = 3/4, R = 3/6 = 1/2, F = 2 * 3/8 / (5/4) = (3/4) / (5/4) = 3/5.
    assert rouge_l("a b c d", "a x c y d z") == pytest.approx(0.6)
    # F1 is symmetric: swapping the sides swaps P and R.
    assert rouge_l("a x c y d z", "a b c d") == pytest.approx(0.6)


def test_rouge_l_is_a_subsequence_not_a_bag_of_words():
    # c = b a, r = a b: both words shared, but the LCS is 1 (a, or b). P = R = 1/2, F = 1/2.
    assert rouge_l("b a", "a b") == pytest.approx(0.5)
    # c = a b c, r = c a b: a greedy left-to-right match on c would take "c" first and stop at 1;
    # the LCS is a b = 2. P = R = 2/3, F = 2/3.
    assert rouge_l("c a b", "a b c") == pytest.approx(2 / 3)
    # Repeated words: c = a a a, r = a: LCS = 1, P = 1/3, R = 1, F = 2 * 1/3 / (4/3) = 1/2.
    assert rouge_l("a a a", "a") == pytest.approx(0.5)


def test_rouge_l_ignores_case_and_punctuation():
    # words(): lower-case, non-alphanumeric runs separate -> [hello, world] on both sides, F = 1.
    assert rouge_l("Hello, World!", "hello world") == pytest.approx(1.0)
    # A hyphen separates too: [state, of, the, art] on both sides.
    assert rouge_l("State-of-the-art.", "state of the art") == pytest.approx(1.0)
    assert evaluation.words("Varo Kelin was born in 1950.") == ["varo", "kelin", "was", "born", "in", "1950"]


def test_rouge_l_empty_sides_are_zero():
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("the cat", "") == 0.0
    assert rouge_l("", "") == 0.0
    # Punctuation only has no words either.
    assert rouge_l("?!...", "the cat") == 0.0


def test_rouge_l_no_overlap_is_zero():
    # LCS = 0: P = R = 0, F defined as 0 (not 0/0).
    assert rouge_l("red blue green", "cat dog") == 0.0


# ------------------------------------------------------------------------- exact match
def test_exact_match_ignores_case_and_punctuation():
    assert exact_match("Varo Kelin lives in Tamsa.", "varo kelin lives in tamsa") == 1.0
    assert exact_match("Varo  Kelin, lives in TAMSA!", "Varo Kelin lives in Tamsa.") == 1.0
    assert exact_match("Varo Kelin lives in Tamsa.", "Varo Kelin lives in Kelo.") == 0.0
    # Word order and extra words matter.
    assert exact_match("Kelin Varo lives in Tamsa.", "Varo Kelin lives in Tamsa.") == 0.0
    assert exact_match("Varo Kelin lives in Tamsa now.", "Varo Kelin lives in Tamsa.") == 0.0
