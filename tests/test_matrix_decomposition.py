"""The maths of LowRankLinear, the surgery of decompose_, its validation, and save → load."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from helpers import LOADERS, load_with_auto_classes
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, MarianMTModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from matrix_decomposition import (
    LOW_RANK_WEIGHTS_NAME, WEIGHTS_NAME, DecompositionError, LowRankLinear, LowRankMarianMTModel, count_parameters,
    decompose_, load_compressed_model, low_rank_parameters, max_saving_rank, resolve_ranks, save_compressed_model,
    truncated_svd,
)

Q = "model.encoder.layers.0.self_attn.q_proj"  # 16×16: ranks 1..7 save weights
FC1 = "model.encoder.layers.0.fc1"  # 32×16 (out×in): ranks 1..10
SRC = ["He managed to get there in time.", "The train arrived."]
TGT = ["Es gelang ihm, rechtzeitig dort zu sein.", "Der Zug kam an."]


def low_rank_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def all_layer_linears(encoder_layers: int = 2, decoder_layers: int = 2) -> set[str]:
    """Every nn.Linear of a Marian encoder/decoder layer, spelled out independently of the code."""
    attn = ["q_proj", "k_proj", "v_proj", "out_proj"]
    enc = [f"self_attn.{p}" for p in attn] + ["fc1", "fc2"]
    dec = [f"{a}.{p}" for a in ("self_attn", "encoder_attn") for p in attn] + ["fc1", "fc2"]
    return ({f"model.encoder.layers.{i}.{m}" for i in range(encoder_layers) for m in enc}
            | {f"model.decoder.layers.{i}.{m}" for i in range(decoder_layers) for m in dec})


def random_linear(d: int, n: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(d, n, bias=bias, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Maths


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_reproduces_the_linear(bias):
    linear = random_linear(24, 40, bias)
    low = LowRankLinear.from_linear(linear, rank=24, svd="exact")
    x = torch.randn(5, 24, dtype=torch.float64)  # (B, d)
    torch.testing.assert_close(low(x), linear(x), rtol=0, atol=1e-12)  # (B, n)


@pytest.mark.parametrize("rank", [1, 7, 20])
def test_truncation_error_is_the_discarded_singular_values(rank):
    linear = random_linear(24, 40)
    weight = linear.weight.detach().clone()
    low = LowRankLinear.from_linear(linear, rank, svd="exact")
    s = torch.linalg.svdvals(weight)  # (24,)
    error = torch.linalg.matrix_norm(weight - low.weight)
    torch.testing.assert_close(error, s[rank:].square().sum().sqrt(), rtol=1e-10, atol=0)
    assert torch.equal(linear.weight, weight)  # the source layer is left unchanged


@pytest.mark.parametrize("rank", [1, 7, 20])
def test_singular_values_are_split_evenly(rank):
    linear = random_linear(24, 40)
    s = torch.linalg.svdvals(linear.weight.detach())  # (24,)
    low = LowRankLinear.from_linear(linear, rank, svd="exact")
    up, down = torch.linalg.matrix_norm(low.up.weight), torch.linalg.matrix_norm(low.down.weight)
    # ‖U√S‖_F² = ‖√S·Vᵀ‖_F² = Σ s_i over the kept values
    torch.testing.assert_close(up, down, rtol=1e-10, atol=0)
    torch.testing.assert_close(up, s[:rank].sum().sqrt(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_low_rank_linear_parameter_count(bias):
    n, d, r = 40, 24, 5
    low = LowRankLinear.from_linear(random_linear(d, n, bias), r)
    assert count_parameters(low) == r * (n + d) + (n if bias else 0) == low_rank_parameters(n, d, r, bias)
    assert low.rank == r and "rank=5" in repr(low)


@pytest.mark.parametrize("n, d", [(16, 16), (32, 16), (16, 32), (512, 512), (2048, 512), (7, 3)])
def test_max_saving_rank_is_the_last_rank_that_saves(n, d):
    bound = max_saving_rank(n, d)
    assert low_rank_parameters(n, d, bound, bias=False) < n * d <= low_rank_parameters(n, d, bound + 1, bias=False)


def test_model_parameter_count_drops_by_the_predicted_amount(make_tiny_marian):
    model = make_tiny_marian()
    shapes = {name: m.weight.shape for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    before = count_parameters(model)
    ranks = decompose_(model, [], {"default": 2, f"{FC1}.weight": 10, f"{Q}.weight": 7})
    saved = sum(n * d - r * (n + d) for name, r in ranks.items() for n, d in [shapes[name]])
    assert before - count_parameters(model) == saved > 0


@pytest.mark.parametrize("rank", [32, 128])
def test_lowrank_svd_is_within_one_percent_of_exact_on_a_decaying_spectrum(rank):
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(1024, 512, generator=g))  # (1024, 512), orthonormal columns
    v, _ = torch.linalg.qr(torch.randn(512, 512, generator=g))  # (512, 512)
    s = torch.arange(1, 513, dtype=torch.float32) ** -0.5  # power-law decay, like a trained weight
    weight = (u * s) @ v.T  # (1024, 512)
    errors = {}
    for method in ("exact", "lowrank"):
        torch.manual_seed(0)
        u_r, s_r, vh_r = truncated_svd(weight, rank, method)  # (1024, r), (r,), (r, 512)
        errors[method] = torch.linalg.matrix_norm(weight - (u_r * s_r) @ vh_r).item()
    assert errors["exact"] == pytest.approx(s[rank:].square().sum().sqrt().item(), rel=1e-4)
    assert errors["exact"] * (1 - 1e-5) <= errors["lowrank"] < errors["exact"] * 1.01


# ---------------------------------------------------------------------------------------------
# Surgery


def test_surgery_hits_exactly_the_listed_layers(make_tiny_marian):
    model = make_tiny_marian()
    dec_q = "model.decoder.layers.1.encoder_attn.q_proj"
    ranks = decompose_(model, [f"{dec_q}.weight", f"{FC1}.weight", f"{FC1}.bias", f"{dec_q}.weight"], 3)
    assert list(ranks.items()) == [(FC1, 3), (dec_q, 3)]  # model order, each layer once
    assert low_rank_names(model) == {FC1, dec_q}
    assert model.config.matrix_decomposition["ranks"] == ranks
    untouched = all_layer_linears() - {FC1, dec_q}
    assert all(type(model.get_submodule(name)) is nn.Linear for name in untouched)


def test_empty_layer_list_means_every_linear_in_the_layers(make_tiny_marian):
    model = make_tiny_marian()
    ranks = decompose_(model, [], 2)
    assert set(ranks) == low_rank_names(model) == all_layer_linears() and len(ranks) == 32
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.shared.weight
    assert type(model.model.encoder.embed_tokens) is nn.Embedding


def test_patterns_expand_to_the_decomposable_weights_in_model_order(make_tiny_marian):
    model = make_tiny_marian()
    assert list(resolve_ranks(model, ["model.decoder.*fc?.weight"], 2)) == [
        f"model.decoder.layers.{i}.{fc}" for i in range(2) for fc in ("fc1", "fc2")]
    everything = resolve_ranks(model, ["*"], 2)  # every linear in the layers and the shared embedding, nothing tied
    assert list(everything)[0] == "model.shared" and set(everything) == all_layer_linears() | {"model.shared"}
    assert set(resolve_ranks(model, ["*layers*", Q + ".weight"], 2)) == all_layer_linears()  # overlaps are harmless
    decompose_(model, ["model.shared.weight", f"{Q}.weight"], 2)  # a teacher this tool already compressed
    assert set(resolve_ranks(model, ["*"], 2)) == all_layer_linears() - {Q}  # factors are not targets again


def test_per_layer_ranks_with_a_default(make_tiny_marian):
    model = make_tiny_marian()
    ranks = decompose_(model, [], {"default": 2, f"{FC1}.weight": 9, Q: 5})
    assert set(ranks) == all_layer_linears()
    assert ranks.pop(FC1) == 9 and ranks.pop(Q) == 5 and set(ranks.values()) == {2}
    assert model.get_submodule(FC1).rank == 9 and model.get_submodule(FC1).down.weight.shape == (9, 16)


def test_per_layer_ranks_without_a_default_name_the_layers(make_tiny_marian):
    model = make_tiny_marian()
    v = "model.decoder.layers.0.self_attn.v_proj"
    ranks = decompose_(model, [], {"model.encoder.layers.1.fc2.weight": 3, v: 4})
    assert ranks == {"model.encoder.layers.1.fc2": 3, v: 4}
    assert low_rank_names(model) == set(ranks)


def test_per_layer_ranks_by_pattern_a_key_wins_then_the_first_pattern(make_tiny_marian):
    model = make_tiny_marian()
    ranks = resolve_ranks(model, [], {f"{FC1}.weight": 9, "*fc?.weight": 6, "model.decoder.*": 4, "default": 2})
    assert ranks.pop(FC1) == 9
    assert all(rank == 6 for name, rank in ranks.items() if name.endswith(("fc1", "fc2")))
    assert all(rank == 4 for name, rank in ranks.items() if name.startswith("model.decoder") and "fc" not in name)
    assert all(rank == 2 for name, rank in ranks.items() if name.startswith("model.encoder") and "fc" not in name)
    # a pattern without a "default" picks the layers too; a pattern may name the biases
    assert list(resolve_ranks(model, [], {"model.encoder.layers.0.fc?.bias": 3})) == [
        "model.encoder.layers.0.fc1", "model.encoder.layers.0.fc2"]
    assert list(resolve_ranks(model, ["model.encoder.layers.1.*_proj.bias"], 2)) == [
        f"model.encoder.layers.1.self_attn.{p}_proj" for p in ("k", "v", "q", "out")]
    with pytest.raises(DecompositionError, match=r"k_info: the pattern '\*cross\*' matches none of the layers"):
        resolve_ranks(model, [], {"*cross*": 3, "default": 2})
    # without a "default" (decompose_layers empty) k_info's keys name the layers: its errors name k_info
    with pytest.raises(DecompositionError, match=r"^k_info: the pattern '\*cross\*' matches no nn.Linear"):
        resolve_ranks(model, [], {"*cross*": 3})
    with pytest.raises(DecompositionError, match=r"^k_info: 'model.encoder.layers.0.fc9.weight' is not a key"):
        resolve_ranks(model, [], {"model.encoder.layers.0.fc9.weight": 3})


ERROR_CASES = [  # (decomposed first, layers, k_info, svd, fragments of the message)
    pytest.param([], ["model.encoder.layers.0.fc3.weight"], 4, "auto",
                 ["'model.encoder.layers.0.fc3.weight' is not a key", "closest keys:", f"{FC1}.weight"],
                 id="unknown-key"),
    pytest.param([], ["model.encoder.layers.0.self_attn_layer_norm.weight"], 4, "auto",
                 ["of type LayerNorm, not an nn.Linear"], id="layernorm"),
    pytest.param([], ["model.encoder.embed_tokens.weight"], 4, "auto",
                 ["of type Embedding, not an nn.Linear"], id="embedding"),
    pytest.param([], ["lm_head.weight"], 4, "auto", ["'lm_head.weight' is tied to 'model.shared.weight'"],
                 id="tied-lm-head"),
    pytest.param([], [Q], 0, "auto", [f"rank 0 for '{Q}' must be at least 1"], id="rank-0"),
    pytest.param([], [FC1], 11, "auto", [f"rank 11 for '{FC1}' saves nothing", "at most 10", "= 10.7"],
                 id="rank-above-bound"),
    pytest.param([], [Q], 4.0, "auto", ["must be a whole number, got 4.0"], id="float-rank"),
    pytest.param([], [Q], True, "auto", ["must be a whole number, got True"], id="bool-rank"),
    pytest.param([], [Q], {"default": "8"}, "auto", ["must be a whole number, got '8'"], id="str-rank"),
    pytest.param([], [Q], {"default": 2, f"{FC1}.weight": 3}, "auto",
                 [f"'{FC1}' has a rank but is not in decompose_layers"], id="mapping-key-not-listed"),
    pytest.param([], [Q, FC1], {Q: 2}, "auto", [f"no rank for '{FC1}'", '"default"'], id="no-rank"),
    pytest.param([FC1], [f"{FC1}.weight"], 2, "auto", [f"'{FC1}.weight' is already decomposed (rank 2)"],
                 id="already-decomposed"),
    pytest.param([], [Q], 2, "svd", ["svd method 'svd' is not one of"], id="svd-method"),
    pytest.param([], ["model.*.layer_norm.weight"], 2, "auto",
                 ["the pattern 'model.*.layer_norm.weight' matches no nn.Linear or embedding weight"],
                 id="pattern-matches-nothing"),
]


@pytest.mark.parametrize("first, layers, k_info, svd, fragments", ERROR_CASES)
def test_validation_errors(make_tiny_marian, first, layers, k_info, svd, fragments):
    model = make_tiny_marian()
    if first:
        decompose_(model, first, 2)
    with pytest.raises(DecompositionError) as caught:
        decompose_(model, layers, k_info, svd=svd)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert low_rank_names(model) == set(first)  # nothing was changed


# ---------------------------------------------------------------------------------------------
# Saving and loading


@pytest.fixture
def saved(tmp_path, make_tiny_marian, tiny_tokenizer):
    """A tiny Marian decomposed at mixed ranks, every tensor nudged off its initial value, saved."""
    model = make_tiny_marian()
    decompose_(model, [], {"default": 3, f"{FC1}.weight": 6, "model.decoder.layers.1.self_attn.q_proj.weight": 1})
    torch.manual_seed(1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(0.01 * torch.randn_like(tensor))
    folder = tmp_path / "compressed"
    save_compressed_model(model, folder, tiny_tokenizer)
    return model, folder


@pytest.mark.parametrize("load", LOADERS.values(), ids=LOADERS.keys())
def test_save_load_gives_identical_logits_and_generations(saved, tiny_tokenizer, load):
    model, folder = saved
    loaded = load(folder)
    assert low_rank_names(loaded) == low_rank_names(model)
    assert loaded.lm_head.weight is loaded.model.shared.weight is loaded.model.decoder.embed_tokens.weight
    batch = tiny_tokenizer(SRC, text_target=TGT, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)  # (B, T, V)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    settings = dict(max_new_tokens=12, num_beams=2, do_sample=False)
    assert torch.equal(loaded.generate(**inputs, **settings), model.generate(**inputs, **settings))


def test_saved_folder_has_its_own_model_type_and_loads_with_the_auto_classes(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "marian_low_rank" and config["architectures"] == ["LowRankMarianMTModel"]
    # transformers alone does not know the type, so without this module it refuses the folder instead of
    # building a dense Marian model around randomly initialized layers
    assert "marian_low_rank" not in CONFIG_MAPPING_NAMES
    assert isinstance(load_with_auto_classes(folder), LowRankMarianMTModel)
    assert isinstance(load_compressed_model(folder), LowRankMarianMTModel)


def test_the_translation_pipeline_is_gone_and_the_deploying_page_says_what_to_use(saved):
    """transformers 5 removed pipeline("translation"): a user trying it on a compressed model gets a
    KeyError; docs/deploying.md says so where loading is explained, and what to use instead."""
    from transformers import pipeline

    _, folder = saved
    with pytest.raises(KeyError, match="The task translation has been removed from transformers"):
        pipeline("translation", model=str(folder))
    page = (Path(__file__).resolve().parent.parent / "docs" / "deploying.md").read_text(encoding="utf-8")
    loading = page[page.index("## Loading a compressed model"):]
    assert "No `pipeline(\"translation\", model=...)`: transformers 5 removed the translation pipelines" in loading
    assert "model.generate()" in loading and "python -m mdcompress.translate --model" in loading


def test_the_plain_class_refuses_a_factorized_folder_instead_of_loading_random_layers(saved):
    """MarianMTModel (not the registered low-rank class) would build dense layers and leave them random:
    the weights' file name is one it does not look for, so it raises."""
    _, folder = saved
    with pytest.raises(OSError, match="no file named model.safetensors"):
        MarianMTModel.from_pretrained(folder)


