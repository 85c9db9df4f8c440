"""Smoke test: the beyond-the-paper benchmark runs end to end in its quick mode, through the real
pipeline on the shipped teacher, and its rows have the sizes their configs ask for."""

import json

from helpers import REPO, run_benchmark


def test_bench_beyond_quick(tmp_path):
    out = tmp_path / "beyond.json"
    result = run_benchmark("bench_beyond.py", "--quick", "--threads", "1", "--json", str(out),
                           "--jobs", "2", timeout=600)  # two runs at once: pytest leaves the second core idle
    assert "| variant | params (% teacher)" in result.stdout
    assert "init activation" in result.stdout and "int8 linears" in result.stdout
    reports = json.loads(out.read_text())
    assert len(reports) == 5  # every row but the 3-epoch one

    # rank 32 on every linear of the shipped teacher's layers (d_model 128, ffn 512, 3+3 layers): each keeps
    # 32·(n+d) of its n·d weights; the README's default run has the same 1,642,496 parameters
    teacher = json.loads((REPO / "models" / "teacher-en-de" / "config.json").read_text())
    d, ffn = teacher["d_model"], teacher["encoder_ffn_dim"]
    saved = lambda n, m: n * m - 32 * (n + m)  # noqa: E731
    per_encoder_layer = 4 * saved(d, d) + saved(ffn, d) + saved(d, ffn)
    per_decoder_layer = 8 * saved(d, d) + saved(ffn, d) + saved(d, ffn)
    default = reports["uniform rank 32, init svd (the default)"]
    expected = default["teacher"]["params"] - (teacher["encoder_layers"] * per_encoder_layer
                                               + teacher["decoder_layers"] * per_decoder_layer)
    assert default["student"]["params"] == expected == 1_642_496
    assert f"| {expected:,} (66.3%) |" in result.stdout
    for label, report in reports.items():
        if label.startswith("target_ratio 0.5"):  # as close below half the teacher as the ranks allow
            assert 0.499 < report["student"]["params"] / report["teacher"]["params"] <= 0.5, label
        assert report["optimizer_steps"] == 3 and report["train_pairs"] == 3 * 32, label  # --quick: 3 steps
    int8 = next(r for r in reports.values() if "student_int8" in r)
    assert int8["student_int8"]["size_mb"] < int8["student"]["size_mb"]
