"""The distillation-step benchmark runs end to end in its --quick mode and prints its table."""

import os
import subprocess
import sys

import pytest
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
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]  # step, terms, median, min, ×, MB
    plain_ms = float(cells[0][2])
    assert plain_ms > 0 and cells[0][4] == "1.00"
    for cell in cells[1:]:  # × plain is each median over the plain one (printed to one decimal of a ms)
        assert float(cell[4]) == pytest.approx(float(cell[2]) / plain_ms, rel=0.05, abs=0.02), cell
    distill_ratio = float(out.split("distillation step / plain step = ")[1].split()[0])
    assert distill_ratio == float(cells[1][4])
    # 16 linears at rank 1: 12 of 32×32 and 4 of 64×32 (ffn) each keep n+d of their n·d weights
    teacher, student = (int(x.replace(",", "")) for x in out.split(" params (")[0].split(": ")[-1].split(" → "))
    assert teacher - student == 12 * (32 * 32 - 64) + 4 * (64 * 32 - 96)
    assert "peak RSS " in out
