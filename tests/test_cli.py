"""The command-line tool end to end: config.json → compressed model + report, and its refusals."""

import json
import os
import re
import stat
import sys
import typing

import pytest
from helpers import CLI, REPO, edit_config, load_with_auto_classes, make_run_dir, refused_in_one_line, run_command
from transformers import AutoTokenizer, GenerationConfig

import compress_model
from mdcompress import checkpoints, data, process
import decomposition
from mdcompress import output_folder
from mdcompress.evaluation import evaluate_translation
from matrix_decomposition import LowRankLinear, count_parameters, decompose_, load_compressed_model, weights_file
from mdcompress.output_folder import OutputError

@pytest.fixture
def run_dir(tmp_path, tiny_teacher_dir, tiny_pairs):
    """A tiny teacher, 120 training + 24 evaluation pairs and a config naming them."""
    return make_run_dir(tmp_path, tiny_teacher_dir, tiny_pairs[:120], tiny_pairs[300:324],
                        k_info=4, epoch=2, batch_size=16, max_new_tokens=12)


@pytest.mark.slow
def test_cli_end_to_end(run_dir):
    edit_config(run_dir, export=["onnx", "onnx-int8"])
    result = run_command(CLI, cwd=run_dir)
    out = run_dir / "out"
    expected = {"model.low_rank.safetensors", "config.json", "generation_config.json", "compression_config.json",
                "report.json", "vocab.json", "source.spm", "target.spm", "tokenizer_config.json",
                "spectrum.png", "ranks.png", "training.png", "report.md"}
    assert expected <= {p.name for p in out.iterdir()}
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]  # no temporary folder left behind

    report = json.loads((out / "report.json").read_text())
    for name in ("teacher", "decomposed", "student"):
        assert {"params", "bleu", "chrf"} <= set(report[name])
    assert report["student"]["params"] < report["teacher"]["params"]
    assert report["decomposed"]["params"] == report["student"]["params"]
    assert report["compression_ratio"] == pytest.approx(report["student"]["params"] / report["teacher"]["params"],
                                                        abs=1e-4)
    assert report["layers_decomposed"] == len(report["ranks"]) == 32  # 2 encoder × 6 + 2 decoder × 10 linears
    assert set(report["ranks"].values()) == {4}
    assert report["train_seconds"] > 0 and report["eval_pairs"] == 24
    assert json.loads((out / "compression_config.json").read_text())["k_info"] == 4
    # generate() without arguments stops where the evaluation did, not at transformers' default of 20 tokens
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 12
    assert "student" in result.stdout and "compression ratio" in result.stdout
    assert "torch threads: 1 (OMP_NUM_THREADS)" in result.stdout

    # The saved model loads, is factorized, and translates the eval pairs to the reported score.
    model = load_compressed_model(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 32
    config = json.loads((run_dir / "config.json").read_text())
    train_pairs, eval_pairs = data.load_data(compress_model.Config(**config))
    # 2 epochs over the 120 training pairs: what was trained on, every real token counted
    assert report["train_pairs"] == 2 * 120 and report["train_dataset_pairs"] == 120
    targets = tokenizer(text_target=list(train_pairs["target_text"]))["input_ids"]
    assert report["train_target_tokens"] == 2 * sum(map(len, targets))
    assert report["train_source_tokens"] == 2 * sum(map(len, tokenizer(list(train_pairs["source_text"]))["input_ids"]))
    scores = evaluate_translation(model, tokenizer, eval_pairs["source_text"], eval_pairs["target_text"],
                                  max_new_tokens=12)
    assert (scores["bleu"], scores["chrf"]) == (report["student"]["bleu"], report["student"]["chrf"])

    # The ONNX exports sit in the output folder; float32 translates as PyTorch does; int8 is quantized
    # (at this toy size its scales outweigh what it saves: sizes are tested on the shipped teacher)
    for name, precision in (("onnx", "float32"), ("onnx-int8", "int8")):
        assert json.loads((out / name / "onnx_export.json").read_text())["precision"] == precision
    onnx_row, int8_row = report["student_onnx"], report["student_onnx_int8"]
    assert (onnx_row["bleu"], onnx_row["chrf"]) == (report["student"]["bleu"], report["student"]["chrf"])
    assert int8_row["params"] == report["student"]["params"] and int8_row["size_mb"] > 0
    assert "MatMulInteger" in (out / "onnx-int8" / "decoder.onnx").read_bytes().decode("latin-1")
    assert "student_onnx_int8" in result.stdout


def test_a_folder_this_tool_wrote_can_be_compressed_further(run_dir, monkeypatch, capsys):
    monkeypatch.chdir(run_dir)
    edit_config(run_dir, epoch=1)
    assert compress_model.main(["--config", "config.json"]) == 0
    first = json.loads((run_dir / "out" / "report.json").read_text())

    # its linears are factorized already: the default targets are refused in one line...
    edit_config(run_dir, teacher_model_path="out", output_path="out2")
    assert compress_model.main(["--config", "config.json"]) == 2
    assert "is already decomposed (rank 4)" in capsys.readouterr().err
    # ...and its shared embedding can still be factorized, on top of them
    edit_config(run_dir, decompose_layers=["model.shared.weight"], k_info=6)
    assert compress_model.main(["--config", "config.json"]) == 0
    second = json.loads((run_dir / "out2" / "report.json").read_text())
    assert second["teacher"]["params"] == first["student"]["params"]
    assert second["teacher"]["bleu"] == first["student"]["bleu"]  # the teacher is the first run's student, intact
    assert second["ranks"] == {"model.shared": 6}
    model = load_with_auto_classes(run_dir / "out2")
    assert set(model.config.matrix_decomposition["ranks"]) == set(first["ranks"]) | {"model.shared"}
    assert count_parameters(model) == second["student"]["params"] < first["student"]["params"]


def test_report_counts_the_pairs_trained_on_not_the_data_set(run_dir, monkeypatch, capsys):
    edit_config(run_dir, max_steps=3, gradient_accumulation_steps=2)  # 3 steps × 2 batches × 16 pairs
    monkeypatch.chdir(run_dir)
    assert compress_model.main(["--config", "config.json"]) == 0
    report = json.loads((run_dir / "out" / "report.json").read_text())
    assert report["train_pairs"] == 96 and report["train_dataset_pairs"] == 120
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "out")
    pairs, _ = data.load_data(compress_model.load_config(run_dir / "config.json"))
    lengths = [len(ids) for ids in tokenizer(text_target=list(pairs["target_text"]))["input_ids"]]
    assert 96 * min(lengths) <= report["train_target_tokens"] <= 96 * max(lengths)
    assert "on 96 pairs (0.8 epochs of 120; " in capsys.readouterr().out


