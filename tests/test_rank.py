"""Which reward sees correctness (experiments/rank.py), and the rewards study from a pretrained
model (experiments/reward_study.py with --init): the key-span correctness rule (DECISIONS.md §13)
and the within-prompt AUC on hand-worked cases; both commands at a tiny size from a tiny GGUF file
and from a tiny SFT checkpoint, their tables checked against a second computation from the
candidates they kept."""

import json

import numpy as np
import pytest

import cagsr
import data
from cli import runs
from experiments import baselines, evaluation, rank, reward_study, stats

pytest.importorskip("gguf")
pytest.importorskip("transformers")

from test_gguf import random_model, train_bpe, write_gguf  # noqa: E402

# --------------------------------------------------------------------------------------------
# The rule and the statistic
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Vessom Risbais was born in 1983.", 1.0),
        ("1983", 1.0),
        ("He was born in 1983, and lives in Neilthim.", 0.0),  # both spans: not an answer
        ("Vessom lives in Neilthim.", 0.0),  # the distractor's
        ("I do not know.", 0.0),
        ("born in 19831", 0.0),  # a span is whole words, not a substring
        ("NEILTHIM? no: 1983!", 0.0),  # case and punctuation ignored
    ],
)
def test_key_span_match_on_hand_worked_answers(answer, expected):
    assert evaluation.key_span_match(answer, "1983", "Neilthim") == expected


def test_key_span_match_needs_the_whole_span_in_order_and_ignores_an_equal_distractor():
    assert evaluation.key_span_match("the river Ol Mara", "Ol Mara", "Tesk") == 1.0
    assert evaluation.key_span_match("Mara Ol", "Ol Mara", "Tesk") == 0.0
    # The distractor names the same city: saying it is the answer.
    assert evaluation.key_span_match("She lives in Bamul.", "Bamul", "Bamul") == 1.0


def test_every_grounded_record_states_its_key_in_its_prompt_and_response():
    records = data.load_dataset("qa-grounded").test[:300]
    for r in records:
        w = evaluation.words
        assert evaluation.contains_span(w(r["response"]), r["key"])
        assert evaluation.contains_span(w(r["wrong"]), r["wrong_key"])
        assert evaluation.contains_span(w(r["prompt"]), r["key"])
        assert evaluation.contains_span(w(r["prompt"]), r["wrong_key"])
        # the reference is correct under the rule unless it names the distractor's span too
        # (a same-surname sibling: the key is the first name)
        assert evaluation.key_span_match(r["response"], r["key"], r["wrong_key"]) == 1.0
        assert evaluation.key_span_match(r["wrong"], r["key"], r["wrong_key"]) == float(
            evaluation.words(r["key"]) == evaluation.words(r["wrong_key"])
        )


def test_prompt_auc_on_a_hand_worked_prompt():
    # correct scores 3 and 1; wrong scores 2, 1 and 0. Pairs: (3,2) (3,1) (3,0) win; (1,2) loses;
    # (1,1) ties; (1,0) wins: (4 + 0.5) / 6.
    assert stats.prompt_auc([3, 2, 1, 1, 0], [1, 0, 1, 0, 0]) == pytest.approx(4.5 / 6)
    assert stats.prompt_auc([1, 2], [1, 1]) is None  # all right: nothing to rank
    assert stats.prompt_auc([1, 2], [0, 0]) is None
    assert stats.within_prompt_auc([0, 1, 5, 4], [0, 1, 0, 1], 2) == [1.0, 0.0]


def test_prompt_auc_is_the_mann_whitney_u_over_the_pairs():
    rng = np.random.default_rng(0)
    score, correct = rng.integers(0, 4, 12), rng.integers(0, 2, 12)  # ties on purpose
    right, wrong = score[correct == 1], score[correct == 0]
    # U from the ranks of all candidates (ties averaged): U = R_right - n(n+1)/2
    r = stats.ranks(score)[correct == 1].sum()
    u = r - len(right) * (len(right) + 1) / 2
    assert stats.prompt_auc(score, correct) == pytest.approx(u / (len(right) * len(wrong)))


def test_term_reward_is_one_term_of_the_attention_reward_with_its_sign():
    import torch

    terms = dict(coverage=torch.tensor([0.2]), repeat=torch.tensor([0.5]))
    assert baselines.TermReward("coverage")(None, None, None, terms).item() == pytest.approx(0.2)
    assert baselines.TermReward("neg_repeat")(None, None, None, terms).item() == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="unknown reward term"):
        baselines.TermReward("reward")


# --------------------------------------------------------------------------------------------
# The commands, from a tiny GGUF file and a tiny SFT checkpoint
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    tok = train_bpe()
    path = tmp_path_factory.mktemp("rank") / "Tiny-Llama.F32.gguf"
    write_gguf(path, "llama", random_model("llama", tok.get_vocab_size(), seed=0), tok, "F32")
    return path


def right_if_even(monkeypatch):
    """A random or barely trained model never says a key span, so nothing would be ranked: here an
    answer is "right" when its text has an even length (the commands' plumbing is what is tested;
    the rule itself is tested above)."""
    even = lambda text, key, wrong: float(len(text) % 2 == 0)
    monkeypatch.setattr(evaluation, "key_span_match", even)


RANK = ["--num-eval", "6", "--num-samples", "3", "--max-new-tokens", "5", "--temperature", "2.0"]


