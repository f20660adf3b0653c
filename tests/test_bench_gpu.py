"""bench/gpu.py, the GPU check: its FLOP counts against the matrix products torch counts
(`FlopCounterMode`) in a real SFT step, encoder pass and KV-cached rollout, and the whole check at
its tiny CPU shape (`python -m bench.gpu --tiny`), so the GPU path runs in CI without a GPU: every
part must pass, torch.compile included, and a part that fails fails the check (exit status 1)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import data
from bench import gpu
from interop.snapshot import config_from_hf
from model import EncoderDecoder, config_for
from sampling import Decoding
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
                Decoding(num_samples=N, max_new_tokens=7),
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
    # Every part passes, torch.compile included (on the CPU it needs a C++ compiler: gcc here).
    pytest.importorskip("transformers")
    status = gpu.main(["--tiny"])
    out = capsys.readouterr().out
    assert "FAILED" not in out and "failed" not in out.lower(), out
    assert status == 0 and out.rstrip().endswith("; every part that ran passed"), out
    for part in (
        "\n1. same weights",
        "\n2. flan-T5-large's shape",
        "\n3. --size tiny",
        "\n4. torch.compile",
        "\n5. Qwen2.5-0.5B's shape, decoder-only",
    ):
        assert part in out, part
    # fp32 against HF on the same weights: the check of
    # `python -m bench.cpu --same-weights`, passing.
    fp32 = next(line for line in out.splitlines() if line.strip().startswith("fp32: greedy"))
    assert "tokens equal: True" in fp32 and float(fp32.rsplit(" ", 1)[-1]) <= 1e-4
    assert out.count("CAGSR iteration") == 3 and "rollout with Abar recorded" in out
    assert "update: eager" in out and "compiled" in out


def test_a_part_that_fails_fails_the_check_by_name_and_the_others_still_run(monkeypatch, capsys):
    # torch.compile that cannot compile here, or any part that raises: each is named where it fails
    # and in the last line, the other parts still run, and the exit status is 1.
    ran = []
    for name in ("preset_part", "decoder_part"):
        monkeypatch.setattr(gpu, name, lambda *a, name=name: ran.append(name))
    monkeypatch.setattr(gpu, "same_weights_part", lambda *a: ran.append("same") or True)

    def no_compiler(*a, **k):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    assert gpu.main(["--tiny"]) == 1
    out = capsys.readouterr().out
    assert "   FAILED: part 4 (torch.compile): RuntimeError: no C++ compiler found" in out
    assert out.rstrip().endswith("; FAILED: part 4 (torch.compile)")
    assert ran == ["same", "preset_part", "decoder_part"]

    def broken(*a):
        raise ValueError("out of memory")

    monkeypatch.setattr(gpu, "large_part", broken)
    monkeypatch.setattr(gpu, "decoder_part", broken)
    assert gpu.main(["--tiny", "--skip-compile"]) == 1
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.endswith(
        "FAILED: part 2 (flan-T5-large's shape), part 5 (decoder-only) "
        "(skipped: part 4 (torch.compile): --skip-compile)"
    )
    assert gpu.main(["--tiny"]) == 1  # part 4 cannot run without part 2's model: failed too
    assert (
        "part 2 (flan-T5-large's shape), part 4 (torch.compile), part 5" in capsys.readouterr().out
    )


def test_part_1_fails_when_the_fp32_check_does_not_pass(monkeypatch, capsys):
    pytest.importorskip("transformers")
    check = dict(tokens=4, tokens_equal=False, max_map_diff=0.0)
    monkeypatch.setattr(gpu.same_weights, "same_weights_check", lambda *a: check)
    monkeypatch.setattr(gpu.same_weights, "make_snapshot", lambda *a: None)
    with pytest.raises(gpu.CheckFailed, match="greedy tokens must be equal"):
        gpu.same_weights_part(gpu.SHAPES["tiny"], torch.device("cpu"))
    assert "fp32: greedy 4 positions, tokens equal: False" in capsys.readouterr().out
