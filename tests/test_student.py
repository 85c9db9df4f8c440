"""A separate student (``student_model_path``): a smaller model distilled from the teacher, a
folder written by this tool in either role, and the refusals when the two cannot be compared."""

import json

import pytest
from helpers import edit_config, make_run_dir, refused_in_one_line, save_model_folder

import compress_model
from matrix_decomposition import count_parameters, load_compressed_model


@pytest.fixture
def run_dir(tmp_path, tiny_teacher_dir, tiny_pairs):
    return make_run_dir(tmp_path, tiny_teacher_dir, tiny_pairs[:64], tiny_pairs[300:316], k_info=4, batch_size=16,
                        max_steps=2, max_new_tokens=8, checkpoint_steps=0)


@pytest.fixture
def save_student(run_dir, make_tiny_marian, tiny_tokenizer):
    """Factory: a tiny Marian with ``overrides`` (e.g. 1+1 layers) saved with the teacher's tokenizer."""
    def save(name="student", **overrides):
        return save_model_folder(make_tiny_marian(**overrides), tiny_tokenizer, run_dir / name)
    return save


def test_cli_distills_the_teacher_into_a_smaller_separate_student(run_dir, monkeypatch, capsys, save_student,
                                                                  make_tiny_marian):
    monkeypatch.chdir(run_dir)
    student_dir = save_student(encoder_layers=1, decoder_layers=1)
    edit_config(run_dir, student_model_path=str(student_dir))
    assert compress_model.main(["--config", "config.json"]) == 0
    report = json.loads((run_dir / "out" / "report.json").read_text())
    assert report["student_model_path"] == str(student_dir) and report["teacher_model_path"].endswith("teacher")
    assert report["teacher"]["params"] == count_parameters(make_tiny_marian())
    assert report["student_base"]["params"] == count_parameters(make_tiny_marian(encoder_layers=1, decoder_layers=1))
    assert report["student"]["params"] == report["decomposed"]["params"] < report["student_base"]["params"]
    assert all(".layers.0." in name for name in report["ranks"]) and len(report["ranks"]) == 16
    assert "student_base" in capsys.readouterr().out
    saved = load_compressed_model(run_dir / "out")
    assert (saved.config.encoder_layers, saved.config.decoder_layers) == (1, 1)


def test_a_folder_written_by_the_tool_works_as_student_and_as_teacher(run_dir, monkeypatch, tiny_teacher_dir):
    monkeypatch.chdir(run_dir)
    edit_config(run_dir, decompose_layers=["*fc?.weight"])
    assert compress_model.main(["--config", "config.json"]) == 0  # feed-forward layers factorized, in out/
    compressed, original = str(run_dir / "out"), str(tiny_teacher_dir)
    roles = [(original, compressed, ["*self_attn.*"], "a"), (compressed, original, [], "b")]
    for teacher, student, layers, output in roles:
        edit_config(run_dir, teacher_model_path=teacher, student_model_path=student, decompose_layers=layers,
                    output_path=str(run_dir / output))
        assert compress_model.main(["--config", "config.json"]) == 0
        report = json.loads((run_dir / output / "report.json").read_text())
        assert report["student"]["params"] < report["student_base"]["params"]


def _swap_two_tokens(folder):
    vocab = json.loads((folder / "vocab.json").read_text())
    first, second = list(vocab)[5:7]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (folder / "vocab.json").write_text(json.dumps(vocab))


PAPER = {"ce": 1.0, "kd": 1.0, "feature": 1.0}  # the paper's recipe: the feature term compares layers of the same shapes

BAD_STUDENTS = [  # (id, student overrides, config changes, words the one-line message must contain)
    ("vocabulary-size", {"vocab_size": 308}, {}, ["student_model_path", "308 tokens", "teacher's 300",
                                                  "share the teacher's vocabulary"]),
    ("vocabulary-tokens", {}, {"swap": True},
     ["student_model_path", "the teacher's size (300 tokens) but other tokens"]),
    ("hidden-layers", {"encoder_layers": 1}, {"loss_weights": {"ce": 1.0, "hidden": 1.0}},
     ["loss_weights: hidden", "teacher: encoder_layers 2", "student: encoder_layers 1", "set hidden to 0",
      "output distillation and cross-entropy work with any student"]),
    ("attention-heads", {"encoder_attention_heads": 1}, {"loss_weights": {"ce": 1.0, "attention": 1.0}},
     ["loss_weights: attention", "encoder_attention_heads 2", "encoder_attention_heads 1", "set attention to 0"]),
    ("feature-width", {"encoder_ffn_dim": 24}, {"loss_weights": PAPER}, ["loss_weights: feature", "the student's model.encoder.layers.0.fc1 "
                                                    "has 24 outputs and the teacher's 32", "set feature to 0"]),
    ("feature-no-such-layer", {"decoder_layers": 3}, {"loss_weights": PAPER}, ["loss_weights: feature", "the teacher has no layer "
                                                          "'model.decoder.layers.2"]),
    ("not-a-folder", None, {"student_model_path": "no/such/folder"}, ["student_model_path", "'no/such/folder'",
                                                                     "is not a folder"]),
]


@pytest.mark.parametrize("case, overrides, changes, words", BAD_STUDENTS, ids=[c[0] for c in BAD_STUDENTS])
def test_a_student_that_cannot_learn_from_the_teacher_is_refused(run_dir, capsys, monkeypatch, save_student, case,
                                                                 overrides, changes, words):
    changes = dict(changes)
    if overrides is not None:
        folder = save_student(**overrides)
        if changes.pop("swap", False):
            _swap_two_tokens(folder)
        changes = {"student_model_path": str(folder), **changes}
    edit_config(run_dir, **changes)
    refused_in_one_line(run_dir, capsys, monkeypatch, words)
