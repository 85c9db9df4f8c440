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


def _saved_by(key: str, rank: int, shape: dict) -> int:
    """Weights a rank-``rank`` factorization of ``key`` saves, its matrix's size read off the shape."""
    d, ffn = shape["d_model"], shape["ffn"]
    if key.endswith(("fc1.weight", "fc2.weight")):
        n = ffn
    elif "proj" in key:
        n = d
    else:  # a token embedding or the output projection: the target vocabulary where separate
        source = key.startswith("model.encoder.") or key == "model.shared.weight"
        n = shape["vocab"] if source or shape["target_vocab"] is None else shape["target_vocab"]
    return n * d - rank * (n + d)


def test_bench_deploy_shapes_quick(tmp_path, capsys):
    report, out = benchmark_in_process("bench_deploy.py", tmp_path, capsys, "shapes", "--quick", "--shape", "tc-big",
                                       "nllb", "--work", str(tmp_path / "w"))
    shapes = {shape["shape"]: shape for shape in report["shapes"]}
    assert list(shapes) == ["tc-big", "nllb"] and "## nllb:" in out
    for name, shape in shapes.items():
        ranks = shape["costs"]["factorization"]["ranks"]
        # every linear of the layers (4 per attention, 2 feed-forward) and every token table
        tables = {"tc-big": {"model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                             "lm_head.weight"}, "nllb": {"model.shared.weight"}}[name]
        assert {k for k in ranks if "layers" not in k} == tables
        assert len(ranks) == 6 * shape["layers"] + 10 * shape["layers"] + len(tables)
        assert shape["dense_params"] - shape["student_params"] == sum(_saved_by(k, r, shape) for k, r in ranks.items())
        assert shape["costs"]["factorization"]["seconds"] > 0
        sensitivity = shape["costs"]["sensitivity"]
        assert sensitivity["layers"] == len(ranks)
        assert sensitivity["extrapolated_s"] > sensitivity["reference_s"] > 0
        rows = {row["system"]: row for row in shape["systems"]}
        assert {"PyTorch dense", "ONNX Runtime student int8", "CTranslate2 dense int8"} <= set(rows)
        for row in rows.values():  # each row measured, or left out with its reason
            assert row.get("sent_per_s_b32", 0) > 0 or row["missing"].startswith(("not exportable:", "not convertible"))
    marian = {row["system"]: row for row in shapes["tc-big"]["systems"]}
    assert marian["ONNX Runtime dense int8"]["size_mb"] < marian["ONNX Runtime dense float32"]["size_mb"]
    assert shapes["tc-big"]["costs"]["export"]["student int8"]["seconds"] > 0
    nllb = {row["system"]: row for row in shapes["nllb"]["systems"]}
    assert nllb["CTranslate2 dense int8"]["vs_ct2_int8_b32"] == 1.0
