"""benchmarks/bench_quality.py runs end to end in --quick mode (tiny random teacher) and prints its table."""

import json

from helpers import run_benchmark

KINDS = ["SVD r={r}, no training", "SVD r={r} + ce", "SVD r={r} + ce + kd", "SVD r={r} + ce + kd + feature"]


def test_bench_quality_quick(tmp_path):
    out_json = tmp_path / "quality.json"
    result = run_benchmark("bench_quality.py", "--quick", "--threads", "1", "--eval", "data/tatoeba_en_de/eval.csv",
                           "--json", str(out_json))
    lines = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| size | model | layer params (% teacher) | total params (% teacher) | BLEU | chrF")
    assert lines[1].startswith("|---")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert len(cells) == 1 + 2 * 5  # teacher, then 2 sizes × (SVD, 3 recoveries, layer-drop peer)
    assert cells[0][:2] == ["100%", "teacher"] and cells[0][7] == cells[0][8] == "1.00"
    assert [c[0] for c in cells[1:]] == ["~70%"] * 5 + ["~50%"] * 5
    report = json.loads(out_json.read_text())
    for size, group in (("~70%", cells[1:6]), ("~50%", cells[6:11])):
        rank = next(r["rank"] for r in report["rows"] if r["size"] == size and r["kind"] == "svd")
        assert [c[1] for c in group[:4]] == [k.format(r=rank) for k in KINDS]
        assert group[4][1].startswith("layer-drop ") and group[4][1].endswith(" + ce + kd")
        assert group[0][9] == "—" and all(c[9] != "—" for c in group[1:])  # train s: only trained rows
    # sizes: the SVD student and its peer land near the target share of the layer parameters
    rows = report["rows"]
    assert len(rows) == 11 and rows[0]["kind"] == "teacher"
    for row in rows[1:]:
        assert abs(row["layer_fraction"] - row["target_fraction"]) < 0.1, row
        assert row["params"] < rows[0]["params"] and row["speed_vs_teacher"] > 0
    trained = [row for row in rows if row["train_seconds"] is not None]
    assert len(trained) == 8 and all(row["history"][-1]["step"] == 3 for row in trained)  # the same budget
    assert "Targets (reported, not asserted)" in result.stdout
