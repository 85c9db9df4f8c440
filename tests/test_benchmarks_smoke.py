"""benchmarks/bench_decompose.py runs end to end in --quick mode, and its error columns are right."""

import math

import pytest
from helpers import run_benchmark


def test_bench_decompose_quick():
    result = run_benchmark("bench_decompose.py", "--quick", "--threads", "1", timeout=120)
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| rank | svd |") and rows[1].startswith("|---")
    assert len(rows) == 2 + 2 * 3  # header, separator, 2 ranks × 3 methods
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]
    assert [(c[0], c[1]) for c in cells] == [(r, m) for r in ("8", "16") for m in ("exact", "lowrank", "auto")]
    # The quick model's linears all have 64 singular values; with s_i = i^-0.5 the relative error of a
    # rank-r truncation is sqrt(Σ_{i>r} 1/i / Σ_i 1/i), whatever the shapes: what every method must find.
    harmonic = lambda n: sum(1 / i for i in range(1, n + 1))  # noqa: E731
    for rank, method, _, _, random_error, decaying_error in cells:
        assert float(decaying_error) == pytest.approx(
            math.sqrt(1 - harmonic(int(rank)) / harmonic(64)), abs=2e-4), (rank, method)
        assert 0 < float(random_error) < 1
    exact = {c[0]: float(c[4]) for c in cells if c[1] == "exact"}
    assert exact["16"] < exact["8"]  # more rank, less error
    assert all(float(c[4]) >= exact[c[0]] - 1e-4 for c in cells)  # nothing beats the exact truncation
