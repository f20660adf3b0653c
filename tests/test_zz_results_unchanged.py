"""Runs last (pytest collects the files in name order): the whole suite wrote nothing into the
committed results/ (its smoke runs write only under temporary directories)."""

from conftest import RESULTS, digest


def test_the_suite_left_the_committed_results_byte_identical(results_at_start):
    assert results_at_start, "results/ holds the committed tables"
    assert digest(RESULTS) == results_at_start
