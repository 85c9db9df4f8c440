"""benchmarks/bench_speed.py runs end to end in --quick mode and prints its tables."""

import json

from helpers import run_benchmark


def test_bench_speed_quick(tmp_path):
    result = run_benchmark("bench_speed.py", "--quick", "--threads", "1", "--json", str(tmp_path / "speed.json"),
                           timeout=180)
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    header = rows.index(next(r for r in rows if r.startswith("| workload | model |")))
    assert rows[header + 1].startswith("|---")
    speed_rows = rows[header + 2:header + 2 + 2 * 2 * 3]  # (forward, generate) × batch (1, 2) × (dense, rank 8, 16)
    assert {row.split("|")[1].strip() for row in speed_rows} == {
        "forward B=1", "forward B=2", "generate B=1", "generate B=2"}
    assert {row.split("|")[2].strip() for row in speed_rows} == {"dense", "rank 8", "rank 16"}
    assert "| rank | layers | decompose_ time (s) |" in result.stdout and "Peak RSS" in result.stdout

    report = json.loads((tmp_path / "speed.json").read_text())
    assert len(report["results"]) == 12
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
