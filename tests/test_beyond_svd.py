"""Beyond plain SVD: activation-aware initialization (SVD-LLM), ranks from a parameter budget,
the factorized shared embedding, sequence-level distillation, int8 inference, and their wiring into the CLI."""

import itertools
import json
import types
import warnings

import pytest
import torch
from helpers import LOADERS, distillation_settings, edit_config, make_run_dir
from datasets import Dataset
from safetensors import safe_open
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

import compress_model
import decomposition
import matrix_decomposition
from mdcompress import translate
from mdcompress.data import read_pairs
from mdcompress.calibration import calibration_batches, fisher_weighted, gather_fisher_rows, gather_input_grams
from distillation import sequence_level_kd
from distillation.knowledge_distillation import Distiller
from mdcompress.evaluation import evaluate_translation
from matrix_decomposition import (
    LOW_RANK_WEIGHTS_NAME, DecompositionError, LowRankEmbedding, LowRankLinear, count_parameters, decompose_,
    default_targets, init_notes, load_compressed_model, low_rank_factors, max_saving_rank, quantize_int8,
    save_compressed_model, singular_values, size_mb, whitening,
)
from mdcompress import rank_allocation
from mdcompress.config import config_help
from mdcompress.rank_allocation import (
    allocate_ranks, convex_errors, ranks_for_ratio, sensitivity_errors, spectrum_errors, stored_sensitivity_errors,
)

ENC_Q1 = "model.encoder.layers.1.self_attn.q_proj"
DEC_Q0 = "model.decoder.layers.0.self_attn.q_proj"
DEC_CROSS_K1 = "model.decoder.layers.1.encoder_attn.k_proj"
SHARED_MODULE = "model.shared"


def anisotropic_inputs(samples: int, d: int = 24) -> torch.Tensor:
    """(samples, d) inputs whose feature scales span three decades, like real activations."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(samples, d, generator=g, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64)


def random_weight(n: int = 40, d: int = 24) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def output_error(weight, up, down, x) -> float:
    """‖(W − B'C')Xᵀ‖_F."""
    return torch.linalg.matrix_norm((weight - up @ down) @ x.T).item()


# ---------------------------------------------------------------------------------------------
# The maths


@pytest.mark.parametrize("rank", [2, 6, 12])
def test_activation_aware_factors_have_lower_output_error_than_plain_svd(rank):
    weight, x = random_weight(), anisotropic_inputs(500)
    plain_up, plain_down, _ = low_rank_factors(weight, rank, "exact")
    up, down, note = low_rank_factors(weight, rank, "exact", input_gram=x.T @ x)
    assert note is None
    assert output_error(weight, up, down, x) < 0.8 * output_error(weight, plain_up, plain_down, x)
    # ... at the price of a larger error on the weight itself, which plain SVD minimizes
    assert torch.linalg.matrix_norm(weight - up @ down) > torch.linalg.matrix_norm(weight - plain_up @ plain_down)


def test_whitened_factors_are_optimal_for_the_output_error():
    """Eckart–Young in the whitened space: the error left is exactly the discarded whitened singular values."""
    weight, x = random_weight(), anisotropic_inputs(500)
    gram = x.T @ x
    root, _ = whitening(gram)
    torch.testing.assert_close(root @ root.T, gram)  # full-rank G needs no jitter
    s = torch.linalg.svdvals(weight @ root)
    up, down, _ = low_rank_factors(weight, 5, "exact", input_gram=gram)
    assert output_error(weight, up, down, x) == pytest.approx(s[5:].square().sum().sqrt().item(), rel=1e-8)


def test_full_rank_with_a_gram_reproduces_the_weight():
    weight, x = random_weight(), anisotropic_inputs(500)
    up, down, _ = low_rank_factors(weight, 24, "exact", input_gram=x.T @ x)
    torch.testing.assert_close(up @ down, weight, rtol=0, atol=1e-9)


@pytest.mark.parametrize("case", ["fewer-samples-than-features", "dead-feature"])
def test_rank_deficient_gram_neither_fails_nor_gives_nan(case):
    weight = random_weight()
    x = anisotropic_inputs(3) if case == "fewer-samples-than-features" else anisotropic_inputs(500)
    if case == "dead-feature":
        x[:, 7] = 0
    gram = x.T @ x
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(gram)  # the plain factorization does fail on it
    up, down, note = low_rank_factors(weight.float(), 6, "exact", input_gram=gram)
    assert note is None and torch.isfinite(up).all() and torch.isfinite(down).all()
    plain_up, plain_down, _ = low_rank_factors(weight, 6, "exact")
    assert output_error(weight, up.double(), down.double(), x) < output_error(weight, plain_up, plain_down, x)
    # the rank-one terms are balanced, so no factor holds values far outside the weight's range
    assert down.abs().max() < 10 * weight.abs().max() and up.abs().max() < 10 * weight.abs().max()


@pytest.mark.parametrize("gram, words", [
    (torch.zeros(24, 24), "is zero"),
    (torch.full((24, 24), float("nan")), "non-finite"),
    (-torch.eye(24), "not positive semi-definite"),
    (torch.diag(torch.tensor([1.0] * 23 + [-10.0])), "not positive semi-definite"),  # beyond the largest jitter
], ids=["zero", "nan", "negative", "indefinite"])
def test_unusable_gram_falls_back_to_plain_svd_and_says_so(gram, words):
    weight = random_weight().float()
    up, down, note = low_rank_factors(weight, 4, "exact", input_gram=gram)
    plain_up, plain_down, _ = low_rank_factors(weight, 4, "exact")
    assert words in note and "plain SVD used" in note
    assert torch.equal(up, plain_up) and torch.equal(down, plain_down)


def test_from_linear_with_a_gram_keeps_the_bias_and_records_fallbacks():
    torch.manual_seed(0)
    linear = nn.Linear(24, 40)
    x = anisotropic_inputs(200).float()
    low = LowRankLinear.from_linear(linear, 6, svd="exact", input_gram=(x.T @ x).double())
    assert low.init_note is None and torch.equal(low.up.bias, linear.bias)
    assert low.up.weight.dtype == low.down.weight.dtype == torch.float32
    plain = LowRankLinear.from_linear(linear, 6, svd="exact")
    with torch.no_grad():
        assert (low(x) - linear(x)).norm() < (plain(x) - linear(x)).norm()
    assert "is zero" in LowRankLinear.from_linear(linear, 6, input_gram=torch.zeros(24, 24)).init_note


# ---------------------------------------------------------------------------------------------
# Calibration on a model


@pytest.fixture
def calibration(tiny_tokenizer, tiny_pairs):
    """24 tokenized pairs of different lengths in 3 padded batches."""
    pairs = tiny_pairs[:24]
    enc = tiny_tokenizer([s for s, _ in pairs], text_target=[t for _, t in pairs], truncation=True, max_length=32)
    dataset = Dataset.from_dict({k: enc[k] for k in ("input_ids", "attention_mask", "labels")})
    return calibration_batches(dataset, tiny_tokenizer, samples=24, batch_size=8)


def reference_grams(model, batches) -> dict[str, torch.Tensor]:
    """Grams of three layers' inputs, from the hidden states the model returns (no hooks)."""
    grams = {ENC_Q1: 0, DEC_Q0: 0, DEC_CROSS_K1: 0}
    with torch.no_grad():
        for b in batches:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True,
                        decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=b["labels"]))
            src, tgt = b["attention_mask"].bool(), b["labels"] != -100  # (B, S), (B, T)
            for name, states, mask in [(ENC_Q1, out.encoder_hidden_states[1], src),
                                       (DEC_Q0, out.decoder_hidden_states[0], tgt),
                                       (DEC_CROSS_K1, out.encoder_last_hidden_state, src)]:
                x = states[mask].double()  # (N, d)
                grams[name] = grams[name] + x.T @ x
    return grams


