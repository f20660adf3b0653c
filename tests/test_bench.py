"""bench/cpu.py runs: one worker call per task on our model (the peer
is optional and not needed here). The matmul floor counts exactly the products a call makes, and
their seconds lie inside the call's; the CAGSR-iteration benchmark reads its split from a real
`python cagsr.py --stage rl` run on a tiny GGUF file; the fixed-seed rollouts tool finds a moved
token.

A worker runs our rollout and training step, and the step's FLOP count (6 x parameters x tokens)
equals the matrix products torch counts in a real step (`FlopCounterMode`) plus the two terms the
convention adds (cross-attention keys and values at target tokens, LayerNorm weights). The
same-weights check of `python -m bench.cpu --same-weights` (bench/same_weights.py: greedy tokens
equal, our Abar against the mean of the reference's maps) runs through the same functions on a tiny
snapshot of the same layout."""

import statistics

import pytest
import torch

from bench import common, cpu, iteration, rollouts, same_weights


@pytest.mark.slow
def test_bench_workers_measure_our_model():
    r = cpu.worker("ours", "rollout", calls=1, threads=2)
    assert len(r["times"]) == 1 and r["times"][0] > 0 and r["peak_growth_mib"] >= 0
    # 96 tokens cost more than 48: the median of 5 paired ratios, the figure bench/cpu.py reports
    # (growth_96_over_48), so that one pair timed while another process ran (ratios 0.58 and 6.0 in
    # one CI run) does not decide it.
    g = cpu.worker("ours", "growth_pairs", calls=5, threads=2)
    assert len(g["ratios"]) == 5 and 1.2 < statistics.median(g["ratios"]) < 4
    t = cpu.worker("ours", "train", calls=1, threads=2)
    # The step's FLOPs (the 6 x parameters x tokens convention) against the matrix products torch
    # counts in one real step (FlopCounterMode: aten.mm, forward and backward). The convention
    # counts every decoder parameter at the 64 x 48 target tokens, but the cross-attention keys and
    # values (2 D^2 per layer) run on the 64 x 32 prompt tokens, and it counts the LayerNorm weights
    # (2 D per encoder layer, 3 D per decoder layer), which make no matrix product.
    from torch.utils.flop_counter import FlopCounterMode

    from model import EncoderDecoder, config_for

    m = EncoderDecoder(config_for("small", **cpu.DIMS))
    step = cpu.train_fn("ours", m)
    with FlopCounterMode(display=False) as counter:
        step()
    counted = sum(
        v
        for k, v in counter.get_flop_counts()["Global"].items()
        if str(k) in ("aten.mm", "aten.addmm")
    )
    D, L = cpu.DIMS["d_model"], cpu.DIMS["n_dec_layers"]
    cross_kv = 6 * L * 2 * D * D * 64 * (48 - 32)
    layer_norms = 6 * (2 * D * cpu.DIMS["n_enc_layers"] * 64 * 32 + 3 * D * L * 64 * 48)
    assert t["flops_per_step"] - cross_kv - layer_norms == counted


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["tiny", "decoder-tiny"])
def test_same_weights_on_a_tiny_snapshot(tmp_path, shape):
    """The same-weights comparison's code on a tiny snapshot of each layout (T5 against HF T5, and
    the decoder-only policy against LlamaForCausalLM): both implementations load it, greedy tokens
    are equal and Abar within 1e-4 of the reference's maps, and one timed sampled rollout of each
    makes all its tokens, then times its own matrix products."""
    pytest.importorskip("transformers")
    same_weights.make_snapshot(tmp_path, shape)
    check = same_weights.same_weights_check(tmp_path, shape)
    assert check["tokens_equal"] and check["max_map_diff"] < 1e-4
    assert (
        check["tokens"] == check["rows"] * check["new"] == 2 * 2 * 8
    )  # no row ended: every position compared
    assert check["distinct"] >= 3  # not one repeated token
    for system in ("ours", "hf"):
        r = same_weights.same_weights_worker(
            system, tmp_path, shape, calls=1, threads=2, floor=True
        )
        # the kernel updates RSS in per-CPU batches, so a call that grows nothing can read a page
        # or two below its start
        assert len(r["times"]) == 1 and r["times"][0] > 0 and r["peak_growth_mib"] > -0.5
        assert r["matmuls"] > 0 and 0 < r["floor_s"] < r["call_s"]


def test_the_matmul_floor_times_exactly_the_products_of_a_call():
    """Three products (a linear layer's addmm, an mm, a bmm) and one fused attention among other
    operators: the clock counts those four and no other, the attention apart from the products,
    and their seconds are part of the call's."""
    layer, a, b = torch.nn.Linear(64, 64), torch.randn(32, 64), torch.randn(4, 64, 64)

    def run():
        with torch.no_grad():
            x = layer(a).relu() + 1  # addmm, then operators that are not products
            y = (x @ a.t()).softmax(-1)  # mm
            z = torch.nn.functional.scaled_dot_product_attention(b[None], b[None], b[None])
            return torch.bmm(b, b).sum() + y.sum() + z.sum()  # bmm

    floor = common.matmul_floor(run)
    assert floor["matmuls"] == 4
    assert 0 < floor["products_s"] < floor["floor_s"] < floor["call_s"]


def test_the_iteration_split_comes_from_a_real_rl_run(tmp_path):
    """bench --iteration's worker is `python cagsr.py --init MODEL --stage rl`: on a tiny GGUF
    file, every iteration row has the four parts and the padded token counts the FLOP count
    reads, and the summary's update share is the FLOP count over the seconds and the peak."""
    pytest.importorskip("gguf")
    from test_gguf import random_model, train_bpe, write_gguf

    tok = train_bpe()
    path = tmp_path / "Tiny-Llama.F32.gguf"
    write_gguf(path, "llama", random_model("llama", tok.get_vocab_size(), seed=0), tok, "F32")
    rows = iteration.rl_rows(iteration.ROOT, str(path), iterations=2, threads=1)
    assert len(rows) == 2
    for r in rows:
        assert all(r[k] >= 0 for k in iteration.PARTS) and r["update_s"] > 0
        assert r["padded_response_tokens"] % 32 == 0  # 8 prompts x 4 candidates
    from bench.gpu import linear_flops
    from cli.runs import snapshot_config

    cfg = snapshot_config(str(path), {})
    s = iteration.summary(rows[1:], 1e9, cfg)
    r = rows[1]
    flops = 3 * linear_flops(cfg, r["padded_prompt_tokens"], r["padded_response_tokens"])
    assert s["update_share"] == pytest.approx(flops / r["update_s"] / 1e9)
    assert s["total_s"] == pytest.approx(sum(r[k] for k in iteration.PARTS))


def test_the_rollouts_tool_finds_a_moved_token(capsys):
    """bench.rollouts compares the fixed-seed rollouts field by field: equal to themselves, and a
    changed token or a moved log-probability is named."""
    saved = {"case": {f: torch.zeros(2, 3) for f in rollouts.FIELDS}}
    saved["case"]["tokens"] = torch.zeros(2, 3, dtype=torch.long)
    assert rollouts.compare(saved, saved)
    moved = {"case": dict(saved["case"])}
    moved["case"]["tokens"] = torch.tensor([[0, 0, 0], [0, 5, 0]])
    moved["case"]["logprobs"] = torch.full((2, 3), 1e-3)
    assert not rollouts.compare(saved, moved)
    out = capsys.readouterr().out
    assert "tokens DIFFER" in out and "logprobs max diff 1.0e-03" in out
