"""cagsr.py: flags, device choice, checkpoints, and the real CLI run as a subprocess.

- Each `--reward` name trains a tiny run whose `rl_summary` records the reward, the temperature and
  the noise (the random reward's means are multiples of 1/8, the oracle's in [0, 1]); with
  `--sft-noise` the SFT pairs differ from the clean ones in exactly the corrupted records, with the
  wrong answer, while RL, validation and test keep the clean references; top-k or top-p in RL,
  `--sft-noise` on `qa`, and `--reward` with an experiment are refused before any work, while
  `--stage sample` takes `--top-k`.
- The CLI as a subprocess: an SFT run and a shortened SFT + RL run write loadable checkpoints,
  `--stage eval` on the RL checkpoint reproduces the reward the run logged, and `--resume` of the
  finished run says it is complete and leaves every file as it was; `--compile` gives the eager
  losses and weights.
- Scale: the memory plan's arithmetic by hand; a GPU preset without a GPU refuses to start."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cagsr
import data
import sft
from cli import runs, stages

ROOT = Path(__file__).resolve().parents[1]
SP = data.Specials(
    pad=0, start=1, eos=2, special=(0, 1, 2, 3)
)  # our tokenizer's ids, for hand-built batches
TINY = ["--set", "d_model=32", "--set", "d_ff=64", "--set", "n_heads=2", "--set", "vocab_size=400"]


def test_unknown_flag_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as e:
        cagsr.main(["--sizee", "tiny"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --sizee" in err and "--size" in err and "--dataset" in err


def test_unknown_size_and_bad_overrides_are_refused():
    with pytest.raises(SystemExit, match="valid sizes: tiny, small, base, 1.3b"):
        cagsr.main(["--size", "huge"])
    with pytest.raises(SystemExit, match="unknown ModelConfig field 'width'"):
        cagsr.main(["--set", "width=3"])
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        cagsr.main(["--set", "d_model"])


def test_device_choice():
    assert runs.pick_device("cpu") == torch.device("cpu")
    expected = (
        "cuda"
        if torch.cuda.is_available()
        else "mps"
        if torch.backends.mps.is_available()
        else "cpu"
    )
    assert runs.pick_device().type == expected
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            runs.pick_device("cuda")


def test_out_dir_holding_files_is_not_overwritten(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("precious\n")
    with pytest.raises(SystemExit, match="--overwrite"):
        cagsr.main(["--out", str(tmp_path), "--sft-steps", "1"] + TINY)
    assert (tmp_path / "metrics.jsonl").read_text() == "precious\n"


def test_default_run_directory_is_new_and_named_after_size_and_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = (
        runs.make_run_dir(None, False, "tiny", "qa-grounded"),
        runs.make_run_dir(None, False, "tiny", "qa-grounded"),
    )
    assert first != second and first.parent.name == second.parent.name == "runs"
    assert first.name.endswith("-tiny-qa-grounded")
    assert second.name.endswith(
        ("-tiny-qa-grounded", "-tiny-qa-grounded-1")
    )  # -1 when in the same second


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    assert sft.lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert sft.lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert sft.lr_at(55, 1.0, 10, 100) == pytest.approx(
        0.1 + 0.9 * 0.5
    )  # half-way through the cosine
    assert sft.lr_at(100, 1.0, 10, 100) == pytest.approx(0.1)


def test_sft_loss_is_the_mean_token_cross_entropy():
    torch.manual_seed(0)
    from model import EncoderDecoder, ModelConfig

    m = EncoderDecoder(
        ModelConfig(vocab_size=9, d_model=16, n_heads=2, n_enc_layers=1, n_dec_layers=1, d_ff=32)
    )
    batch = data.collate([([5, 6, 2], [7, 2]), ([4, 2], [8, 5, 6, 2])], SP)
    with torch.no_grad():
        logits, _ = m(batch["src"], batch["src_mask"], batch["tgt_in"])
        loss = sft.sft_loss(m, batch).item()
    # Independent: average -log p over the 2 + 4 real target tokens, pads excluded.
    terms = [
        -torch.log_softmax(logits[b, t], -1)[batch["tgt_out"][b, t]]
        for b, n in ((0, 2), (1, 4))
        for t in range(n)
    ]
    assert loss == pytest.approx(float(sum(terms) / 6), rel=1e-6)


@pytest.mark.slow
def test_cli_sft_run_writes_a_loadable_run_directory(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "cagsr.py",
        "--stage",
        "sft",
        "--dataset",
        "qa-grounded",
        "--sft-steps",
        "30",
        "--sft-eval-every",
        "15",
        "--sft-batch-size",
        "16",
        "--num-eval",
        "8",
        "--out",
        str(out),
        "--seed",
        "3",
    ] + TINY
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out exact-match" in proc.stdout and "reference:" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sft_rows = [r for r in rows if r["stage"] == "sft"]
    assert [r["step"] for r in sft_rows] == [15, 30]
    assert sft_rows[1]["val_loss"] < sft_rows[0]["val_loss"]  # it learns
    assert (
        rows[-2]["stage"] == "sft_eval"
        and rows[-2]["num_eval"] == 8
        and rows[-1]["stage"] == "done"
    )
    assert json.loads((out / "args.json").read_text())["seed"] == 3
    model, tok, ckpt = runs.load_checkpoint(out / "sft.pt")
    assert ckpt["stage"] == "sft" and ckpt["step"] == 30 and ckpt["model_config"]["d_model"] == 32
    assert model.cfg.vocab_size == tok.get_vocab_size() <= 400
    text = "Kelo Varin was born in 1950. When was Kelo Varin born?"
    assert data.decode(tok, data.encode(tok, text)) == text
    assert not list(out.glob("*.tmp"))  # atomic write left nothing behind


@pytest.mark.slow
def test_cli_cagsr_run_writes_its_run_directory_and_its_checkpoint_serves_sample_and_eval(tmp_path):
    """The main job on the real tiny preset, shortened: SFT, then CAGSR RL on the CPU defaults.

    It does not assert that the fixed-set reward rises: on this data it does not do so reliably
    (results/README.md, "What the default run shows"), and a test that passes by a lucky seed would
    say otherwise."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "cagsr.py",
        "--dataset",
        "qa-grounded",
        "--sft-steps",
        "300",
        "--sft-eval-every",
        "150",
        "--iterations",
        "20",
        "--eval-every",
        "10",
        "--eval-prompts",
        "32",
        "--num-eval",
        "32",
        "--prompts-per-iter",
        "32",
        "--out",
        str(out),
        "--seed",
        "0",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in (
        "RL settings",
        "before RL",
        "after RL",
        "Candidates before -> after RL",
        "done in",
    ):
        assert text in proc.stdout
    assert {"args.json", "metrics.jsonl", "sft.pt", "rl.pt"} <= {p.name for p in out.iterdir()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r["stage"] == "rl"]
    assert [r["iteration"] for r in rl] == list(range(1, 21))
    for key in (
        "reward",
        "coverage",
        "focus",
        "repeat",
        "policy_loss",
        "value_loss",
        "approx_kl",
        "clipfrac",
        "entropy",
        "explained_variance",
        "kl_ref",
        "length",
        "sink_share",
    ):
        assert all(math.isfinite(r[key]) for r in rl), key
    fixed = {r["iteration"]: r for r in rows if r["stage"] == "rl_eval"}
    assert sorted(fixed) == [0, 10, 20]
    assert all(
        math.isfinite(fixed[i][k]) for i in fixed for k in ("reward", "exact_match", "rouge_l")
    )
    assert fixed[20]["reward"] != fixed[0]["reward"]  # the policy moved
    summary = next(r for r in rows if r["stage"] == "rl_summary")
    assert summary["skipped_updates"] == 0
    _, _, ckpt = runs.load_checkpoint(out / "rl.pt")
    assert (
        ckpt["stage"] == "rl"
        and ckpt["iteration"] == 20
        and ckpt["idf"].shape == (ckpt["model_config"]["vocab_size"],)
    )

    sample = subprocess.run(
        [
            sys.executable,
            "cagsr.py",
            "--stage",
            "sample",
            "--init",
            str(out / "rl.pt"),
            "--prompt",
            "Kelo Varin was born in 1950. When was Kelo Varin born?",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert sample.stdout.count("coverage ") == 4  # N = 4 candidates with their terms
    ev = subprocess.run(
        [
            sys.executable,
            "cagsr.py",
            "--stage",
            "eval",
            "--init",
            str(out / "rl.pt"),
            "--dataset",
            "qa-grounded",
            "--eval-prompts",
            "32",
            "--num-eval",
            "32",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ev.returncode == 0, ev.stderr[-2000:]
    # The same checkpoint, set and seed give the same fixed-set reward as the run logged at its end.
    assert f"reward {fixed[20]['reward']:.4f}" in ev.stdout

    # --resume of the finished run says so and changes nothing.
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    again = subprocess.run(
        [sys.executable, "cagsr.py", "--resume", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0 and "this run is complete" in again.stdout, again.stderr[-2000:]
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == files


# ---------------------------------------------------------------------------- scale: the plan
def test_memory_plan_counts_bytes_per_parameter_and_activations_by_hand():
    from cli.plan import memory_plan
    from model import ModelConfig, count_params

    cfg = ModelConfig(vocab_size=100, d_model=8, n_heads=2, n_enc_layers=1, n_dec_layers=2, d_ff=16)
    P = count_params(cfg)
    plan = memory_plan(cfg, batch=3, src_len=5, tgt_len=4, act_bytes=2)
    assert plan["parameters"] == P
    assert (plan["weights"], plan["gradients"], plan["optimizer"], plan["reference_policy"]) == (
        4 * P,
        4 * P,
        8 * P,
        4 * P,
    )
    # encoder: 3*5 tokens x 1 layer x (10*8 + 2*16) = 15 * 112 = 1680;
    # decoder: 3*4 x 2 x (14*8 + 2*16) = 12*2*144 = 3456; logits 3*4*100 = 1200, in bf16 (2 bytes)
    # and again in float32 (4 bytes).
    assert plan["activations"] == (1680 + 3456 + 1200) * 2 + 1200 * 4
    assert plan["total"] == 20 * P + plan["activations"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_gpu_preset_without_a_gpu_prints_the_plan_and_refuses(capsys):
    with pytest.raises(SystemExit, match="GPU preset and no GPU was found.*--device cpu"):
        cagsr.main(["--size", "1.3b"])
    assert "1,242,313,729 parameters" in capsys.readouterr().out
    assert cagsr.main(["--size", "1.3b", "--dry-run"]) == 0
    assert "optimizer" in capsys.readouterr().out


@pytest.mark.slow
def test_compile_changes_speed_not_numbers():
    """--compile: torch.compile of the SFT forward and of the PPO update's forward (ppo.PolicyValue)
    gives the eager losses and weights, to float32 rounding."""
    import ppo
    from model import EncoderDecoder, ModelConfig
    from reward import RewardConfig, SalientTokens

    pairs = [
        (
            [4 + (i * 7 + j) % 20 for j in range(3 + i % 5)] + [SP.eos],
            [4 + (i * 3 + j) % 20 for j in range(2 + i % 4)] + [SP.eos],
        )
        for i in range(64)
    ]
    salient = SalientTokens(
        torch.linspace(0.1, 2.0, 24), torch.arange(24) >= 4, [f" t{i}" for i in range(24)]
    )
    results = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = EncoderDecoder(
            ModelConfig(
                vocab_size=24,
                d_model=32,
                n_heads=2,
                n_enc_layers=1,
                n_dec_layers=2,
                d_ff=64,
                max_src_len=16,
                max_tgt_len=16,
            )
        )
        sft_cfg = sft.SFTConfig(steps=4, batch_size=16, lr=1e-3, warmup=2, eval_every=4)
        result = sft.train_sft(
            model,
            sft.SFTTask(pairs, pairs[:16], specials=SP),
            sft_cfg,
            "cpu",
            sft.SFTRun(seed=0, compile=compile),
        )
        ref = EncoderDecoder(model.cfg)
        ref.load_state_dict(model.state_dict())
        cfg = ppo.PPOConfig(
            prompts_per_iter=8, num_samples=2, max_new_tokens=8, lr=1e-3, baseline="group"
        )
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        rows = ppo.train(
            model,
            ref.eval(),
            opt,
            ppo.RLTask(
                [p for p, _ in pairs], specials=SP, salient=salient, reward_cfg=RewardConfig()
            ),
            cfg,
            ppo.RLRun(1, compile=compile),
        )
        results.append(
            (
                result["history"][-1]["train_loss"],
                rows[0]["policy_loss"],
                torch.cat([p.flatten() for p in model.parameters()]),
            )
        )
    (sft0, pl0, w0), (sft1, pl1, w1) = results
    assert sft1 == pytest.approx(sft0, abs=1e-5) and pl1 == pytest.approx(pl0, abs=1e-5)
    torch.testing.assert_close(w1, w0, atol=1e-4, rtol=0)  # Adam steps are ~lr = 1e-3 each
    assert not torch.equal(w0, torch.zeros_like(w0))


def test_gpu_preset_checkpoint_given_to_init_is_refused_on_a_cpu(tmp_path, capsys):
    """The guard reads the --init checkpoint's preset, not only --size (the file is not loaded)."""
    from model import EncoderDecoder, ModelConfig

    cfg = ModelConfig(
        vocab_size=300, d_model=32, n_heads=2, n_enc_layers=1, n_dec_layers=1, d_ff=64
    )
    path = tmp_path / "big.pt"
    tok = data.train_tokenizer(["a cat", "a dog"] * 10, 300)
    runs.save_checkpoint(
        path, EncoderDecoder(cfg), tok, None, size="1.3b", dataset="qa", stage="sft"
    )
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match=r"big\.pt is a 1\.3b model, a GPU preset"):
        cagsr.main(["--stage", "rl", "--init", str(path)])
    assert "plan for --size 1.3b" in capsys.readouterr().out


# ---------------------------------------------------------------------------- --reward, --sft-noise


def noisy_jsonl(tmp_path) -> Path:
    path = tmp_path / "facts.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                dict(
                    prompt=f"Ana {i} lives in Lima {i}. Where does Ana {i} live?",
                    response=f"Ana {i} lives in Lima {i}.",
                    wrong=f"Ana {i} lives in Oslo.",
                )
            )
            + "\n"
            for i in range(40)
        )
    )
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["attention", "self-certainty", "neg-entropy", "logprob", "random", "oracle", "hybrid"]
)
def test_each_reward_trains_a_tiny_run_and_is_recorded(tmp_path, name):
    out = tmp_path / "run"
    argv = [
        "--dataset",
        str(noisy_jsonl(tmp_path)),
        "--sft-noise",
        "0.25",
        "--sft-steps",
        "3",
        "--iterations",
        "2",
        "--prompts-per-iter",
        "4",
        "--minibatches",
        "1",
        "--num-samples",
        "2",
        "--max-new-tokens",
        "6",
        "--eval-every",
        "2",
        "--eval-prompts",
        "2",
        "--num-eval",
        "4",
        "--reward",
        name,
        "--out",
        str(out),
    ] + TINY
    if name == "hybrid":  # its reward model's flags; any other reward refuses them (no effect)
        argv += ["--rm-steps", "2", "--human-prompts", "4"]
    assert cagsr.main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = next(r for r in rows if r["stage"] == "rl_summary")
    assert (
        summary["reward_name"] == name
        and summary["sft_noise"] == 0.25
        and summary["temperature"] == 0.5
    )
    assert next(r for r in rows if r["stage"] == "sft_eval")["corrupted"] == 8  # round(0.25 * 32)
    rl = [r for r in rows if r["stage"] == "rl"]
    if name == "random":  # Bernoulli(0.5) rewards: the mean of 8 candidates is k/8
        assert all(abs(r["reward"] * 8 - round(r["reward"] * 8)) < 1e-6 for r in rl)
    if name == "oracle":  # reference match (a JSONL's correctness) in [0, 1], not R's scale
        assert all(0 <= r["reward"] <= 1 and r["reward"] != r["attention_reward"] for r in rl)
    assert summary["correctness"] == "reference_match"
    assert json.loads((out / "args.json").read_text())["reward"] == name


def test_sft_noise_trains_sft_on_the_wrong_responses_and_keeps_the_clean_ones_for_rl_and_evaluation(
    tmp_path,
):
    path = noisy_jsonl(tmp_path)
    args = cagsr.build_parser().parse_args(
        [
            "--dataset",
            str(path),
            "--sft-noise",
            "0.25",
            "--prompts-per-iter",
            "4",
            "--minibatches",
            "1",
        ]
        + TINY
    )
    run = cagsr.settings.resolve(args, "test")
    setup = stages.prepare(run, torch.device("cpu"))
    clean = data.encode_records(setup.tok, setup.splits.train, 64, 64)
    assert setup.train_pairs == clean and setup.corrupted == 8 == round(0.25 * len(clean))
    differ = [i for i, (a, b) in enumerate(zip(setup.sft_pairs, clean)) if a != b]
    assert len(differ) == 8 and all(
        setup.sft_pairs[i][0] == clean[i][0] for i in differ
    )  # same prompt
    assert all(
        "Oslo" in data.decode(setup.tok, setup.sft_pairs[i][1], setup.specials) for i in differ
    )  # wrong answer
    assert all(
        "Oslo" not in r["response"]
        for r in setup.splits.train + setup.splits.val + setup.splits.test
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--top-k", "50"], "--top-k 50: must be none in RL"),
        (["--experiment", "table1", "--top-p", "0.9"], "--top-p 0.9: must be none in RL"),
        (
            ["--sft-noise", "0.3", "--dataset", "qa"],
            "--sft-noise on qa: closed-book QA has no plausible wrong answer",
        ),
        (
            ["--sft-noise", "1.5", "--dataset", "instruct"],
            "--sft-noise 1.5: must be a share in [0, 1)",
        ),
        (
            ["--experiment", "rewards", "--reward", "oracle"],
            "--reward oracle: --experiment rewards sets each row's reward",
        ),
    ],
)
def test_off_policy_sampling_and_misplaced_noise_or_reward_are_refused(tmp_path, argv, message):
    with pytest.raises(runs.UsageError, match=re.escape(message)):
        cagsr.main(
            argv
            + ["--out", str(tmp_path / "run")]
            + (["--results-dir", str(tmp_path / "results")] if "--experiment" in argv else [])
        )
    assert not (tmp_path / "run").exists()


def test_sample_may_still_use_top_k(checkpoint, capsys):
    assert (
        cagsr.main(
            [
                "--stage",
                "sample",
                "--init",
                str(checkpoint),
                "--prompt",
                "where does the cat live ?",
                "--top-k",
                "3",
                "--num-samples",
                "2",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count("coverage ") == 2
