"""benchmarks/bench_sensitivity.py runs end to end in --quick mode, and both allocations spend the budget."""

import json
import math

from helpers import REPO, run_benchmark


def test_bench_sensitivity_quick():
    result = run_benchmark("bench_sensitivity.py", "--quick")
    assert "sensitivity of 4 layers on 8 pairs" in result.stdout
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in result.stdout.splitlines()
            if line.startswith("| model.")]
    assert [row[0] for row in rows] == ["model.shared", "model.encoder.layers.0.self_attn.k_proj",
                                        "model.encoder.layers.0.self_attn.v_proj",
                                        "model.encoder.layers.0.self_attn.q_proj"]
    # the shipped teacher's shapes: a V×d embedding and three d×d projections, whose weights --quick
    # halves; each allocation must fit that budget, to within one step of its costliest layer
    teacher = json.loads((REPO / "models" / "teacher-en-de" / "config.json").read_text())
    d, vocab = teacher["d_model"], teacher["vocab_size"]
    shapes = [(vocab, d)] + [(d, d)] * 3
    budget = sum(n * m for n, m in shapes) // 2
    for column in (1, 2):  # spectrum, sensitivity
        ranks = [int(row[column]) for row in rows]
        assert all(1 <= r <= math.ceil(n * m / (n + m)) - 1 for r, (n, m) in zip(ranks, shapes)), ranks
        spent = sum(r * (n + m) for r, (n, m) in zip(ranks, shapes))
        assert budget - (vocab + d) < spent <= budget + 1, (column, spent, budget)
