"""benchmarks/bench_deploy.py runs end to end in --quick mode (tiny opus-shaped models)."""

import pytest
from helpers import benchmark_in_process

pytestmark = pytest.mark.slow


def test_bench_deploy_quick(tmp_path, capsys):
    report, out = benchmark_in_process("bench_deploy.py", tmp_path, capsys, "opus", "--quick",
                                       "--work", str(tmp_path / "w"))
    assert "| ONNX Runtime student int8 |" in out
    # the quick student halves every linear and the embedding: 71,040 of 107,520 parameters
    assert (report["dense_params"], report["student_params"]) == (107_520, 71_040)
    rows = {row["system"]: row for row in report["systems"]}
    assert {"PyTorch dense", "ONNX Runtime dense int8", "ONNX Runtime student int8"} <= set(rows)
    assert rows["ONNX Runtime dense float32"]["vs_onnx_dense_b32"] == 1.0
    assert rows["ONNX Runtime dense int8"]["size_mb"] < rows["ONNX Runtime dense float32"]["size_mb"]
    assert all(row["sent_per_s_b32"] > 0 for row in rows.values())
    assert set(report["step_profile"]) == {"teacher float32", "teacher int8", "student float32", "student int8"}
