"""The plan (--plan), the size sweep (a list of target_ratio / k_info) and the pictures in the output folder."""

import json
import re
import time

import pytest
from helpers import edit_config, make_run_dir
from matplotlib.image import imread

import compress_model
import decomposition
from mdcompress import rank_allocation
from mdcompress import pictures
from mdcompress import plan
from distillation import knowledge_distillation
from matrix_decomposition import count_parameters, decompose_

LAYER_ROW = re.compile(r"^(\S+)\.weight\s+(\d+)×(\d+)\s+(\d+)\s+(\d+)\s+([\d,]+) → ([\d,]+)\s+([\d.]+)%$")


@pytest.fixture
def run_dir(tmp_path, tiny_teacher_dir, tiny_pairs):
    return make_run_dir(tmp_path, tiny_teacher_dir, tiny_pairs[:64], tiny_pairs[300:316], k_info=4, batch_size=16,
                        max_steps=3, max_new_tokens=8, checkpoint_steps=0, calibration_samples=16)


def files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def assert_pictures(folder, names):
    for name in names:
        image = imread(folder / name)  # decodes the PNG
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
        assert image.std() > 0, name  # something is drawn
    markdown = (folder / "report.md").read_text()
    assert all(f"]({name})" in markdown for name in names)


@pytest.mark.pictures
def test_the_plan_gives_the_runs_numbers_and_writes_nothing(run_dir, monkeypatch, capsys):
    monkeypatch.chdir(run_dir)
    edit_config(run_dir, drop=["k_info"], target_ratio=0.6, init="activation",  # allocated by sensitivity
                checkpoint_steps=1)
    before = files(run_dir)
    assert compress_model.main(["--config", "config.json", "--plan"]) == 0
    out = capsys.readouterr().out
    assert files(run_dir) == before  # no output folder, no checkpoints, nothing
    rows = [LAYER_ROW.match(line) for line in out.splitlines() if LAYER_ROW.match(line)]
    planned = {m[1]: int(m[4]) for m in rows}
    totals = re.search(r"^parameters: ([\d,]+) → ([\d,]+) ", out, re.M)
    assert "estimated wall time of the run:" in out and "an estimate" in out
    assert re.search(r"predicted speed-up from multiply-adds: \d+\.\d\d× translating", out)
    assert re.search(r"float32 [\d.]+ → [\d.]+ MB; int8 linear layers [\d.]+ → [\d.]+ MB", out)
    for m in rows:  # parameters before → after are n·d + bias → r·(n+d) + bias; the rank saves something
        n, d, rank, bound = int(m[2]), int(m[3]), int(m[4]), int(m[5])
        before_, after = int(m[6].replace(",", "")), int(m[7].replace(",", ""))
        assert before_ - n * d == after - rank * (n + d) in (0, n) and rank <= bound and 0 < float(m[8]) <= 100

    edit_config(run_dir, plan=False)
    assert compress_model.main(["--config", "config.json"]) == 0
    report = json.loads((run_dir / "out" / "report.json").read_text())
    assert planned == report["ranks"] and len(set(planned.values())) > 1
    assert (int(totals[1].replace(",", "")), int(totals[2].replace(",", ""))) == \
        (report["teacher"]["params"], report["student"]["params"])
    saved = sum(int(m[6].replace(",", "")) - int(m[7].replace(",", "")) for m in rows)
    assert saved == report["teacher"]["params"] - report["student"]["params"]

    # the run's pictures and report.md
    assert_pictures(run_dir / "out", ["spectrum.png", "ranks.png", "training.png"])
    assert [point["step"] for point in report["loss_curve"]] == [1, 2, 3]
    assert {"ce", "kd", "loss", "seconds"} <= set(report["loss_curve"][0])  # the default recipe: ce + kd
    assert "| student | " in (run_dir / "out" / "report.md").read_text()