def test_every_translation_pass_shows_progress(run_dir, monkeypatch, capsys):
    edit_config(run_dir, progress=True, epoch=1, checkpoint_steps=0)
    monkeypatch.chdir(run_dir)
    assert compress_model.main(["--config", "config.json"]) == 0
    err = capsys.readouterr().err
    for name in ("teacher", "decomposed", "student"):  # 24 eval pairs each
        assert re.search(rf"^BLEU {name}: 24/24 sentences \(100%\), ", err, re.M), (name, err[-2000:])
    assert "\r" not in err and re.search(r"^distilling: \d+/\d+ steps \(100%\), ", err, re.M), err[-2000:]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_folder_and_files_follow_the_umask(tmp_path, make_tiny_marian, tiny_tokenizer, umask):
    model = make_tiny_marian()
    decompose_(model, [], 4)
    previous = os.umask(umask)
    try:
        output_folder.save_outputs(tmp_path / "out", model, tiny_tokenizer, {"report": 1}, {"config": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert "model.low_rank.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


@pytest.mark.parametrize("num_threads, environ, cores, load, expected", [
    (3, {"OMP_NUM_THREADS": "2"}, 8, 7.9, 3),  # num_threads wins
    (None, {"OMP_NUM_THREADS": "2"}, 8, 7.9, 2),  # then the environment
    (None, {}, 2, 0.1, 2),  # an idle machine: every core
    (None, {}, 2, 1.2, 1),  # another job on one of two cores: the other core only
    (None, {}, 2, 5.0, 1),  # overloaded: one thread, never 0
    (None, {}, 16, 0.0, 8),  # no more than torch's default (here 8)
])
def test_torch_threads_leave_the_cores_other_jobs_use(num_threads, environ, cores, load, expected):
    threads, why = process.torch_threads(num_threads, environ, cores=cores, load=load, torch_default=8)
    assert threads == expected
    assert why == ("num_threads" if num_threads else "OMP_NUM_THREADS" if environ else
                   f"{cores} cores, load average {load:.1f}; set num_threads or OMP_NUM_THREADS to choose")


def test_generation_limit_keeps_the_teachers_own(make_tiny_marian):
    model = make_tiny_marian()
    assert model.generation_config.max_length is None and model.generation_config.max_new_tokens is None
    decomposition.set_generation_limit_(model, 40)
    assert model.generation_config.max_new_tokens == 40
    model.generation_config.max_new_tokens, model.generation_config.max_length = None, 512  # as OPUS-MT ships
    decomposition.set_generation_limit_(model, 40)
    assert (model.generation_config.max_length, model.generation_config.max_new_tokens) == (512, None)


def test_replaced_data_preprocessor_is_used(run_dir, monkeypatch):
    """``compress_model.data_preprocessor = your_function`` before ``main()``, as the README's hook does."""
    seen = []

    def shouting_preprocessor(batch, tokenizer, config):
        seen.extend(batch["source_text"])
        batch = {**batch, "source_text": [s.upper() for s in batch["source_text"]]}
        return compress_model.default_data_preprocessor(batch, tokenizer, config)

    monkeypatch.setattr(compress_model, "data_preprocessor", shouting_preprocessor)
    monkeypatch.chdir(run_dir)
    edit_config(run_dir, max_steps=1)
    assert compress_model.main(["--config", "config.json"]) == 0
    assert len(seen) == 120 + 24  # every training and evaluation pair went through the replacement


def readme_snippets_calling_main() -> list[str]:
    """docs/your-data.md's Python code blocks that run the tool through compress_model.main()."""
    page = (REPO / "docs" / "your-data.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    return [block for block in blocks if "compress_model.main(" in block]


@pytest.mark.slow
def test_readme_scripts_calling_main_exit_with_its_code(tmp_path):
    """A script of the README that calls main() passes its return code on: a refused run must not exit 0."""
    snippets = readme_snippets_calling_main()
    assert snippets  # the preprocessing hook's example
    (tmp_path / "my.json").write_text(json.dumps({"epoch": 0}))
    for snippet in snippets:
        (tmp_path / "run.py").write_text(snippet)
        result = run_command([sys.executable, "run.py"], cwd=tmp_path, timeout=120, check=False)
        assert result.returncode == 2, (snippet, result.stderr[-2000:])
        assert result.stderr.strip() == "compress_model.py: error: epoch: must be at least 1, got 0"


BAD_CONFIGS = [
    # (id, how to break the run folder, words the one-line message must contain)
    ("invalid-json", lambda d: (d / "config.json").write_text('{"epoch": 1,'), ["not valid JSON"]),
    ("not-an-object", lambda d: (d / "config.json").write_text("[1, 2]"), ["JSON object"]),
    # the closest key and where the keys are documented, not the 900-character list of all of them
    ("unknown-key", lambda d: edit_config(d, epochs=3),
     ["unknown config key 'epochs'; did you mean 'epoch'? (the keys are listed in docs/configuration.md and by --help)"]),
    ("wrong-type", lambda d: edit_config(d, batch_size="32"), ["batch_size", '"32"']),
    ("bool-as-int", lambda d: edit_config(d, epoch=True), ["epoch", "true"]),
    ("zero-epoch", lambda d: edit_config(d, epoch=0), ["epoch", "at least 1", "0"]),
    ("negative-batch", lambda d: edit_config(d, batch_size=-4), ["batch_size", "-4"]),
    ("bad-choice", lambda d: edit_config(d, svd="qr"), ["svd", "'qr'", "exact"]),
    ("bad-export", lambda d: edit_config(d, export=["tflite"]), ["export", "'tflite'", "onnx-int8"]),
    ("export-twice", lambda d: edit_config(d, export=["onnx", "onnx"]), ["export", "twice"]),
    ("fp16-on-cpu", lambda d: edit_config(d, mixed_precision="fp16"), ["mixed_precision", "'fp16' needs a GPU", "bf16"]),
    ("bad-loss-term", lambda d: edit_config(d, loss_weights={"mse": 1.0}), ["loss_weights", "'mse'", "kd"]),
    ("kd-top-k-with-feature", lambda d: edit_config(d, kd_top_k=8, loss_weights={"ce": 1, "kd": 1, "feature": 1}),
     ["kd_top_k: 8", "loss_weights feature term compares", "set kd_top_k to 0"]),
    ("feature-layers-without-feature-term",
     lambda d: edit_config(d, feature_layers=["model.decoder.layers.0.fc1"], loss_weights={"ce": 1, "kd": 1}),
     ["feature_layers: 1 layer(s) given", "no feature term", '"feature": 1']),
    ("kd-top-k-negative", lambda d: edit_config(d, kd_top_k=-1), ["kd_top_k", "must not be negative", "-1"]),
    # Python's json reads NaN, Infinity and -Infinity; NaN < 0 is false, so no range check caught them
    ("learning-rate-nan", lambda d: edit_config(d, learning_rate=float("nan")),
     ["learning_rate: must be a finite number, got NaN"]),
    ("warmup-ratio-nan", lambda d: edit_config(d, warmup_ratio=float("nan")),
     ["warmup_ratio: must be a finite number, got NaN"]),
    ("temperature-infinite", lambda d: edit_config(d, temperature=float("inf")),
     ["temperature: must be a finite number, got Infinity"]),
    ("loss-weight-infinite", lambda d: edit_config(d, loss_weights={"ce": 1, "kd": float("-inf")}),
     ["loss_weights: kd must be a finite number, got -Infinity"]),
    ("sweep-value-nan", lambda d: edit_config(d, k_info=None, target_ratio=[0.5, float("nan")]),
     ["target_ratio: every value must be a finite number, got [0.5, NaN]"]),
    ("dropout-one", lambda d: edit_config(d, dropout=1.0), ["dropout", "below 1", "1.0"]),
    ("dropout-negative", lambda d: edit_config(d, dropout=-0.1), ["dropout", "at least 0", "-0.1"]),
    ("kd-top-k-above-vocabulary", lambda d: edit_config(d, kd_top_k=10**6, loss_weights={"ce": 1, "kd": 1}),
     ["kd_top_k: 1000000", "vocabulary"]),
    ("missing-teacher", lambda d: edit_config(d, teacher_model_path=str(d / "nowhere")),
     ["teacher_model_path", "nowhere"]),
    ("mistyped-relative-teacher", lambda d: ((d / "models" / "teacher-en-de").mkdir(parents=True),
                                             edit_config(d, teacher_model_path="models/teacher-en-fr")),
     ["teacher_model_path", "'models/teacher-en-fr' is not a folder", "closest: 'models/teacher-en-de'"]),
    ("missing-dataset", lambda d: edit_config(d, dataset_path=str(d / "nope.csv")), ["dataset_path", "nope.csv",
                                                                                "does not exist"]),
    ("missing-columns", lambda d: _write_csv(d, "en,de\nHello,Hallo\n"), ["dataset_path", "'source_text'",
                                                                         "columns found: en, de"]),
    ("empty-dataset", lambda d: _write_csv(d, "source_text,target_text\n"), ["dataset_path", "no pairs"]),
    ("not-utf8", lambda d: _write_csv(d, "source_text,target_text\nGr\xfc\xdfe,Hallo\n", "latin-1"),
     ["dataset_path", "is not UTF-8 text (byte 0xfc on line 2); convert it first, e.g. iconv -f latin1 -t utf-8"]),
    ("unsupported-type", lambda d: _write_csv(d, "x", name="data.txt"), ["dataset_path", "'.txt'"]),
    ("unknown-layer", lambda d: edit_config(d, decompose_layers=["model.encoder.layers.0.fc3.weight"]),
     ["decompose_layers", "fc3", "closest"]),
    ("non-linear-layer",
     lambda d: edit_config(d, decompose_layers=["model.encoder.layers.0.self_attn_layer_norm.weight"]),
     ["self_attn_layer_norm.weight", "not an nn.Linear"]),
    ("rank-zero", lambda d: edit_config(d, k_info=0), ["k_info", "rank 0", "at least 1"]),
    ("max-length-factor-zero", lambda d: edit_config(d, max_length_factor=0),
     ["max_length_factor: must be positive (or null: no bound but max_new_tokens), got 0"]),
    ("rank-too-big", lambda d: edit_config(d, k_info=16), ["k_info", "16", "saves nothing", "at most"]),
    ("target-ratio-out-of-reach", lambda d: edit_config(d, k_info=None, target_ratio=0.01),
     ["target_ratio 0.01 is out of reach", "choose target_ratio in"]),
    ("freeze-not-a-list", lambda d: edit_config(d, freeze="model.shared.weight"), ["freeze", "model.shared.weight"]),
    ("freeze-matches-nothing", lambda d: edit_config(d, freeze=["model.decoder.layers.7.*"]),
     ["freeze: 'model.decoder.layers.7.*' matches no trainable parameter of this model", "model."]),
    ("freeze-everything", lambda d: edit_config(d, freeze=["*"]),
     ['freeze: ["*"] names every trainable parameter of the model', "nothing would be trained"]),
    ("unknown-feature-layer", lambda d: edit_config(d, feature_layers=["model.decoder.layers.7.fc1"],
                                                    loss_weights={"ce": 1, "kd": 1, "feature": 1}),
     ["feature_layers", "layers.7"]),
    ("output-is-file", lambda d: (d / "out").write_text("x"), ["output_path", "is a file"]),
    ("output-under-a-file",
     lambda d: ((d / "afile").write_text("x"), edit_config(d, output_path=str(d / "afile" / "out"))),
     ["output_path", "which is a file"]),
    ("output-not-writable", lambda d: edit_config(d, output_path="/proc/compress-model-out"),
     ["output_path", "cannot write under '/proc'"]),
    ("output-not-empty", lambda d: ((d / "out").mkdir(), (d / "out" / "keep.txt").write_text("x")),
     ["output_path", "not empty", "overwrite_output"]),
    # overwrite_output replaces the whole folder: never one the run reads from, nor one it did not write
    ("output-is-the-teacher", lambda d: edit_config(d, output_path=str(d / "teacher"), overwrite_output=True),
     ["output_path", "teacher' is the teacher_model_path"]),
    ("output-inside-the-teacher",
     lambda d: edit_config(d, output_path=str(d / "teacher" / "out"), overwrite_output=True),
     ["output_path", "lies inside the teacher_model_path"]),
    ("output-holds-the-data", lambda d: _move_data(d, "data", output_path="data", overwrite_output=True),
     ["output_path: 'data' contains the dataset_path 'data/train.csv'"]),
    ("output-is-the-working-folder", lambda d: edit_config(d, output_path=".", overwrite_output=True),
     ["output_path: '.' contains the teacher_model_path"]),
    ("output-not-written-by-this-tool",
     lambda d: ((d / "out").mkdir(), (d / "out" / "keep.txt").write_text("x"), edit_config(d, overwrite_output=True)),
     ["output_path", "was not written by this tool", "compression_config.json and report.json"]),
    ("checkpoints-in-the-data", lambda d: _move_data(d, "data", checkpoint_dir="data"),
     ["checkpoint_dir: 'data' contains the dataset_path"]),
    ("checkpoints-are-the-output", lambda d: edit_config(d, checkpoint_dir=str(d / "out")),
     ["checkpoint_dir", "is the output_path"]),
]


def _move_data(run_dir, folder, **changes):
    """The training and evaluation CSVs moved into ``run_dir/folder``, named relatively, with ``changes``."""
    (run_dir / folder).mkdir()
    for name in ("train.csv", "eval.csv"):
        (run_dir / name).rename(run_dir / folder / name)
    edit_config(run_dir, dataset_path=f"{folder}/train.csv", eval_dataset_path=f"{folder}/eval.csv", **changes)


def _write_csv(run_dir, text, encoding="utf-8", name="bad.csv"):
    (run_dir / name).write_bytes(text.encode(encoding))
    edit_config(run_dir, dataset_path=str(run_dir / name))


@pytest.mark.parametrize("case, breaks, words", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_error_and_writes_nothing(run_dir, capsys, monkeypatch, case, breaks, words):
    breaks(run_dir)
    refused_in_one_line(run_dir, capsys, monkeypatch, words)


FLOAT_KEYS = [name for name, tp in typing.get_type_hints(compress_model.Config).items() if "float" in str(tp)]


@pytest.mark.parametrize("name", FLOAT_KEYS)
@pytest.mark.parametrize("value, shown", [(float("nan"), "NaN"), (float("inf"), "Infinity"),
                                          (float("-inf"), "-Infinity")])
def test_every_float_key_refuses_a_value_that_is_not_finite(tmp_path, name, value, shown):
    default = getattr(compress_model.Config(), name)
    if isinstance(default, dict):  # loss_weights: each weight
        bad, words = {**default, "kd": value}, f"{name}: kd must be a finite number, got {shown}"
    else:
        bad, words = value, f"{name}: must be a finite number, got {shown}"
    changes = {name: bad, **({"k_info": None} if name == "target_ratio" else {})}
    (tmp_path / "config.json").write_text(json.dumps(changes))  # written as JSON writes them: NaN, Infinity
    with pytest.raises(compress_model.ConfigError) as refused:
        compress_model.load_config(tmp_path / "config.json")
    assert str(refused.value) == words


RELATIVE_PATHS = [  # (key, value, the message: {cwd} is the folder the tool runs in)
    ("dataset_path", "data/train.csv",
     "dataset_path: 'data/train.csv' does not exist (relative to the current folder: looked for "
     "'{cwd}/data/train.csv')"),
    ("eval_dataset_path", "../eval.csv",
     "eval_dataset_path: '../eval.csv' does not exist (relative to the current folder: looked for '{parent}/eval.csv')"),
    ("teacher_model_path", "./teacher-en-de",
     "teacher_model_path: './teacher-en-de' is not a folder (relative to the current folder: looked for "
     "'{cwd}/teacher-en-de')"),
    ("teacher_model_path", "models/teacher-en-de",  # the shipped config's, run from another folder: taken for a hub id
     "teacher_model_path: cannot load 'models/teacher-en-de' (no folder '{cwd}/models/teacher-en-de' relative to the "
     "current folder, so as a hub id)"),
    ("dataset_path", "{cwd}/nope.csv", "dataset_path: '{cwd}/nope.csv' does not exist"),  # absolute: nothing to add
]


@pytest.mark.parametrize("key, value, message", RELATIVE_PATHS, ids=[f"{k}={v}" for k, v, _ in RELATIVE_PATHS])
def test_a_missing_relative_path_says_where_it_was_looked_for(run_dir, capsys, monkeypatch, key, value, message):
    folders = {"cwd": os.path.realpath(run_dir), "parent": os.path.dirname(os.path.realpath(run_dir))}
    edit_config(run_dir, **{key: value.format(**folders)})
    err = refused_in_one_line(run_dir, capsys, monkeypatch, [message.format(**folders)])
    if os.path.isabs(value.format(**folders)):
        assert "relative to the current folder" not in err


# Refusals that depend on the config and the models alone: made once the models are loaded, not after tokenizing
MODEL_CHECKS = ["unknown-layer", "non-linear-layer", "rank-zero", "rank-too-big", "target-ratio-out-of-reach",
                "freeze-matches-nothing", "freeze-everything", "unknown-feature-layer"]


@pytest.mark.parametrize("case, breaks, words", [c for c in BAD_CONFIGS if c[0] in MODEL_CHECKS],
                         ids=[c[0] for c in BAD_CONFIGS if c[0] in MODEL_CHECKS])
def test_layer_rank_and_freeze_errors_come_before_the_pairs_are_tokenized(run_dir, capsys, monkeypatch, case, breaks,
                                                                          words):
    breaks(run_dir)

    def tokenize(*args, **kwargs):
        raise AssertionError("the pairs were tokenized before the refusal")

    monkeypatch.setattr(data, "preprocess", tokenize)
    refused_in_one_line(run_dir, capsys, monkeypatch, words)


def test_the_inputs_output_folders_keep_clear_of(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir)
    config = compress_model.load_config("config.json")
    assert checkpoints.run_inputs(config, "config.json") == {
        "teacher_model_path": str(run_dir / "teacher"), "dataset_path": str(run_dir / "train.csv"),
        "eval_dataset_path": str(run_dir / "eval.csv"), "config file": "config.json"}
    with pytest.raises(OutputError, match="output_path: 'conf' contains the config file 'conf/c.json'"):
        output_folder.check_clear_of("output_path", "conf", {"config file": "conf/c.json"})


def test_overwrite_output_replaces_only_a_folder_this_tool_wrote(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="was not written by this tool"):
        output_folder.check_output_path(folder, overwrite=True)
    for name in output_folder.OUTPUT_MARKERS:
        (folder / name).write_text("{}")
    assert output_folder.check_output_path(folder, overwrite=True) == folder
    with pytest.raises(OutputError, match="not empty"):
        output_folder.check_output_path(folder, overwrite=False)


def test_the_installed_command_names_itself_as_the_user_typed_it(tmp_path, monkeypatch, capsys):
    """Installed, the command is matrix-decomposition: its errors and interrupt lines say so, not
    compress_model.py (which main(argv) from Python, and python compress_model.py, keep)."""
    monkeypatch.chdir(tmp_path)  # no config.json here
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "venv" / "bin" / "matrix-decomposition")])
    assert compress_model.main() == 2
    assert capsys.readouterr().err == "matrix-decomposition: error: config file 'config.json' not found\n"
    assert compress_model.main(["--config", "config.json"]) == 2
    assert capsys.readouterr().err == "compress_model.py: error: config file 'config.json' not found\n"
    monkeypatch.setattr(sys, "argv", ["compress_model.py"])
    assert compress_model.main() == 2
    assert capsys.readouterr().err == "compress_model.py: error: config file 'config.json' not found\n"

    def ctrl_c(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["matrix-decomposition"])
    monkeypatch.setattr(compress_model, "load_config", ctrl_c)
    assert compress_model.main() == 130
    assert capsys.readouterr().err == "matrix-decomposition: interrupted\n"


def test_an_unknown_key_with_nothing_close_points_at_the_documentation(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"zzz_qqq": 1}))
    with pytest.raises(compress_model.ConfigError) as refused:
        compress_model.load_config(tmp_path / "config.json")
    assert str(refused.value) == ("unknown config key 'zzz_qqq'; the keys are listed in docs/configuration.md "
                                  "and by --help")


