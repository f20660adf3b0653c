"""Data parallelism under torchrun (ppo.py, cagsr.py): shards, whitening over all ranks, skipping
together, and identical weights on every rank after an update. The multi-process tests launch
`python -m torch.distributed.run` on the CPU with the gloo backend and 2 processes (marked slow).

Prompt and batch shards are disjoint and make up the batch; under `torchrun` with 2 gloo processes
that start from different weights, both ranks hold bit-identical weights after PPO updates (and the
updates moved them), logged rows agree, whitening over the two shards equals whitening of their
concatenation, and a NaN on one rank makes both skip without touching a weight; the real CLI trains
on 2 processes with rank 0 alone writing, refuses a batch that does not split evenly, and a
2-process run killed mid-RL resumes to the same log as an uninterrupted one.

This file is also the worker those tests launch: `python tests/test_distributed.py OUT_DIR`.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import parallel  # noqa: E402
import ppo  # noqa: E402
from model import EncoderDecoder, ModelConfig  # noqa: E402
from reward import RewardConfig, SalientTokens  # noqa: E402

V = 16
SP = data.Specials(
    pad=0, start=1, eos=2, special=(0, 1, 2, 3)
)  # our tokenizer's ids: the toy vocabulary's 0..3


def prompts(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(4, V, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        + [SP.eos]
        for _ in range(n)
    ]


def salient():
    return SalientTokens(
        torch.linspace(0.1, 2.0, V), torch.arange(V) >= 4, [f" t{i}" for i in range(V)]
    )


# ---- one process: the shards --------------------------------------------------------------


def test_prompt_shards_are_disjoint_and_make_up_the_batch():
    ps = prompts()
    whole = ppo.prompt_batches(ps, 8, seed=3, sp=SP)
    shards = [ppo.prompt_batches(ps, 8, seed=3, sp=SP, rank=r, world=4) for r in range(4)]
    for _ in range(7):  # past the end of a pass: reshuffled
        src, mask = next(whole)
        rows = [tuple(s[m].tolist()) for s, m in zip(src, mask)]
        parts = []
        for it in shards:
            s, m = next(it)
            assert s.size(0) == 2
            parts += [tuple(r[k].tolist()) for r, k in zip(s, m)]
        assert parts == rows  # disjoint, in order, together the batch


def test_prompts_per_iteration_must_split_evenly():
    with pytest.raises(ValueError, match="multiple of 3"):
        next(ppo.prompt_batches(prompts(), 8, seed=0, sp=SP, rank=0, world=3))


def test_sft_batch_shares_cover_the_batch_once():
    pairs = [([4 + i % 10, SP.eos], [5, SP.eos]) for i in range(23)]
    whole = [b["src"][:, 0].tolist() for b in data.batches(pairs, 8, SP, seed=1)]
    parts = [
        [b["src"][:, 0].tolist() for b in data.batches(pairs, 8, SP, seed=1, rank=r, world=3)]
        for r in range(3)
    ]
    assert [len(p) for p in parts] == [3, 3, 3]
    for i in range(3):  # 8 = 2 + 3 + 3, and the last batch of 7 = 2 + 2 + 3
        assert parts[0][i] + parts[1][i] + parts[2][i] == whole[i]
    # a last batch smaller than the number of ranks is left out
    assert (
        len(list(data.batches(pairs[:17], 8, SP, rank=0, world=3)))
        == 2
        == data.batches_per_epoch(17, 8, 3)
    )
    # a resumed pass skips batches without changing the ones that follow
    later = [
        b["src"][:, 0].tolist() for b in data.batches(pairs, 8, SP, seed=1, rank=1, world=3, skip=1)
    ]
    assert later == parts[1][1:]


def test_single_process_helpers_are_the_plain_versions():
    x = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert parallel.rank_and_world() == (0, 1)
    # mean 4, biased variance (9 + 4 + 1 + 36) / 4 = 12.5: (x - 4) / sqrt(12.5)
    expected = torch.tensor([-3.0, -2.0, -1.0, 6.0]) / math.sqrt(12.5)
    torch.testing.assert_close(ppo.whiten_across_ranks(x), expected, rtol=1e-6, atol=1e-6)
    assert parallel.all_finite(x) and not parallel.all_finite(torch.tensor([1.0, float("nan")]))
    row = dict(reward=0.5, iteration=3)
    assert (
        parallel.mean_over_ranks(row) is row
        and parallel.replicas_agree(torch.nn.Linear(2, 2)) == 0.0
    )


# ---- two processes ------------------------------------------------------------------------


def torchrun(args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def worker(out: Path) -> None:
    """Each rank: its own initial weights (DDP must broadcast rank 0's), its own shard of prompts,
    two PPO iterations (value warm-up, then whitened advantages); then an update with a NaN loss on
    rank 1 only. Saves what the test compares."""
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(100 + rank)
    cfg = ModelConfig(
        vocab_size=V,
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
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ppo_cfg = ppo.PPOConfig(
        prompts_per_iter=8,
        num_samples=3,
        max_new_tokens=8,
        lr=1e-3,
        whiten=True,
        value_warmup=1,
        epochs=2,
        minibatches=2,
    )
    opt = torch.optim.Adam(model.parameters(), lr=ppo_cfg.lr)
    rows = ppo.train(
        model,
        ref,
        opt,
        ppo.RLTask(prompts(), specials=SP, salient=salient(), reward_cfg=RewardConfig()),
        ppo_cfg,
        ppo.RLRun(iterations=2, seed=0),
    )
    x = torch.randn(
        5 + rank, generator=torch.Generator().manual_seed(rank)
    )  # unequal shards on purpose
    # A rollout whose returns are NaN on rank 1 only: both ranks must
    # skip, or rank 0 would hang in DDP.
    src, mask = next(ppo.prompt_batches(prompts(), 8, seed=5, sp=SP, rank=rank, world=2))
    experience, _ = ppo.collect(
        model,
        ref,
        src,
        mask,
        ppo.RLTask([], specials=SP, salient=salient(), reward_cfg=RewardConfig()),
        ppo_cfg,
        kl_coef=0.0,
    )
    if rank == 1:
        experience.advantages[:] = float("nan")
    before_skip = {k: v.clone() for k, v in model.state_dict().items()}
    skip_stats = ppo.update(
        model,
        opt,
        experience,
        ppo_cfg,
        policy=parallel.data_parallel(ppo.PolicyValue(model), "cpu"),
    )
    changed_by_skip = any(not torch.equal(before_skip[k], v) for k, v in model.state_dict().items())
    torch.save(
        dict(
            state=model.state_dict(),
            initial=initial,
            rows=rows,
            x=x,
            white=ppo.whiten_across_ranks(x),
            skipped=skip_stats["skipped"],
            changed_by_skip=changed_by_skip,
            agree=parallel.replicas_agree(model),
        ),
        out / f"rank{rank}.pt",
    )
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_hold_identical_weights_after_ppo_updates(tmp_path):
    proc = torchrun([str(Path(__file__).resolve()), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # Different starting points, one model after DDP: identical to the bit on both ranks...
    assert any(not torch.equal(r0["initial"][k], r1["initial"][k]) for k in r0["initial"])
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["agree"] == r1["agree"] == 0.0
    # ...and the updates did move it (the policy after the warm-up iteration, the value head too).
    moved = {k for k in r0["state"] if not torch.equal(r0["state"][k], r0["initial"][k])}
    assert any(k.startswith("decoder.") for k in moved) and any(
        k.startswith("value_head.") for k in moved
    )
    # Logged rows are the mean over the ranks: the same on both.
    assert r0["rows"] == r1["rows"] and [r["value_warmup"] for r in r0["rows"]] == [True, False]
    # Whitening over both shards is whitening of their concatenation.
    both = torch.cat([r0["x"], r1["x"]])
    torch.testing.assert_close(
        torch.cat([r0["white"], r1["white"]]), ppo.whiten(both), atol=1e-6, rtol=0
    )
    # A NaN on rank 1 alone: every minibatch skipped on both ranks, no weight touched.
    assert (
        r0["skipped"] == r1["skipped"] == 4
        and not r0["changed_by_skip"]
        and not r1["changed_by_skip"]
    )


@pytest.mark.slow
def test_torchrun_cli_trains_on_two_processes_and_rank_zero_writes(tmp_path):
    tiny = [
        "--set",
        "d_model=32",
        "--set",
        "d_ff=64",
        "--set",
        "n_heads=2",
        "--set",
        "vocab_size=400",
    ]
    common = [
        "cagsr.py",
        "--dataset",
        "qa-grounded",
        "--sft-steps",
        "6",
        "--sft-batch-size",
        "8",
        "--sft-eval-every",
        "3",
        "--iterations",
        "2",
        "--num-eval",
        "8",
        "--eval-prompts",
        "8",
        "--device",
        "cpu",
    ] + tiny
    out = tmp_path / "run"
    proc = torchrun(common + ["--prompts-per-iter", "8", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data parallel: 2 processes (gloo)" in proc.stdout
    for stage in ("SFT", "RL"):
        assert f"after {stage}: all 2 ranks hold identical weights" in proc.stdout
    assert proc.stdout.count("done in") == 1  # rank 1 prints nothing
    assert {"args.json", "metrics.jsonl", "sft.pt", "rl.pt"} <= {p.name for p in out.iterdir()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if r["stage"] == "rl"] == [1, 2]
    # An impossible combination is refused before any work, naming the flag.
    bad = torchrun(
        common + ["--prompts-per-iter", "7", "--minibatches", "1", "--out", str(tmp_path / "bad")]
    )
    assert (
        bad.returncode != 0
        and "--prompts-per-iter 7 cannot be split evenly over 2 processes" in bad.stderr
    )
    assert not (tmp_path / "bad").exists()


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


def logged(run: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.slow
def test_torchrun_run_killed_and_resumed_logs_what_an_uninterrupted_one_does(tmp_path):
    """Each rank's sampling stream is in the checkpoint, so a 2-process run resumes exactly too."""
    args = [
        "cagsr.py",
        "--dataset",
        "qa-grounded",
        "--sft-steps",
        "6",
        "--sft-batch-size",
        "8",
        "--sft-eval-every",
        "3",
        "--iterations",
        "5",
        "--ckpt-every",
        "2",
        "--eval-every",
        "2",
        "--prompts-per-iter",
        "8",
        "--num-eval",
        "8",
        "--eval-prompts",
        "8",
        "--device",
        "cpu",
        "--set",
        "d_model=32",
        "--set",
        "d_ff=64",
        "--set",
        "n_heads=2",
        "--set",
        "vocab_size=400",
    ]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert torchrun(args + ["--out", str(whole)]).returncode == 0
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *args,
        "--out",
        str(part),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        for _ in range(6000):  # until iteration 3 is logged (checkpoint at 2)
            path = part / "metrics.jsonl"
            if path.exists() and '"stage": "rl", "iteration": 3' in path.read_text():
                break
            assert proc.poll() is None
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        proc.wait()
    assert torch.load(part / "rl.pt", weights_only=False)["iteration"] == 2
    resumed = torchrun(["cagsr.py", "--resume", str(part)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged(part) == logged(whole)
    # the same checkpoint on another number of processes is refused
    single = subprocess.run(
        [sys.executable, "cagsr.py", "--resume", str(part)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert single.returncode != 0 and "resume it on as many (now 1)" in single.stderr


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
