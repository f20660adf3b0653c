"""Fixtures shared by the test files."""

import pytest
import torch

import data
import runs
from model import EncoderDecoder, ModelConfig


@pytest.fixture
def checkpoint(tmp_path):
    """A small policy checkpoint in the one layout, as a run writes it (prompts of at most 8 tokens)."""
    tok = data.train_tokenizer(["where does the cat live ?", "the cat lives in town ."] * 20, 300)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_heads=2, n_enc_layers=1, n_dec_layers=1,
                      d_ff=64, max_src_len=8, max_tgt_len=8)
    path = tmp_path / "sft.pt"
    runs.save_checkpoint(path, EncoderDecoder(cfg), tok, torch.ones(cfg.vocab_size), size="tiny", dataset="qa",
                         stage="sft")
    return path