def test_gathered_grams_are_those_of_the_real_positions(make_tiny_marian, calibration):
    model = make_tiny_marian()
    assert any((b["attention_mask"] == 0).any() and (b["labels"] == -100).any() for b in calibration)  # padding
    grams = gather_input_grams(model, default_targets(model), calibration)
    assert set(grams) == set(default_targets(model))
    assert all(g.dtype == torch.float64 and torch.isfinite(g).all() for g in grams.values())
    for name, expected in reference_grams(model, calibration).items():
        torch.testing.assert_close(grams[name], expected, rtol=1e-6, atol=1e-6)
    assert not model._forward_pre_hooks and not any(m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_activation_init_on_a_model_lowers_every_layers_output_error(make_tiny_marian, calibration):
    teacher = make_tiny_marian()
    grams = gather_input_grams(teacher, default_targets(teacher), calibration)
    aware, ranks = decomposition.build_student(teacher, [], 3, "exact", input_grams=grams)
    plain, _ = decomposition.build_student(teacher, [], 3, "exact")
    assert init_notes(aware) == {} and len(ranks) == 32
    errors = {"plain": 0.0, "aware": 0.0}
    for name, gram in grams.items():
        weight = teacher.get_submodule(name).weight.detach().double()
        error = {}
        for kind, student in (("plain", plain), ("aware", aware)):
            e = weight - student.get_submodule(name).weight.detach().double()  # (n, d)
            error[kind] = torch.trace(e @ gram @ e.T).sqrt().item()  # ‖(W − B'C')Xᵀ‖_F, X the calibration inputs
            errors[kind] += error[kind]
        assert error["aware"] <= error["plain"] * (1 + 1e-6), name
    assert errors["aware"] < 0.9 * errors["plain"], errors


def test_fisher_rows_are_the_squared_gradients_of_the_cross_entropy(make_tiny_marian, calibration):
    """Per output row: Σ over batches of Σ_j (∂L/∂W_ij)², L the summed cross-entropy of the real target
    tokens, computed here with plain autograd on a copy; the model's requires_grad flags and weights stay."""
    model = make_tiny_marian()
    model.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [ENC_Q1, DEC_Q0, DEC_CROSS_K1]
    rows = gather_fisher_rows(model, names, calibration)
    assert all(not p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    copy_ = make_tiny_marian()
    copy_.load_state_dict(model.state_dict())
    copy_.eval()
    expected = {name: torch.zeros(copy_.get_submodule(name).out_features, dtype=torch.float64) for name in names}
    for b in calibration:
        copy_.zero_grad()
        logits = copy_(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       decoder_input_ids=copy_.prepare_decoder_input_ids_from_labels(labels=b["labels"])).logits
        nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100,
                                    reduction="sum").backward()
        for name in names:
            expected[name] += copy_.get_submodule(name).weight.grad.double().square().sum(dim=1)
    assert set(rows) == set(names)
    for name in names:
        torch.testing.assert_close(rows[name], expected[name], rtol=1e-5, atol=1e-12)
        assert (rows[name] > 0).all()


def test_fisher_init_minimizes_the_fisher_weighted_output_error(make_tiny_marian, calibration):
    """init "fisher": each linear's factors have the least ‖diag(√F)·(W − Ŵ)·L‖_F (L·Lᵀ = XᵀX) of rank r, so
    no more than the activation init's, which ignores F; and less of it summed over the layers."""
    teacher = make_tiny_marian()
    names = default_targets(teacher)
    grams = gather_input_grams(teacher, names, calibration)
    fisher = gather_fisher_rows(teacher, names, calibration)
    weighted = fisher_weighted(grams, fisher)
    assert all(isinstance(w, matrix_decomposition.Weighting) for w in weighted.values())
    assert all(torch.equal(weighted[n].gram, grams[n]) for n in names)
    assert all(abs(weighted[n].rows.mean().item() - 1) < 1e-9 or weighted[n].rows.min() == 1e-3 for n in names)
    aware, _ = decomposition.build_student(teacher, [], 3, "exact", input_grams=grams)
    fisher_student, _ = decomposition.build_student(teacher, [], 3, "exact", input_grams=weighted)
    assert init_notes(fisher_student) == {}
    totals = {"aware": 0.0, "fisher": 0.0}
    for name in names:
        weight = teacher.get_submodule(name).weight.detach().double()
        rows = weighted[name].rows[:, None]
        error = {}
        for kind, student in (("aware", aware), ("fisher", fisher_student)):
            e = rows * (weight - student.get_submodule(name).weight.detach().double())  # diag(√F)·(W − Ŵ)
            error[kind] = torch.trace(e @ grams[name] @ e.T).sqrt().item()
            totals[kind] += error[kind]
        assert error["fisher"] <= error["aware"] * (1 + 1e-6), name
    assert totals["fisher"] < 0.95 * totals["aware"], totals


def test_fisher_rows_of_a_linear_the_forward_pass_never_reaches_are_zero(make_tiny_marian, calibration):
    """A target linear outside the forward pass gets zero rows (then the activation init alone), not an error."""
    model = make_tiny_marian()
    model.model.encoder.unused = nn.Linear(16, 8)
    rows = gather_fisher_rows(model, [ENC_Q1, "model.encoder.unused"], calibration)
    assert rows["model.encoder.unused"].eq(0).all() and (rows[ENC_Q1] > 0).all()
    weighted = fisher_weighted({ENC_Q1: torch.eye(16), "model.encoder.unused": torch.eye(16)}, rows)
    assert isinstance(weighted[ENC_Q1], matrix_decomposition.Weighting)
    assert not isinstance(weighted["model.encoder.unused"], matrix_decomposition.Weighting)


def test_fisher_weighting_skips_a_layer_no_gradient_reached():
    gram = torch.eye(4, dtype=torch.float64)
    weighted = fisher_weighted({"a": gram, "b": gram}, {"a": torch.zeros(3, dtype=torch.float64),
                                                                    "b": torch.tensor([4.0, 0.0, 1.0], dtype=torch.float64)})
    assert weighted["a"] is gram  # the activation init alone
    torch.testing.assert_close(weighted["b"].rows, torch.tensor([2.0, 1e-3, 1.0], dtype=torch.float64))


def test_missing_grams_fall_back_per_layer(make_tiny_marian):
    model = make_tiny_marian()
    fc1 = "model.encoder.layers.0.fc1"
    decompose_(model, [f"{fc1}.weight", f"{ENC_Q1}.weight"], 3, input_grams={fc1: torch.eye(16, dtype=torch.float64)})
    assert list(init_notes(model)) == [ENC_Q1] and "no input Gram matrix" in init_notes(model)[ENC_Q1]


# ---------------------------------------------------------------------------------------------
# Ranks from a parameter budget


def truncation_error(layers, ranks) -> float:
    """Σ over layers of the discarded σ²/Σσ²."""
    return sum((s[ranks[name]:].square().sum() / s.square().sum()).item() for name, (_, _, s) in layers.items())


@pytest.mark.parametrize("ratio", [0.55, 0.7, 0.85])
def test_budget_is_met_closely_and_every_bound_respected(make_tiny_marian, ratio):
    teacher = make_tiny_marian()
    names = default_targets(teacher)
    ranks = ranks_for_ratio(teacher, names, ratio)
    student, _ = decomposition.build_student(teacher, names, ranks)
    total, kept = count_parameters(teacher), count_parameters(student)
    widest = max(sum(teacher.get_submodule(n).weight.shape) for n in names)  # n + d: one more rank's cost
    assert ratio * total - widest < kept <= ratio * total
    for name, rank in ranks.items():
        assert 1 <= rank <= max_saving_rank(*teacher.get_submodule(name).weight.shape), name
    assert len(set(ranks.values())) > 1  # really allocated, not one rank for all


def test_slowly_decaying_spectrum_gets_more_rank():
    i = torch.arange(16, dtype=torch.float64)
    layers = {"fast": (16, 16, spectrum_errors(0.3 ** i)), "slow": (16, 16, spectrum_errors(0.9 ** i))}
    ranks = allocate_ranks(layers, budget=8 * 32)
    assert ranks == {"fast": 2, "slow": 6}  # gains per unit: fast .082, .007…; slow .154, .125, .101, .082, .066…


def test_greedy_allocation_is_optimal_for_equal_layer_shapes():
    g = torch.Generator().manual_seed(0)
    layers = {f"l{k}": (16, 16, torch.rand(16, generator=g, dtype=torch.float64).sort(descending=True).values
                        ** (k + 1)) for k in range(3)}
    curves = {name: (n, d, spectrum_errors(s)) for name, (n, d, s) in layers.items()}
    bound = max_saving_rank(16, 16)
    for units in range(3, 3 * bound + 1):
        ranks = allocate_ranks(curves, budget=units * 32)
        best = min(truncation_error(layers, dict(zip(layers, r)))
                   for r in itertools.product(range(1, bound + 1), repeat=3) if sum(r) <= units)
        assert truncation_error(layers, ranks) == pytest.approx(best, rel=1e-12, abs=1e-15), units


def test_budget_below_rank_one_everywhere_is_refused():
    with pytest.raises(DecompositionError, match="below rank 1 everywhere"):
        allocate_ranks({"a": (16, 16, spectrum_errors(torch.ones(16))), "b": (16, 16, spectrum_errors(torch.ones(16)))},
                       budget=63)


@pytest.mark.parametrize("ratio", [0.05, 0.99])
def test_unreachable_ratio_names_the_achievable_range(make_tiny_marian, ratio):
    teacher = make_tiny_marian()
    names = default_targets(teacher)
    with pytest.raises(DecompositionError) as caught:
        ranks_for_ratio(teacher, names, ratio)
    message = str(caught.value)
    assert "\n" not in message and f"target_ratio {ratio} is out of reach" in message
    low, high = (float(x) for x in message.split("choose target_ratio in [")[1].split("]")[0].split(", "))
    assert 0 < low < high < 1
    for edge, expected in ((low, {1}), (high, None)):  # the range it names is reachable, end to end
        ranks = ranks_for_ratio(teacher, names, edge)
        student, _ = decomposition.build_student(teacher, names, ranks)
        assert count_parameters(student) <= edge * count_parameters(teacher)
        if expected:
            assert set(ranks.values()) == expected


def test_activation_aware_budget_uses_the_whitened_spectrum(make_tiny_marian):
    """Two layers with the same weight; one only ever sees inputs in a 2-d subspace, so after
    whitening its spectrum collapses and the budget goes to the other."""
    teacher = make_tiny_marian()
    a, b = "model.encoder.layers.0.self_attn.q_proj", "model.encoder.layers.0.self_attn.k_proj"
    with torch.no_grad():
        teacher.get_submodule(b).weight.copy_(teacher.get_submodule(a).weight)
    x = torch.randn(200, 16, dtype=torch.float64)
    narrow = torch.zeros(200, 16, dtype=torch.float64)
    narrow[:, :2] = x[:, :2]
    grams = {a: x.T @ x, b: narrow.T @ narrow}
    total = count_parameters(teacher)
    ratio = (total - 2 * 256 + 8 * 32) / total  # 8 units of rank to share between the two
    plain = ranks_for_ratio(teacher, [a, b], ratio)
    aware = ranks_for_ratio(teacher, [a, b], ratio, input_grams=grams)
    assert plain[a] == plain[b]
    assert aware[b] <= 2 < aware[a]
    assert singular_values(teacher.get_submodule(b).weight, grams[b])[2:].max() < 1e-3


def test_convex_errors_are_non_increasing_convex_and_keep_the_hull_corners():
    measured = {1: 5.0, 4: 1.0, 8: 0.8, 12: 0.9, 16: 0.0}  # 12 above 8: noise, more rank never hurts
    errors = convex_errors(measured, 16)
    assert len(errors) == 17 and errors[0] == errors[1] == 5.0
    assert errors[4] == 1.0 and errors[16] == 0.0
    steps = [a - b for a, b in zip(errors, errors[1:])]
    assert all(s >= 0 for s in steps)  # non-increasing
    assert all(s1 >= s2 - 1e-12 for s1, s2 in zip(steps[1:], steps[2:]))  # gains only shrink: convex
    assert errors[8] <= 0.8 and errors[12] <= 0.8  # the hull lies on or below every measured point


SILENCED_V, LIVE_V = "model.encoder.layers.1.self_attn.v_proj", "model.encoder.layers.0.self_attn.v_proj"


def _silence(teacher):
    """Copy LIVE_V's weight into SILENCED_V and zero the out_proj after it: the same spectrum, but
    SILENCED_V's output never reaches the model's output."""
    with torch.no_grad():
        teacher.get_submodule(SILENCED_V).weight.copy_(teacher.get_submodule(LIVE_V).weight)
        out_proj = teacher.get_submodule("model.encoder.layers.1.self_attn.out_proj")
        out_proj.weight.zero_()
        out_proj.bias.zero_()
    return teacher


def test_sensitivity_sees_what_the_spectrum_cannot_and_leaves_the_model_unchanged(make_tiny_marian, calibration):
    teacher = _silence(make_tiny_marian(init_std=0.3))  # weights large enough for peaked predictions
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    names = [LIVE_V, SILENCED_V, SHARED_MODULE]
    errors = sensitivity_errors(teacher, names, calibration, points=4)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert teacher.lm_head.weight is teacher.model.shared.weight  # the tie survives the in-place trials
    assert set(errors[SILENCED_V]) == {0.0}  # its output is ignored downstream: truncating it changes nothing
    for name in (LIVE_V, SHARED_MODULE):
        curve = errors[name]
        assert len(curve) == max_saving_rank(*teacher.get_submodule(name).weight.shape) + 1
        assert curve[1] > curve[-1] >= 0 and all(a >= b for a, b in zip(curve, curve[1:])), name

    total = count_parameters(teacher)
    ratio = (total - 2 * 256 + 8 * 32) / total  # 8 units of rank to share between the two v_proj
    assert ranks_for_ratio(teacher, names[:2], ratio) == {LIVE_V: 4, SILENCED_V: 4}  # same spectra
    ranks = ranks_for_ratio(teacher, names[:2], ratio, errors=errors)
    assert ranks == {LIVE_V: 7, SILENCED_V: 1}  # the silenced layer gives up its rank


def test_sensitivity_refuses_non_finite_predictions(make_tiny_marian, calibration):
    teacher = make_tiny_marian()
    with torch.no_grad():
        teacher.final_logits_bias[0, 5] = float("-inf")
    with pytest.raises(DecompositionError, match="not all finite.*spectrum"):
        sensitivity_errors(teacher, [LIVE_V], calibration, points=2)


def test_sensitivity_with_activation_init_measures_the_factors_it_will_get(make_tiny_marian, calibration):
    teacher = make_tiny_marian(init_std=0.3)
    grams = gather_input_grams(teacher, [LIVE_V], calibration)
    plain = sensitivity_errors(teacher, [LIVE_V], calibration, points=4)[LIVE_V]
    aware = sensitivity_errors(teacher, [LIVE_V], calibration, points=4, input_grams=grams)[LIVE_V]
    assert aware[1] < plain[1]  # fitted to these very inputs, the whitened rank-1 factors drift less


def test_sensitivity_is_stored_and_read_back_only_for_the_same_model_and_pairs(make_tiny_marian, calibration,
                                                                                tmp_path, monkeypatch):
    teacher = make_tiny_marian(init_std=0.3)
    names = [LIVE_V, SHARED_MODULE]
    errors, read = stored_sensitivity_errors(teacher, names, calibration, tmp_path)
    assert not read and errors == sensitivity_errors(teacher, names, calibration)
    [stored] = tmp_path.glob("sensitivity-*.json")
    assert [p.name for p in tmp_path.iterdir()] == [stored.name]  # no temporary file left

    def measure(*args, **kwargs):
        measure.calls += 1
        return real(*args, **kwargs)
    measure.calls, real = 0, rank_allocation.sensitivity_errors
    monkeypatch.setattr(rank_allocation, "sensitivity_errors", measure)
    assert stored_sensitivity_errors(teacher, names, calibration, tmp_path) == (errors, True)
    assert measure.calls == 0
    stored_sensitivity_errors(teacher, names, calibration[:1], tmp_path)  # other calibration pairs
    stored_sensitivity_errors(teacher, names[:1], calibration, tmp_path)  # other layers
    with torch.no_grad():
        teacher.get_submodule(LIVE_V).weight.mul_(2)  # other weights
    stored_sensitivity_errors(teacher, names, calibration, tmp_path)
    assert measure.calls == 3 and len(list(tmp_path.glob("sensitivity-*.json"))) == 4
    with torch.no_grad():
        teacher.get_submodule(LIVE_V).weight.div_(2)
    stored.write_text('{"cut short')  # unreadable: measured again and rewritten
    assert stored_sensitivity_errors(teacher, names, calibration, tmp_path) == (errors, False)
    assert json.loads(stored.read_text()) == errors


# ---------------------------------------------------------------------------------------------
# The factorized shared embedding

SHARED = "model.shared.weight"
SRC = ["He managed to get there in time.", "The train arrived."]
TGT = ["Es gelang ihm, rechtzeitig dort zu sein.", "Der Zug kam an."]


@pytest.fixture
def factorized(make_tiny_marian):
    """(teacher with a non-zero final_logits_bias, its copy with the shared embedding at rank 6)."""
    teacher = make_tiny_marian()
    teacher.final_logits_bias.normal_(generator=torch.Generator().manual_seed(2))
    student, ranks = decomposition.build_student(teacher, [SHARED], 6)
    assert ranks == {"model.shared": 6}
    return teacher, student


def test_shared_embedding_is_one_set_of_factors_for_inputs_and_output(factorized):
    teacher, student = factorized
    shared = student.model.shared
    assert isinstance(shared, LowRankEmbedding) and shared.rank == 6
    assert student.model.encoder.embed_tokens is shared and student.model.decoder.embed_tokens is shared
    assert student.get_input_embeddings() is shared
    head = student.get_output_embeddings()
    assert head is student.lm_head and isinstance(head, LowRankLinear)
    assert head.up.weight is shared.up.weight and head.down.weight is shared.down.weight  # A (V×r), B (r×d)
    assert shared.up.weight.shape == (300, 6) and shared.down.weight.shape == (6, 16)
    v, d = teacher.model.shared.weight.shape
    assert count_parameters(teacher) - count_parameters(student) == v * d - 6 * (v + d)  # factors counted once
    assert student.config.matrix_decomposition["ranks"] == {"model.shared": 6}


def test_factorized_model_computes_with_the_product_everywhere(factorized, tiny_tokenizer):
    """Same logits as the dense model whose tied embedding is A·B: input embeddings of encoder and
    decoder and the output projection all use the factors, and final_logits_bias is still added."""
    teacher, student = factorized
    dense = teacher
    with torch.no_grad():
        dense.model.shared.weight.copy_(student.model.shared.weight)  # A·B, tied: lm_head too
    batch = tiny_tokenizer(SRC, text_target=TGT, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(student(**batch).logits, dense(**batch).logits, rtol=1e-5, atol=1e-5)
        no_bias = student(**batch).logits - student.final_logits_bias
        student.final_logits_bias.zero_()
        torch.testing.assert_close(student(**batch).logits, no_bias)


def test_tie_weights_keeps_the_factors_tied(factorized, tiny_tokenizer):
    _, student = factorized
    batch = tiny_tokenizer(SRC, text_target=TGT, return_tensors="pt", padding=True)
    with torch.no_grad():
        before = student(**batch).logits
        student.model.shared.down.weight.mul_(1.5)  # one tensor: seen by embedding and output projection
        changed = student(**batch).logits
        student.tie_weights()
        after = student(**batch).logits
    assert not torch.equal(before, changed) and torch.equal(changed, after)
    assert student.lm_head.up.weight is student.model.shared.up.weight
    assert student.lm_head.down.weight is student.model.shared.down.weight
    assert set(student.all_tied_weights_keys) >= {"lm_head.up.weight", "lm_head.down.weight"}


def test_gradients_from_both_uses_reach_the_one_set_of_factors(factorized, tiny_tokenizer):
    _, student = factorized
    batch = tiny_tokenizer(SRC, text_target=TGT, return_tensors="pt", padding=True)
    student.train()
    student(**batch).loss.backward()
    shared = student.model.shared
    assert shared.up.weight.grad is not None and shared.up.weight.grad.abs().sum() > 0
    assert shared.down.weight.grad is not None and shared.down.weight.grad.abs().sum() > 0
    names = {n for n, _ in student.named_parameters()}  # each factor appears once
    assert sum("up.weight" in n and ("shared" in n or "lm_head" in n or "embed_tokens" in n) for n in names) == 1


@pytest.mark.parametrize("load", LOADERS.values(), ids=LOADERS.keys())
def test_save_load_of_a_factorized_embedding_is_identical(make_tiny_marian, tiny_tokenizer, tmp_path, load):
    model = make_tiny_marian()
    decompose_(model, [SHARED, "model.decoder.layers.0.fc1.weight"], {"default": 4, SHARED: 7})
    torch.manual_seed(1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(0.01 * torch.randn_like(tensor))
    save_compressed_model(model, tmp_path / "m", tiny_tokenizer)
    with safe_open(tmp_path / "m" / LOW_RANK_WEIGHTS_NAME, "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    loaded = load(tmp_path / "m")
    assert loaded.config.matrix_decomposition["ranks"] == {"model.shared": 7, "model.decoder.layers.0.fc1": 4}
    assert loaded.lm_head.up.weight is loaded.model.shared.up.weight is loaded.model.encoder.embed_tokens.up.weight
    batch = tiny_tokenizer(SRC, text_target=TGT, return_tensors="pt", padding=True)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    settings = dict(max_new_tokens=12, num_beams=2, do_sample=False)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
        assert torch.equal(loaded.generate(**inputs, **settings), model.generate(**inputs, **settings))
    vocab = [k for k, shape in shapes.items() if shape[0] == 300]  # tensors with a row per token
    assert sorted(shapes[k] for k in vocab) == [(300, 7)]  # A, stored once; no V×d table
    assert sum(shape == (7, 16) for shape in shapes.values()) == 1  # B, stored once


@pytest.mark.parametrize("key, words", [
    ("model.encoder.embed_tokens.weight", ["of type Embedding, not an nn.Linear", "factorized as model.shared.weight"]),
    ("lm_head.weight", ["is tied to 'model.shared.weight'", "list 'model.shared.weight'"]),
    ("model.encoder.embed_positions.weight", ["MarianSinusoidalPositionalEmbedding, not an nn.Linear"]),
])
def test_other_names_of_the_embedding_are_refused_with_a_pointer(make_tiny_marian, key, words):
    with pytest.raises(DecompositionError) as caught:
        decompose_(make_tiny_marian(), [key], 4)
    for word in words:
        assert word in str(caught.value), str(caught.value)


def test_embedding_and_linears_together_reach_half_the_parameters(make_tiny_marian):
    teacher = make_tiny_marian()
    names = ["model.shared", *default_targets(teacher)]
    with pytest.raises(DecompositionError, match="out of reach"):
        ranks_for_ratio(teacher, names[1:], 0.45)  # the linears alone cannot get there
    ranks = ranks_for_ratio(teacher, names, 0.45)
    student, _ = decomposition.build_student(teacher, names, ranks)
    assert 0.44 < count_parameters(student) / count_parameters(teacher) <= 0.45
    assert isinstance(student.model.shared, LowRankEmbedding) and student.model.shared.rank == ranks["model.shared"]


def test_an_embedding_without_its_statistics_gets_plain_svd_and_a_note(make_tiny_marian, calibration):
    teacher = make_tiny_marian()
    linears = default_targets(teacher)
    grams = gather_input_grams(teacher, linears, calibration)  # the linears' only
    student, _ = decomposition.build_student(teacher, [SHARED, *linears], 3, input_grams=grams)
    assert list(init_notes(student)) == ["model.shared"] and "plain SVD" in init_notes(student)["model.shared"]
    plain, _ = decomposition.build_student(teacher, [SHARED], 3)
    torch.testing.assert_close(student.model.shared.weight, plain.model.shared.weight)


def weighted_error(weight, approx, weighting) -> float:
    """‖diag(rows)·(W − Ŵ)·L‖_F with L·Lᵀ = gram, as √trace(D·E·G·Eᵀ·D) (no factor of G)."""
    e = weighting.rows[:, None] * (weight - approx).double()
    return torch.trace(e @ weighting.gram @ e.T).sqrt().item()


def test_weighted_factors_are_optimal_for_the_weighted_error_and_nest():
    weight = random_weight(40, 24)
    x = anisotropic_inputs(200)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    rows = torch.logspace(1, -2, 40, dtype=torch.float64)[order]  # three decades of row weights
    weighting = matrix_decomposition.Weighting(gram=x.T @ x, rows=rows)
    spectrum = torch.linalg.svdvals(rows[:, None] * weight @ torch.linalg.cholesky(x.T @ x))
    torch.testing.assert_close(singular_values(weight, weighting), spectrum)
    up, down, note = low_rank_factors(weight, 12, "exact", weighting)
    assert note is None
    for rank in (3, 7, 12):  # the first r terms are the best rank-r factorization (Eckart–Young on D·W·L)
        best = spectrum[rank:].square().sum().sqrt().item()
        assert weighted_error(weight, up[:, :rank] @ down[:rank], weighting) == pytest.approx(best, rel=1e-8)
        plain_up, plain_down, _ = low_rank_factors(weight, rank, "exact")
        assert weighted_error(weight, plain_up @ plain_down, weighting) > 1.2 * best
    ones = matrix_decomposition.Weighting(rows=torch.ones(40, dtype=torch.float64))  # no weights: the plain SVD
    up, down, _ = low_rank_factors(weight, 5, "exact", ones)
    plain_up, plain_down, _ = low_rank_factors(weight, 5, "exact")
    torch.testing.assert_close(up @ down, plain_up @ plain_down)


@pytest.mark.parametrize("rows, words", [(torch.zeros(40), "finite and positive"), (torch.ones(39), "39 row weights")])
def test_unusable_row_weights_fall_back_to_plain_svd_and_say_so(rows, words):
    weight = random_weight(40, 24)
    up, down, note = low_rank_factors(weight, 5, "exact", matrix_decomposition.Weighting(rows=rows))
    assert words in note and "plain SVD" in note
    plain_up, plain_down, _ = low_rank_factors(weight, 5, "exact")
    torch.testing.assert_close(up @ down, plain_up @ plain_down)


def test_the_embedding_statistics_are_its_token_counts_and_the_tied_heads_inputs(make_tiny_marian, calibration):
    model = make_tiny_marian()
    weighting = gather_input_grams(model, [SHARED_MODULE], calibration)[SHARED_MODULE]
    counts, gram, positions = torch.zeros(model.config.vocab_size, dtype=torch.float64), 0, 0
    with torch.no_grad():  # from the batches and the decoder's last hidden states (what lm_head reads), no hooks
        for b in calibration:
            decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=b["labels"])
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True,
                        decoder_input_ids=decoder_ids)
            src, tgt = b["attention_mask"].bool(), b["labels"] != -100
            for ids in (b["input_ids"][src], decoder_ids[tgt]):  # one table looked up by encoder and decoder
                counts += torch.bincount(ids, minlength=counts.numel()).double()
            h = out.decoder_hidden_states[-1][tgt].double()
            gram, positions = gram + h.T @ h, positions + h.shape[0]
    torch.testing.assert_close(weighting.rows, (counts + counts.mean()).sqrt())
    per_position = gram / positions
    identity = torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(weighting.gram, per_position + per_position.diagonal().mean() * identity)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_embedding_init_fits_the_tokens_the_data_uses(make_tiny_marian, calibration):
    teacher = make_tiny_marian()
    grams = gather_input_grams(teacher, [SHARED_MODULE], calibration)
    aware, _ = decomposition.build_student(teacher, [SHARED], 4, "exact", input_grams=grams)
    plain, _ = decomposition.build_student(teacher, [SHARED], 4, "exact")
    assert init_notes(aware) == {}
    weight, weighting = teacher.model.shared.weight.detach(), grams[SHARED_MODULE]
    errors = {kind: weighted_error(weight, student.model.shared.weight.detach(), weighting)
              for kind, student in (("aware", aware), ("plain", plain))}
    assert errors["aware"] < 0.9 * errors["plain"], errors
    reference = [rank_allocation._real_token_log_probs(teacher, b) for b in calibration]
    drift = {kind: rank_allocation.output_drift(student, calibration, reference)
             for kind, student in (("aware", aware), ("plain", plain))}
    assert drift["aware"] < drift["plain"], drift  # the teacher's predictions move less
    assert aware.lm_head.up.weight is aware.model.shared.up.weight  # still one set of factors


def test_the_embedding_statistics_are_part_of_the_sensitivity_key(make_tiny_marian, calibration):
    model = make_tiny_marian()
    grams = gather_input_grams(model, [SHARED_MODULE], calibration)
    key = rank_allocation.sensitivity_key(model, [SHARED_MODULE], calibration, input_grams=grams)
    weighting = grams[SHARED_MODULE]
    other = {SHARED_MODULE: matrix_decomposition.Weighting(gram=weighting.gram, rows=weighting.rows.flip(0))}
    assert rank_allocation.sensitivity_key(model, [SHARED_MODULE], calibration, input_grams=other) != key
    assert rank_allocation.sensitivity_key(model, [SHARED_MODULE], calibration, input_grams=grams) == key


def test_distilling_with_a_factorized_embedding(factorized, tiny_tokenizer, calibration):
    teacher, student = factorized
    ranks = {"model.shared": 6}
    assert decomposition.resolve_feature_layers(teacher, [], ranks) == []  # embeddings are no feature layer
    with pytest.raises(DecompositionError, match="'model.shared' is an embedding"):
        decomposition.resolve_feature_layers(teacher, ["model.shared"], ranks)
    pairs = Dataset.from_dict({k: [row for b in calibration for row in _unpad(b, k)]
                               for k in ("input_ids", "attention_mask", "labels")})
    before = student.model.shared.down.weight.detach().clone()
    settings = distillation_settings(max_steps=3, batch_size=8, learning_rate=1e-2, loss_weights={"ce": 1.0, "kd": 1.0})
    decomposition.distill(teacher, student, tiny_tokenizer, pairs, None, settings, [])
    assert not torch.equal(before, student.model.shared.down.weight)
    assert student.lm_head.down.weight is student.model.shared.down.weight  # still one tensor after training


def _unpad(batch, key):
    keep = batch["attention_mask"].bool() if key != "labels" else batch["labels"] != -100
    return [row[mask].tolist() for row, mask in zip(batch[key], keep)]


# ---------------------------------------------------------------------------------------------
# Sequence-level distillation: the teacher's translations, generated once


@pytest.fixture
def counted_generate(monkeypatch):
    """Counts the sentences passed to any model's generate()."""
    from transformers import GenerationMixin

    real, counts = GenerationMixin.generate, []

    def generate(self, *args, **kwargs):
        counts.append(len(kwargs.get("input_ids", args[0] if args else None)))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    return counts


def test_teacher_translations_are_cached_and_reused(make_tiny_marian, tiny_tokenizer, tiny_pairs, tmp_path,
                                                    counted_generate):
    teacher, sources = make_tiny_marian(), [s for s, _ in tiny_pairs[:10]]
    settings = dict(num_beams=1, max_new_tokens=6, batch_size=4)
    first, path, reused = sequence_level_kd.teacher_translations(teacher, tiny_tokenizer, sources, tmp_path, "t",
                                                             **settings)
    assert not reused and sum(counted_generate) == 10
    assert first == translate.translate(teacher, tiny_tokenizer, sources, num_beams=1, max_new_tokens=6)
    assert [json.loads(line) for line in path.read_text().splitlines()] == \
        [{"source": s, "target": t} for s, t in zip(sources, first)]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    counted_generate.clear()
    again, path_again, reused = sequence_level_kd.teacher_translations(teacher, tiny_tokenizer, sources, tmp_path, "t",
                                                                   **{**settings, "batch_size": 3})
    assert reused and again == first and path_again == path and counted_generate == []

    # anything that changes the translations gets its own cache entry
    for changed in [dict(sources=sources[:9]), dict(teacher_path="other"), dict(num_beams=2),
                    dict(teacher=make_tiny_marian(d_model=8))]:
        args = {"teacher": teacher, "sources": sources, "teacher_path": "t", **settings, **changed}
        counted_generate.clear()
        _, other, reused = sequence_level_kd.teacher_translations(args.pop("teacher"), tiny_tokenizer, args.pop("sources"),
                                                              tmp_path, args.pop("teacher_path"), **args)
        assert not reused and other != path and sum(counted_generate) == len(changed.get("sources", sources))


def test_a_damaged_cache_is_regenerated(make_tiny_marian, tiny_tokenizer, tiny_pairs, tmp_path, counted_generate):
    teacher, sources = make_tiny_marian(), [s for s, _ in tiny_pairs[:4]]
    first, path, _ = sequence_level_kd.teacher_translations(teacher, tiny_tokenizer, sources, tmp_path, "t",
                                                        max_new_tokens=6)
    path.write_text(path.read_text()[:-10])  # cut off mid-line
    again, _, reused = sequence_level_kd.teacher_translations(teacher, tiny_tokenizer, sources, tmp_path, "t",
                                                          max_new_tokens=6)
    assert not reused and again == first and len(path.read_text().splitlines()) == 4


def test_a_cache_with_unicode_line_separators_is_reused(make_tiny_marian, tiny_tokenizer, tmp_path,
                                                       counted_generate):
    teacher = make_tiny_marian()
    sources = ["one\u2028two", "three\u2029four", "five\x85six", "plain"]
    first, path, reused = sequence_level_kd.teacher_translations(teacher, tiny_tokenizer, sources, tmp_path, "t",
                                                             max_new_tokens=6)
    counted_generate.clear()
    again, _, reused = sequence_level_kd.teacher_translations(teacher, tiny_tokenizer, sources, tmp_path, "t",
                                                          max_new_tokens=6)
    assert reused and again == first and counted_generate == []


def test_teacher_translations_are_sharded_across_processes(make_tiny_marian, tiny_tokenizer, tiny_pairs, tmp_path,
                                                          counted_generate, monkeypatch):
    """Process 1 of 2 translates only its share, gets the others' from gather_object and writes no cache."""
    teacher, sources = make_tiny_marian(), [s for s, _ in tiny_pairs[:5]]
    monkeypatch.setattr(sequence_level_kd, "PartialState", lambda: types.SimpleNamespace(
        num_processes=2, process_index=1, is_main_process=False))
    from_rank0 = [(i, f"rank0-{i}") for i in (0, 2, 4)]
    monkeypatch.setattr(sequence_level_kd, "gather_object", lambda obj: obj * 2 if obj == [False] else from_rank0 + obj)
    targets, path, reused = sequence_level_kd.teacher_translations(teacher, tiny_tokenizer, sources, tmp_path, "t",
                                                               max_new_tokens=6)
    assert not reused and sum(counted_generate) == 2  # its share only
    mine = translate.translate(teacher, tiny_tokenizer, [sources[1], sources[3]], max_new_tokens=6)
    assert targets == ["rank0-0", mine[0], "rank0-2", mine[1], "rank0-4"] and not path.exists()


# ---------------------------------------------------------------------------------------------
# int8 inference


@pytest.fixture
def int8_pair(make_tiny_marian):
    """(float student with every layer linear and the shared embedding factorized, its int8 copy)."""
    model = make_tiny_marian()
    decompose_(model, [SHARED, *default_targets(model)], 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecation warnings of torch.ao.quantization stay inside
        return model, quantize_int8(model)


def test_int8_student_has_quantized_linears_and_generates(int8_pair, tiny_tokenizer):
    model, int8 = int8_pair
    float_linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    quantized = {n for n, m in int8.named_modules() if isinstance(m, DynamicQuantizedLinear)}
    assert quantized == float_linears - {"model.shared.down"} and len(quantized) == 2 * 32 + 2  # + lm_head's factors
    assert not any(type(m) is nn.Linear for n, m in int8.named_modules() if n != "model.shared.down")
    assert type(int8.model.shared.down) is nn.Linear  # B is used as a matrix, not called: kept float
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n in float_linears)  # original untouched
    batch = tiny_tokenizer(SRC, return_tensors="pt", padding=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        generated = int8.generate(**batch, max_new_tokens=8, num_beams=2)
        logits = int8(**batch, decoder_input_ids=generated).logits
        reference = model(**batch, decoder_input_ids=generated).logits
    assert generated.shape[0] == 2 and generated.shape[1] > 1 and torch.isfinite(logits).all()
    assert torch.corrcoef(torch.stack([logits.flatten(), reference.flatten()]))[0, 1] > 0.99  # close to float
    assert size_mb(int8) < 0.8 * size_mb(model)


def test_load_compressed_model_as_int8(int8_pair, tiny_tokenizer, tmp_path):
    model, _ = int8_pair
    save_compressed_model(model, tmp_path / "m", tiny_tokenizer)
    assert {p.suffix for p in (tmp_path / "m").iterdir()} & {".bin", ".pt", ".pkl"} == set()
    with safe_open(tmp_path / "m" / LOW_RANK_WEIGHTS_NAME, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # saved weights stay float32
    loaded = load_compressed_model(tmp_path / "m", quantize="int8")
    assert isinstance(loaded.model.encoder.layers[0].fc1.up, DynamicQuantizedLinear)
    batch = tiny_tokenizer(SRC, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = quantize_int8(model).generate(**batch, max_new_tokens=8)
        assert torch.equal(loaded.generate(**batch, max_new_tokens=8), expected)
    with pytest.raises(DecompositionError, match="quantize: 'int4' is not one of None, 'int8'"):
        load_compressed_model(tmp_path / "m", quantize="int4")
    with pytest.raises(DecompositionError, match=r"quantize='int8' needs float32 weights, got dtype=torch.float16"):
        load_compressed_model(tmp_path / "m", dtype=torch.float16, quantize="int8")


# ---------------------------------------------------------------------------------------------
# The CLI


@pytest.fixture
def run_dir(tmp_path, tiny_teacher_dir, tiny_pairs):
    return make_run_dir(tmp_path, tiny_teacher_dir, tiny_pairs[:64], tiny_pairs[300:316], k_info=4, batch_size=16,
                        max_steps=2, max_new_tokens=8, checkpoint_steps=0, calibration_samples=16)


def _run_with_init(run_dir, monkeypatch, init: str, gatherer: str):
    """The CLI with ``init`` on 32 calibration pairs: (its report, the pairs ``decomposition.<gatherer>`` was
    called with per call, what each factorized layer's ``low_rank_factors`` was given)."""
    monkeypatch.chdir(run_dir)
    edit_config(run_dir, init=init, calibration_samples=32)
    seen = []
    real = getattr(decomposition, gatherer)
    monkeypatch.setattr(decomposition, gatherer,
                        lambda model, names, batches: seen.append(sum(len(b["input_ids"]) for b in batches))
                        or real(model, names, batches))
    given = []  # per factorized layer: the Gram matrix or Weighting it was given
    real_factors = matrix_decomposition.low_rank_factors
    monkeypatch.setattr(matrix_decomposition, "low_rank_factors", lambda weight, rank, svd="auto", input_gram=None:
                        given.append(input_gram) or real_factors(weight, rank, svd, input_gram))
    assert compress_model.main(["--config", "config.json"]) == 0
    return json.loads((run_dir / "out" / "report.json").read_text()), seen, given


def test_cli_activation_init(run_dir, monkeypatch, capsys):
    report, seen, grams = _run_with_init(run_dir, monkeypatch, "activation", "gather_input_grams")
    assert report["init"] == "activation" and report["init_notes"] == {} and seen == [32]
    assert len(grams) == len(report["ranks"]) == 32
    assert all(g is not None and g.shape[0] == g.shape[1] and g.abs().sum() > 0 for g in grams)
    assert "(activation init)" in capsys.readouterr().out


def test_cli_fisher_init(run_dir, monkeypatch, capsys):
    """init "fisher" gathers the grams and the Fisher rows on the same calibration pairs and hands every
    factorized linear a Weighting with both."""
    report, seen, given = _run_with_init(run_dir, monkeypatch, "fisher", "gather_fisher_rows")
    assert report["init"] == "fisher" and report["init_notes"] == {} and seen == [32]
    assert len(given) == len(report["ranks"]) == 32
    assert all(isinstance(w, matrix_decomposition.Weighting) and w.gram is not None and w.rows is not None
               for w in given)
    assert "(fisher init)" in capsys.readouterr().out


@pytest.mark.parametrize("allocation", ["sensitivity", "spectrum"])
def test_cli_target_ratio(run_dir, monkeypatch, capsys, allocation):
    monkeypatch.chdir(run_dir)
    edit_config(run_dir, drop=["k_info"], target_ratio=0.6, rank_allocation=allocation)
    assert compress_model.main(["--config", "config.json"]) == 0
    report = json.loads((run_dir / "out" / "report.json").read_text())
    assert 0.55 < report["compression_ratio"] <= 0.6 and report["target_ratio"] == 0.6
    assert report["rank_allocation"] == allocation
    assert len(report["ranks"]) == 32 and len(set(report["ranks"].values())) > 1
    out = capsys.readouterr().out
    assert "target 60%" in out
    assert ("rank sensitivity of 32 layers measured" in out) == (allocation == "sensitivity")


def test_resume_reuses_the_allocated_ranks(run_dir, monkeypatch, capsys):
    monkeypatch.chdir(run_dir)
    edit_config(run_dir, drop=["k_info"], target_ratio=0.6, checkpoint_steps=2, max_steps=6)
    real_step, calls = Distiller._loss_step, {"n": 0}

    def poisoned(self, *args):  # stop the run after its first checkpoint
        loss, terms = real_step(self, *args)
        calls["n"] += 1
        return (loss * float("nan"), terms) if calls["n"] == 4 else (loss, terms)

    monkeypatch.setattr(Distiller, "_loss_step", poisoned)
    assert compress_model.main(["--config", "config.json"]) == 1
    saved = json.loads((run_dir / "out-checkpoints" / "run.json").read_text())["ranks"]
    monkeypatch.setattr(Distiller, "_loss_step", real_step)

    def measured_again(*args, **kwargs):
        raise AssertionError("the sensitivity was measured (or read from the cache) again on resume")

    monkeypatch.setattr(decomposition, "stored_sensitivity_errors", measured_again)
    capsys.readouterr()
    assert compress_model.main(["--config", "config.json", "--resume"]) == 0
    assert "reused from the interrupted run" in capsys.readouterr().out
    assert json.loads((run_dir / "out" / "report.json").read_text())["ranks"] == saved


def test_cli_embedding_and_linears_to_half_the_teacher(run_dir, monkeypatch, make_tiny_marian, tiny_tokenizer):
    monkeypatch.chdir(run_dir)
    layers = [SHARED] + [f"{name}.weight" for name in default_targets(make_tiny_marian())]
    edit_config(run_dir, drop=["k_info"], decompose_layers=layers, target_ratio=0.5, init="activation")
    assert compress_model.main(["--config", "config.json"]) == 0
    report = json.loads((run_dir / "out" / "report.json").read_text())
    assert 0.49 < report["compression_ratio"] <= 0.5 and "model.shared" in report["ranks"]
    assert report["init_notes"] == {}  # the embedding too gets its activation-aware init (token counts, tied head)
    loaded = load_compressed_model(run_dir / "out")
    assert isinstance(loaded.model.shared, LowRankEmbedding)
    assert loaded.lm_head.up.weight is loaded.model.shared.up.weight
    assert count_parameters(loaded) == report["student"]["params"]
    sources, references = zip(*read_pairs(run_dir / "eval.csv"))
    scores = evaluate_translation(loaded, tiny_tokenizer, sources, references, max_new_tokens=8)
    assert (scores["bleu"], scores["chrf"]) == (report["student"]["bleu"], report["student"]["chrf"])


def test_cli_sequence_level_kd_trains_on_cached_teacher_translations(run_dir, monkeypatch, capsys, tiny_tokenizer):
    monkeypatch.chdir(run_dir)
    edit_config(run_dir, sequence_level_kd=True, overwrite_output=True)
    train_pairs = read_pairs(run_dir / "train.csv")
    train_inputs = tiny_tokenizer([s for s, _ in train_pairs], truncation=True, max_length=128)["input_ids"]
    calls, seen_targets = [], []
    real_translate, real_preprocessor = translate.translate_ids, compress_model.data_preprocessor
    monkeypatch.setattr(translate, "translate_ids", lambda translator, sources, *args, **kw:
                        calls.append(list(sources)) or real_translate(translator, sources, *args, **kw))
    monkeypatch.setattr(compress_model, "data_preprocessor", lambda batch, tokenizer, config:
                        seen_targets.append(list(batch["target_text"])) or real_preprocessor(batch, tokenizer, config))
    outputs = []
    for _ in range(2):
        calls.clear()
        seen_targets.clear()
        assert compress_model.main(["--config", "config.json"]) == 0
        outputs.append((sum(c == train_inputs for c in calls), capsys.readouterr().out, list(seen_targets)))
    (first_calls, first_out, first_targets), (second_calls, second_out, second_targets) = outputs
    assert first_calls == 1 and second_calls == 0  # generated once, then reused
    assert "cached in" in first_out and "reused from" in second_out
    cache = [json.loads(line) for f in (run_dir / "out-cache").iterdir() for line in f.read_text().splitlines()]
    assert [row["source"] for row in cache] == train_inputs  # the preprocessed inputs
    teacher_targets = [row["target"] for row in cache]
    assert first_targets[-1] == second_targets[-1] == teacher_targets  # trained on them, not the references
    assert teacher_targets != [t for _, t in train_pairs]
    assert json.loads((run_dir / "out" / "report.json").read_text())["sequence_level_kd"] is True


def test_cli_evaluation_and_sequence_level_kd_translate_the_preprocessed_inputs_and_int8_adds_a_row(
        run_dir, monkeypatch, capsys, tiny_tokenizer):
    """A preprocessor that rewrites every source (as a language tag would) changes what is translated;
    quantize_int8 adds the row of the student with int8 linears, and saves the float32 student."""
    monkeypatch.chdir(run_dir)
    edit_config(run_dir, sequence_level_kd=True, quantize_int8=True)
    real_translate, real_preprocessor = translate.translate_ids, compress_model.data_preprocessor
    calls = []
    monkeypatch.setattr(translate, "translate_ids", lambda translator, sources, *args, **kw:
                        calls.append(list(sources)) or real_translate(translator, sources, *args, **kw))
    monkeypatch.setattr(compress_model, "data_preprocessor", lambda batch, tokenizer, config: real_preprocessor(
        {**batch, "source_text": ["the same sentence"] * len(batch["source_text"])}, tokenizer, config))
    assert compress_model.main(["--config", "config.json"]) == 0
    expected = tiny_tokenizer("the same sentence")["input_ids"]
    # seq-KD targets (64 train pairs), teacher, decomposed, student, int8 (16 eval pairs each)
    assert [len(c) for c in calls] == [64, 16, 16, 16, 16]
    assert all(source == expected for call in calls for source in call)

    report = json.loads((run_dir / "out" / "report.json").read_text())
    row = report["student_int8"]
    assert set(row) == {"params", "bleu", "chrf", "size_mb", "translate_seconds"}
    assert row["params"] == report["student"]["params"] and row["size_mb"] < report["student"]["size_mb"]
    assert "student_int8" in capsys.readouterr().out
    loaded = load_compressed_model(run_dir / "out")  # what was saved is the float32 student
    assert not any(isinstance(m, DynamicQuantizedLinear) for m in loaded.modules())


BAD_CONFIGS = [  # (changes, words the one-line message must contain)
    pytest.param({"init": "lora"}, ["init", "'lora'", "svd, activation"], id="init-choice"),
    pytest.param({"init": 1}, ["init", "expected str", "1"], id="init-type"),
    pytest.param({"calibration_samples": 0}, ["calibration_samples", "at least 1", "0"], id="calibration-zero"),
    pytest.param({"calibration_samples": 2.5}, ["calibration_samples", "expected int", "2.5"], id="calibration-type"),
    pytest.param({"rank_allocation": "uniform"}, ["rank_allocation", "'uniform'", "sensitivity, spectrum"],
                 id="allocation-choice"),
    pytest.param({"target_ratio": 0}, ["target_ratio", "above 0 and below 1", "got 0"], id="ratio-zero"),
    pytest.param({"target_ratio": 1.5}, ["target_ratio", "above 0 and below 1", "1.5"], id="ratio-above-one"),
    pytest.param({"target_ratio": "half"}, ["target_ratio", "expected float or list or NoneType", '"half"'], id="ratio-type"),
    pytest.param({"target_ratio": 0.6}, ["k_info: 4 is ignored when target_ratio is set", "remove one of them"],
                 id="ratio-and-k-info"),
    pytest.param({"target_ratio": 0.6, "k_info": {"model.encoder.layers.0.fc1.weight": 4}},
                 ["k_info: {", "is ignored when target_ratio is set"], id="ratio-and-k-info-mapping"),
    pytest.param({"target_ratio": 0.6, "k_info": 32}, ["k_info: 32 is ignored when target_ratio is set"],
                 id="ratio-and-k-info-equal-to-the-default"),
    pytest.param({"target_ratio": 0.1, "k_info": None}, ["target_ratio 0.1 is out of reach", "32 layers",
                                                       "choose target_ratio in"], id="ratio-unreachable"),
    pytest.param({"quantize_int8": 1}, ["quantize_int8", "expected bool", "1"], id="int8-type"),
    pytest.param({"sequence_level_kd": "yes"}, ["sequence_level_kd", "expected bool", '"yes"'], id="seqkd-type"),
    pytest.param({"cache_dir": 3}, ["cache_dir", "expected str or NoneType", "3"], id="cache-dir-type"),
    pytest.param({"sequence_level_kd": True, "cache_dir": "config.json"}, ["cache_dir", "'config.json' is a file"],
                 id="cache-dir-is-file"),
]


@pytest.mark.parametrize("changes, words", BAD_CONFIGS)
def test_bad_new_keys_are_one_line_errors(run_dir, monkeypatch, capsys, changes, words):
    monkeypatch.chdir(run_dir)
    edit_config(run_dir, **changes)
    assert compress_model.main(["--config", "config.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("compress_model.py: error: "), err
    for word in words:
        assert word in err, (word, err)
    assert not (run_dir / "out").exists()


def test_k_info_defaults_to_32_unless_target_ratio_allocates_the_ranks(tmp_path):
    assert compress_model.Config().k_info == 32 and compress_model.Config(target_ratio=0.5).k_info is None
    (tmp_path / "c.json").write_text(json.dumps({"target_ratio": 0.5}))
    assert compress_model.load_config(tmp_path / "c.json").k_info is None


def test_new_keys_have_help_and_defaults():
    help_text = config_help()
    for key, default in (("init", '"svd"'), ("calibration_samples", "256"), ("target_ratio", "null"),
                         ("sequence_level_kd", "false"), ("cache_dir", "null"), ("quantize_int8", "false")):
        line = next(line for line in help_text.splitlines() if line.split()[0] == key)
        assert line.endswith(f"({default})"), line
