"""benchmarks/bench_decompose.py runs end to end in --quick mode and prints its table."""

import subprocess
import sys

from conftest import REPO


def test_bench_decompose_quick():
    # one thread: the smoke test checks the script, not the speed, and stays fast on busy cores
    result = subprocess.run([sys.executable, "benchmarks/bench_decompose.py", "--quick", "--threads", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| rank | svd |") and rows[1].startswith("|---")
    assert len(rows) == 2 + 2 * 3  # header, separator, 2 ranks × 3 methods
    assert {row.split("|")[2].strip() for row in rows[2:]} == {"exact", "lowrank", "auto"}
