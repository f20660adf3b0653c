"""The rival internal rewards (experiments/baselines.py), the statistics (experiments/stats.py) and
the reward comparison (experiments/reward_study.py): each reward against an independent computation,
the bootstrap and Spearman on hand-worked cases, and a smoke run of `--experiment rewards`.

- `self_certainty` against KL(U ‖ p) summed in numpy from the probabilities, `neg_entropy` against
  −Σ p log p, the mean log-probability against a numpy log-softmax; the sampler's recorded
  per-token self-certainty and entropy (temperature 0.7, top-k 4) equal the pure functions on a
  teacher-forced pass over the same tokens.
- The random reward is a seeded fair coin; the oracle with exact-match, reference match and
  ROUGE-L on four hand-worked candidates; the three cases ROUGE-L F1 ranks wrongly ("X was born in
  1942." / "X was born in." / "X was born in 1999."): exact-match and reference match pay the right
  answer alone the most and the omission no more than the wrong answer, and padding does not pay.
- The registry builds each `--reward` name; the hybrid adds exactly weight x the reward model;
  inside `ppo.sample_and_score` a rival reward replaces R and keeps it as `attention_reward`.
- The bootstrap intervals on hand-worked cases (x = [0, 0, 0, 1] gives [0, 0.75] from the
  Binomial(4, 1/4) percentiles), Spearman with ties by hand, prompts all tied skipped and counted,
  the collapse step.
- A smoke run of `--experiment rewards` (tiny, 1 seed, 2 iterations) that writes every row, curve
  and headroom check and resumes without recomputing anything."""

import json
import math

import numpy as np
import pytest
import torch

import cagsr
import data
import ppo
from cli import runs
from experiments import baselines, evaluation, reward_study, stats
from experiments.evaluation import PairScorer
from model import EncoderDecoder, config_for
from reward import RewardConfig, SalientTokens
from sampling import Decoding, Rollout

SP = data.Specials(pad=0, start=1, eos=2, special=(0, 1, 2, 3))  # the toy vocabulary's ids


def random_logits(seed=0, B=3, T=5, V=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    mask = torch.arange(T)[None, :] < torch.tensor([5, 2, 3])[:, None]
    return logits, mask


def per_row_mean(values, mask):
    """A plain loop: the mean of values[b][t] over the response tokens of row b."""
    return [
        sum(values[b][t] for t in range(mask.shape[1]) if mask[b, t]) / int(mask[b].sum())
        for b in range(mask.shape[0])
    ]


# ---- each reward against an independent computation ---------------------------------------------


def test_self_certainty_is_the_kl_of_uniform_from_the_token_distribution():
    logits, mask = random_logits()
    p = np.exp(logits.double().numpy())
    p /= p.sum(-1, keepdims=True)
    V = p.shape[-1]
    kl = (1 / V * np.log((1 / V) / p)).sum(-1)  # KL(U || p) = sum_j u_j log(u_j / p_j)
    want = per_row_mean(kl, mask)
    assert baselines.self_certainty(logits, mask).tolist() == pytest.approx(want, rel=1e-5)
    # Uniform logits are certain of nothing: 0.
    assert baselines.self_certainty(
        torch.zeros(1, 2, 7), torch.ones(1, 2, dtype=torch.bool)
    ).item() == pytest.approx(0.0, abs=1e-6)


def test_neg_entropy_is_minus_the_mean_entropy_of_each_token_distribution():
    logits, mask = random_logits(seed=1)
    p = np.exp(logits.double().numpy())
    p /= p.sum(-1, keepdims=True)
    entropy = -(p * np.log(p)).sum(-1)
    want = [-v for v in per_row_mean(entropy, mask)]
    assert baselines.neg_entropy(logits, mask).tolist() == pytest.approx(want, rel=1e-5)
    # Uniform over V: entropy log V.
    assert baselines.neg_entropy(
        torch.zeros(1, 1, 8), torch.ones(1, 1, dtype=torch.bool)
    ).item() == pytest.approx(-math.log(8), rel=1e-6)


def test_mean_logprob_is_the_mean_log_probability_of_the_tokens():
    logits, mask = random_logits(seed=2)
    tokens = torch.randint(
        0, logits.size(-1), mask.shape, generator=torch.Generator().manual_seed(3)
    )
    z = logits.double().numpy()
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, tokens.numpy()[..., None], -1)[..., 0]
    assert baselines.mean_logprob(logits, tokens, mask).tolist() == pytest.approx(
        per_row_mean(picked, mask), rel=1e-5
    )


