"""Smoke test: the beyond-the-paper benchmark runs end to end in its quick mode."""

import os
import subprocess
import sys

from conftest import REPO


def test_bench_beyond_quick(tmp_path):
    out = tmp_path / "beyond.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_beyond.py"), "--quick", "--threads", "1",
                             "--json", str(out)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| variant | params (% teacher)" in result.stdout
    assert "init activation" in result.stdout and "int8 linears" in result.stdout
    assert out.is_file()
