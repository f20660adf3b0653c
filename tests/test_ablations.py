"""Why the attention reward fails (experiments/ablations.py) and the intervals that include the
seeds (experiments/stats.py): each against a computation made apart, and the ablation command at
a tiny size.

- The two-stage bootstrap (seeds, then prompts): constant seeds leave only the seed stage, whose
  percentiles are worked by hand; one seed is the one-stage bootstrap of that seed; its variance
  matches the law of total variance computed from the data; a paired difference is the interval
  of the differences.
- Student's t over seeds on the audit's own example (+3.5 / -15.7 / -20.3 gives [-42, +21]).
- The oracle salient set is the answer clause's own tokens, read off a record by hand; the
  prompt-independent share on hand-made answers; the decoder-only policy's first real token is
  never salient; each seed's SFT noise is its own draw.
- The ablation command at a tiny size writes every row with its intervals and resumes from disk.
"""

import json

import numpy as np
import pytest
import torch

import cagsr
import data
from decoder import DecoderOnly, policy_config
from experiments import ablations, reward_study, stats
from experiments.common import Shared, seed_sft_pairs
from reward import RewardConfig, SalientTokens

# ---- intervals that include the seeds ----------------------------------------------------------


def test_constant_seeds_leave_the_seed_stage_whose_percentiles_are_worked_by_hand():
    # Seeds at 0 and 1: a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% percentiles are 0 and 1, and about half the resamples sit at 1/2.
    means = stats.hierarchical_means([[0.0, 0.0, 0.0], [1.0, 1.0]], resamples=20_000)
    assert set(np.unique(means)) == {0.0, 0.5, 1.0}
    assert abs(np.mean(means == 0.5) - 0.5) < 0.02
    r = stats.hierarchical_interval([[0.0, 0.0, 0.0], [1.0, 1.0]])
    assert (r["mean"], r["lo"], r["hi"]) == (0.5, 0.0, 1.0)


def test_one_seed_is_the_one_stage_bootstrap_of_its_prompts():
    # x = [0, 0, 0, 1]: the resampled mean is Binomial(4, 1/4) / 4; its 2.5% and 97.5%
    # percentiles are 0 and 0.75 (P(K >= 3) = 13/256 > 2.5%, P(K = 4) = 1/256 < 2.5%).
    r = stats.hierarchical_interval([[0.0, 0.0, 0.0, 1.0]], resamples=20_000)
    assert (r["mean"], r["lo"], r["hi"]) == (0.25, 0.0, 0.75)


def test_the_two_stage_variance_is_the_law_of_total_variance():
    rng = np.random.default_rng(3)
    groups = [rng.normal(m, 1.0, size=n) for m, n in ((0.0, 40), (2.0, 25), (-1.0, 60))]
    S = len(groups)
    m = np.array([g.mean() for g in groups])
    v = np.array([g.var() / g.size for g in groups])  # each seed's prompt-stage variance
    # one slot: a seed drawn uniformly, then its prompt mean: Var = Var(m) + mean(v); S slots
    expected = (m.var() + v.mean()) / S
    got = stats.hierarchical_means(groups, resamples=200_000, seed=1).var()
    assert abs(got - expected) / expected < 0.02


