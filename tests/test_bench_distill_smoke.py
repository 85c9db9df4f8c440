"""The distillation-step benchmark runs end to end in its --quick mode and reports every setup."""

import pytest
from helpers import benchmark_in_process

pytestmark = pytest.mark.slow


def test_bench_distill_step_quick(tmp_path, capsys):
    report, out = benchmark_in_process("bench_distill_step.py", tmp_path, capsys, "--quick", "--profile")
    assert "| step | loss terms | median ms |" in out and "| part of a plain step | share |" in out
    rows = report["rows"]
    assert [row["step"] for row in rows] == ["(a) plain", "(h) by hand", "(b) cached kd", "(c) online kd",
                                             "(d) paper", "(e) everything", "(t) teacher"]
    assert (report["steps"], report["warmup"]) == (2, 1)  # --quick
    plain_ms = rows[0]["median_ms"]
    assert plain_ms > 0 and rows[0]["vs_plain"] == 1.0
    for row in rows:  # × plain is each median over the plain one
        assert 0 < row["min_ms"] <= row["median_ms"] and row["saved_activations_mb"] >= 0, row
        assert row["vs_plain"] == pytest.approx(row["median_ms"] / plain_ms), row
    assert report["cached_kd_vs_plain"] == rows[2]["vs_plain"] and report["kd_top_k"] == 16  # (b)
    # the shipped teacher, every layer linear and the shared embedding factorized to at most half its parameters
    teacher, student = report["teacher_params"], report["student_params"]
    assert teacher == 2_478_080 and 0.49 * teacher < student <= 0.5 * teacher
    assert report["cache_ms_per_batch"] > 0 and report["peak_rss_mb"] >= report["rss_before_steps_mb"] > 0
    # --profile: every part of a plain step, each a share, the shares adding up to the whole
    shares = report["profile_shares"]
    assert list(shares) == ["vocabulary-wide (output projection, cross-entropy)", "attention",
                            "other matrix products", "dropout masks", "optimizer", "the rest"]
    assert shares["vocabulary-wide (output projection, cross-entropy)"] > 0 and shares["attention"] > 0
    assert sum(shares.values()) == pytest.approx(1)
