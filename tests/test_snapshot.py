"""The whole pipeline from a Hugging Face snapshot directory (`--init DIR`), and special ids that
come from the tokenizer everywhere.

The snapshot is built here: a tiny random T5 written by transformers (a test-only dependency) and a
real tokenizer.json, a Unigram model with Metaspace whose post-processor appends </s>, trained with
`tokenizers` on the qa dataset's texts. Nothing is downloaded.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import data
import ppo
from model import EncoderDecoder, ModelConfig, special_mask
from reward import RewardConfig, SalientTokens

ROOT = Path(__file__).resolve().parent.parent
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 in a T5 tokenizer
SENTINELS = ["<extra_id_0>", "<extra_id_1>"]


def t5_tokenizer(texts, vocab_size=400, specials_first=True) -> Tokenizer:
    """A T5-style tokenizer: Unigram pieces, "▁" word starts, </s> appended by the post-processor,
    sentinels as special tokens, and truncation and padding switched on (as some snapshots ship
    them), which cagsr must turn off. specials_first=False puts pad and </s> after the pieces, so
    that no special id is 0, 1 or 2."""
    special = T5_SPECIALS if specials_first else ["<unk>"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(
        texts,
        trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=special, unk_token="<unk>", show_progress=False
        ),
    )
    tok.add_special_tokens(([] if specials_first else ["<pad>", "</s>"]) + SENTINELS)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", eos)]
    )
    tok.enable_truncation(max_length=8)
    tok.enable_padding(pad_id=tok.token_to_id("<pad>"), pad_token="<pad>", length=24)
    return tok


@pytest.fixture(scope="module")
def qa_texts():
    return list(data.record_texts(data.load_dataset("qa").train))


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory, qa_texts):
    """DIR with config.json, model.safetensors (flan layout: gated-gelu, untied head, 28 embedding
    rows more than the tokenizer has pieces) and tokenizer.json."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("snapshot")
    tok = t5_tokenizer(qa_texts)
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=tok.get_vocab_size() + 28,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return path


