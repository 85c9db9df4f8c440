"""benchmarks/bench_embedding_init.py runs end to end in --quick mode on the shipped teacher, and
the activation init moves the teacher's predictions far less than plain SVD at a high rank."""

import os
import subprocess
import sys

from conftest import REPO


def test_bench_embedding_init_quick():
    result = subprocess.run([sys.executable, "benchmarks/bench_embedding_init.py", "--quick"], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| factorization | rank 16 | rank 104 |" in result.stdout
    rows = {cells[0]: [float(c) for c in cells[1:]] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in result.stdout.splitlines()
             if line.startswith("| ") and not line.startswith("| factorization"))}
    assert list(rows) == ["plain SVD", "tied head's input Gram only", "token counts only", "both (the activation init)"]
    assert all(value >= 0 for values in rows.values() for value in values)
    plain, init = rows["plain SVD"], rows["both (the activation init)"]
    assert init[1] < plain[1] / 5  # rank 104 of 128: plain SVD drops directions the output projection reads