def test_bad_config_from_the_shell_has_no_traceback(run_dir):
    edit_config(run_dir, epoch=0)
    result = run_command(CLI, cwd=run_dir, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "compress_model.py: error: epoch: must be at least 1, got 0"


def test_shipped_config_is_valid():
    config = compress_model.load_config(REPO / "config.json")
    assert (REPO / config.dataset_path).is_file() and (REPO / config.eval_dataset_path).is_file()


def test_half_size_config_is_the_recipe_benchmarked_at_half_size():
    """configs/half-size.json is what BENCHMARKS.md measured keeping 98.6% at 50% (bench_recovery.py at
    --ratio 0.5 --recipes shipped --epochs 4): the shipped recipe, the half-size factorization, 4 epochs."""
    config = compress_model.load_config(REPO / "configs" / "half-size.json")
    shipped = compress_model.load_config(REPO / "config.json")
    assert (REPO / config.teacher_model_path / "config.json").is_file()
    assert (REPO / config.dataset_path).is_file() and (REPO / config.eval_dataset_path).is_file()
    assert (config.target_ratio, config.decompose_layers, config.init, config.k_info) == (0.5, ["*"], "activation", None)
    changed = {key for key in vars(config) if getattr(config, key) != getattr(shipped, key)}
    # nothing else differs; output_path does, so the two jobs do not refuse each other's output
    assert changed == {"output_path", "decompose_layers", "k_info", "target_ratio", "init", "epoch"}
    measured = json.loads((REPO / "benchmarks" / "results" / "recovery_50_4_epochs.json").read_text())
    args = measured["args"]
    assert config.epoch == args["epochs"] == 4 and args["ratio"] == 0.5 and args["recipes"] == ["shipped"]
    assert not args["set"] and args["train"].endswith(config.dataset_path)


@pytest.mark.parametrize("cut", ["empty", "half", "factorized-half"])
@pytest.mark.parametrize("command", ["compress_model", "translate", "onnx_export"])
def test_a_truncated_weights_file_is_named_in_one_line_by_every_command(command, cut, run_dir, tiny_teacher_dir,
                                                                        tiny_tokenizer, capsys, monkeypatch):
    """A weights file cut short (an interrupted download or copy) is named, said to look truncated, with
    the fix, by the three commands that load a model (all through load_pretrained): one line, exit 2."""
    from mdcompress import onnx_export, translate

    if cut == "factorized-half":  # a folder this tool wrote: loaded by load_compressed_model
        from transformers import AutoModelForSeq2SeqLM

        from matrix_decomposition import save_compressed_model

        model = AutoModelForSeq2SeqLM.from_pretrained(tiny_teacher_dir)
        decompose_(model, ["*fc1.weight"], k_info=4)
        save_compressed_model(model, tiny_teacher_dir, tiny_tokenizer)
    weights = weights_file(tiny_teacher_dir)  # model.low_rank.safetensors for the factorized folder
    assert weights.name == ("model.low_rank.safetensors" if cut == "factorized-half" else "model.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(b"" if cut == "empty" else data[: len(data) // 2])
    words = [f"{str(weights)!r} ({weights.stat().st_size} bytes) looks truncated or incomplete",
             "download it again, or save the model again"]
    if command == "compress_model":
        refused_in_one_line(run_dir, capsys, monkeypatch, words)
        return
    capsys.readouterr()
    main = translate.main if command == "translate" else onnx_export.main
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    assert main(["--model", str(tiny_teacher_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{command}.py: error: --model: "), err
    assert all(word in err for word in words), err
    assert not (tiny_teacher_dir / "onnx").exists()
