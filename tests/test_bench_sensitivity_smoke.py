"""benchmarks/bench_sensitivity.py runs end to end in --quick mode, and both allocations spend the budget."""

import json
import math

import pytest
from helpers import REPO, benchmark_in_process

pytestmark = pytest.mark.slow


def test_bench_sensitivity_quick(tmp_path, capsys):
    report, out = benchmark_in_process("bench_sensitivity.py", tmp_path, capsys, "--quick")
    assert "sensitivity of 4 layers on 8 pairs" in out and "| layer | spectrum | sensitivity |" in out
    assert report["layers"] == ["model.shared", "model.encoder.layers.0.self_attn.k_proj",
                                "model.encoder.layers.0.self_attn.v_proj", "model.encoder.layers.0.self_attn.q_proj"]
    assert (report["samples"], report["batches"]) == (8, 1)
    # the shipped teacher's shapes: a V×d embedding and three d×d projections, whose weights --quick
    # halves; each allocation must fit that budget, to within one step of its costliest layer
    teacher = json.loads((REPO / "models" / "teacher-en-de" / "config.json").read_text())
    d, vocab = teacher["d_model"], teacher["vocab_size"]
    shapes = [(vocab, d)] + [(d, d)] * 3
    budget = sum(n * m for n, m in shapes) // 2
    for allocation in ("spectrum", "sensitivity"):
        ranks = [report["ranks"][allocation][name] for name in report["layers"]]
        assert all(1 <= r <= math.ceil(n * m / (n + m)) - 1 for r, (n, m) in zip(ranks, shapes)), ranks
        spent = sum(r * (n + m) for r, (n, m) in zip(ranks, shapes))
        assert budget - (vocab + d) < spent <= budget + 1, (allocation, spent, budget)
