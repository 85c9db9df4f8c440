"""``freeze``: the parameters a config names are kept as the factorization left them during recovery."""

import json

import pytest
import torch
from helpers import edit_config, make_run_dir

import compress_model
from decomposition import build_student, freeze_, frozen_parameters, parameter_keys
from matrix_decomposition import DecompositionError, load_compressed_model, load_pretrained


@pytest.fixture
def factorized(make_tiny_marian):
    """A tiny Marian with its shared embedding and one encoder fc1 factorized (rank 4)."""
    student, _ = build_student(make_tiny_marian(), ["model.shared.weight", "model.encoder.layers.0.fc1.weight"], 4)
    return student


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


FC1 = "model.encoder.layers.0.fc1"


@pytest.mark.parametrize("pattern, factors", [
    (f"{FC1}.weight", {"down.weight", "up.weight"}),  # the layer's key before: both factors
    (f"{FC1}.bias", {"up.bias"}),
    (FC1, {"down.weight", "up.weight", "up.bias"}),  # its module name: all of it
    (f"{FC1}.*", {"down.weight", "up.weight", "up.bias"}),
    (f"{FC1}.up.*", {"up.weight", "up.bias"}),  # the factors' own names
])
def test_a_factorized_layer_is_named_by_its_keys_before_and_after(factorized, pattern, factors):
    before = trainable(factorized)
    count = freeze_(factorized, [pattern])
    assert before - trainable(factorized) == {f"{FC1}.{name}" for name in factors}
    assert count == sum(factorized.get_parameter(f"{FC1}.{name}").numel() for name in factors)


def test_factor_names_are_accepted_before_the_factorization(make_tiny_marian):
    teacher = make_tiny_marian()
    for pattern in ("model.shared.up.weight", "lm_head.down.weight", f"{FC1}.up.bias"):
        with pytest.raises(DecompositionError, match="matches no trainable parameter"):
            frozen_parameters(teacher, [pattern])  # not names of the dense teacher...
        assert frozen_parameters(teacher, [pattern], will_factorize=["model.shared", FC1])  # ...but of its factors


def test_the_tied_embedding_is_named_by_any_of_its_keys(factorized):
    keys = {name for _, names in parameter_keys(factorized).values() for name in names}
    assert {"model.shared.weight", "model.shared.up.weight", "lm_head.up.weight"} <= keys  # tied: one set of factors
    for key in ("model.shared.weight", "lm_head.weight", "model.encoder.embed_tokens.weight"):
        assert {id(p) for p in frozen_parameters(factorized, [key])} == \
            {id(factorized.model.shared.up.weight), id(factorized.model.shared.down.weight)}, key


def test_a_dense_weight_is_frozen_without_its_bias(factorized):
    before = trainable(factorized)
    freeze_(factorized, ["model.encoder.layers.1.fc1.weight"])
    assert before - trainable(factorized) == {"model.encoder.layers.1.fc1.weight"}


@pytest.mark.parametrize("patterns, words", [
    (["model.encoder.layers.9.fc1.weight"], ["'model.encoder.layers.9.fc1.weight' matches no trainable parameter",
                                             "did you mean 'model.encoder.layers."]),
    (["*"], ['["*"] names every trainable parameter of the model', "nothing would be trained"]),
])
def test_refused_in_words(factorized, patterns, words):
    before = trainable(factorized)
    with pytest.raises(DecompositionError) as refused:
        freeze_(factorized, patterns)
    for word in words:
        assert word in str(refused.value)
    assert trainable(factorized) == before  # nothing frozen half-way


def test_a_run_keeps_the_frozen_factors_and_trains_the_rest(tmp_path, tiny_teacher_dir, tiny_pairs, monkeypatch,
                                                            capsys):
    layers = ["model.shared.weight", "model.decoder.layers.0.fc1.weight"]
    run_dir = make_run_dir(tmp_path, tiny_teacher_dir, tiny_pairs[:64], tiny_pairs[300:308], decompose_layers=layers,
                           k_info=4, svd="exact", epoch=1, batch_size=16, max_new_tokens=8, checkpoint_steps=0,
                           loss_weights={"ce": 1.0}, learning_rate=1e-2, freeze=["model.shared.weight"])
    monkeypatch.chdir(run_dir)
    assert compress_model.main(["--config", "config.json"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run_dir / "out" / "report.json").read_text())
    teacher, _ = load_pretrained(str(tiny_teacher_dir), "teacher_model_path")
    decomposed, _ = build_student(teacher, layers, 4, "exact")  # what the run factorized, before training
    trained = load_compressed_model(run_dir / "out")
    shared = decomposed.model.shared
    assert report["frozen_params"] == shared.up.weight.numel() + shared.down.weight.numel()
    assert f"frozen during recovery: {report['frozen_params']:,} of the " in out
    for name in ("up.weight", "down.weight"):
        assert torch.equal(trained.model.shared.get_parameter(name), shared.get_parameter(name)), name
    fc1, fc1_before = trained.get_submodule("model.decoder.layers.0.fc1"), decomposed.get_submodule(
        "model.decoder.layers.0.fc1")
    assert not torch.allclose(fc1.up.weight, fc1_before.up.weight)  # the rest was trained

    # without freeze the same run moves the embedding's factors
    edit_config(run_dir, freeze=[], output_path="out2")
    assert compress_model.main(["--config", "config.json"]) == 0
    moved = load_compressed_model(run_dir / "out2")
    assert not torch.allclose(moved.model.shared.up.weight, shared.up.weight)
