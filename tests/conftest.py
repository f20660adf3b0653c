"""Fixtures shared by the test files."""

import hashlib
from pathlib import Path

import pytest
import torch

import data
from cli import runs
from model import EncoderDecoder, ModelConfig


@pytest.fixture
def checkpoint(tmp_path):
    """A small policy checkpoint in the one layout, as a run writes it
    (prompts of at most 8 tokens)."""
    tok = data.train_tokenizer(["where does the cat live ?", "the cat lives in town ."] * 20, 300)
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        d_model=32,
        n_heads=2,
        n_enc_layers=1,
        n_dec_layers=1,
        d_ff=64,
        max_src_len=8,
        max_tgt_len=8,
    )
    path = tmp_path / "sft.pt"
    runs.save_checkpoint(
        path,
        EncoderDecoder(cfg),
        tok,
        torch.ones(cfg.vocab_size),
        size="tiny",
        dataset="qa",
        stage="sft",
    )
    return path


def digest(folder: Path) -> dict:
    """Every file under `folder` with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


RESULTS = Path(__file__).resolve().parents[1] / "results"


@pytest.fixture(scope="session", autouse=True)
def results_at_start() -> dict:
    """results/ as it was before the first test ran (tests/test_zz_results_unchanged.py checks it
    after the last)."""
    return digest(RESULTS)
