"""benchmarks/bench_embedding_init.py runs end to end in --quick mode on the shipped teacher, and
the activation init moves the teacher's predictions far less than plain SVD at a high rank."""

import pytest
from helpers import benchmark_in_process

pytestmark = pytest.mark.slow


def test_bench_embedding_init_quick(tmp_path, capsys):
    report, out = benchmark_in_process("bench_embedding_init.py", tmp_path, capsys, "--quick")
    assert "| factorization | rank 16 | rank 104 |" in out
    assert report["ranks"] == [16, 104] and (report["samples"], report["pairs"]) == (8, 8)
    drift = report["drift"]
    assert list(drift) == ["plain SVD", "tied head's input Gram only", "token counts only", "both (the activation init)"]
    assert all(len(values) == 2 and all(value >= 0 for value in values) for values in drift.values())
    plain, init = drift["plain SVD"], drift["both (the activation init)"]
    assert init[1] < plain[1] / 5  # rank 104 of 128: plain SVD drops directions the output projection reads
