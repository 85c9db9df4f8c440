"""benchmarks/bench_data.py runs end to end in --quick mode and prints its table."""

from helpers import run_benchmark


def test_bench_data_quick():
    result = run_benchmark("bench_data.py", "--quick")
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| step ")]
    assert [row.split("|")[2].strip() for row in rows] == ["4,000"] * 5 + ["400"]
    assert "tool, second run (cached) | 4,000 | " in result.stdout and "grouped by length" in result.stdout
