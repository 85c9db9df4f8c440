"""benchmarks/bench_sensitivity.py runs end to end in --quick mode and prints its table."""

import os
import subprocess
import sys

from conftest import REPO


def test_bench_sensitivity_quick():
    result = subprocess.run([sys.executable, "benchmarks/bench_sensitivity.py", "--quick"], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sensitivity of 4 layers on 8 pairs" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| model.")]
    assert [row.split("|")[1].strip() for row in rows][0] == "model.shared" and len(rows) == 4
    assert all(int(cell) >= 1 for row in rows for cell in row.split("|")[2:4])