def test_the_sampler_records_the_same_per_token_quantities_as_teacher_forcing():
    # Sampled with temperature 0.7 and top-k 4: the recorded self-certainty and entropy are of the
    # full softmax(logits / 0.7), which a teacher-forced pass over the same tokens recomputes.
    torch.manual_seed(0)
    model = EncoderDecoder(
        config_for(
            "tiny",
            vocab_size=40,
            d_model=32,
            d_ff=64,
            n_heads=2,
            n_enc_layers=1,
            n_dec_layers=2,
            last_layers=1,
        )
    ).eval()
    src = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
    r = model.sample(
        src,
        src > 0,
        Decoding(num_samples=3, max_new_tokens=6, temperature=0.7, top_k=4),
        generator=torch.Generator().manual_seed(1),
        **SP.sample_ids(),
    )
    logits, _ = model(src, src > 0, ppo.decoder_input(r.tokens, SP.start), num_samples=3)
    z = logits / 0.7
    rows = dict(
        self_certainty=baselines.self_certainty(z, r.mask),
        neg_entropy=baselines.neg_entropy(z, r.mask),
        logprob=baselines.mean_logprob(z, r.tokens, r.mask),
    )
    for kind, want in rows.items():
        got = baselines.RolloutReward(kind)(src, src > 0, r)
        assert torch.allclose(got, want, atol=1e-4), kind
    assert (
        float(r.certainty[~r.mask].abs().sum()) == 0 and float(r.entropy[~r.mask].abs().sum()) == 0
    )


def test_random_reward_is_a_seeded_fair_coin_per_candidate():
    r = Rollout(
        tokens=torch.zeros(4000, 3, dtype=torch.long),
        logprobs=torch.zeros(4000, 3),
        mask=torch.ones(4000, 3, dtype=torch.bool),
        attn=None,
    )
    a = baselines.RandomReward(5)(None, None, r)
    assert set(a.tolist()) == {0.0, 1.0}
    assert abs(float(a.mean()) - 0.5) < 0.03  # 4,000 draws: std 0.008
    assert torch.equal(a, baselines.RandomReward(5)(None, None, r))
    assert not torch.equal(a, baselines.RandomReward(6)(None, None, r))


def toy_tokenizer():
    texts = [
        "where does varo live",
        "varo lives in tamsa",
        "what is kelin",
        "kelin is a river",
    ] * 20
    return data.train_tokenizer(texts, 300)


