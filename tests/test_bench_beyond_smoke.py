"""Smoke test: the beyond-the-paper benchmark runs end to end in its quick mode, through the real
pipeline on the shipped teacher, and its rows have the sizes their configs ask for."""

import json

import pytest
from helpers import REPO, benchmark_json

pytestmark = pytest.mark.slow


def test_bench_beyond_quick(tmp_path):
    reports, out = benchmark_json("bench_beyond.py", tmp_path, "--quick", "--threads", "1", "--jobs", "2",
                                  timeout=600)  # two runs at once: pytest leaves the second core idle
    assert "| variant | params (% teacher)" in out and "| ↳ same student, int8 linears |" in out
    # one run of each code path: by sensitivity with activation init and int8, rank k_info, target_ratio by spectrum
    assert list(reports) == ["target_ratio 0.5 incl. embedding, allocation sensitivity, init activation",
                             "uniform rank 32, init svd (the default)",
                             "target_ratio 0.5 incl. embedding, allocation spectrum, init svd"]
    assert "student_int8" in reports["target_ratio 0.5 incl. embedding, allocation sensitivity, init activation"]

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
    assert f"{100 * default['compression_ratio']:.1f}%" == "66.3%"
    for label, report in reports.items():
        if label.startswith("target_ratio 0.5"):  # as close below half the teacher as the ranks allow
            assert 0.499 < report["student"]["params"] / report["teacher"]["params"] <= 0.5, label
        assert report["optimizer_steps"] == 3 and report["train_pairs"] == 3 * 32, label  # --quick: 3 steps
    int8 = next(r for r in reports.values() if "student_int8" in r)
    assert int8["student_int8"]["size_mb"] < int8["student"]["size_mb"]
    assert all(report["eval_pairs"] == 8 for report in reports.values())
