"""Faults and bad input: atomic checkpoints under SIGKILL, exact --resume, Ctrl-C, non-finite
updates, and the errors a user meets (USAGE.md, "When things go wrong").

A run killed with SIGKILL mid-SFT or mid-RL, and one stopped with Ctrl-C (exit 130, checkpoint
written where it stopped), resume to a `metrics.jsonl` equal row for row to an uninterrupted run's
(wall-clock fields aside); a writer killed at five moments always leaves a loadable checkpoint; a
NaN reward, loss or gradient never changes a weight and three in a row stop RL or SFT with the
cause named; `--resume` refuses other flags, a directory without a run, and checkpoints of another
size or tokenizer; an empty or overlong `--prompt` is refused; prompts without salient tokens get
finite terms."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cagsr
import data
import parallel
import ppo
from model import EncoderDecoder, ModelConfig
from reward import RewardConfig, SalientTokens
from sft import SFTConfig, SFTHooks, SFTRun, SFTTask, train_sft

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "d_model=32", "--set", "d_ff=64", "--set", "n_heads=2", "--set", "vocab_size=400"]
RUN = [
    "cagsr.py",
    "--dataset",
    "qa-grounded",
    "--sft-steps",
    "30",
    "--sft-eval-every",
    "10",
    "--sft-batch-size",
    "16",
    "--iterations",
    "6",
    "--ckpt-every",
    "2",
    "--eval-every",
    "3",
    "--prompts-per-iter",
    "8",
    "--eval-prompts",
    "8",
    "--num-eval",
    "8",
    "--seed",
    "1",
] + TINY
SP = data.Specials(
    pad=0, start=1, eos=2, special=(0, 1, 2, 3)
)  # our tokenizer's ids: the toy vocabulary's 0..3
WALL_CLOCK = {
    "elapsed_s",
    "tokens_per_s",
    "sample_s",
    "reward_s",
    "ref_s",
    "update_s",
    "sft_seconds",
    "rl_seconds",
    "total_seconds",
}


def rows(run: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def start(args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(run: Path, pred, proc, timeout=300):
    """Poll metrics.jsonl until some row satisfies pred."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        path = run / "metrics.jsonl"
        if path.exists() and any(
            pred(json.loads(x)) for x in path.read_text().splitlines() if x.endswith("}")
        ):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise TimeoutError


# ---- exact resume -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    proc = subprocess.run(
        [sys.executable, *RUN, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return rows(out)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["sft", "rl"])