@pytest.mark.parametrize(
    "correct, expected",
    [
        # 1) identical. 2) "tamsa": LCS 1 of 1 and 4 words. 3) "kelin is a": LCS 3 of 3 and 4.
        # 4) "river kelin": LCS 1 of 2 and 4.
        (evaluation.exact_match, [1.0, 0.0, 0.0, 0.0]),
        (
            evaluation.reference_match,
            [1.0, 1 / 4, 3 / 4, 1 / 4],
        ),  # LCS / max(|candidate|, |reference|)
        (
            evaluation.rouge_l,
            [1.0, 0.4, 6 / 7, 1 / 3],
        ),  # F1: 2PR/(P+R) with P, R = 1, 1/4; 1, 3/4; 1/2, 1/4
    ],
)
def test_oracle_reward_is_the_given_correctness_of_each_candidate_against_its_reference(
    correct, expected
):
    tok = toy_tokenizer()
    sp = data.specials(tok)
    records = [
        dict(prompt="where does varo live", response="varo lives in tamsa"),
        dict(prompt="what is kelin", response="kelin is a river"),
    ]
    oracle = baselines.OracleReward.from_records(
        tok, records, lambda text, rec: correct(text, rec["response"])
    )
    src, src_mask = data.collate_prompts([data.encode(tok, r["prompt"], sp) for r in records], sp)
    # Two candidates per prompt.
    cands = ["varo lives in tamsa", "tamsa", "kelin is a", "river kelin"]
    ids = [data.encode(tok, c, sp) for c in cands]
    T = max(map(len, ids))
    tokens = torch.tensor([x + [sp.pad] * (T - len(x)) for x in ids])
    r = Rollout(tokens=tokens, logprobs=torch.zeros(tokens.shape), mask=tokens != sp.pad, attn=None)
    assert oracle(src, src_mask, r).tolist() == pytest.approx(expected, abs=1e-6)


def test_the_oracle_cannot_be_won_by_leaving_the_answer_out():
    """The three cases that ROUGE-L F1 ranks wrongly: it pays the omission 0.889 and the wrong year
    0.8, so an oracle on it would teach PPO to drop the answer. Exact-match (QA) and reference
    match (instruct) pay the right answer alone the most, and the omission no more than the wrong
    answer."""
    ref, right, omitted, wrong = (
        "X was born in 1942.",
        "X was born in 1942.",
        "X was born in.",
        "X was born in 1999.",
    )
    assert [evaluation.exact_match(c, ref) for c in (right, omitted, wrong)] == [1.0, 0.0, 0.0]
    # LCS 5 of 5; 4 of max(4, 5); 4 of max(5, 5)
    assert [evaluation.reference_match(c, ref) for c in (right, omitted, wrong)] == pytest.approx(
        [1.0, 0.8, 0.8]
    )
    # F1 for the record: omission 2 * 1 * 0.8 / 1.8 = 0.889 above the wrong answer's 0.8
    assert [evaluation.rouge_l(c, ref) for c in (omitted, wrong)] == pytest.approx([16 / 18, 0.8])
    assert evaluation.reference_match(ref + " " + ref, ref) == pytest.approx(
        0.5
    )  # padding does not pay either


def test_the_reward_registry_builds_each_named_reward():
    tok = toy_tokenizer()
    records = [dict(prompt="where does varo live", response="varo lives in tamsa")]
    made = {
        name: baselines.make_reward(
            name,
            tok=tok,
            records=records,
            seed=0,
            rm=PairScorer.from_policy(
                EncoderDecoder(config_for("tiny", vocab_size=300, d_model=32, d_ff=64, n_heads=2))
            ),
        )
        for name in baselines.REWARD_NAMES
    }
    assert made["attention"] is None  # ppo.sample_and_score's own attention reward
    assert [made[n].kind for n in ("self-certainty", "neg-entropy", "logprob")] == [
        "self_certainty",
        "neg_entropy",
        "logprob",
    ]
    assert isinstance(made["random"], baselines.RandomReward) and isinstance(
        made["hybrid"], baselines.HybridReward
    )
    assert made["oracle"].correct is evaluation.exact_match_of  # the default: QA's correctness
    with pytest.raises(ValueError, match="unknown reward 'rouge'"):
        baselines.make_reward("rouge")


def test_hybrid_reward_adds_the_weighted_reward_model_to_the_attention_reward():
    torch.manual_seed(0)
    policy = EncoderDecoder(config_for("tiny", vocab_size=50, d_model=32, d_ff=64, n_heads=2))
    scorer = PairScorer.from_policy(policy)
    torch.nn.init.constant_(scorer.head.bias, 1.5)  # head weight 0: the RM says 1.5 for everything
    src = torch.tensor([[5, 6, 2]])
    tokens = torch.tensor([[8, 2], [9, 2]])
    r = Rollout(tokens=tokens, logprobs=torch.zeros(2, 2), mask=tokens > 0, attn=None)
    got = baselines.HybridReward(scorer, 0.4)(
        src, src > 0, r, dict(reward=torch.tensor([-0.7, -0.2]))
    )
    assert got.tolist() == pytest.approx([-0.7 + 0.4 * 1.5, -0.2 + 0.4 * 1.5], abs=1e-6)


