"""The distillation-step benchmark runs end to end in its --quick mode and prints its table."""

import pytest
from helpers import run_benchmark


def test_bench_distill_step_quick():
    result = run_benchmark("bench_distill_step.py", "--quick", "--profile")
    out = result.stdout
    assert "| step | loss terms | median ms |" in out
    rows = [line for line in out.splitlines() if line.startswith("| (")]
    assert [row.split("|")[1].strip() for row in rows] == ["(a) plain", "(h) by hand", "(b) cached kd", "(c) online kd",
                                                            "(d) paper", "(e) everything", "(t) teacher"]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]  # step, terms, median, min, ×, MB
    plain_ms = float(cells[0][2])
    assert plain_ms > 0 and cells[0][4] == "1.00"
    for cell in cells[1:]:  # × plain is each median over the plain one (printed to one decimal of a ms)
        assert float(cell[4]) == pytest.approx(float(cell[2]) / plain_ms, rel=0.05, abs=0.02), cell
    distill_ratio = float(out.split("distillation step with kd_top_k 16 / plain step = ")[1].split()[0])
    assert distill_ratio == float(cells[2][4])  # (b)
    # the shipped teacher, every layer linear and the shared embedding factorized to at most half its parameters
    teacher, student = (int(x.replace(",", "")) for x in out.split(" params (")[0].split(": ")[-1].split(" → "))
    assert teacher == 2_478_080 and 0.49 * teacher < student <= 0.5 * teacher
    assert "the cache of the teacher's top-16: " in out and "peak RSS " in out
    # --profile: every part of a plain step, each share a percentage, the shares adding up to the whole
    shares = {row.split("|")[1].strip(): float(row.split("|")[2].strip().rstrip("%"))
              for row in out.split("| part of a plain step | share |")[1].splitlines()[2:] if row.startswith("| ")}
    assert list(shares) == ["vocabulary-wide (output projection, cross-entropy)", "attention",
                            "other matrix products", "dropout masks", "optimizer", "the rest"]
    assert shares["vocabulary-wide (output projection, cross-entropy)"] > 0 and shares["attention"] > 0
    assert sum(shares.values()) == pytest.approx(100, abs=3)  # rounded to whole percents
