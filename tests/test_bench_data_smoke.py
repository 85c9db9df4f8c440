"""benchmarks/bench_data.py runs end to end in --quick mode and prints its table."""

import os
import subprocess
import sys

from conftest import REPO


def test_bench_data_quick():
    result = subprocess.run([sys.executable, "benchmarks/bench_data.py", "--quick"], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| step ")]
    assert [row.split("|")[2].strip() for row in rows] == ["4,000"] * 5 + ["400"]
    assert "tool, second run (cached) | 4,000 | " in result.stdout and "grouped by length" in result.stdout
