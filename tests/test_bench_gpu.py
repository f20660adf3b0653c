"""bench/gpu.py, the GPU check: its FLOP counts against the matrix products torch counts
(`FlopCounterMode`) in a real SFT step, encoder pass and KV-cached rollout, and the whole check at
its tiny CPU shape (`python -m bench.gpu --tiny`), so the GPU path runs in CI without a GPU."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import data
from bench import gpu
from interop.snapshot import config_from_hf
from model import EncoderDecoder, config_for
from sft import sft_loss

CONFIGS = {
    "flan-T5 layout (gated-gelu, untied head, relative positions)": lambda: config_from_hf(
        gpu.SHAPES["tiny"]["large"], last_layers=1
    ),
    "the tiny preset (gelu, tied head, learned positions)": lambda: config_for(
        "tiny", last_layers=2
    ),
}


def linear_products(fn) -> int:
    """The FLOPs of aten.mm and aten.addmm (the linear layers and the head) that fn() runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return sum(
        v
        for k, v in counter.get_flop_counts()["Global"].items()
        if str(k) in ("aten.mm", "aten.addmm")
    )


@pytest.mark.parametrize("name", CONFIGS)
def test_linear_flops_are_the_products_of_a_training_step(name):
    # Forward + backward of L_SFT: every linear layer's forward product, its input gradient and its
    # weight gradient, 3 x the forward count for B x S prompt tokens and B x T response tokens.
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    model = EncoderDecoder(cfg)
    sp = gpu.OUR_SPECIALS
    B, S, T = 3, 7, 5
    batch = data.collate(gpu.random_pairs(B, S, T, cfg.vocab_size, sp), sp)
    assert linear_products(lambda: sft_loss(model, batch).backward()) == 3 * gpu.linear_flops(
        cfg, B * S, B * T
    )


@pytest.mark.parametrize("name", CONFIGS)
def test_linear_flops_are_the_products_of_a_cached_rollout_and_of_the_encoder(name):
    # Sampling: the encoder and the cross-attention keys/values once per prompt, then one decoder
    # position per row and step, for the B*N rows over the rollout's T steps.
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    model = EncoderDecoder(cfg).eval()
    sp = gpu.OUR_SPECIALS
    B, S, N = 2, 6, 3
    src = torch.randint(4, cfg.vocab_size, (B, S))
    mask = torch.ones(B, S, dtype=torch.bool)
    out = {}
    counted = linear_products(
        lambda: out.setdefault(
            "r",
            model.sample(
                src,
                mask,
                num_samples=N,
                max_new_tokens=7,
                generator=torch.Generator().manual_seed(0),
                **sp.sample_ids(),
            ),
        )
    )
    T = out["r"].tokens.size(1)
    assert counted == gpu.linear_flops(cfg, B * S, B * N * T)
    with torch.no_grad():
        assert linear_products(lambda: model.encode(src, mask)) == gpu.encoder_flops(cfg, B * S)


@pytest.mark.slow
def test_the_gpu_check_runs_at_its_tiny_cpu_shape(capsys):
    pytest.importorskip("transformers")
    assert gpu.main(["--tiny"]) == 0
    out = capsys.readouterr().out
    for part in (
        "\n1. same weights",
        "\n2. flan-T5-large's shape",
        "\n3. --size tiny",
        "\n4. torch.compile",
        "\n5. Qwen2.5-0.5B's shape, decoder-only",
    ):
        assert part in out, part
    # fp32 against HF on the same weights: the check of `python -m bench.cpu --same-weights`, passing.
    fp32 = next(line for line in out.splitlines() if line.strip().startswith("fp32: greedy"))
    assert "tokens equal: True" in fp32 and float(fp32.rsplit(" ", 1)[-1]) <= 1e-4
    assert out.count("CAGSR iteration") == 3 and "rollout with Abar recorded" in out
    assert "update: eager" in out or "torch.compile failed" in out
