"""benchmarks/bench_speed.py runs end to end in --quick mode and reports every workload."""

import pytest
from helpers import benchmark_in_process

pytestmark = pytest.mark.slow


def test_bench_speed_quick(tmp_path, capsys):
    report, out = benchmark_in_process("bench_speed.py", tmp_path, capsys, "--quick", "--threads", "1")
    assert "| workload | model |" in out and "| rank | layers | decompose_ time (s) |" in out
    # (forward, generate) × batch (1, 2) × (dense, rank 8, 16)
    assert len(report["results"]) == 12 and {(r["workload"], r["model"]) for r in report["results"]} == {
        (workload, model) for workload in ("forward B=1", "forward B=2", "generate B=1", "generate B=2")
        for model in ("dense", "rank 8", "rank 16")}
    assert set(report["cost"]) == {"8", "16"} and report["peak_rss_mb"] > 0
    dense = [r for r in report["results"] if r["model"] == "dense"]
    assert all(r["predicted_speedup"] == 1.0 for r in dense)
    assert all(r["predicted_speedup"] > 1.0 for r in report["results"] if r["model"] != "dense")

    # The FLOP model's linear layers, counted independently: d_model 64, ffn 256, 2+2 layers, 8 source
    # and 8 target tokens, one sentence. Per token a linear costs n·d multiply-adds dense, r·(n+d) at rank r.
    d, ffn, s, t = 64, 256, 8, 8
    for model, cost in (("dense", lambda n, m: n * m), ("rank 8", lambda n, m: 8 * (n + m)),
                        ("rank 16", lambda n, m: 16 * (n + m))):
        ffn_cost = cost(ffn, d) + cost(d, ffn)
        encoder = 2 * (4 * cost(d, d) + ffn_cost) * s
        decoder = 2 * ((4 + 2) * cost(d, d) + ffn_cost) * t + 2 * 2 * cost(d, d) * s  # cross-attention k, v: source
        row = next(r for r in report["results"] if r["workload"] == "forward B=1" and r["model"] == model)
        assert row["macs"]["layers"] == encoder + decoder, model
        assert row["macs"]["lm_head"] == 1000 * d * t  # vocabulary 1000, every target position, never factorized
