"""Smoke test: the recovery benchmark runs its recipes through the real pipeline in its quick mode,
evaluates on held-out pairs, and its table holds what the reports say."""

import json

import pytest
from helpers import REPO, benchmark_in_process


@pytest.mark.slow
def test_bench_recovery_quick(tmp_path, capsys):
    report, out = benchmark_in_process("bench_recovery.py", tmp_path, capsys, "--quick", "--seeds", "2",
                                       "--recipes", "paper", "cached")
    results = report["results"]
    assert list(results) == ["paper: ce + kd + feature, lr 3e-4, 1 epoch (Config's defaults)",
                             "ce + kd from the cached top-16 (kd_top_k 16), lr 1e-3"]
    paper, default = results.values()
    assert [r["kd_top_k"] for r in paper + default] == [0, 0, 16, 16]  # the paper runs the teacher every step
    assert all(r["teacher_cache_seconds"] > 0 for r in default)  # each run builds its own cache
    assert all(0.49 < r["compression_ratio"] <= 0.5 for r in paper + default)
    assert all(r["eval_pairs"] == 8 for r in paper + default)
    for name, reports in results.items():
        bleu = [r["student"]["bleu"] for r in reports]
        mean = sum(bleu) / len(bleu)
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))  # the table: mean, spread
        assert f"| {mean:.2f} ({100 * mean / reports[0]['teacher']['bleu']:.1f}%) |" in row
        assert f"| {max(bleu) - min(bleu):.2f} |" in row


@pytest.mark.slow
def test_bench_recovery_default_job_runs_the_shipped_config(tmp_path, capsys):
    written, _ = benchmark_in_process("bench_recovery.py", tmp_path, capsys, "--quick", "--seeds", "1",
                                      "--default-job", "--recipes", "shipped")
    shipped = json.loads((REPO / "config.json").read_text())
    [[report]] = written["results"].values()
    terms = {term for term, weight in shipped["loss_weights"].items() if weight}
    assert set(report["history"][-1]) - {"epoch", "step", "loss", "eval_ce"} == terms  # the terms it trained on
    assert report["target_ratio"] is None and report["ranks"]
    assert set(report["ranks"].values()) == {shipped["k_info"]}


def test_set_puts_a_config_key_on_top_of_every_recipe(monkeypatch, capsys):
    from benchmarks import bench_recovery

    seen = []

    def fake_run(base, changes, epochs, seed, folder, shared):  # what the real run_one would build its Config from
        seen.append(({**base, **changes}, epochs))
        return {"student": {"bleu": 20.0, "params": 1}, "teacher": {"bleu": 25.0, "params": 2}, "train_seconds": 1,
                "eval_pairs": 16, "compression_ratio": 0.5, "optimizer_steps": 3}

    monkeypatch.setattr(bench_recovery, "run_one", fake_run)
    assert bench_recovery.main(["--recipes", "shipped", "paper", "--seeds", "1", "--set", "learning_rate=3e-4",
                                "--set", "init=activation", "--set", "sequence_level_kd=true"]) == 0
    assert [config["learning_rate"] for config, _ in seen] == [3e-4, 3e-4]
    assert all(config["init"] == "activation" and config["sequence_level_kd"] is True for config, _ in seen)
    assert [epochs for _, epochs in seen] == [bench_recovery.RECIPES["shipped"][2], 1.0]  # their own epochs
    assert 'paper: ce + kd + feature, lr 3e-4, 1 epoch (Config\'s defaults), learning_rate 0.0003, init "activation"' \
        in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_recovery.main(["--set", "learning_rat=3e-4"])  # a misspelt key is refused, not ignored


def test_epochs_runs_every_recipe_that_long_and_says_so(monkeypatch, capsys):
    from benchmarks import bench_recovery

    seen = []

    def fake_run(base, changes, epochs, seed, folder, shared):
        seen.append(epochs)
        return {"student": {"bleu": 20.0, "params": 1}, "teacher": {"bleu": 25.0, "params": 2}, "train_seconds": 1,
                "eval_pairs": 16, "compression_ratio": 0.5, "optimizer_steps": 3}

    monkeypatch.setattr(bench_recovery, "run_one", fake_run)
    assert bench_recovery.main(["--recipes", "shipped", "paper", "--seeds", "1", "--epochs", "3"]) == 0
    assert seen == [3.0, 3.0]
    out = capsys.readouterr().out
    assert "1 epoch (Config's defaults), run for 3 epochs (--epochs) |" in out
    assert f"{bench_recovery.RECIPES['shipped'][2]:g} epochs, run for 3 epochs (--epochs) |" in out


def test_ranks_from_reuses_an_earlier_allocation(monkeypatch, tmp_path, capsys):
    from benchmarks import bench_recovery

    seen = []

    def fake_run(base, changes, epochs, seed, folder, shared):
        seen.append({**base, **changes})
        return {"student": {"bleu": 20.0, "params": 1}, "teacher": {"bleu": 25.0, "params": 2}, "train_seconds": 1,
                "eval_pairs": 16, "compression_ratio": 0.5, "optimizer_steps": 3}

    monkeypatch.setattr(bench_recovery, "run_one", fake_run)
    ranks = {"model.shared": 85, "model.encoder.layers.0.fc1": 13}
    train = str(REPO / "data" / "tatoeba_en_de" / "train.csv")

    def earlier(name, target_ratio=0.5, **args):
        path = tmp_path / name
        path.write_text(json.dumps({"args": {"ratio": 0.5, "train": train, "set": [], "default_job": False, **args},
                                    "results": {"a recipe": [{"target_ratio": target_ratio, "ranks": ranks}]}}))
        return str(path)

    def refused(*argv):
        with pytest.raises(SystemExit):
            bench_recovery.main(["--recipes", "shipped", "--seeds", "1", *argv])
        return capsys.readouterr().err.strip().splitlines()[-1]

    run = ["--recipes", "shipped", "--seeds", "1", "--ranks-from"]
    assert bench_recovery.main([*run, earlier("allocated.json")]) == 0
    assert seen[-1]["k_info"] == ranks and seen[-1]["target_ratio"] is None
    assert seen[-1]["decompose_layers"] == ["*"]
    # a run that itself reused the ranks (its reports say target_ratio null) can be reused in turn
    assert bench_recovery.main([*run, earlier("reused.json", target_ratio=None, ranks_from="allocated.json",
                                               set=[["learning_rate", 3e-4]])]) == 0
    assert seen[-1]["k_info"] == ranks and len(seen) == 2
    # refused, with one line, whatever would not give the same ranks
    assert "allocated for --ratio 0.5" in refused("--ratio", "0.33", "--ranks-from", earlier("a.json"))
    assert "--set calibration_samples was 128 there and is null here" in \
        refused("--ranks-from", earlier("b.json", set=[["calibration_samples", 128]]))
    assert "a --default-job run" in refused("--ranks-from", earlier("c.json", default_job=True))
    assert "not a --json written by this script" in refused("--ranks-from", str(tmp_path / "missing.json"))
    assert "--ranks-from replaces the allocation" in refused("--default-job", "--ranks-from", earlier("d.json"))
    assert len(seen) == 2  # nothing ran after a refusal
