"""Nothing lost, nothing half-written: each bad input below is run as a user runs it (a
subprocess of `python cagsr.py`) and must end in one line naming what was wrong, with
the documented exit status, no traceback, no run directory left and no existing file
changed (USAGE.md, "When things go wrong").

The cases: `--experiment table1|rewards` refusing to replace the committed `results/`
(byte-identical afterwards); a snapshot whose `model.safetensors` or one shard is cut short, a shard
missing, a corrupt `pytorch_model.bin`, a `tokenizer.json` that is not a tokenizer, a `config.json`
that is not JSON, each named; a checkpoint cut short under `--resume`, with advice for resuming;
`--out` under `/sys`, `/proc` or a file; a one-record dataset (no validation or test pair) and a
1.8 MB held-out prompt named by its file line, refused before the run directory so the same `--out`
can be used again; `--set n_heads=3` naming the user's flag; a bad `--experiment` choice. Also: the
run-time requirements equal the third-party modules the library imports (read from its source),
the test-only ones in `requirements-test.txt`. The suite's last test
(`tests/test_zz_results_unchanged.py`) checks that `results/` is byte-identical to what it was
before the first test."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import digest
from safetensors.torch import save_file

import data

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each case starts a Python process (about 3 s)


def refused(args, cwd, status, *expected) -> str:
    """Run cagsr.py with `args` in `cwd`; check the exit status, that stderr is one error line
    holding every `expected` text and no traceback; return that line."""
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cagsr.py"), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# ---- 1. the experiments never replace results without being asked -----------------------------


@pytest.mark.parametrize(
    "kind, dataset, folder",
    [
        ("rewards", "qa-grounded", "results"),
        ("rewards", "instruct", "results"),
        ("table1", "qa", "results/earlier"),
    ],
)
def test_an_experiment_refuses_to_replace_the_committed_results(tmp_path, kind, dataset, folder):
    before, table = digest(ROOT / "results"), f"{folder}/{kind}_{dataset}"
    assert (ROOT / (table + ".md")).is_file()  # the committed table is there to protect
    work = tmp_path / "work"
    line = refused(
        [
            "--experiment",
            kind,
            "--dataset",
            dataset,
            "--seeds",
            "1",
            "--sft-steps",
            "30",
            "--iterations",
            "1",
            "--out",
            work,
            "--results-dir",
            folder,
        ],
        ROOT,
        2,
        f"{table}.md",
        f"{table}.json",
        "--overwrite",
    )
    assert "--results-dir" in line
    assert digest(ROOT / "results") == before and not work.exists()


# ---- 2. snapshot and checkpoint files that cannot be read --------------------------------------


def snapshot(path: Path) -> Path:
    """A directory with a valid T5 config.json and tokenizer.json, and no weights yet."""
    path.mkdir()
    tok = data.train_tokenizer(["where does the cat live ?", "the cat lives in town ."] * 20, 300)
    tok.save(str(path / "tokenizer.json"))
    (path / "config.json").write_text(
        json.dumps(
            dict(
                model_type="t5",
                vocab_size=tok.get_vocab_size(),
                d_model=16,
                d_kv=8,
                d_ff=32,
                num_heads=2,
                num_layers=1,
            )
        )
    )
    return path


def weights_file(path: Path, cut: bool) -> None:
    save_file(
        {"shared.weight": torch.randn(64, 16), "lm_head.weight": torch.randn(64, 16)}, str(path)
    )
    if cut:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage(folder: Path, case: str) -> str:
    """Damage the snapshot `folder` as `case` says; the name of the file the error must name."""
    if case == "safetensors cut short":
        weights_file(folder / "model.safetensors", cut=True)
        return "model.safetensors"
    if case in ("shard cut short", "shard missing"):  # two shards; the second cut or absent
        shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
        weights_file(folder / shards[0], cut=False)
        if case == "shard cut short":
            weights_file(folder / shards[1], cut=True)
        index = {"weight_map": {"shared.weight": shards[0], "lm_head.weight": shards[1]}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        return shards[1]
    if case == "pytorch_model.bin corrupt":
        (folder / "pytorch_model.bin").write_bytes(os.urandom(4096))
        return "pytorch_model.bin"
    weights_file(folder / "model.safetensors", cut=False)
    if case == "tokenizer.json not a tokenizer":
        (folder / "tokenizer.json").write_text(json.dumps({"hello": "world"}))
        return "tokenizer.json"
    assert case == "config.json not JSON"
    (folder / "config.json").write_text('{"model_type": "t5", "d_model": ')
    return "config.json"


@pytest.mark.parametrize(
    "case",
    [
        "safetensors cut short",
        "shard cut short",
        "shard missing",
        "pytorch_model.bin corrupt",
        "tokenizer.json not a tokenizer",
        "config.json not JSON",
    ],
)
def test_an_unreadable_snapshot_is_one_line_naming_the_file(tmp_path, case):
    folder = snapshot(tmp_path / "snap")
    name = damage(folder, case)
    before, out = digest(folder), tmp_path / "run"
    status = 2 if case in ("tokenizer.json not a tokenizer", "config.json not JSON") else 1
    refused(
        ["--init", folder, "--out", out, "--sft-steps", "2"], tmp_path, status, str(folder / name)
    )
    assert digest(folder) == before and not out.exists() and not (tmp_path / "runs").exists()


def test_a_damaged_checkpoint_under_resume_gets_advice_for_resuming(tmp_path, checkpoint):
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(
        json.dumps(dict(size="tiny", dataset="qa", command="python cagsr.py"))
    )
    (run / "sft.pt").write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    before = digest(run)
    line = refused(
        ["--resume", run],
        tmp_path,
        2,
        f"--resume {run / 'sft.pt'}: cannot be read as a checkpoint",
        "restore it from a copy",
    )
    assert "Give a .pt file" not in line and digest(run) == before


# ---- 3. an --out that cannot be made ------------------------------------------------------------


@pytest.mark.parametrize("where", ["/sys/cagsr-test/run", "/proc/cagsr-test-run", "a_file/run"])
def test_an_out_that_cannot_be_created_is_refused_before_any_work(tmp_path, where):
    (tmp_path / "a_file").write_text("keep me")
    out = tmp_path / where if where == "a_file/run" else Path(where)
    refused(["--out", out, "--sft-steps", "2"], tmp_path, 2, f"--out {out}: cannot be")
    assert not out.exists() and (tmp_path / "a_file").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# ---- 4. data checks that need the split, before the run directory -------------------------------


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_dataset_without_validation_or_test_pairs_is_refused_with_the_counts(tmp_path):
    path = write_jsonl(
        tmp_path / "one.jsonl", [dict(prompt="Where does Ana live?", response="In Lima.")]
    )
    out = tmp_path / "run"
    refused(
        ["--dataset", path, "--prompts-per-iter", "1", "--minibatches", "1", "--out", out],
        tmp_path,
        1,
        "1 train / 0 validation / 0 test pairs",
        "at least one validation and one test pair",
    )
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl"]


def test_an_overlong_held_out_prompt_is_refused_by_its_file_line_before_the_run_directory(tmp_path):
    records = [
        dict(prompt=f"Where does person {i} live?", response=f"In town {i}.") for i in range(30)
    ]
    val = data.split(records, seed=0).val[0]  # the split puts this record in validation
    line = records.index(val) + 2  # line 1 is blank: file lines count it
    records[line - 2] = dict(val, prompt="where " * 300_000)  # 1.8 MB
    path = tmp_path / "long.jsonl"
    path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    for attempt in range(2):  # the same --out may be used again: nothing was left
        refused(
            ["--dataset", path, "--out", out, "--prompts-per-iter", "8", "--minibatches", "1"],
            tmp_path,
            1,
            f"line {line}: prompt is",
            "over the model's max_src_len",
            "--truncate",
        )
        assert not out.exists()


# ---- 5. messages that say what the user got wrong -----------------------------------------------


def test_a_rule_between_two_settings_names_the_one_the_user_set(tmp_path):
    line = refused(
        ["--set", "n_heads=3"],
        tmp_path,
        2,
        "--set n_heads=3:",
        "d_model is 128",
        "divisible by n_heads=3",
    )
    assert "--set d_model=128" not in line


def test_a_bad_choice_gets_the_choices_not_every_flag(tmp_path):
    line = refused(
        ["--experiment", "nosuch"], tmp_path, 2, "invalid choice: 'nosuch'", "table1", "rewards"
    )
    assert "did you mean" not in line and "--num-samples" not in line


def third_party_imports(files) -> set[str]:
    """The top-level names of every module the files import (at any depth), less the standard
    library and the project's own modules."""
    own = {p.stem for p in (*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"))}
    own |= {p.name for p in ROOT.glob("*/__init__.py") for p in [p.parent]}  # the folders
    names = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - own - {"__future__"}


def requirement_names(path: Path) -> set[str]:
    return {
        re.split(r"[<>=!~\[ ]", line)[0]
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }


def test_requirements_hold_what_the_library_imports_and_the_tests_the_rest():
    library = [
        *ROOT.glob("*.py"),
        *ROOT.glob("cli/*.py"),
        *ROOT.glob("experiments/*.py"),
        *ROOT.glob("interop/*.py"),
    ]  # the benchmarks (bench/) are test-side
    assert requirement_names(ROOT / "requirements.txt") == third_party_imports(library)
    test_side = third_party_imports(
        [*ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]
    ) - third_party_imports(library)
    assert test_side <= requirement_names(ROOT / "requirements-test.txt")
    assert {"nbclient", "ipykernel"} <= requirement_names(
        ROOT / "requirements-test.txt"
    )  # the tutorial's kernel