def test_the_plan_leaves_out_the_sensitivity_it_kept_for_the_run(run_dir, monkeypatch, capsys):
    """A first plan measures the rank sensitivity and keeps it in cache_dir: the run will read it, so
    the plan's estimate leaves those seconds out and says so; a second plan reads it as the run would."""
    monkeypatch.chdir(run_dir)
    cache = run_dir.parent / f"{run_dir.name}-cache"  # a cache of its own: no curves stored by another test
    edit_config(run_dir, drop=["k_info"], target_ratio=0.6, cache_dir=str(cache))
    measured = {"seconds": 0.0}
    real_sensitivity = rank_allocation.sensitivity_errors

    def slow_sensitivity(*args, **kwargs):  # a measurement that takes long enough to show in the plan
        time.sleep(3.0)
        measured["seconds"] += 3.0
        return real_sensitivity(*args, **kwargs)

    monkeypatch.setattr(rank_allocation, "sensitivity_errors", slow_sensitivity)
    decomposition_seconds = []
    for _ in range(2):
        assert compress_model.main(["--config", "config.json", "--plan"]) == 0
        out = capsys.readouterr().out
        estimate = next(line for line in out.splitlines() if line.startswith("estimated wall time"))
        decomposition_seconds.append(float(re.search(r"\(decomposition (\d+) s", estimate)[1]))
        if not decomposition_seconds[1:]:
            assert "rank sensitivity of " in out and " measured on " in out
            assert re.search(rf"the rank sensitivity took \d+ s of this plan; kept in {re.escape(str(cache))}, the run "
                             r"reads it instead \(not counted above\)", out)
        else:
            assert " read from " in out and "the rank sensitivity took" not in out
    assert measured["seconds"] == 3.0  # measured once: the second plan read the curves
    assert decomposition_seconds[0] < 3.0 and decomposition_seconds[1] < 3.0


def test_plan_as_a_config_key(run_dir, monkeypatch, capsys):
    monkeypatch.chdir(run_dir)
    edit_config(run_dir, plan=True)
    before = files(run_dir)
    assert compress_model.main(["--config", "config.json"]) == 0
    out = capsys.readouterr().out
    assert "nothing written" in out and files(run_dir) == before
    assert re.search(r"estimated wall time of the run: .*\(decomposition .*, distillation ", out)  # ce + kd
    edit_config(run_dir, loss_weights={"ce": 1.0, "kd": 0.0, "feature": 0.0})
    assert compress_model.main(["--config", "config.json"]) == 0
    estimate = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("estimated wall time"))
    assert ", fine-tuning " in estimate and "distillation" not in estimate  # no teacher term: plain fine-tuning
    assert compress_model.main(["--config", "config.json", "--resume"]) == 2
    assert capsys.readouterr().err.strip() == ("compress_model.py: error: plan: true only plans a run; remove it (or "
                                               "--resume) to continue the interrupted run")


def _unfinished_run(run_dir):
    edit_config(run_dir, checkpoint_steps=1)
    (run_dir / "out-checkpoints").mkdir()
    (run_dir / "out-checkpoints" / "latest").write_text("checkpoint-2")


PLANS_OF_A_REFUSED_RUN = [  # (id, what is in the way, the refusal the plan's last line reports)
    ("output-not-empty", lambda d: ((d / "out").mkdir(), (d / "out" / "report.json").write_text("{}")),
     "output_path: 'out' exists and is not empty; choose another path or set \"overwrite_output\": true"),
    ("unfinished-checkpoints", _unfinished_run,
     "checkpoint_dir: 'out-checkpoints' holds an unfinished run; add --resume to continue it, or delete the folder "
     "(or set \"overwrite_output\": true) to start over"),
    ("sweep-output-not-empty", lambda d: ((d / "out").mkdir(), (d / "out" / "report.json").write_text("{}"),
                                          edit_config(d, k_info=[4, 6])),
     "output_path: 'out' exists and is not empty; choose another path or set \"overwrite_output\": true"),
]


@pytest.mark.parametrize("case, in_the_way, refusal", PLANS_OF_A_REFUSED_RUN, ids=[c[0] for c in PLANS_OF_A_REFUSED_RUN])
def test_a_plan_runs_where_the_run_would_be_refused_and_says_so(run_dir, monkeypatch, capsys, case, in_the_way,
                                                                 refusal):
    """--plan right after the job ran: the plan writes nothing in output_path nor checkpoint_dir, so it
    runs, and ends with the line saying why the run itself would be refused."""
    monkeypatch.chdir(run_dir)
    edit_config(run_dir, output_path="out")
    in_the_way(run_dir)
    before = files(run_dir)
    assert compress_model.main(["--config", "config.json", "--plan"]) == 0
    out = capsys.readouterr().out
    itself = "the sweep itself" if case.startswith("sweep") else "the run itself"
    assert out.splitlines()[-1] == f"note: {itself} would be refused: {refusal}"
    assert out.count("would be refused") == 1  # a sweep says it once, not once per model
    assert files(run_dir) == before
    assert compress_model.main(["--config", "config.json"]) == 2
    assert capsys.readouterr().err == f"compress_model.py: error: {refusal}\n"