def test_killed_run_resumes_to_the_same_log(tmp_path, uninterrupted, when):
    """SIGKILL mid-SFT (after the step-10 checkpoint) or mid-RL (after iteration 3; the last
    checkpoint is iteration 2), then --resume: every logged value equals the uninterrupted run's,
    wall-clock fields aside."""
    out = tmp_path / "run"
    proc = start([*RUN, "--out", str(out)])
    if when == "sft":
        wait_for(out, lambda r: r["stage"] == "sft" and r["step"] == 20, proc)
    else:
        wait_for(out, lambda r: r["stage"] == "rl" and r["iteration"] == 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(out / ("rl.pt" if when == "rl" else "sft.pt"), weights_only=False)
    assert (ckpt["stage"], ckpt.get("iteration", ckpt.get("step"))) in {
        ("sft", 10),
        ("sft", 20),
        ("rl", 2),
    }
    resumed = subprocess.run(
        [sys.executable, "cagsr.py", "--resume", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert rows(out) == uninterrupted


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_exits_cleanly_and_resumes_exactly(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = start([*RUN, "--out", str(out)])
    wait_for(out, lambda r: r["stage"] == "rl" and r["iteration"] == 3, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert (
        "Traceback" not in stderr and "checkpoint written" in stdout and f"--resume {out}" in stdout
    )
    ckpt = torch.load(out / "rl.pt", weights_only=False)
    assert ckpt["iteration"] >= 3  # written where it stopped, not at 2
    resumed = subprocess.run(
        [sys.executable, "cagsr.py", "--resume", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert rows(out) == uninterrupted


# ---- atomic checkpoints -------------------------------------------------------------------

WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from cli.runs import atomic_save
from pathlib import Path
path = Path({path!r})
i = 0
while True:
    atomic_save(path, dict(i=i, weights=torch.full((1_000_000,), float(i))))
    print(i, flush=True)
    i += 1
"""


@pytest.mark.slow
def test_sigkill_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "ckpt.pt"
    code = WRITER.format(root=str(ROOT), path=str(path))
    for delay in (0.3, 0.45, 0.6, 0.75, 0.9):  # different moments of a write
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # the first write is done (imports can be slow)
        time.sleep(delay)  # then a moment during the later writes
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = torch.load(path, weights_only=False)  # never a half-written file
        assert torch.equal(ckpt["weights"], torch.full((1_000_000,), float(ckpt["i"])))


# ---- non-finite values --------------------------------------------------------------------


def small_setup(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=16,
        d_model=32,
        n_heads=2,
        n_enc_layers=1,
        n_dec_layers=2,
        d_ff=64,
        max_src_len=12,
        max_tgt_len=12,
        last_layers=2,
    )
    model, ref = EncoderDecoder(cfg), EncoderDecoder(cfg)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 16, (5,), generator=g).tolist() + [2] for _ in range(16)]
    salient = SalientTokens(
        torch.linspace(0.1, 2.0, 16), torch.arange(16) >= 4, [f" t{i}" for i in range(16)]
    )
    ppo_cfg = ppo.PPOConfig(
        prompts_per_iter=4, num_samples=2, max_new_tokens=6, lr=1e-3, baseline="group", **kw
    )
    return model, ref, prompts, salient, ppo_cfg


def test_nonfinite_reward_never_reaches_the_weights_and_stops_the_run_after_three():
    model, ref, prompts, salient, cfg = small_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    nan_reward = lambda src, src_mask, r, terms: torch.full((r.tokens.size(0),), float("nan"))
    seen = []
    with pytest.raises(
        parallel.NonFiniteError,
        match=r"iterations 1-3: no update applied.*reward \(not finite for 8 of 8",
    ):
        ppo.train(
            model,
            ref,
            opt,
            ppo.RLTask(
                prompts,
                specials=SP,
                salient=salient,
                reward_cfg=RewardConfig(),
                reward_fn=nan_reward,
            ),
            cfg,
            ppo.RLRun(10),
            ppo.RLHooks(on_iteration=lambda i, row, state: seen.append(row)),
        )
    assert [r["skipped"] for r in seen] == [1, 1, 1] and all(
        r["nonfinite_reward"] == 8 for r in seen
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_nonfinite_gradient_is_skipped_and_named():
    model, ref, prompts, salient, cfg = small_setup()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    src, mask = next(ppo.prompt_batches(prompts, 4, seed=0, sp=SP))
    experience, _ = ppo.collect(
        model,
        ref,
        src,
        mask,
        ppo.RLTask([], specials=SP, salient=salient, reward_cfg=RewardConfig()),
        cfg,
        kl_coef=0.0,
    )
    with torch.no_grad():
        model.dec_ln.weight[0] = float("inf")  # the loss is then inf or nan
    poisoned = {k: v.clone() for k, v in model.state_dict().items()}
    stats = ppo.update(model, opt, experience, cfg)
    assert (
        stats["applied"] == 0
        and stats["skipped"] == 1
        and stats["skip_cause"] in ("loss", "gradient")
    )
    for k, v in model.state_dict().items():
        assert torch.equal(v, poisoned[k]) or (torch.isnan(v) == torch.isnan(poisoned[k])).all(), k
    assert not any(torch.isnan(p).any() for p in model.parameters())


def test_sft_skips_nonfinite_steps_and_stops_after_three():
    model, *_ = small_setup()
    pairs = [([5, 6, 2], [7, 2])] * 8
    with torch.no_grad():
        model.tok_emb.weight[5] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logged = []
    with pytest.raises(
        parallel.NonFiniteError, match=r"SFT steps 1-3: the loss was not finite 3 times in a row"
    ):
        train_sft(
            model,
            SFTTask(pairs, pairs, specials=SP),
            SFTConfig(steps=10, batch_size=4, lr=1e-3, warmup=1, eval_every=100),
            "cpu",
            SFTRun(seed=0),
            SFTHooks(log=logged.append),
        )
    assert logged == [dict(stage="sft_skip", step=i, skip_cause="loss") for i in (1, 2, 3)]
    for k, v in model.state_dict().items():  # untouched, the NaN row included
        assert torch.equal(torch.nan_to_num(v), torch.nan_to_num(before[k])), k


# ---- flags and resume mistakes ------------------------------------------------------------


def test_resume_refuses_other_flags_and_a_directory_without_a_run(tmp_path):
    with pytest.raises(SystemExit, match="no args.json"):
        cagsr.main(["--resume", str(tmp_path)])
    (tmp_path / "args.json").write_text(json.dumps(vars(cagsr.build_parser().parse_args([]))))
    with pytest.raises(SystemExit, match=r"drop --iterations, --size"):
        cagsr.main(["--resume", str(tmp_path), "--size", "small", "--iterations", "3"])


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_from_another_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out, vocab in ((a, "400"), (b, "300")):
        args = (
            [
                "cagsr.py",
                "--stage",
                "sft",
                "--dataset",
                "qa-grounded",
                "--sft-steps",
                "2",
                "--sft-eval-every",
                "2",
                "--num-eval",
                "2",
                "--out",
                str(out),
            ]
            + TINY[:-1]
            + [f"vocab_size={vocab}"]
        )
        assert (
            subprocess.run(
                [sys.executable, *args], cwd=ROOT, capture_output=True, timeout=300
            ).returncode
            == 0
        )
    # another tokenizer: b's checkpoint dropped into a as its rl.pt
    ckpt = torch.load(b / "sft.pt", weights_only=False)
    ckpt.update(stage="rl", iteration=1)
    torch.save(ckpt, a / "rl.pt")
    p = subprocess.run(
        [sys.executable, "cagsr.py", "--resume", str(a)], cwd=ROOT, capture_output=True, text=True
    )
    assert p.returncode != 0 and "another tokenizer than sft.pt" in p.stderr
    # another size
    ckpt = torch.load(a / "sft.pt", weights_only=False)
    ckpt["size"] = "small"
    torch.save(ckpt, a / "sft.pt")
    (a / "rl.pt").unlink()
    p = subprocess.run(
        [sys.executable, "cagsr.py", "--resume", str(a)], cwd=ROOT, capture_output=True, text=True
    )
    assert (
        p.returncode != 0 and "sft.pt is a small checkpoint but the run is --size tiny" in p.stderr
    )


# ---- bad prompts --------------------------------------------------------------------------


def test_prompts_without_salient_tokens_score_finite_terms():
    """Prompts of special tokens and non-content tokens only (the toy's ids < 4, as punctuation is
    for a real tokenizer): no salient token, coverage 0, every term finite."""
    model, ref, _, salient, cfg = small_setup()
    src = torch.tensor([[3, 1, 3, 2], [2, 0, 0, 0]])  # <unk> <bos> <unk> <eos>; <eos> alone
    r, terms, _, _ = ppo.sample_and_score(
        model,
        src,
        src != 0,
        salient,
        RewardConfig(),
        cfg,
        SP,
        generator=torch.Generator().manual_seed(0),
    )
    for k in ("reward", "coverage", "focus", "repeat", "sink_share"):
        assert torch.isfinite(terms[k]).all(), k
    assert (terms["coverage"] == 0).all()


def test_sample_refuses_an_empty_or_overlong_prompt(checkpoint):
    path = checkpoint  # max_src_len 8 (tests/conftest.py)
    with pytest.raises(SystemExit, match="--prompt is empty"):
        cagsr.main(["--stage", "sample", "--init", str(path), "--prompt", "  "])
    with pytest.raises(
        SystemExit, match=r"--prompt is \d+ tokens, over this model's max_src_len=8"
    ):
        cagsr.main(
            ["--stage", "sample", "--init", str(path), "--prompt", "where does the cat live ? " * 3]
        )