def check_rank_table(results, work, name: str, seeds: list[int]) -> dict:
    """The table of `name` against a second computation from the candidates kept in `work`."""
    out = json.loads((results / f"rank_{name}.json").read_text())
    assert out["seeds"] == seeds
    for s in seeds:
        kept = json.loads((work / f"seed{s}.json").read_text())
        assert len(kept["text"]) == 6 * 3
        records = data.load_dataset("qa-grounded").test[:6]
        again = [
            float(evaluation.key_span_match(t, r["key"], r["wrong_key"]))
            for t, r in zip(kept["text"], (r for r in records for _ in range(3)))
        ]
        assert kept["correct"] == again
        summary = out["per_seed"][str(s)]
        assert summary["correct"] == pytest.approx(np.mean(again))
        assert summary["mixed"] > 0  # something is ranked
        for sig in rank.SIGNAL_NAMES:
            aucs = summary["signals"][sig]["per_prompt"]
            for b, auc in enumerate(aucs):
                sl = slice(3 * b, 3 * b + 3)
                right = [x for x, c in zip(kept[sig][sl], again[sl]) if c]
                wrong = [x for x, c in zip(kept[sig][sl], again[sl]) if not c]
                if not right or not wrong:
                    assert auc is None
                    continue
                pairs = [(x > y) + 0.5 * (x == y) for x in right for y in wrong]
                assert auc == pytest.approx(sum(pairs) / len(pairs))
    assert out["best_variant"] in rank.ATTENTION_VARIANTS
    md = (results / f"rank_{name}.md").read_text()
    assert "Random score" in md and (results / f"rank_{name}.png").stat().st_size > 0
    return out


@pytest.mark.slow
def test_rank_then_the_rewards_study_from_a_tiny_gguf(tiny_llama, tmp_path, capsys, monkeypatch):
    # A random model never says a key span, so nothing would be ranked: here an answer is "right"
    # when its text has an even length (the commands' plumbing is what is tested).
    monkeypatch.setattr(
        evaluation, "key_span_match", lambda text, key, wrong: float(len(text) % 2 == 0)
    )
    results, name = tmp_path / "results", "qa-grounded-tiny-llama"
    argv = ["--experiment", "rank", "--init", str(tiny_llama), "--results-dir", str(results)]
    work = tmp_path / "rank"
    assert cagsr.main(argv + RANK + ["--seeds", "2", "--out", str(work)]) == 0
    check_rank_table(results, work, name, [0, 1])
    capsys.readouterr()
    assert cagsr.main(argv + RANK + ["--seeds", "2", "--out", str(work), "--overwrite"]) == 0
    assert capsys.readouterr().out.count("done earlier") == 2  # each seed read back

    study = [
        "--experiment", "rewards", "--init", str(tiny_llama), "--results-dir", str(results),
        "--out", str(tmp_path / "rewards"), "--seeds", "1", "--iterations", "2",
        "--eval-every", "1", "--prompts-per-iter", "2", "--num-samples", "2",
        "--max-new-tokens", "5", "--num-eval", "6", "--eval-prompts", "4",
        "--baseline", "group", "--whiten",
    ]  # fmt: skip
    assert cagsr.main(study) == 0
    out = json.loads((results / f"rewards_{name}.json").read_text())
    assert (
        out["settings"]["variant"]
        == json.loads((results / f"rank_{name}.json").read_text())["best_variant"]
    )
    assert out["settings"]["correctness"] == "key_span"
    names = [r.name for r in reward_study.PRETRAINED_ROWS]
    assert set(names) <= set(out["rows"]) and "hybrid" not in out["rows"]
    for row in names:
        curve = out["rows"][row]["curve"]
        assert [p["iteration"] for p in curve] == ([0] if row == "sft" else [0, 1, 2])
        assert all(0 <= p["greedy_correct"] <= 1 for p in curve)
    start = out["rows"]["oracle"]["curve"][0]
    assert start["rewards"]["oracle"] == pytest.approx(start["correct"])  # the oracle is the rule
    md = (results / f"rewards_{name}.md").read_text()
    assert "HEADROOM CHECK FAILED" in md or "Headroom check: passed" in md
    assert "python cagsr.py --experiment rewards --init" in json.dumps(out["gpu_command"])


@pytest.mark.slow
def test_rank_from_a_tiny_sft_checkpoint(tmp_path, capsys, monkeypatch):
    right_if_even(monkeypatch)
    run_dir = tmp_path / "sft"
    sft = ["--stage", "sft", "--dataset", "qa-grounded", "--sft-steps", "3", "--out", str(run_dir)]
    assert cagsr.main(sft + ["--sft-batch-size", "8", "--num-eval", "4"]) == 0
    results, work = tmp_path / "results", tmp_path / "rank"
    argv = ["--experiment", "rank", "--init", str(run_dir / "sft.pt"), "--out", str(work)]
    assert cagsr.main(argv + RANK + ["--seeds", "1", "--results-dir", str(results)]) == 0
    out = check_rank_table(results, work, "qa-grounded-tiny", [0])
    # Under cross-attention the prompt share is 1 for every candidate: it ranks nothing, and is
    # never the variant, whatever its tied AUC.
    assert out["pooled"]["prompt_share"]["constant"] and out["best_variant"] != "prompt_share"
    assert "constant (all ties)" in next(results.glob("rank_*.md")).read_text()


def test_rank_needs_an_init_and_table1_refuses_one(tmp_path):
    with pytest.raises(runs.UsageError, match="--experiment rank ranks the candidates .*--init"):
        cagsr.main(["--experiment", "rank", "--out", str(tmp_path / "w")])
    with pytest.raises(runs.UsageError, match="--experiment table1 .* does not take --init"):
        cagsr.main(["--experiment", "table1", "--init", str(tmp_path), "--out", str(tmp_path)])
    assert not (tmp_path / "w").exists()


def test_split_is_rank_only():
    with pytest.raises(runs.UsageError, match="--split has no effect with --experiment rewards"):
        cagsr.main(["--experiment", "rewards", "--split", "val"])
