"""The distillation-step benchmark runs end to end in its --quick mode and prints its table."""

import os
import subprocess
import sys

from conftest import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_bench_distill_step_quick():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_distill_step.py"), "--quick"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "| step | loss terms | median ms |" in out
    rows = [line for line in out.splitlines() if line.startswith("| (")]
    assert [row.split("|")[1].strip() for row in rows] == ["(a) plain", "(b) distill", "(c) distill+", "(t) teacher"]
    plain = rows[0].split("|")
    assert float(plain[3]) > 0 and float(plain[5]) == 1.0  # median ms, × plain
    assert "distillation step / plain step = " in out and "peak RSS " in out
