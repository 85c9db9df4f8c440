"""benchmarks/bench_data.py runs end to end in --quick mode and reports every step."""

import pytest
from helpers import benchmark_in_process

pytestmark = pytest.mark.slow


def test_bench_data_quick(tmp_path, capsys):
    report, out = benchmark_in_process("bench_data.py", tmp_path, capsys, "--quick")
    assert "| step | pairs |" in out and "grouped by length" in out
    rows = report["rows"]
    assert [row["step"] for row in rows] == ["read", "plain", "tool-1", "tool-n", "tool-warm", "tool-tenth"]
    assert [row["pairs"] for row in rows] == [4000] * 5 + [400]
    assert report["pairs"] == 4000
    warm = rows[4]  # the tool's second run (cached), then the training batches grouped by length
    assert warm["batches"] == 20 and 0 <= warm["padding_grouped"] <= warm["padding_random"] < 1
