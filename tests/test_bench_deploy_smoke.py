"""benchmarks/bench_deploy.py runs end to end in --quick mode: tiny opus-shaped models, and the shapes section
at the tc-big and NLLB layouts (tiny)."""

import json

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


def test_bench_deploy_shapes_trim_quick(tmp_path, capsys):
    report, out = benchmark_in_process("bench_deploy.py", tmp_path, capsys, "shapes", "--quick", "--shape", "nllb",
                                       "--trim-kept", "600", "--work", str(tmp_path / "w"))
    shape = report["shapes"][0]
    [trim] = shape["trim"]
    d, vocab = shape["d_model"], shape["vocab"]
    assert trim["kept"] == trim["costs"]["vocabulary_after"] == 600 and trim["costs"]["vocabulary_before"] == vocab
    # the tied embedding and output projection lose 600 rows of d_model; nothing else changes
    assert shape["dense_params"] - trim["dense_params"] == (vocab - 600) * d
    ranks = trim["costs"]["factorization"]["ranks"]
    assert ranks["model.shared.weight"] == round(600 * d / (2 * (600 + d)))  # half the trimmed table
    saved = sum(_saved_by(k, r, {**shape, "vocab": 600}) for k, r in ranks.items())
    assert trim["dense_params"] - trim["student_params"] == saved
    named = trim["costs"]["named"]  # the special tokens and both language codes are kept
    assert "source_lang_code 'eng_Latn'" in named and "target_lang_code 'deu_Latn'" in named
    kept = set(json.loads((tmp_path / "w" / "nllb" / "trim-600" / "kept_ids.json").read_text()))
    assert len(kept) == 600 and set(named.values()) <= kept
    rows = {row["system"]: row for row in shape["systems"]}
    for role, params in (("dense", trim["dense_params"]), ("student", trim["student_params"])):
        row = rows[f"ONNX Runtime {role} int8, vocabulary trimmed to 600"]
        assert row["params"] == params and row["sent_per_s_b32"] > 0 and row["sent_per_s_b1"] > 0
    assert "student int8, vocabulary trimmed to 600" in shape["step_profile"]
    assert "vocabulary trimmed to 600 of 1,200" in out


@pytest.mark.parametrize("args, message", [
    (["--shape", "nllb", "--trim-kept", "1200"], "--trim-kept 1200: shape nllb has 1,200 tokens; keep from 16 to 1,199"),
    (["--shape", "tc-big", "--trim-kept", "600"], "--trim-kept 600: shape tc-big has separate source and target"),
])
def test_bench_deploy_trim_kept_refused(tmp_path, capsys, args, message):
    from benchmarks import bench_deploy

    with pytest.raises(SystemExit) as exit_info:
        bench_deploy.main(["shapes", "--quick", *args, "--work", str(tmp_path / "w")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # refused before anything is made