def test_a_factorized_model_saved_again_through_transformers_stays_refused_by_the_plain_class(saved, tmp_path):
    """Loaded through the Auto classes and saved with save_pretrained (what push_to_hub does), the folder
    keeps the low-rank file name; an explicit variant=None loads as before."""
    _, folder = saved
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, variant=None)
    model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / LOW_RANK_WEIGHTS_NAME).is_file() and not (tmp_path / "again" / WEIGHTS_NAME).exists()
    with pytest.raises(OSError, match="no file named model.safetensors"):
        MarianMTModel.from_pretrained(tmp_path / "again")
    again = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "again")
    ours, theirs = model.state_dict(), again.state_dict()  # transformers saves no sinusoid position table:
    moved = [k for k in ours if not torch.equal(ours[k], theirs[k])]  # the fixture nudged it, a load rebuilds it
    assert ours.keys() == theirs.keys() and all(k.endswith("embed_positions.weight") for k in moved)


def test_a_dense_model_is_saved_where_every_class_reads_it(tmp_path, make_tiny_marian):
    model = make_tiny_marian()
    save_compressed_model(model, tmp_path / "dense")
    assert (tmp_path / "dense" / WEIGHTS_NAME).is_file() and not (tmp_path / "dense" / LOW_RANK_WEIGHTS_NAME).exists()
    assert type(MarianMTModel.from_pretrained(tmp_path / "dense")) is MarianMTModel
    decompose_(model, [], 3)
    save_compressed_model(model, tmp_path / "dense")  # factorized since: the dense weights do not stay behind
    assert sorted(p.name for p in (tmp_path / "dense").glob("*.safetensors")) == [LOW_RANK_WEIGHTS_NAME]


