"""benchmarks/bench_decompose.py runs end to end in --quick mode, and its error columns are right."""

import math

import pytest
from helpers import benchmark_in_process

pytestmark = pytest.mark.slow


def test_bench_decompose_quick(tmp_path, capsys):
    report, out = benchmark_in_process("bench_decompose.py", tmp_path, capsys, "--quick", "--threads", "1")
    assert "| rank | svd |" in out
    rows = report["rows"]
    assert [(row["rank"], row["svd"]) for row in rows] == [(r, m) for r in (8, 16) for m in ("exact", "lowrank", "auto")]
    # The quick model's linears all have 64 singular values; with s_i = i^-0.5 the relative error of a
    # rank-r truncation is sqrt(Σ_{i>r} 1/i / Σ_i 1/i), whatever the shapes: what every method must find.
    harmonic = lambda n: sum(1 / i for i in range(1, n + 1))  # noqa: E731
    for row in rows:
        assert row["error_decaying_spectrum"] == pytest.approx(
            math.sqrt(1 - harmonic(row["rank"]) / harmonic(64)), abs=2e-4), row
        assert 0 < row["error_random_init"] < 1
    exact = {row["rank"]: row["error_random_init"] for row in rows if row["svd"] == "exact"}
    assert exact[16] < exact[8]  # more rank, less error
    assert all(row["error_random_init"] >= exact[row["rank"]] - 1e-4 for row in rows)  # nothing beats the exact truncation
