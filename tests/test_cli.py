"""The command-line tool end to end: config.json → compressed model + report, and its refusals."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, edit_config, make_run_dir, refused_in_one_line
from transformers import AutoTokenizer

import compress_model
import data
import decomposition
from matrix_decomposition import LowRankLinear, load_compressed_model

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def run_dir(tmp_path, tiny_teacher_dir, tiny_pairs):
    """A tiny teacher, 120 training + 24 evaluation pairs and a config naming them."""
    return make_run_dir(tmp_path, tiny_teacher_dir, tiny_pairs[:120], tiny_pairs[300:324],
                        k_info=4, epoch=2, batch_size=16, max_new_tokens=12)


def test_cli_end_to_end(run_dir):
    result = subprocess.run([sys.executable, str(REPO / "compress_model.py"), "--config", "config.json"],
                            cwd=run_dir, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = run_dir / "out"
    expected = {"model.safetensors", "config.json", "generation_config.json", "compression_config.json",
                "report.json", "vocab.json", "source.spm", "target.spm", "tokenizer_config.json"}
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
    assert report["train_seconds"] > 0 and report["train_pairs"] == 120 and report["eval_pairs"] == 24
    assert json.loads((out / "compression_config.json").read_text())["k_info"] == 4
    assert "student" in result.stdout and "compression ratio" in result.stdout

    # The saved model loads, is factorized, and translates the eval pairs to the reported score.
    model = load_compressed_model(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 32
    config = json.loads((run_dir / "config.json").read_text())
    _, eval_pairs = data.load_data(compress_model.Config(**config))
    scores = decomposition.evaluate_translation(model, tokenizer, eval_pairs["source_text"],
                                                eval_pairs["target_text"], max_new_tokens=12)
    assert (scores["bleu"], scores["chrf"]) == (report["student"]["bleu"], report["student"]["chrf"])


PREPROCESSOR_SCRIPT = """
import json, sys
import compress_model

seen = []

def shouting_preprocessor(batch, tokenizer, config):
    seen.extend(batch["source_text"])
    batch = {**batch, "source_text": [s.upper() for s in batch["source_text"]]}
    return compress_model.default_data_preprocessor(batch, tokenizer, config)

compress_model.data_preprocessor = shouting_preprocessor
code = compress_model.main(["--config", "config.json"])
json.dump(seen, open("seen.json", "w"))
sys.exit(code)
"""


def test_replaced_data_preprocessor_is_used(run_dir):
    (run_dir / "run.py").write_text(PREPROCESSOR_SCRIPT)
    result = subprocess.run([sys.executable, "run.py"], cwd=run_dir, capture_output=True, text=True, timeout=300,
                            env={**ENV, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads((run_dir / "seen.json").read_text())
    assert len(seen) == 120 + 24  # every training and evaluation pair went through the replacement


BAD_CONFIGS = [
    # (id, how to break the run folder, words the one-line message must contain)
    ("invalid-json", lambda d: (d / "config.json").write_text('{"epoch": 1,'), ["not valid JSON"]),
    ("not-an-object", lambda d: (d / "config.json").write_text("[1, 2]"), ["JSON object"]),
    ("unknown-key", lambda d: edit_config(d, epochs=3), ["unknown config key 'epochs'", "epoch"]),
    ("wrong-type", lambda d: edit_config(d, batch_size="32"), ["batch_size", '"32"']),
    ("bool-as-int", lambda d: edit_config(d, epoch=True), ["epoch", "true"]),
    ("zero-epoch", lambda d: edit_config(d, epoch=0), ["epoch", "at least 1", "0"]),
    ("negative-batch", lambda d: edit_config(d, batch_size=-4), ["batch_size", "-4"]),
    ("bad-choice", lambda d: edit_config(d, svd="qr"), ["svd", "'qr'", "exact"]),
    ("bad-loss-term", lambda d: edit_config(d, loss_weights={"mse": 1.0}), ["loss_weights", "'mse'", "kd"]),
    ("missing-teacher", lambda d: edit_config(d, teacher_model_path=str(d / "nowhere")),
     ["teacher_model_path", "nowhere"]),
    ("missing-dataset", lambda d: edit_config(d, dataset_path=str(d / "nope.csv")), ["dataset_path", "nope.csv",
                                                                                "does not exist"]),
    ("missing-columns", lambda d: _write_csv(d, "en,de\nHello,Hallo\n"), ["dataset_path", "'source_text'",
                                                                         "columns found: en, de"]),
    ("empty-dataset", lambda d: _write_csv(d, "source_text,target_text\n"), ["dataset_path", "no pairs"]),
    ("not-utf8", lambda d: _write_csv(d, "source_text,target_text\nGr\xfc\xdfe,Hallo\n", "latin-1"),
     ["dataset_path", "UTF-8"]),
    ("unsupported-type", lambda d: _write_csv(d, "x", name="data.txt"), ["dataset_path", "'.txt'"]),
    ("unknown-layer", lambda d: edit_config(d, decompose_layers=["model.encoder.layers.0.fc3.weight"]),
     ["decompose_layers", "fc3", "closest"]),
    ("non-linear-layer",
     lambda d: edit_config(d, decompose_layers=["model.encoder.layers.0.self_attn_layer_norm.weight"]),
     ["self_attn_layer_norm.weight", "not an nn.Linear"]),
    ("rank-zero", lambda d: edit_config(d, k_info=0), ["k_info", "rank 0", "at least 1"]),
    ("rank-too-big", lambda d: edit_config(d, k_info=16), ["k_info", "16", "saves nothing", "at most"]),
    ("unknown-feature-layer", lambda d: edit_config(d, feature_layers=["model.decoder.layers.7.fc1"]),
     ["feature_layers", "layers.7"]),
    ("output-is-file", lambda d: (d / "out").write_text("x"), ["output_path", "is a file"]),
    ("output-under-a-file",
     lambda d: ((d / "afile").write_text("x"), edit_config(d, output_path=str(d / "afile" / "out"))),
     ["output_path", "which is a file"]),
    ("output-not-writable", lambda d: edit_config(d, output_path="/proc/compress-model-out"),
     ["output_path", "cannot write under '/proc'"]),
    ("output-not-empty", lambda d: ((d / "out").mkdir(), (d / "out" / "keep.txt").write_text("x")),
     ["output_path", "not empty", "overwrite_output"]),
]


def _write_csv(run_dir, text, encoding="utf-8", name="bad.csv"):
    (run_dir / name).write_bytes(text.encode(encoding))
    edit_config(run_dir, dataset_path=str(run_dir / name))


@pytest.mark.parametrize("case, breaks, words", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_error_and_writes_nothing(run_dir, capsys, monkeypatch, case, breaks, words):
    breaks(run_dir)
    refused_in_one_line(run_dir, capsys, monkeypatch, words)


def test_bad_config_from_the_shell_has_no_traceback(run_dir):
    edit_config(run_dir, epoch=0)
    result = subprocess.run([sys.executable, str(REPO / "compress_model.py"), "--config", "config.json"],
                            cwd=run_dir, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "compress_model.py: error: epoch: must be at least 1, got 0"


def test_shipped_config_is_valid():
    config = compress_model.load_config(REPO / "config.json")
    assert (REPO / config.dataset_path).is_file() and (REPO / config.eval_dataset_path).is_file()
