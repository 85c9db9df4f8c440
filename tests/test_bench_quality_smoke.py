"""benchmarks/bench_quality.py runs end to end in --quick mode (tiny random teacher) and reports every row."""

import pytest
from helpers import REPO, benchmark_in_process

pytestmark = pytest.mark.slow
KINDS = ["SVD r={r}, no training", "SVD r={r} + ce", "SVD r={r} + ce + kd", "SVD r={r} + ce + kd + feature"]


def test_bench_quality_quick(tmp_path, capsys):
    report, out = benchmark_in_process("bench_quality.py", tmp_path, capsys, "--quick", "--threads", "1",
                                       "--eval", str(REPO / "data" / "tatoeba_en_de" / "eval.csv"))
    assert "| size | model | layer params (% teacher) | total params (% teacher) | BLEU | chrF" in out
    assert "Targets (reported, not asserted)" in out
    rows = report["rows"]
    assert len(rows) == 1 + 2 * 5  # teacher, then 2 sizes × (SVD, 3 recoveries, layer-drop peer)
    assert (rows[0]["size"], rows[0]["model"], rows[0]["kind"]) == ("100%", "teacher", "teacher")
    assert rows[0]["speed_vs_teacher"] == rows[0]["fixed_length_speed_vs_teacher"] == 1.0
    assert [row["size"] for row in rows[1:]] == ["~70%"] * 5 + ["~50%"] * 5
    for group in (rows[1:6], rows[6:11]):
        assert group[0]["kind"] == "svd"
        assert [row["model"] for row in group[:4]] == [k.format(r=group[0]["rank"]) for k in KINDS]
        assert group[4]["model"].startswith("layer-drop ") and group[4]["model"].endswith(" + ce + kd")
        assert group[0]["train_seconds"] is None and all(row["train_seconds"] is not None for row in group[1:])
    # sizes: the SVD student and its peer land near the target share of the layer parameters
    for row in rows[1:]:
        assert abs(row["layer_fraction"] - row["target_fraction"]) < 0.1, row
        assert row["params"] < rows[0]["params"] and row["speed_vs_teacher"] > 0
    trained = [row for row in rows if row["train_seconds"] is not None]
    assert len(trained) == 8 and all(row["history"][-1]["step"] == 3 for row in trained)  # the same budget