@pytest.mark.pictures
def test_sweep_shares_the_teacher_and_the_sensitivity_and_its_rows_are_the_runs(run_dir, monkeypatch, capsys):
    monkeypatch.chdir(run_dir)
    cache = run_dir.parent / f"{run_dir.name}-cache"  # a cache of its own: no curves stored by another test
    edit_config(run_dir, drop=["k_info"], target_ratio=[0.7, 0.55], checkpoint_steps=1,  # the runs ignore it
                cache_dir=str(cache))
    calls = {"sensitivity": 0, "teacher": 0}
    real_sensitivity, real_evaluate = rank_allocation.sensitivity_errors, decomposition.evaluate_translation

    def sensitivity(*args, **kwargs):
        calls["sensitivity"] += 1
        return real_sensitivity(*args, **kwargs)

    def evaluate(*args, desc="", **kwargs):
        calls["teacher"] += desc == "BLEU teacher"
        return real_evaluate(*args, desc=desc, **kwargs)

    monkeypatch.setattr(rank_allocation, "sensitivity_errors", sensitivity)
    monkeypatch.setattr(decomposition, "evaluate_translation", evaluate)
    assert compress_model.main(["--config", "config.json"]) == 0
    assert calls == {"sensitivity": 1, "teacher": 1}
    out_dir = run_dir / "out"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "eval.csv", "out", "teacher", "train.csv"]
    sweep = json.loads((out_dir / "report.json").read_text())
    assert sweep["sweep"] == "target_ratio" and sweep["values"] == [0.7, 0.55]
    for row, value in zip(sweep["rows"], [0.7, 0.55]):
        report = json.loads((out_dir / row["folder"] / "report.json").read_text())
        assert row["folder"] == f"ratio-{value:g}" and report["target_ratio"] == value
        assert json.loads((out_dir / row["folder"] / "compression_config.json").read_text())["output_path"] == \
            str(out_dir / row["folder"])
        assert (row["params"], row["size_mb"], row["bleu_student"], row["chrf_student"], row["bleu_decomposed"]) == \
            (report["student"]["params"], report["student"]["size_mb"], report["student"]["bleu"],
             report["student"]["chrf"], report["decomposed"]["bleu"])
        assert report["teacher"] == sweep["teacher"]
        assert_pictures(out_dir / row["folder"], ["spectrum.png", "ranks.png", "training.png"])
    assert_pictures(out_dir, ["sweep.png"])
    assert json.loads((out_dir / "compression_config.json").read_text())["target_ratio"] == [0.7, 0.55]
    out = capsys.readouterr().out
    assert "size sweep over target_ratio" in out and re.search(r"^ratio-0\.55 +[\d,]+ ", out, re.M)
    # a later run on the same teacher and pairs reads the curves the sweep stored
    edit_config(run_dir, target_ratio=0.6, output_path="again")
    assert compress_model.main(["--config", "config.json"]) == 0
    assert calls["sensitivity"] == 1 and "rank sensitivity of 32 layers read from" in capsys.readouterr().out
    edit_config(run_dir, output_path=str(out_dir))

    # a sweep is replaced as a whole, like a single run's folder
    edit_config(run_dir, target_ratio=None, k_info=[4], overwrite_output=True)
    assert compress_model.main(["--config", "config.json"]) == 0
    assert sorted(p.name for p in out_dir.iterdir() if p.is_dir()) == ["rank-4"]


SWEEP_ERRORS = [
    pytest.param({"target_ratio": []}, "target_ratio: the sweep [] needs one or more different values", id="empty"),
    pytest.param({"target_ratio": [0.5, 0.5]}, "target_ratio: the sweep [0.5, 0.5] needs one or more different values",
                 id="twice"),
    pytest.param({"target_ratio": [0.5, 1.5]}, "target_ratio: must be above 0 and below 1 (a fraction of the "
                 "teacher's parameters), got 1.5", id="out-of-range"),
    pytest.param({"target_ratio": [0.6, 0.1]}, "target_ratio 0.1 is out of reach", id="unreachable-second-value"),
    pytest.param({"k_info": [4, 400]}, "k_info: rank 400 for 'model.encoder.layers.0.self_attn.k_proj' saves nothing",
                 id="rank-too-high"),
    pytest.param({"k_info": [4, "8"]}, 'k_info: expected int or dict or list or NoneType, got [4, "8"]',
                 id="type"),
]


