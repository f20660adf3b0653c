"""experiments/table1.py: the Table 1 runner (§7.3-§7.6): aggregation,
settings guard, and a smoke run.

The sample standard deviation, the rows of the paper and the ablations, and a smoke run of
`--experiment table1` (tiny, 1 seed, 1 iteration) that writes every row, resumes without
recomputing anything, and refuses to mix rows computed under other settings."""

import json
import math

import pytest
import torch

import cagsr
from cli import runs
from experiments import stats, table1


def test_mean_std_is_the_sample_standard_deviation():
    # values 1, 2, 4: mean 7/3; squared deviations 16/9, 1/9, 25/9 sum to 42/9; / (n - 1) = 21/9.
    mean, std = stats.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(math.sqrt(21 / 9))
    assert stats.mean_std([0.5]) == (0.5, 0.0)


def test_every_row_of_the_paper_and_the_ablations_is_there():
    names = table1.METHOD_NAMES
    assert set(table1.PAPER_TABLE1) <= set(names)
    assert {
        "no_rl",
        "synthetic_pref",
        "human_pref_sim",
        "cagsr",
        "cagsr_pg",
        "cagsr_kl",
        "ablate_coverage",
        "ablate_focus",
        "ablate_repeat",
    } == set(names)
    rows = {m.name: m for m in table1.METHODS}
    # Each ablation switches off exactly its own term (§7.6).
    assert rows["ablate_coverage"].reward == {"alpha": 0.0}
    assert rows["ablate_focus"].reward == {"beta": 0.0}
    assert rows["ablate_repeat"].reward == {"gamma": 0.0}


SMOKE = [
    "--experiment",
    "table1",
    "--dataset",
    "qa",
    "--seeds",
    "1",
    "--sft-steps",
    "30",
    "--iterations",
    "1",
    "--max-new-tokens",
    "12",
    "--rm-steps",
    "3",
    "--relevance-steps",
    "3",
    "--human-prompts",
    "24",
    "--num-eval",
    "8",
]


@pytest.mark.slow
def test_table1_smoke_run_writes_every_row_and_resumes(tmp_path, capsys):
    work, results = tmp_path / "work", tmp_path / "results"
    argv = SMOKE + ["--out", str(work), "--results-dir", str(results)]
    assert cagsr.main(argv) == 0
    table = json.loads((results / "table1_qa.json").read_text())
    assert set(table["rows"]) == set(table1.METHOD_NAMES)
    for name, row in table["rows"].items():
        for metric in table1.METRICS:
            assert math.isfinite(row[metric]["mean"]), (name, metric)
        assert 0.0 <= row["relevance"]["mean"] <= 1.0 and 0.0 <= row["rouge_l"]["mean"] <= 1.0
    md = (results / "table1_qa.md").read_text()
    assert (
        "not measured" in md and "0.83" in md and "Human Preference RL (limited, simulated)" in md
    )
    assert (results / "table1_qa.png").stat().st_size > 0
    capsys.readouterr()

    # A second call is refused before any work: it would replace the
    # tables (nothing changes on disk) ...
    written = {p.name: p.read_bytes() for p in results.iterdir()}
    with pytest.raises(runs.UsageError, match=r"would replace .*table1_qa\.md.*--overwrite"):
        cagsr.main(argv)
    assert {p.name: p.read_bytes() for p in results.iterdir()} == written
    # ... and with --overwrite it reuses every row (nothing is recomputed)
    # and writes the same numbers.
    argv += ["--overwrite"]
    assert cagsr.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier") == len(table1.METHODS) + 1  # SFT + every row
    again = json.loads((results / "table1_qa.json").read_text())
    assert again["rows"] == table["rows"]

    # Other settings never mix with the rows on disk.
    other = list(argv)
    other[other.index("--iterations") + 1] = "2"
    with pytest.raises(SystemExit, match="differs in: iterations"):
        cagsr.main(other)


@pytest.mark.slow
def test_table1_takes_the_decoder_only_policy(tmp_path, capsys):
    work, results = tmp_path / "work", tmp_path / "results"
    light = [
        "--arch",
        "decoder",
        "--sft-steps",
        "5",
        "--prompts-per-iter",
        "8",
    ]  # the plumbing, not the numbers
    assert cagsr.main(SMOKE + light + ["--out", str(work), "--results-dir", str(results)]) == 0
    table = json.loads((results / "table1_qa-decoder.json").read_text())
    assert set(table["rows"]) == set(table1.METHOD_NAMES) and table["settings"]["arch"] == "decoder"
    assert all(
        math.isfinite(row[m]["mean"]) for row in table["rows"].values() for m in table1.METRICS
    )
    assert (
        "(tiny decoder-only preset, 1 seeds)"
        in (results / "table1_qa-decoder").with_suffix(".md").read_text()
    )
    assert (
        torch.load(work / "seed0" / "sft.pt", weights_only=False)["model_config"]["arch"]
        == "decoder"
    )
    capsys.readouterr()
