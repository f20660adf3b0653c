"""The command line on decoder-only policies (DECISIONS.md §10, §11), in subprocesses: from
tiny random Llama and Qwen2 snapshots with a real tokenizer.json (byte-level BPE; Llama's
prepends <s>, Qwen2's has no BOS and ends in <|endoftext|>), `--dry-run` plans,
`--stage sample`, SFT + RL, `--stage eval`, Ctrl-C and `--resume` to the uninterrupted run's
log, and `--stage export`, after which transformers loads the export and gives the logits of
our checkpoint. The same for the from-scratch `--arch decoder` preset, which is the Llama
layout. The T5 round trip is in tests/test_snapshot.py."""

import json
import signal
import subprocess
import sys

import pytest
import torch
from test_robustness import ROOT, WALL_CLOCK, start, wait_for
from test_snapshot import cli
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import data
from cli import runs

transformers = pytest.importorskip("transformers")

RUN = [
    "--dataset",
    "qa",
    "--sft-steps",
    4,
    "--sft-batch-size",
    8,
    "--iterations",
    6,
    "--ckpt-every",
    1,
    "--eval-every",
    1,
    "--prompts-per-iter",
    4,
    "--eval-prompts",
    4,
    "--num-eval",
    4,
    "--max-new-tokens",
    8,
]
PROMPT, ANSWER = "Where does Stimdol Mellu live?", "Stimdol Mellu lives in Ashwick."


def bpe(texts, specials, bos=None) -> Tokenizer:
    """Byte-level BPE over `texts` with `specials` first; `bos`: the
    token its post-processor prepends."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def snapshot(request, tmp_path_factory):
    texts = list(data.record_texts(data.load_dataset("qa").train[:800]))
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    shape = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if request.param == "llama":
        tok = bpe(texts, ["<unk>", "<s>", "</s>"], bos="<s>")
        cfg = transformers.LlamaConfig(
            vocab_size=tok.get_vocab_size(),
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=None,
            tie_word_embeddings=False,
            **shape,
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:
        tok = bpe(texts, ["<|endoftext|>"])
        cfg = transformers.Qwen2Config(
            vocab_size=tok.get_vocab_size() + 5,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            tie_word_embeddings=True,
            **shape,
        )
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_proj.bias"):
                    p.normal_(0, 0.1)
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return request.param, path


def metric_rows(run):
    return [
        {k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def logits_match(checkpoint, export_dir):
    """transformers' logits of the export equal ours of the checkpoint
    on a prompt and its response."""
    ours, tok, _ = runs.load_checkpoint(checkpoint)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(export_dir).eval()
    sp = data.specials(tok)
    prompt, response = data.encode(tok, PROMPT, sp), data.encode(tok, ANSWER, sp, response=True)
    with torch.no_grad():
        mine, _ = ours.eval()(
            torch.tensor([prompt]),
            torch.ones(1, len(prompt), dtype=torch.bool),
            torch.tensor([[sp.start] + response[:-1]]),
        )
        hf = theirs(torch.tensor([prompt + response])).logits[:, len(prompt) - 1 : -1]
    torch.testing.assert_close(hf, mine, atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(export_dir)
    assert hf_tok(PROMPT)["input_ids"] + [sp.eos] == prompt


@pytest.mark.slow
def test_a_snapshot_plans_samples_trains_evaluates_and_exports(snapshot, tmp_path):
    layout, snap = snapshot
    r = cli("--dry-run", "--init", snap)
    assert r.returncode == 0 and f"plan for --init {snap} (from its config.json)" in r.stdout, (
        r.stderr
    )
    r = cli(
        "--init",
        snap,
        "--stage",
        "sample",
        "--prompt",
        PROMPT,
        "--dataset",
        "qa",
        "--max-new-tokens",
        8,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("coverage") == 4 and "prompt 1.00" not in r.stdout.split("prompt: ")[0]

    out = tmp_path / "run"
    r = cli("--init", snap, *RUN, "--out", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    rows = metric_rows(out)
    assert [x["iteration"] for x in rows if x["stage"] == "rl"] == [1, 2, 3, 4, 5, 6] and rows[-1][
        "stage"
    ] == "done"
    assert all(0 < x["prompt_share"] <= 1 for x in rows if x["stage"] in ("rl", "rl_eval"))
    ckpt = torch.load(out / "rl.pt", weights_only=False)
    assert ckpt["model_config"]["arch"] == "decoder" and ckpt["model_config"]["layout"] == layout
    eos = 2 if layout == "llama" else 0
    assert ckpt["specials"]["eos"] == eos and ckpt["specials"]["start"] == (
        1 if layout == "llama" else 0
    )

    r = cli("--stage", "eval", "--init", out / "rl.pt", "--num-eval", 4, "--eval-prompts", 4)
    assert r.returncode == 0 and "test (4 prompts)" in r.stdout, r.stderr

    r = cli("--stage", "export", "--init", out / "rl.pt", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == layout
    logits_match(out / "rl.pt", tmp_path / "hf")
    if layout == "llama":  # stopped by Ctrl-C, resumed: the same log
        stopped = tmp_path / "stopped"
        proc = start(["cagsr.py", "--init", str(snap), *map(str, RUN), "--out", str(stopped)])
        wait_for(stopped, lambda row: row["stage"] == "rl" and row["iteration"] == 1, proc)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=300)
        assert proc.returncode == 130  # stopped, checkpoint written
        r = cli("--resume", stopped)
        assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
        assert metric_rows(stopped) == rows


@pytest.mark.slow
def test_an_exported_snapshot_equals_the_original_tensor_for_tensor(snapshot, tmp_path):
    from safetensors.torch import load_file

    layout, snap = snapshot
    r = cli("--stage", "export", "--init", snap, "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    original, exported = (
        load_file(snap / "model.safetensors"),
        load_file(tmp_path / "hf" / "model.safetensors"),
    )
    assert set(exported) == set(original)
    assert all(torch.equal(original[k], exported[k]) for k in original)


@pytest.mark.slow
def test_the_decoder_preset_trains_and_exports_as_llama(tmp_path):
    out = tmp_path / "run"
    r = cli(
        "--arch",
        "decoder",
        *RUN,
        "--set",
        "d_model=32",
        "--set",
        "d_ff=48",
        "--set",
        "vocab_size=400",
        "--out",
        out,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert "size tiny (decoder)" in r.stdout
    r = cli("--stage", "export", "--init", out / "rl.pt", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"
    ]
    logits_match(out / "rl.pt", tmp_path / "hf")
    r = cli("--arch", "encoder-decoder", "--stage", "eval", "--init", out / "rl.pt")
    assert r.returncode == 2 and "holds a decoder model" in r.stderr


def test_a_from_scratch_encoder_decoder_is_refused_with_the_reason(checkpoint, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "cagsr.py",
            "--stage",
            "export",
            "--init",
            str(checkpoint),
            "--out",
            str(tmp_path / "hf"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0 and "learned absolute position tables" in r.stderr
    assert not (tmp_path / "hf").exists()