def test_the_rival_rewards_run_inside_sample_and_score_and_keep_the_attention_reward():
    torch.manual_seed(0)
    model = EncoderDecoder(config_for("tiny", vocab_size=40, d_model=32, d_ff=64, n_heads=2)).eval()
    src = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
    salient = SalientTokens(
        idf=torch.ones(40), content=torch.ones(40, dtype=torch.bool), token_strings=None
    )
    cfg = ppo.PPOConfig(num_samples=2, max_new_tokens=5)
    gen = lambda: torch.Generator().manual_seed(3)
    rollout, plain, _, _ = ppo.sample_and_score(
        model, src, src > 0, salient, RewardConfig(), cfg, SP, gen()
    )
    _, terms, _, _ = ppo.sample_and_score(
        model,
        src,
        src > 0,
        salient,
        RewardConfig(),
        cfg,
        SP,
        gen(),
        reward_fn=baselines.RolloutReward("neg_entropy"),
    )
    assert torch.equal(terms["attention_reward"], plain["reward"])
    # Independently: the teacher-forced logits of the same tokens, their entropies in numpy,
    # averaged by a loop.
    with torch.no_grad():
        logits, _ = model(src, src > 0, ppo.decoder_input(rollout.tokens, SP.start), num_samples=2)
    p = np.exp(logits.double().numpy() / cfg.temperature)
    p /= p.sum(-1, keepdims=True)
    want = [-v for v in per_row_mean(-(p * np.log(p)).sum(-1), rollout.mask)]
    assert terms["reward"].tolist() == pytest.approx(want, abs=1e-4)


# ---- statistics on hand-worked cases ------------------------------------------------------------


def test_bootstrap_interval_of_a_mean_on_a_hand_worked_case():
    # x = [0, 0, 0, 1]: a resample's mean is Binomial(4, 1/4) / 4. P(0) = 81/256 = 0.316 > 2.5%, so
    # the lower end is 0; P(mean <= 0.5) = 243/256 = 0.949 < 97.5% <= P(mean <= 0.75) = 255/256, so
    # the upper end is 0.75.
    r = stats.mean_interval([0, 0, 0, 1], seed=0)
    assert r == dict(mean=0.25, lo=0.0, hi=0.75)
    # Paired: a - b = [1, 0]: resample means 0, 1/2, 1 with probabilities
    # 1/4, 1/2, 1/4: [0, 1], includes 0.
    d = stats.paired_difference([1.0, 2.0], [0.0, 2.0], seed=3)
    assert (d["diff"], d["lo"], d["hi"], d["excludes_0"]) == (0.5, 0.0, 1.0, False)
    # A constant gain: every resample says 1.
    assert stats.paired_difference([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])["excludes_0"] is True
    with pytest.raises(ValueError, match="not the same prompts"):
        stats.paired_difference([1.0, 2.0], [1.0])


def test_bootstrap_is_seeded():
    x = np.random.default_rng(0).normal(size=50)
    assert stats.mean_interval(x, seed=7) == stats.mean_interval(x, seed=7)
    assert stats.mean_interval(x, seed=7) != stats.mean_interval(x, seed=8)


def test_spearman_with_ties_on_a_hand_worked_case():
    # ranks x: [1, 2.5, 2.5, 4], y: [1, 3, 2, 4]; deviations from 2.5: [-1.5, 0, 0, 1.5],
    # [-1.5, .5, -.5, 1.5]; sum of products 4.5, sums of squares 4.5 and 5: rho = 4.5 / sqrt(22.5).
    assert stats.ranks([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert stats.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert stats.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))