def cli(*args, timeout=600):
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONHASHSEED": "0"}
    return subprocess.run(
        [sys.executable, "cagsr.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# ---- the tokenizer of a snapshot ---------------------------------------------------------------


def test_a_snapshot_tokenizer_reads_as_t5s(snapshot):
    tok = data.snapshot_tokenizer(snapshot)
    assert tok.truncation is None and tok.padding is None
    sp = data.specials(tok)
    sentinels = [tok.token_to_id(t) for t in SENTINELS]
    assert (sp.pad, sp.start, sp.eos, sp.appends_eos) == (0, 0, 1, True)
    assert set(sp.special) == {0, 1, 2, *sentinels}
    text = " ".join(["Where does Stimdol Mellu live?"] * 4)  # longer than the shipped truncation
    pieces = tok.encode(text).ids
    ids = data.encode(tok, text, sp)
    assert ids[-1] == 1 and ids.count(1) == 1 and len(ids) > 8 and ids == pieces
    assert data.decode(tok, ids, sp) == text
    content = data.content_token_mask(tok, sp)
    assert not content[[0, 1, 2, *sentinels]].any()
    assert not content[tok.token_to_id("▁")] if tok.token_to_id("▁") is not None else True


# ---- special ids that are not 0/1/2 ------------------------------------------------------------


def test_an_rl_step_with_special_ids_that_are_not_0_1_2(qa_texts):
    """collate, the sampler, the sink mask, the decoder input and the update all use the tokenizer's
    ids. If anything still used 0/1/2, the teacher-forced log-probabilities of the update would not
    be the sampler's (the first epoch's ratio would not be 1), or pad would show up as a token."""
    tok = t5_tokenizer(qa_texts, specials_first=False)
    tok.no_truncation()
    tok.no_padding()
    sp = data.specials(tok)
    assert sp.appends_eos and min(sp.pad, sp.eos, sp.start) > 2 and sp.start == sp.pad != sp.eos
    records = data.load_dataset("qa").train[:8]
    pairs = data.encode_records(tok, records, 64, 64)
    batch = data.collate(pairs, sp)
    assert (batch["tgt_in"][:, 0] == sp.start).all()
    assert (batch["src"][~batch["src_mask"]] == sp.pad).all()
    torch.manual_seed(0)
    model = EncoderDecoder(
        ModelConfig(
            vocab_size=tok.get_vocab_size(),
            d_model=32,
            n_heads=2,
            n_enc_layers=1,
            n_dec_layers=1,
            d_ff=64,
        )
    ).eval()
    src, src_mask = data.collate_prompts([p for p, _ in pairs], sp)
    salient = SalientTokens.build(tok, [p for p, _ in pairs])
    cfg = ppo.PPOConfig(
        prompts_per_iter=8, num_samples=2, max_new_tokens=12, epochs=1, minibatches=1, lr=1e-3
    )
    experience, _ = ppo.collect(
        model,
        model,
        src,
        src_mask,
        ppo.RLTask([], specials=sp, salient=salient, reward_cfg=RewardConfig()),
        cfg,
        0.0,
        torch.Generator().manual_seed(0),
    )
    assert (experience.tgt_in[:, 0] == sp.start).all() and torch.equal(
        experience.tgt_in[:, 1:], experience.tokens[:, :-1]
    )
    assert (experience.tokens[~experience.mask] == sp.pad).all()
    ended = experience.mask.sum(1) < experience.mask.size(
        1
    )  # rows that stopped before the last step
    last = experience.tokens.gather(1, (experience.mask.sum(1, keepdim=True) - 1)).squeeze(1)
    assert (last[ended] == sp.eos).all()
    sinks = special_mask(src, src_mask, sp.special)
    assert torch.equal(sinks, src_mask & ((src == sp.eos) | (src == tok.token_to_id("<unk>"))))
    with torch.no_grad():
        logits, _ = model(src, src_mask, experience.tgt_in, num_samples=2)
    tf = ppo.masked(ppo.token_logprobs(logits, experience.tokens), experience.mask)
    assert torch.allclose(tf, experience.old_logprobs, atol=1e-5)  # the update's ratio starts at 1
    stats = ppo.update(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        experience,
        cfg,
        generator=torch.Generator().manual_seed(0),
    )
    assert stats["applied"] == 1 and stats["approx_kl"] == pytest.approx(0.0, abs=1e-6)


# ---- the command line from a snapshot ----------------------------------------------------------


@pytest.mark.slow
def test_the_pipeline_runs_from_a_snapshot(snapshot, tmp_path):
    out = tmp_path / "run"
    r = cli("--init", snapshot, "--stage", "sample", "--prompt", "Where does Stimdol Mellu live?")
    assert r.returncode == 0, r.stderr
    assert "IDF (§3.2): the snapshot has none; computed from --dataset qa-grounded's" in r.stdout
    assert r.stdout.count("coverage") == 4 and "prompt: Where does Stimdol Mellu live?" in r.stdout

    r = cli(
        "--init", snapshot, "--dataset", "qa", "--sft-steps", 10, "--iterations", 2, "--out", out
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert (
        "profile pretrained (fine-tuning a snapshot): SFT AdamW lr 0.0001, 10 steps x 16 pairs; "
        "RL Adam lr 1e-05" in r.stdout
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r_["iteration"] for r_ in rows if r_["stage"] == "rl"] == [1, 2] and rows[-1][
        "stage"
    ] == "done"
    ckpt = torch.load(out / "rl.pt", weights_only=False)
    assert (
        ckpt["size"] == "pretrained"
        and ckpt["specials"]["start"] == 0
        and ckpt["specials"]["eos"] == 1
    )
    assert (
        ckpt["model_config"]["position"] == "relative"
        and ckpt["model_config"]["max_src_len"] == 512
    )

    r = cli("--stage", "eval", "--init", out / "rl.pt", "--num-eval", 20)
    assert r.returncode == 0, r.stderr
    assert re.search(r"test \(20 prompts\): .*reward -?\d", r.stdout)

    r = cli(
        "--stage", "export", "--init", out / "rl.pt", "--out", tmp_path / "hf"
    )  # back to transformers
    assert r.returncode == 0, r.stderr
    from transformers import T5ForConditionalGeneration

    from cli import runs

    ours, tok, _ = runs.load_checkpoint(out / "rl.pt")
    theirs = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    sp = data.specials(tok)
    batch = data.collate(
        [
            (
                data.encode(tok, "Where does Stimdol Mellu live?", sp),
                data.encode(tok, "Stimdol Mellu lives in Ashwick.", sp, response=True),
            )
        ],
        sp,
    )
    with torch.no_grad():
        mine, _ = ours.eval()(batch["src"], batch["src_mask"], batch["tgt_in"])
        hf = theirs(
            input_ids=batch["src"],
            attention_mask=batch["src_mask"].long(),
            decoder_input_ids=batch["tgt_in"],
        ).logits
    torch.testing.assert_close(hf, mine, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_dry_run_plans_a_snapshot_from_its_config_alone(snapshot, tmp_path):
    only_config = tmp_path / "shape"
    only_config.mkdir()
    (only_config / "config.json").write_text(
        (snapshot / "config.json").read_text()
    )  # no weights, no tokenizer
    r = cli("--dry-run", "--init", only_config)
    assert r.returncode == 0, r.stderr
    from interop.snapshot import config_from_hf
    from model import count_params

    n = count_params(config_from_hf(json.loads((snapshot / "config.json").read_text())))
    assert f"plan for --init {only_config} (from its config.json): {n:,} parameters" in r.stdout


@pytest.mark.slow
def test_snapshot_errors_are_refused_before_any_work(snapshot, tmp_path):
    bare = tmp_path / "spiece_only"
    bare.mkdir()
    (bare / "config.json").write_text((snapshot / "config.json").read_text())
    (bare / "spiece.model").write_bytes(b"\0")
    r = cli("--init", bare, "--stage", "sample", "--prompt", "hi")
    assert (
        r.returncode == 2 and "ships only spiece.model" in r.stderr and "tokenizer.json" in r.stderr
    )
    r = cli("--init", snapshot, "--size", "small")
    assert r.returncode == 2 and "--size small cannot reshape the snapshot" in r.stderr
    r = cli("--init", snapshot, "--set", "d_model=64", "--stage", "sample", "--prompt", "hi")
    assert r.returncode == 2 and "--set d_model: the architecture of the snapshot" in r.stderr
    r = cli("--init", snapshot, "--set", "max_src_len=many", "--dry-run")
    assert r.returncode == 2 and "--set max_src_len=many: must be an integer" in r.stderr
    large = tmp_path / "large"  # flan-T5-large's shape: refused on a CPU
    large.mkdir()
    (large / "config.json").write_text(
        (ROOT / "interop" / "configs" / "flan-t5-large" / "config.json").read_text()
    )
    (large / "tokenizer.json").write_text((snapshot / "tokenizer.json").read_text())
    r = cli("--init", large, "--sft-steps", 1)
    assert (
        r.returncode == 2
        and "a snapshot of over 500,000,000 parameters, and no GPU was found" in r.stderr
    )
    assert "plan for --init" in r.stdout and "784,200,705 parameters" in r.stdout
    r = cli("--set", "ffn=swish", "--dry-run")
    assert r.returncode == 2 and "--set ffn=swish: must be one of" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape, published",
    [("flan-t5-base", 247_577_856), ("flan-t5-large", 783_150_080), ("flan-t5-xl", 2_849_757_184)],
)
def test_the_readme_plans_of_flan_t5_shapes(shape, published):
    """interop/configs/<shape>/config.json holds the published config values; the dry-run's count is
    transformers' count of that architecture (built on the meta device) plus our value head."""
    transformers = pytest.importorskip("transformers")
    path = ROOT / "interop" / "configs" / shape
    hf_config = json.loads((path / "config.json").read_text())
    with torch.device("meta"):
        hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_config))
    hf_count = (
        sum(p.numel() for p in hf.parameters()) + hf.lm_head.weight.numel()
    )  # transformers 5 ties it
    assert hf_count == published
    d = hf_config["d_model"]
    r = cli("--dry-run", "--init", path)
    assert r.returncode == 0, r.stderr
    assert (
        f"plan for --init {path} (from its config.json): "
        f"{hf_count + d * d + 2 * d + 1:,} parameters" in r.stdout
    )