@pytest.mark.parametrize("changes, words", SWEEP_ERRORS)
def test_bad_sweeps_are_one_line_errors_before_any_work(run_dir, monkeypatch, capsys, changes, words):
    monkeypatch.chdir(run_dir)
    edit_config(run_dir, drop=["k_info"] if "target_ratio" in changes else [], **changes)
    before = files(run_dir)
    assert compress_model.main(["--config", "config.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("compress_model.py: error: ") and words in err, err
    assert files(run_dir) == before


def test_a_sweep_cannot_be_resumed(run_dir, monkeypatch, capsys):
    monkeypatch.chdir(run_dir)
    edit_config(run_dir, k_info=[4, 6])
    assert compress_model.main(["--config", "config.json", "--resume"]) == 2
    assert "--resume: a sweep (k_info [4, 6]) keeps no checkpoints and cannot be resumed" in capsys.readouterr().err


def test_the_training_curve_has_at_most_its_points_and_ends_on_the_last_step(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir)
    monkeypatch.setattr(knowledge_distillation, "CURVE_POINTS", 2)
    edit_config(run_dir, max_steps=5, epoch=2)  # 4 batches an epoch
    assert compress_model.main(["--config", "config.json"]) == 0
    curve = json.loads((run_dir / "out" / "report.json").read_text())["loss_curve"]
    assert [point["step"] for point in curve] == [3, 5]
    assert curve[0]["seconds"] < curve[1]["seconds"]


@pytest.mark.pictures
def test_pictures_of_a_factorized_embedding(tmp_path, make_tiny_marian):
    teacher = make_tiny_marian()
    student = make_tiny_marian()
    ranks = decompose_(student, ["model.shared.weight", "model.encoder.layers.0.fc1.weight"], 4)
    report = {"teacher": {"params": count_parameters(teacher), "bleu": 20.0, "chrf": 40.0, "size_mb": 1.0},
              "decomposed": {"params": count_parameters(student), "bleu": 10.0, "chrf": 30.0, "size_mb": 0.5},
              "student": {"params": count_parameters(student), "bleu": 18.0, "chrf": 38.0, "size_mb": 0.5},
              "ranks": ranks, "compression_ratio": 0.5, "layers_decomposed": 2, "train_seconds": 1.0,
              "optimizer_steps": 0, "train_pairs": 0, "eval_pairs": 3, "bleu_signature": "test", "history": []}
    written = pictures.write_run_pictures(tmp_path, report, plan.layer_spectra(teacher, ranks),
                                          plan.no_saving_bounds(teacher, ranks))
    assert [p.name for p in written] == ["spectrum.png", "ranks.png", "training.png", "report.md"]
    assert_pictures(tmp_path, ["spectrum.png", "ranks.png", "training.png"])
    assert {pictures.layer_kind(name) for name in ranks} == {"embedding", "feed-forward"}


def test_a_resumed_run_draws_the_same_training_curve(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir)
    monkeypatch.setattr(knowledge_distillation, "CURVE_POINTS", 2)  # a point every 3 steps; checkpoints every 2
    edit_config(run_dir, max_steps=6, epoch=2, checkpoint_steps=2)
    assert compress_model.main(["--config", "config.json"]) == 0
    straight = json.loads((run_dir / "out" / "report.json").read_text())["loss_curve"]

    real_step, calls = knowledge_distillation.Distiller._loss_step, {"n": 0}

    def poisoned(self, *args):  # the run stops at step 4, after the checkpoint of step 2
        loss, terms = real_step(self, *args)
        calls["n"] += 1
        return (loss * float("nan"), terms) if calls["n"] == 4 else (loss, terms)

    edit_config(run_dir, output_path="again")
    monkeypatch.setattr(knowledge_distillation.Distiller, "_loss_step", poisoned)
    assert compress_model.main(["--config", "config.json"]) == 1
    monkeypatch.setattr(knowledge_distillation.Distiller, "_loss_step", real_step)
    assert compress_model.main(["--config", "config.json", "--resume"]) == 0
    resumed = json.loads((run_dir / "again" / "report.json").read_text())["loss_curve"]
    assert [p["step"] for p in straight] == [3, 6]
    assert [{k: v for k, v in p.items() if k != "seconds"} for p in resumed] == \
        [{k: v for k, v in p.items() if k != "seconds"} for p in straight]


def test_the_plan_of_a_factorized_embedding(run_dir, monkeypatch, capsys):
    """With the shared embedding factorized (``decompose_layers: ["*"]``), the plan lists its row and its
    totals and multiply-adds count the tied output projection as the run builds it."""
    monkeypatch.chdir(run_dir)
    edit_config(run_dir, decompose_layers=["*"], k_info=4)
    assert compress_model.main(["--config", "config.json", "--plan"]) == 0
    out = capsys.readouterr().out
    rows = {m[1]: m for m in map(LAYER_ROW.match, out.splitlines()) if m}
    assert "model.shared" in rows and int(rows["model.shared"][4]) == 4
    totals = re.search(r"^parameters: ([\d,]+) → ([\d,]+) ", out, re.M)
    assert re.search(r"predicted speed-up from multiply-adds: \d+\.\d\d× translating", out)

    edit_config(run_dir, max_steps=1, export=[])
    assert compress_model.main(["--config", "config.json"]) == 0
    report = json.loads((run_dir / "out" / "report.json").read_text())
    assert (int(totals[1].replace(",", "")), int(totals[2].replace(",", ""))) == \
        (report["teacher"]["params"], report["student"]["params"])


def _default_layers() -> list[str]:
    """The default run's 48 layers: 3 encoder and 3 decoder layers, attention and feed-forward."""
    names = []
    for side, attentions in (("encoder", ["self_attn"]), ("decoder", ["self_attn", "encoder_attn"])):
        for i in range(3):
            names += [f"model.{side}.layers.{i}.{a}.{p}_proj" for a in attentions for p in "kvqo"]
            names += [f"model.{side}.layers.{i}.fc1", f"model.{side}.layers.{i}.fc2"]
    return names


def test_ranks_picture_labels_layer_groups_and_keeps_the_legend_off_the_bars():
    names = _default_layers()
    figure = pictures.ranks_figure({n: 32 for n in names}, {n: 102 if "fc" in n else 63 for n in names})
    (ax,) = figure.axes
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["encoder 0", "encoder 1", "encoder 2", "decoder 0", "decoder 1", "decoder 2"]
    assert all(t.get_fontsize() >= 9 for t in ax.get_xticklabels())
    figure.canvas.draw()  # the layout: where the legend ends up
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1  # right of the bars, over none


def test_training_picture_one_line_for_equal_terms_plain_ticks():
    curve = [{"step": s, "seconds": s / 10, "ce": 2.0 - s / 100, "loss": 2.0 - s / 100} for s in range(10, 101, 10)]
    history = [{"epoch": 1, "step": 50, "eval_ce": 2.2}, {"epoch": 2, "step": 100, "eval_ce": 2.1}]
    left, right = pictures.training_figure(curve, history).axes
    assert [line.get_label() for line in left.get_lines()] == ["loss = ce"]
    formatter = left.yaxis.get_major_formatter()
    assert formatter(2.0, 0) == "2" and formatter(1.5, 0) == "1.5"  # not 2×10^0
    assert len(left.yaxis.get_minor_ticks()) == 0 or not any(t.label1.get_text() for t in left.yaxis.get_minor_ticks())
    assert right.get_xlim() == left.get_xlim()  # the held-out points on the training's steps axis
    assert any("eval_steps" in t.get_text() for t in right.texts)  # how to get more than 2 points

    curve = [{**p, "kd": 0.05, "loss": p["ce"] + 0.05} for p in curve]
    between = [{"step": s, "eval_ce": 2.3 - s / 1000} for s in (20, 40, 50, 60, 80)]  # 50: also an epoch's end
    left, right = pictures.training_figure(curve, history, between).axes
    assert [line.get_label() for line in left.get_lines()] == ["loss", "ce", "kd"]
    (line,) = right.get_lines()
    assert list(line.get_xdata()) == [20, 40, 50, 60, 80, 100]
    assert not any("eval_steps" in t.get_text() for t in right.texts)  # enough points: no hint