def test_within_prompt_spearman_skips_all_tied_prompts_and_counts_them():
    reward = [1, 2, 3, 5, 5, 5, 3, 2, 1]
    correct = [0, 0, 1, 0, 1, 1, 1, 1, 1]
    # Prompt 1: ranks [1, 2, 3] vs [1.5, 1.5, 3]; deviations [-1, 0, 1] and [-.5, -.5, 1]: products
    # sum to 1.5, squares to 2 and 1.5: rho = 1.5 / sqrt(3) = 0.866. Prompt 2: rewards all tied;
    # prompt 3: correctness all tied. Mean over the one defined prompt, two skipped.
    rho, skipped = stats.within_prompt_spearman(reward, correct, 3)
    assert rho == pytest.approx(1.5 / math.sqrt(3)) and skipped == 2


def test_collapse_is_the_first_evaluation_below_the_start_interval():
    curve = [
        dict(iteration=0, correct=0.6),
        dict(iteration=10, correct=0.55),
        dict(iteration=20, correct=0.4),
        dict(iteration=30, correct=0.3),
    ]
    assert reward_study.collapse_step(curve, start_lo=0.5) == 20
    assert reward_study.collapse_step(curve, start_lo=0.2) is None


# ---- the experiment ----------------------------------------------------------------------------

SMOKE = [
    "--experiment",
    "rewards",
    "--dataset",
    "qa",
    "--seeds",
    "1",
    "--sft-steps",
    "30",
    "--iterations",
    "2",
    "--eval-every",
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
    "--eval-prompts",
    "6",
]


@pytest.mark.slow
def test_rewards_smoke_run_writes_every_row_and_resumes(tmp_path, capsys):
    work, results = tmp_path / "work", tmp_path / "results"
    argv = SMOKE + ["--out", str(work), "--results-dir", str(results)]
    assert cagsr.main(argv) == 0
    out = json.loads((results / "rewards_qa.json").read_text())
    assert set(reward_study.ROW_NAMES) <= set(out["rows"])
    assert {
        "sft",
        "cagsr",
        "self_certainty",
        "neg_entropy",
        "logprob",
        "random",
        "oracle",
        "hybrid",
    } == set(reward_study.ROW_NAMES)
    names = reward_study.ROW_NAMES
    level = {m: reward_study.seed_level(out, m, names) for m in reward_study.METRICS}
    for name in names:
        row = out["rows"][name]
        assert [p["iteration"] for p in row["curve"]] == ([0] if name == "sft" else [0, 1, 2])
        for m in reward_study.METRICS:
            assert (
                math.isfinite(row["metrics"][m]["mean"]) and len(row["metrics"][m]["values"]) == 1
            )
            assert level[m][name]["method"].startswith("two-stage bootstrap")
            if name != "sft":  # every row's difference from the start, its seeds and prompts kept
                d = level[m][name]["vs_start"]
                assert d["lo"] <= d["diff"] <= d["hi"]
        assert "collapse" in row
    # The oracle's own reward at iteration 0 is the correctness (exact-match
    # on qa) of the same candidates.
    start = out["rows"]["oracle"]["curve"][0]
    assert start["rewards"]["oracle"] == pytest.approx(start["correct"])
    assert (
        start["correct"] <= start["pass_at_n"] <= min(1.0, 4 * start["correct"])
    )  # pass@4 of the same
    assert set(out["headroom"]) >= {"ok", "diff", "lo", "hi"}
    md = (results / "rewards_qa.md").read_text()
    assert "Headroom check" in md or "HEADROOM CHECK FAILED" in md
    for label in (
        "Self-certainty",
        "Negative entropy",
        "Random",
        "Oracle",
        "Hybrid",
        "not self-supervised",
    ):
        assert label in md
    assert (results / "rewards_qa.png").stat().st_size > 0
    capsys.readouterr()

    written = {p.name: p.read_bytes() for p in results.iterdir()}
    with pytest.raises(runs.UsageError, match=r"would replace .*rewards_qa\.md.*--overwrite"):
        cagsr.main(argv)  # the tables are never replaced without asking
    assert {p.name: p.read_bytes() for p in results.iterdir()} == written
    argv += ["--overwrite"]
    assert cagsr.main(argv) == 0  # every row reused, the same numbers written
    assert (
        capsys.readouterr().out.count("done earlier") == len(reward_study.ROWS) + 1
    )  # SFT + every row
    again = json.loads((results / "rewards_qa.json").read_text())
    assert again["rows"] == out["rows"]


