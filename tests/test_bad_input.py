"""Every bad input is refused before any work, with one line naming the flag or file, what was wrong
and what to do; nothing is left half-written. Usage errors exit with status 2, errors found in the
data with status 1 (USAGE.md, "When things go wrong").

16 bad settings (NaN or negative learning rates, `--iterations -1`, temperature or top-p 0, 0
samples, the group baseline with 1, minibatches that do not divide the batch, `--kl-target` from
`--kl-coef 0`, a `--set` the preset cannot take, an unknown dataset or device, 0 seeds) are refused
with their one-line message and leave no file behind; `--init` naming a text file, a checkpoint cut
to half its size, a directory or nothing; a checkpoint of another format;
`--out` naming a file; a flag of the experiments group given where nothing reads it (`--seeds 3`
without `--experiment`), by name even at its default value, while it is read where it applies and
`--resume` still replays a run's args.json; too few prompts for a batch (after
loading the data, before the run directory); exit status 2 for a usage error and 1 for bad data,
without a traceback; `--help` states each default and whose it is; an unknown flag gets the nearest
valid one; the settings the paper does not state are printed as such; `--algo pg` takes the steps
its Table 1 row describes; the synthetic reward model's label accuracy is measured on held-out
records."""

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
import ppo
import presets
from cli import runs, settings
from experiments import baselines, table1
from model import EncoderDecoder, ModelConfig
from reward import RewardConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "nan"], "--lr nan: must be a positive, finite number"),
        (["--sft-lr", "-1"], "--sft-lr -1.0: must be a positive, finite number"),
        (["--iterations", "-1"], "--iterations -1: must be a whole number >= 1"),
        (["--temperature", "0"], "--temperature 0.0: must be a positive, finite number"),
        (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
        (
            ["--num-samples", "0", "--baseline", "value"],
            "--num-samples 0: must be a whole number >= 1",
        ),
        (
            ["--num-samples", "1", "--baseline", "group"],
            "--num-samples 1: must be at least 2 with the group baseline",
        ),
        (
            ["--prompts-per-iter", "10"],
            "--prompts-per-iter 10: minibatches is 4 (the default; not set), which must be a "
            "divisor of prompts_per_iter=10",
        ),
        (
            ["--prompts-per-iter", "10", "--minibatches", "3"],
            "--minibatches 3: must be a divisor of prompts_per_iter=10",
        ),
        (
            ["--set", "n_heads=3"],
            "--set n_heads=3: d_model is 128 (the default; not set), which must be divisible by "
            "n_heads=3",
        ),
        (
            ["--kl-target", "2", "--kl-coef", "0"],
            "--kl-target 2.0: must be given with a starting kl_coef > 0",
        ),
        (["--set", "d_model=30"], "--set d_model=30: must be divisible by n_heads=4"),
        (
            ["--dataset", "nope"],
            "--dataset nope: not one of qa, qa-grounded, instruct, nor a .jsonl file",
        ),
        (["--dataset", "missing.jsonl"], "--dataset missing.jsonl: no such file"),
        (["--device", "tpu"], "--device tpu: not a device"),
        (["--experiment", "table1", "--seeds", "0"], "--seeds 0: must be a whole number >= 1"),
        (["--experiment", "rewards", "--workers", "0"], "--workers 0: must be a whole number >= 1"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(runs.UsageError, match=re.escape(message)):
        cagsr.main(argv + ["--out", str(tmp_path / "run")])
    assert list(tmp_path.iterdir()) == []  # no run directory, nothing written


# ---- flags given where they have no effect ------------------------------------------------------

EXPERIMENT_FLAGS = {  # flag: (its default, another value, the Run field it sets with --experiment)
    "--seeds": ("3", "2", "seeds"),
    "--workers": ("1", "2", "workers"),
    "--results-dir": ("results", "tables", "results_dir"),
    "--rm-steps": ("300", "5", "rm_steps"),
    "--human-prompts": ("1000", "7", "human_prompts"),
    "--hybrid-weight": ("1.0", "0.5", "hybrid_weight"),
    "--relevance-steps": ("600", "9", "relevance_steps"),
}
HYBRID = {"--rm-steps": "rm_steps", "--human-prompts": "human_prompts", "--hybrid-weight": "weight"}


def resolve_in(folder, argv):
    return settings.resolve(cagsr.build_parser().parse_args(argv + ["--out", str(folder)]), "test")


@pytest.mark.parametrize("flag", EXPERIMENT_FLAGS)
def test_an_experiment_flag_without_experiment_is_refused_even_at_its_default(
    tmp_path, monkeypatch, flag
):
    monkeypatch.chdir(tmp_path)
    default, other, _ = EXPERIMENT_FLAGS[flag]
    where = " or --reward hybrid" if flag in HYBRID else ""
    for value in (default, other):
        with pytest.raises(runs.UsageError) as e:
            cagsr.main([flag, value, "--out", str(tmp_path / "run")])
        assert str(e.value).startswith(f"{flag} has no effect without --experiment{where}: ")
        assert "\n" not in str(e.value) and "it applies only to --experiment" in str(e.value)
    with pytest.raises(runs.UsageError, match=f"^{flag} has no effect"):  # any stage, and --dry-run
        cagsr.main(["--dry-run", flag, default])
    assert list(tmp_path.iterdir()) == []  # refused before any work


@pytest.mark.parametrize("flag", EXPERIMENT_FLAGS)
def test_an_experiment_flag_is_read_where_it_applies(tmp_path, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    default, other, field = EXPERIMENT_FLAGS[flag]
    kinds = ["rewards"] if flag == "--hybrid-weight" else ["table1", "rewards"]
    for kind in kinds:
        run = resolve_in(tmp_path / "w", ["--experiment", kind, flag, other])
        assert str(getattr(run.experiment, field)) == other
        not_given = resolve_in(tmp_path / "w", ["--experiment", kind]).experiment
        assert str(getattr(not_given, field)) == default  # ExperimentConfig's, as --help states
    if flag in HYBRID:  # a plain run reads it with --reward hybrid
        run = resolve_in(tmp_path / "run", ["--reward", "hybrid", flag, other])
        assert run.experiment is None and str(run.hybrid[HYBRID[flag]]) == other
    else:
        with pytest.raises(runs.UsageError, match=f"^{flag} has no effect without --experiment: "):
            resolve_in(tmp_path / "run", ["--reward", "hybrid", flag, other])


def test_the_hybrid_weight_is_refused_where_no_hybrid_reward_is_trained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(runs.UsageError) as e:
        resolve_in(tmp_path / "w", ["--experiment", "table1", "--hybrid-weight", "1.0"])
    assert str(e.value) == (
        "--hybrid-weight has no effect with --experiment table1: it applies only to --experiment "
        "rewards or ablations, or --reward hybrid; drop it"
    )
    assert resolve_in(tmp_path / "run", ["--reward", "hybrid"]).hybrid == dict(
        rm_steps=300, human_prompts=1000, weight=1.0
    )


def test_resume_replays_a_runs_experiment_settings_old_or_new(tmp_path, monkeypatch):
    # args.json written before these flags defaulted to None holds their defaults (seeds 3, ...);
    # one written now holds None. Both resume; an experiment flag beside --resume is still refused.
    monkeypatch.chdir(tmp_path)
    parser = cagsr.build_parser()
    old = {**vars(parser.parse_args([])), "seeds": 3, "workers": 1, "results_dir": "results"}
    old.update(rm_steps=300, human_prompts=1000, hybrid_weight=1.0, relevance_steps=600)
    for name, saved in (("old", old), ("new", vars(parser.parse_args([])))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "args.json").write_text(json.dumps({**saved, "command": "c"}))
        args = parser.parse_args(["--resume", str(tmp_path / name)])
        new, command, last = settings.resumed(vars(parser.parse_args([])), args, "c")
        run = settings.resolve(new, command, last)
        assert run.experiment is None and run.hybrid["rm_steps"] == 300
    with pytest.raises(runs.UsageError, match="drop --seeds"):
        settings.resumed(
            vars(parser.parse_args([])),
            parser.parse_args(["--resume", str(tmp_path / "new"), "--seeds", "3"]),
            "c",
        )


@pytest.mark.slow
def test_an_experiment_flag_without_experiment_exits_2_with_one_line():
    out = subprocess.run(
        [sys.executable, "cagsr.py", "--seeds", "3"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 2 and out.stderr.splitlines() == [
        "cagsr.py: error: --seeds has no effect without --experiment: it applies only to "
        "--experiment table1, rewards, rank or ablations; drop it"
    ]


def test_an_init_that_is_not_a_checkpoint_file_is_refused(tmp_path, checkpoint):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    half = tmp_path / "half.pt"
    half.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    for init, message in (
        (notes, "cannot be read as a checkpoint"),
        (half, "cannot be read as a checkpoint"),
        (tmp_path, "is a directory without a config.json: --init takes a checkpoint file"),
        (tmp_path / "none.pt", "no such checkpoint file"),
    ):
        with pytest.raises(
            runs.UsageError, match=re.escape(f"--init {init}") + ".*" + re.escape(message)
        ):
            cagsr.main(["--stage", "eval", "--init", str(init)])
    assert "--resume" in str(
        pytest.raises(runs.UsageError, cagsr.main, ["--stage", "rl", "--init", str(tmp_path)]).value
    )


def test_a_checkpoint_of_another_format_is_refused(tmp_path, checkpoint):
    ckpt = torch.load(checkpoint, weights_only=False)
    assert ckpt["format"] == runs.CHECKPOINT_FORMAT
    unmarked = {k: v for k, v in ckpt.items() if k != "format"}
    for name, obj, message in (
        ("unmarked.pt", unmarked, 'checkpoint format 1 (it has no "format" field), but this'),
        ("one.pt", {**ckpt, "format": 1}, "train a new checkpoint with this code"),
        ("three.pt", {**ckpt, "format": 3}, "written by a newer cagsr.py: update the code"),
    ):
        torch.save(obj, tmp_path / name)
        where = re.escape(f"--init {tmp_path / name}: ")
        with pytest.raises(runs.UsageError, match=where + ".*" + re.escape(message)):
            cagsr.main(["--stage", "eval", "--init", str(tmp_path / name)])
    torch.save(ckpt["model"], tmp_path / "weights.pt")  # a bare state dict: no checkpoint at all
    with pytest.raises(runs.UsageError, match=re.escape("(missing format, model, model_config")):
        runs.load_checkpoint(tmp_path / "weights.pt", flag="--init")
    assert runs.load_checkpoint(checkpoint)[2]["format"] == runs.CHECKPOINT_FORMAT


def test_out_naming_a_file_is_refused(tmp_path):
    out = tmp_path / "some_file"
    out.write_text("keep me")
    with pytest.raises(runs.UsageError, match=re.escape(f"--out {out} is a file")):
        cagsr.main(["--out", str(out)])
    assert out.read_text() == "keep me"


def test_too_few_prompts_for_a_batch_is_refused_after_loading_the_data_before_the_run_directory(
    tmp_path,
):
    path = tmp_path / "small.jsonl"
    path.write_text(
        "".join(
            json.dumps(dict(prompt=f"question {i}?", response=f"answer {i}.")) + "\n"
            for i in range(30)
        )
    )
    out = tmp_path / "run"
    with pytest.raises(
        SystemExit, match=r"small\.jsonl: 24 training prompts, fewer than --prompts-per-iter 64"
    ):
        cagsr.main(["--dataset", str(path), "--out", str(out), "--set", "vocab_size=300"])
    assert not out.exists()


@pytest.mark.slow
def test_exit_status_is_2_for_usage_and_1_for_bad_data(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a?", "response": "b."}\n{"prompt": "c?"\n')
    usage = subprocess.run(
        [sys.executable, "cagsr.py", "--lr", "nan"], cwd=ROOT, capture_output=True, text=True
    )
    assert usage.returncode == 2 and usage.stderr.strip().splitlines() == [
        "cagsr.py: error: --lr nan: must be a positive, finite number"
    ]
    data_err = subprocess.run(
        [sys.executable, "cagsr.py", "--dataset", str(bad), "--out", str(tmp_path / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert data_err.returncode == 1 and "bad.jsonl, line 2: malformed JSON" in data_err.stderr
    assert "Traceback" not in usage.stderr + data_err.stderr and not (tmp_path / "run").exists()


# ---- --help and unknown flags -------------------------------------------------------------------


def test_help_states_each_default_and_whose_it_is(capsys):
    with pytest.raises(SystemExit):
        cagsr.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in out
    # the "pretrained" profile (--init with a snapshot) keeps the paper's RL lr
    # and fine-tunes SFT at 1e-4
    assert (
        "Adam learning rate (§7.2: 1e-5). "
        "(default: 3e-05 (tiny/small), 1e-05 (base/1.3b/pretrained))" in out
    )
    # --sft-lr
    assert "(default: 0.002 (tiny), 0.001 (small), 0.0005 (base), 0.0001 (1.3b/pretrained))" in out
    assert "the paper states none, 1.0 is the project's choice" in out  # max_grad_norm


def test_an_unknown_flag_gets_the_nearest_valid_one(capsys):
    with pytest.raises(SystemExit) as e:
        cagsr.main(["--n-samples", "3"])
    assert (
        e.value.code == 2
        and "did you mean --num-samples (not --n-samples)?" in capsys.readouterr().err
    )


def test_settings_the_paper_does_not_state_are_not_printed_as_the_papers(capsys):
    settings.print_rl_settings(ppo.PPOConfig(**presets.RUN_CPU_PPO), RewardConfig(), 40)
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[1:]}
    for name in ("top_k", "max_grad_norm", "value_coef", "max_new_tokens", "epochs"):
        assert lines[name].startswith("  -") and lines[name].endswith("| not stated"), lines[name]
    assert lines["lr"].startswith("  *") and lines["lr"].endswith("| 1e-05")
    table = table1.markdown(
        json.loads((ROOT / "results" / "earlier" / "table1_qa.json").read_text())
    )
    stated = table[table.index("settings the paper does not state") :].splitlines()[0]
    assert "top_k 50" in stated and "max_grad_norm 1.0" in stated


# ---- settings and reported numbers that do what their text says ---------------------------------


def test_plain_policy_gradient_does_what_its_table_row_says():
    """--algo pg: one epoch over the rollout whatever --epochs says, one step per minibatch."""
    from test_ppo import setup_rollout

    policy, _, experience, cfg, _ = setup_rollout(
        baseline="group", algo="pg", epochs=4, minibatches=3
    )
    stats = ppo.update(policy, torch.optim.Adam(policy.parameters(), lr=1e-3), experience, cfg)
    assert stats["applied"] == 3
    note = next(m.note for m in table1.METHODS if m.name == "cagsr_pg")
    assert "one epoch over each rollout, one step per minibatch" in note


def test_the_synthetic_reward_model_is_scored_on_held_out_records():
    """Training never sees the held-out records; with 3 of them (3 references + 3 corruptions) the
    accuracy is a multiple of 1/6, which 40 training records (80 examples) would rarely give."""
    records = [
        dict(prompt=f"what is item {i}?", response=f"item {i} is a red box number {i}.")
        for i in range(40)
    ]
    held_out = [
        dict(prompt=f"where is place {i}?", response=f"place {i} lies by the old river.")
        for i in range(3)
    ]
    tok = data.train_tokenizer(data.record_texts(records + held_out), 300)
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        d_model=32,
        n_heads=2,
        n_enc_layers=1,
        n_dec_layers=1,
        d_ff=64,
        max_src_len=32,
        max_tgt_len=48,
    )
    _, stats = baselines.train_synthetic_rm(
        EncoderDecoder(cfg), tok, records, held_out, "cpu", steps=3, batch_size=8
    )
    assert stats["held_out_records"] == 3
    assert math.isclose(
        stats["label_accuracy"] * 6, round(stats["label_accuracy"] * 6), abs_tol=1e-6
    )


def test_a_flag_set_to_none_turns_its_setting_off(tmp_path, checkpoint):
    # Flags default to None ("not given"); `--top-k none` is a value of its own: the setting is off,
    # not left at the profile's value.
    resolve = lambda *argv: settings.resolve(cagsr.build_parser().parse_args(list(argv)), "test")
    sample = ("--stage", "sample", "--init", str(checkpoint), "--prompt", "a?")
    assert resolve(*sample, "--top-k", "7").ppo.top_k == 7
    assert resolve(*sample, "--top-k", "7", "--top-k", "none").ppo.top_k is None
    assert resolve().ppo.kl_coef == 0.1  # the CPU profile's
    assert resolve("--kl-coef", "0.1", "--kl-target", "2").ppo.kl_target == 2.0
    assert (
        resolve("--kl-coef", "0.1", "--kl-target", "2", "--kl-target", "off").ppo.kl_target is None
    )