def test_saved_folder_has_ranks_safetensors_and_tokenizer(saved, tiny_tokenizer):
    model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["matrix_decomposition"]["ranks"] == model.config.matrix_decomposition["ranks"]
    assert config["matrix_decomposition"]["ranks"][FC1] == 6 and len(config["matrix_decomposition"]["ranks"]) == 32
    assert (folder / LOW_RANK_WEIGHTS_NAME).is_file() and not (folder / WEIGHTS_NAME).exists()
    assert not [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    reloaded = AutoTokenizer.from_pretrained(folder)
    assert reloaded(SRC, text_target=TGT)["input_ids"] == tiny_tokenizer(SRC, text_target=TGT)["input_ids"]
    assert reloaded(SRC, text_target=TGT)["labels"] == tiny_tokenizer(SRC, text_target=TGT)["labels"]


@pytest.mark.parametrize("change, expected", [
    (lambda sd: sd.update({"extra.weight": torch.zeros(2)}), "Unexpected key(s) in state_dict: \"extra.weight\""),
    (lambda sd: sd.pop(f"{FC1}.up.bias"), f"Missing key(s) in state_dict: \"{FC1}.up.bias\""),
], ids=["extra-key", "missing-key"])
def test_load_is_strict(saved, change, expected):
    _, folder = saved
    tensors = load_file(folder / LOW_RANK_WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, folder / LOW_RANK_WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="Error") as caught:
        load_compressed_model(folder)
    assert expected in str(caught.value)


def test_factors_of_a_decomposed_layer_are_not_targets_again(make_tiny_marian):
    model = make_tiny_marian()
    decompose_(model, [], 2)
    with pytest.raises(DecompositionError, match="already decomposed"):
        decompose_(model, [], 2)
    with pytest.raises(DecompositionError, match="factor of the already decomposed layer"):
        decompose_(model, ["model.encoder.layers.0.fc1.up.weight"], 1)


def test_a_single_key_string_and_a_buffer_key(make_tiny_marian):
    model = make_tiny_marian()
    assert list(decompose_(model, "model.encoder.layers.0.fc1.weight", 2)) == ["model.encoder.layers.0.fc1"]
    with pytest.raises(DecompositionError, match="'final_logits_bias' is a buffer"):
        decompose_(model, ["final_logits_bias"], 2)


def test_wide_matrices_factor_like_tall_ones():
    torch.manual_seed(0)
    wide = torch.randn(24, 80, dtype=torch.float64)
    for method in ("exact", "lowrank"):
        u, s, vh = truncated_svd(wide, 6, method=method)
        ut, st, vht = truncated_svd(wide.T.contiguous(), 6, method=method)
        assert u.shape == (24, 6) and vh.shape == (6, 80)
        assert torch.allclose(u @ torch.diag(s) @ vh, (ut @ torch.diag(st) @ vht).T, atol=1e-8)