def test_rewards_experiment_refuses_a_bad_hybrid_weight(tmp_path):
    for bad in ("nan", "-1"):
        with pytest.raises(
            runs.UsageError, match=f"--hybrid-weight {bad}.*: must be a finite number >= 0"
        ):
            cagsr.main(
                [
                    "--experiment",
                    "rewards",
                    "--dataset",
                    "qa",
                    "--hybrid-weight",
                    bad,
                    "--out",
                    str(tmp_path / "w"),
                ]
            )
    assert not (tmp_path / "w").exists()  # refused before any work


@pytest.mark.slow
def test_seeds_in_worker_processes_write_the_rows_one_process_writes(tmp_path, capsys):
    """--workers 2: each seed in its own process (spawned, its output in seed<s>/log.txt) writes the
    rows that one process computing the seeds in turn writes, the timings aside."""
    torch.set_num_threads(1)  # the same float order in both (a worker gets 1 thread)
    rows = {}
    for workers in (2, 1):
        work = tmp_path / f"workers{workers}"
        argv = SMOKE + [
            "--seeds",
            "2",
            "--sft-steps",
            "10",
            "--iterations",
            "1",
            "--human-prompts",
            "8",
            "--num-eval",
            "4",
            "--eval-prompts",
            "4",
            "--out",
            str(work),
            "--results-dir",
            str(tmp_path / f"results{workers}"),
            "--workers",
            str(workers),
        ]
        assert cagsr.main(argv) == 0
        rows[workers] = {
            p.relative_to(work).as_posix(): {
                k: v
                for k, v in json.loads(p.read_text()).items()
                if k not in ("seconds", "iteration_seconds")  # timings
            }
            for p in work.glob("seed*/row_*.json")
        }
    out = capsys.readouterr().out
    assert "2 worker processes at once" in out
    assert out.count("done earlier") == 2 * (
        len(reward_study.ROWS) + 1
    )  # SFT + every row, computed by the workers
    assert (tmp_path / "workers2" / "seed1" / "log.txt").read_text().count("seed 1 |") >= len(
        reward_study.ROWS
    )
    assert len(rows[2]) == 2 * len(reward_study.ROWS) and rows[2] == rows[1]


@pytest.mark.slow
def test_the_study_takes_the_decoder_only_policy_and_reads_its_rows_back(tmp_path, capsys):
    work, results = tmp_path / "work", tmp_path / "results"
    argv = SMOKE + [
        "--arch",
        "decoder",
        "--iterations",
        "1",
        "--sft-steps",
        "5",
        "--prompts-per-iter",
        "8",
        "--out",
        str(work),
        "--results-dir",
        str(results),
    ]
    assert cagsr.main(argv) == 0
    first = json.loads((results / "rewards_qa-decoder.json").read_text())
    assert (
        set(reward_study.ROW_NAMES) <= set(first["rows"]) and first["settings"]["arch"] == "decoder"
    )
    assert "decoder-only preset" in (results / "rewards_qa-decoder").with_suffix(".md").read_text()
    capsys.readouterr()
    assert cagsr.main(argv + ["--overwrite"]) == 0  # every row and reward model read back
    assert json.loads((results / "rewards_qa-decoder.json").read_text())["rows"] == first["rows"]
