"""bench.py runs: one worker call per task on our model (the peer is optional and not needed here)."""
import pytest

import bench


@pytest.mark.slow
def test_bench_workers_measure_our_model():
    r = bench.worker("ours", "rollout", calls=1, threads=2)
    assert len(r["times"]) == 1 and r["times"][0] > 0 and r["peak_growth_mib"] >= 0
    g = bench.worker("ours", "growth_pairs", calls=2, threads=2)
    assert len(g["ratios"]) == 2 and all(1.2 < x < 4 for x in g["ratios"])   # 96 tokens cost more than 48
    t = bench.worker("ours", "train", calls=1, threads=2)
    # 6 x (encoder params x 64*32 prompt tokens + (decoder params + tied head) x 64*48 target tokens).
    from model import EncoderDecoder, config_for
    m = EncoderDecoder(config_for("small", **bench.DIMS))
    enc = sum(p.numel() for n, p in m.named_parameters() if n.startswith("encoder."))
    dec = sum(p.numel() for n, p in m.named_parameters() if n.startswith("decoder.")) + m.tok_emb.weight.numel()
    assert t["flops_per_step"] == 6 * (enc * 64 * 32 + dec * 64 * 48)