def test_a_paired_difference_is_the_interval_of_the_differences():
    a = [[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    b = [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    d = stats.hierarchical_difference(a, b)
    r = stats.hierarchical_interval([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert (d["diff"], d["lo"], d["hi"]) == (r["mean"], r["lo"], r["hi"])
    assert d["diff"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="same seeds and prompts"):
        stats.hierarchical_difference(a, [[0.0, 1.0]])


def test_student_t_over_seeds_on_the_audits_example():
    r = stats.seed_t_interval([3.5, -15.7, -20.3])
    # mean -10.833, sd 12.61, t(0.975, 2) = 4.3027: half-width 4.3027 x 12.61 / sqrt(3) = 31.36
    assert r["mean"] == pytest.approx(-10.8333, abs=1e-4)
    assert (round(r["lo"]), round(r["hi"])) == (-42, 21)


def test_seed_level_reads_per_prompt_values_where_the_json_keeps_them_and_seed_means_otherwise():
    per_prompt = {
        "0": {n: {"test": {"correct": v}} for n, v in (("sft", [1, 0]), ("random", [0, 0]))},
        "1": {n: {"test": {"correct": v}} for n, v in (("sft", [1, 1]), ("random", [1, 0]))},
    }
    two_stage = reward_study.seed_level(
        dict(per_seed_rows=per_prompt), "correct", ("sft", "random")
    )
    assert two_stage["sft"]["value"]["mean"] == 0.75
    assert two_stage["sft"]["vs_random"]["diff"] == 0.5 and two_stage["sft"]["vs_start"] is None
    means = {
        n: {"metrics": {"correct": {"values": v}}}
        for n, v in (("sft", [0.5, 1]), ("random", [0, 0.5]))
    }
    t = reward_study.seed_level(dict(rows=means), "correct", ("sft", "random"))
    assert t["sft"]["method"] == "Student's t over the seed means"
    # the differences are 0.5 and 0.5: no spread, so the interval is the point
    assert (t["sft"]["vs_random"]["lo"], t["sft"]["vs_random"]["hi"]) == (0.5, 0.5)


# ---- the oracle salient set, collapse, sinks, noise per seed -------------------------------------

RECORD = {
    "prompt": "Gobro Parbros lives in Krofeir and has a sibling called Dinbas Parbros. "
    "Where does Gobro Parbros live?",
    "response": "Gobro Parbros lives in Krofeir.",
    "wrong": "Gobro Parbros has a sibling called Dinbas Parbros.",
    "key": "Krofeir",
    "wrong_key": "Dinbas",
}


@pytest.fixture(scope="module")
def tok():
    splits = data.load_dataset("qa-grounded", seed=0)
    return data.train_tokenizer(list(data.record_texts(splits.train[:3000] + [RECORD])), 2000)


def test_the_oracle_salient_set_is_the_answer_clauses_own_tokens(tok):
    ids = data.encode(tok, RECORD["prompt"])
    src = torch.tensor([ids])
    oracle = ablations.OracleSalient(tok, [RECORD], data.content_token_mask(tok))
    chosen = oracle(src, torch.ones_like(src, dtype=torch.bool), RewardConfig())[0]
    words = [tok.decode([i]).strip() for i, c in zip(ids, chosen.tolist()) if c]
    # "lives in Krofeir": in the answer, not in the distractor's; the subject is in both, and the
    # question's "Gobro Parbros live" comes after the context
    assert words == ["lives", "in", "Krofeir"]
    with pytest.raises(KeyError, match="not one of the records"):
        oracle(src[:, 1:], torch.ones_like(src[:, 1:], dtype=torch.bool), RewardConfig())


def test_prompt_independent_answers_invent_the_same_words_for_many_prompts():
    prompts = [f"A{i} lives in C{i} and keeps a pet. Where does A{i} live?" for i in range(300)]
    answers = (
        [f"A{i} lives in Tenkrain." for i in range(4)]  # invented, the same for 4 prompts
        + [f"A{i} lives in pet." for i in range(4, 8)]  # wrong, but every word is in its prompt
        + [f"A{i} lives in Zed{i}." for i in range(8, 11)]  # invented, each its own
        + [f"A{i} lives in C{i}." for i in range(11, 300)]  # right
    )
    flags = ablations.prompt_independent(answers, prompts)
    # 3 of 300 answers (1%) must invent the same words: "tenkrain" is said 4 times, each "zed<i>"
    # once; an answer whose words are all in its prompt invents nothing
    assert flags == [1.0] * 4 + [0.0] * 296
    assert ablations.invented("A4 lives in Zed4 twice.", prompts[4]) == "zed4 twice"


def test_a_distractor_answer_says_the_other_clauses_fact_and_not_the_asked_one():
    answers = [
        "Gobro Parbros has a sibling called Dinbas Parbros.",
        "Gobro Parbros lives in Krofeir.",
        "Gobro Parbros lives in Krofeir, sibling Dinbas.",
        "Gobro Parbros lives in pet.",
    ]
    assert ablations.distractor_answers(answers, [RECORD] * 4) == [1.0, 0.0, 0.0, 0.0]


def test_the_decoder_only_first_real_token_is_never_salient(tok):
    cfg = policy_config("decoder", "tiny", vocab_size=tok.get_vocab_size())
    policy = DecoderOnly(cfg)
    ids = data.encode(tok, RECORD["prompt"])
    src = torch.tensor([[0, 0] + ids])  # left padding
    mask = src != 0
    sp = data.specials(tok)
    idf = torch.zeros(tok.get_vocab_size())
    idf[ids[0]] = 10.0  # the first real token has the highest IDF
    salient = SalientTokens.from_idf(tok, idf)
    cfg_r = RewardConfig(salient_top_k=1)
    assert salient(src, mask, cfg_r)[0, 2]  # without the sinks it would be chosen
    chosen = salient(src, mask, cfg_r, policy.sinks(src, mask, sp.special))
    assert not chosen[0, 2] and chosen.sum() == 1


def test_each_seeds_sft_noise_is_its_own_draw(tok):
    splits = data.load_dataset("qa-grounded", seed=0)
    train = splits.train[:400]
    pairs = data.encode_records(tok, train, 64, 64)
    cfg = policy_config("encoder-decoder", "tiny", max_src_len=64, max_tgt_len=64)
    sh = Shared("x", data.Splits(train, [], []), tok, cfg, pairs, ["shared draw"], None, None, None)
    settings = dict(sft_noise=0.3, dataset="qa-grounded", sft_noise_draw="per seed")
    a, b = seed_sft_pairs(sh, settings, 0), seed_sft_pairs(sh, settings, 1)
    wrong = lambda ps: {i for i, (p, q) in enumerate(ps) if q != pairs[i][1]}
    assert len(wrong(a)) == len(wrong(b)) == 120 and wrong(a) != wrong(b)
    assert seed_sft_pairs(sh, {**settings, "sft_noise_draw": None}, 1) == ["shared draw"]


# ---- the ablation command at a tiny size ---------------------------------------------------------

TINY = (
    "--experiment ablations --seeds 1 --sft-steps 30 --iterations 2 --eval-every 1 "
    "--max-new-tokens 12 --rm-steps 2 --relevance-steps 2 --human-prompts 48 --num-eval 8 "
    "--eval-prompts 6 --prompts-per-iter 16"
).split()


@pytest.mark.slow
def test_the_ablation_command_writes_every_row_with_intervals_and_resumes(tmp_path, capsys):
    argv = TINY + ["--out", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results")]
    assert cagsr.main(argv) == 0
    out = json.loads((tmp_path / "results" / "ablations_qa-grounded.json").read_text())
    assert set(out["rows"]) == set(ablations.ROW_NAMES)
    for name, row in out["rows"].items():
        assert row["greedy"]["lo"] <= row["greedy"]["mean"] <= row["greedy"]["hi"]
        assert {"diff", "lo", "hi", "excludes_0"} <= set(row["greedy_vs_random"])
    assert out["rows"]["random"]["greedy_vs_random"]["diff"] == 0.0
    guards = json.loads((tmp_path / "work" / "seed0" / "guards.json").read_text())
    assert guards["entropy_floor"] > 0 and guards["kl_coef"] >= 0
    md = (tmp_path / "results" / "ablations_qa-grounded.md").read_text()
    assert "Coverage of the answer clause (upper bound" in md
    capsys.readouterr()
    assert cagsr.main(argv + ["--overwrite"]) == 0  # every row read back from the work directory
    assert "done earlier" in capsys.readouterr().out
    again = json.loads((tmp_path / "results" / "ablations_qa-grounded.json").read_text())
    assert again["rows"] == out["rows"]


def test_the_ablation_refuses_another_dataset_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="qa-grounded only"):
        cagsr.main(TINY + ["--dataset", "instruct", "--out", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()
