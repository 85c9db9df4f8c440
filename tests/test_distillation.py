"""The distillation losses (maths, masking, no NaN), the hooks, the gradients of every loss term,
and a short recovery run on tiny MarianMT models."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import distillation_settings, tokenized_pairs
from torch import nn
from transformers import DataCollatorForSeq2Seq

from decomposition import build_student, distill, resolve_feature_layers
from distillation.distillation_loss import (
    IGNORE_INDEX, attention_loss, cross_entropy_loss, feature_loss, mean_feature_loss, output_distillation_loss,
    weighted_sum,
)
from distillation import knowledge_distillation
from distillation.knowledge_distillation import (
    DROPOUT_ATTRIBUTES, LOSS_TERMS, Distiller, LengthGroupedSampler, set_dropout_, token_lengths,
)
from matrix_decomposition import DecompositionError, LowRankLinear, default_targets
from mdcompress.teacher_forcing import capture_outputs, source_positioned

RANK = 4  # truncated: the student differs from the teacher (every tiny layer saves weights up to rank 7)
N_PAIRS = 64


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def tiny_train_set(tiny_pairs, tiny_tokenizer):
    """The first 64 pairs tokenized as ``compress_model`` does (truncated to 16 source, 20 target tokens)."""
    return tokenized_pairs(tiny_pairs, tiny_tokenizer, N_PAIRS, max_source_length=16, max_target_length=20)


@pytest.fixture(scope="module")
def tiny_batch(tiny_train_set, tiny_tokenizer):
    """A padded batch of 8 pairs whose source and target lengths differ (and both have padding)."""
    collator = DataCollatorForSeq2Seq(tiny_tokenizer, label_pad_token_id=IGNORE_INDEX)
    batch = collator([tiny_train_set[i] for i in range(8, 16)])
    assert batch["input_ids"].shape[1] != batch["labels"].shape[1]
    assert not batch["attention_mask"].all() and (batch["labels"] == IGNORE_INDEX).any()
    return batch


def make_distiller(teacher, student, tokenizer, train_set, weights, feature_layers=(), **settings):
    settings = distillation_settings(loss_weights=weights, batch_size=16, **settings)
    return Distiller(teacher, student, tokenizer, train_set, None, settings, list(feature_layers))


def loss_on(distiller: Distiller, batch, real_positions: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``_loss_step`` on one batch with the hooks of ``Distiller.train`` in place (the feature layers'
    outputs and, unless ``real_positions`` is False, the logits of real target positions only)."""
    if real_positions:
        with distiller._hooks() as (teacher_features, student_features):
            return distiller._loss_step(batch, teacher_features, student_features)
    with capture_outputs(distiller.teacher, distiller.feature_layers) as teacher_features, \
            capture_outputs(distiller.unwrapped_student, distiller.feature_layers) as student_features:
        return distiller._loss_step(batch, teacher_features, student_features)


def factor_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``…down.weight`` / ``…up.weight`` of every LowRankLinear."""
    return {f"{name}.{side}.weight": getattr(module, side).weight
            for name, module in model.named_modules() if isinstance(module, LowRankLinear)
            for side in ("down", "up")}


def all_hooks_removed(model: nn.Module) -> bool:
    """No forward hook of ``capture_outputs`` is left (transformers installs lasting hooks of its own the
    first time hidden states or attentions are asked for: those are not ours)."""
    return not any(hook.__module__ == capture_outputs.__module__
                   for module in model.modules() for hook in module._forward_hooks.values())


def random_logits(seed: int, shape=(2, 3, 5)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # (B, T, V)


def random_attention(seed: int, shape=(2, 2, 3, 4)) -> torch.Tensor:
    return random_logits(seed, shape).softmax(dim=-1)  # (B, A, Lq, Lk)


MASK = torch.tensor([[True, True, False], [True, False, False]])  # (B, T): 3 real tokens of 6


# ---------------------------------------------------------------------------------------------
# Losses: zero for identical inputs, positive otherwise


def _kd(a, b, mask):
    return output_distillation_loss(a, b, mask, temperature=2.0)


def _feature(a, b, mask):
    return feature_loss(a, b, mask)


def _mean_feature(a, b, mask):
    return mean_feature_loss([a, a * 2], [b, b * 2], [mask, mask])


def _attention(a, b, mask):
    return attention_loss([a.softmax(-1)[:, None], a.softmax(-1)[:, None]],
                          [b.softmax(-1)[:, None], b.softmax(-1)[:, None]], [mask, mask])


LOSSES = {"kd": _kd, "feature": _feature, "mean_feature": _mean_feature, "attention": _attention}


@pytest.mark.parametrize("name", LOSSES)
def test_loss_is_zero_for_identical_inputs_and_positive_otherwise(name):
    loss = LOSSES[name]
    a, b = random_logits(0), random_logits(1)
    for mask in (MASK, None):
        assert loss(a, a.clone(), mask).item() == 0.0
        assert loss(a, b, mask).item() > 0.0


def test_kd_matches_a_hand_computation():
    student, teacher, t = random_logits(0).double(), random_logits(1).double(), 3.0
    total, count = 0.0, 0
    for i in range(2):
        for j in range(3):
            if not MASK[i, j]:
                continue
            p_t = torch.exp(teacher[i, j] / t) / torch.exp(teacher[i, j] / t).sum()
            p_s = torch.exp(student[i, j] / t) / torch.exp(student[i, j] / t).sum()
            total += sum(p_t[v] * (torch.log(p_t[v]) - torch.log(p_s[v])) for v in range(5)).item()
            count += 1
    expected = t * t * total / count
    got = output_distillation_loss(student, teacher, MASK, temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the arguments are not interchangeable: KL(teacher ‖ student), not KL(student ‖ teacher)
    assert output_distillation_loss(teacher, student, MASK, temperature=t).item() != pytest.approx(expected,
                                                                                                  rel=1e-3)


def test_kd_scales_with_temperature_squared_for_small_differences():
    """For nearby distributions KL ≈ ½·Var/T², so the T² factor keeps the loss about the same size."""
    teacher = random_logits(0, (2, 3, 50))
    student = teacher + 1e-2 * random_logits(1, (2, 3, 50))
    low, high = (output_distillation_loss(student, teacher, None, temperature=t).item() for t in (4.0, 8.0))
    assert high == pytest.approx(low, rel=0.5)
    # without the T² factor the high-temperature loss would be 4× smaller
    assert high / 64 < 0.5 * low / 16


def test_cross_entropy_matches_the_mean_negative_log_likelihood_of_real_tokens():
    logits = random_logits(0).double()  # (B, T, V)
    labels = torch.tensor([[1, 4, IGNORE_INDEX], [0, IGNORE_INDEX, IGNORE_INDEX]])  # (B, T)
    log_p = logits.log_softmax(-1)
    expected = -(log_p[0, 0, 1] + log_p[0, 1, 4] + log_p[1, 0, 0]) / 3
    assert cross_entropy_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert cross_entropy_loss(logits, labels).item() > 0


# ---------------------------------------------------------------------------------------------
# Masking: values at masked positions do not matter; nothing real → exactly 0, not NaN


def _scramble_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with huge different values at the positions where ``mask`` (B, T) is False."""
    y = x.clone()
    y[~mask] = 1e4 * torch.randn_like(y[~mask])
    return y


@pytest.mark.parametrize("name", LOSSES)
def test_masked_positions_do_not_change_the_loss(name):
    loss = LOSSES[name]
    a, b = random_logits(0), random_logits(1)
    reference = loss(a, b, MASK)
    assert loss(_scramble_masked(a, MASK), _scramble_masked(b, MASK), MASK).item() == pytest.approx(
        reference.item(), rel=1e-6)
    assert loss(_scramble_masked(a, MASK), b, None).item() != pytest.approx(reference.item(), rel=1e-3)


def test_cross_entropy_ignores_logits_at_ignored_labels():
    logits = random_logits(0)
    labels = torch.tensor([[1, 4, IGNORE_INDEX], [0, IGNORE_INDEX, IGNORE_INDEX]])
    scrambled = _scramble_masked(logits, labels != IGNORE_INDEX)
    assert cross_entropy_loss(scrambled, labels).item() == pytest.approx(cross_entropy_loss(logits, labels).item())


@pytest.mark.parametrize("name", LOSSES)
def test_everything_masked_gives_exactly_zero_and_finite_gradients(name):
    a, b = random_logits(0).requires_grad_(), random_logits(1)
    loss = LOSSES[name](a, b, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(a.grad).all() and not a.grad.any()


def test_cross_entropy_with_every_label_ignored_is_zero_and_keeps_the_graph():
    logits = random_logits(0).requires_grad_()
    loss = cross_entropy_loss(logits, torch.full((2, 3), IGNORE_INDEX), label_smoothing=0.1)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and not logits.grad.any()


def test_empty_lists_of_activations_give_zero():
    assert mean_feature_loss([], [], []).item() == 0.0
    assert attention_loss([], [], []).item() == 0.0


def test_weighted_sum_skips_terms_weighted_zero():
    terms = {"ce": torch.tensor(2.0), "kd": torch.tensor(3.0), "feature": torch.tensor(float("nan"))}
    assert weighted_sum(terms, {"ce": 1.0, "kd": 0.5, "feature": 0.0}).item() == 3.5
    assert weighted_sum(terms, {"kd": 2.0}).item() == 6.0


# ---------------------------------------------------------------------------------------------
# Hooks


@pytest.mark.parametrize("name, expected", [
    ("model.encoder.layers.0.fc1", True),
    ("model.encoder.layers.1.self_attn.out_proj", True),
    ("model.encoder.layers.0", True),
    ("model.decoder.layers.0.encoder_attn.k_proj", True),
    ("model.decoder.layers.1.encoder_attn.v_proj", True),
    ("model.decoder.layers.0.encoder_attn.q_proj", False),
    ("model.decoder.layers.0.encoder_attn.out_proj", False),
    ("model.decoder.layers.1.self_attn.k_proj", False),
    ("model.decoder.layers.1.fc2", False),
    ("lm_head", False),
])
def test_source_positioned(make_tiny_marian, name, expected):
    assert (name in source_positioned(make_tiny_marian(), [name])) is expected


HOOKED = ["model.encoder.layers.0.fc1", "model.encoder.layers.1", "model.decoder.layers.0.self_attn.q_proj",
          "model.decoder.layers.1.encoder_attn.k_proj", "model.decoder.layers.1.encoder_attn.v_proj",
          "model.decoder.layers.1.fc2"]


def test_capture_outputs_records_both_models_and_removes_its_hooks(make_tiny_marian, tiny_batch):
    teacher = make_tiny_marian()
    student, _ = build_student(teacher, [], RANK)
    inputs = {k: tiny_batch[k] for k in ("input_ids", "attention_mask", "labels")}
    (b, s), t = tiny_batch["input_ids"].shape, tiny_batch["labels"].shape[1]
    with torch.no_grad(), capture_outputs(teacher, HOOKED) as t_out, capture_outputs(student, HOOKED) as s_out:
        teacher(**inputs)
        student(**inputs)
    assert set(t_out) == set(s_out) == set(HOOKED)
    sources = source_positioned(teacher, HOOKED)
    for name in HOOKED:
        module = teacher.get_submodule(name)
        width = module.out_features if isinstance(module, nn.Linear) else teacher.config.d_model
        assert t_out[name].shape == s_out[name].shape == (b, s if name in sources else t, width), name
        # the student is a truncated factorization: its recorded activations really are its own
        assert not torch.allclose(t_out[name], s_out[name]), name
    assert all_hooks_removed(teacher) and all_hooks_removed(student)


def test_capture_outputs_removes_its_hooks_when_the_body_raises(make_tiny_marian, tiny_batch):
    model = make_tiny_marian()
    with pytest.raises(RuntimeError, match="boom"):
        with capture_outputs(model, HOOKED) as outputs:
            assert sum(len(model.get_submodule(n)._forward_hooks) for n in HOOKED) == len(HOOKED)
            assert not all_hooks_removed(model)  # the check below can see them
            model(input_ids=tiny_batch["input_ids"], labels=tiny_batch["labels"])
            assert set(outputs) == set(HOOKED)
            raise RuntimeError("boom")
    assert all_hooks_removed(model)


def test_capture_outputs_removes_the_hooks_already_placed_when_a_name_is_wrong(make_tiny_marian):
    model = make_tiny_marian()
    with pytest.raises(AttributeError):
        with capture_outputs(model, HOOKED[:3] + ["model.encoder.layers.7.fc1"]):
            pass
    assert all_hooks_removed(model)


# ---------------------------------------------------------------------------------------------
# Gradients reach the student's factors through every term; the teacher gets none


def test_a_student_identical_to_the_teacher_has_zero_distillation_terms(make_tiny_marian, tiny_tokenizer,
                                                                         tiny_train_set, tiny_batch):
    teacher = make_tiny_marian()
    student = copy.deepcopy(teacher)
    distiller = make_distiller(teacher, student, tiny_tokenizer, tiny_train_set,
                               dict.fromkeys(LOSS_TERMS, 1.0), default_targets(teacher))
    _, terms = loss_on(distiller, tiny_batch)
    assert set(terms) == set(LOSS_TERMS)
    assert terms["ce"] > 0
    for name in ("kd", "feature", "hidden", "attention"):
        assert terms[name].abs().item() < 1e-10, (name, terms[name])


@pytest.mark.parametrize("term", LOSS_TERMS)
def test_each_term_alone_sends_gradients_to_the_factors_and_none_to_the_teacher(
        term, make_tiny_marian, tiny_tokenizer, tiny_train_set, tiny_batch):
    teacher = make_tiny_marian()
    student, ranks = build_student(teacher, [], RANK)
    feature_layers = resolve_feature_layers(teacher, [], ranks)
    distiller = make_distiller(teacher, student, tiny_tokenizer, tiny_train_set, {term: 1.0}, feature_layers)
    loss, terms = loss_on(distiller, tiny_batch)
    assert loss.item() == pytest.approx(terms[term].item()) and loss.item() > 0  # only this term is weighted
    loss.backward()

    factors = factor_weights(student)
    assert len(factors) == 2 * len(ranks) == 2 * 32  # 2·6 encoder + 2·10 decoder linears, two factors each
    if term == "attention":  # the last layers' values, outputs and feed-forwards shape no attention map
        factors = {k: v for k, v in factors.items() if ".q_proj." in k or ".k_proj." in k}
    no_grad = [name for name, weight in factors.items() if weight.grad is None or not weight.grad.any()]
    assert not no_grad, f"{term}: no gradient reaches {no_grad}"
    assert all(torch.isfinite(w.grad).all() for w in factors.values())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_extra_padding_changes_no_term(make_tiny_marian, tiny_tokenizer, tiny_train_set, tiny_batch):
    """Every term averages over real positions only, with the right mask for each activation."""
    teacher = make_tiny_marian()
    student, ranks = build_student(teacher, [], RANK)
    distiller = make_distiller(teacher, student, tiny_tokenizer, tiny_train_set, dict.fromkeys(LOSS_TERMS, 1.0),
                               resolve_feature_layers(teacher, [], ranks))
    extra = 5
    padded = {"input_ids": nn.functional.pad(tiny_batch["input_ids"], (0, extra), value=tiny_tokenizer.pad_token_id),
              "attention_mask": nn.functional.pad(tiny_batch["attention_mask"], (0, extra), value=0),
              "labels": nn.functional.pad(tiny_batch["labels"], (0, extra), value=IGNORE_INDEX)}
    with torch.no_grad():
        loss, terms = loss_on(distiller, tiny_batch)
        padded_loss, padded_terms = loss_on(distiller, padded)
    for name in LOSS_TERMS:
        assert padded_terms[name].item() == pytest.approx(terms[name].item(), rel=1e-5), name
    assert padded_loss.item() == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("weights, features", [
    pytest.param({"ce": 1.0}, False, id="ce"),
    pytest.param({"ce": 1.0, "kd": 1.0}, False, id="ce+kd"),
    pytest.param({"ce": 1.0, "kd": 1.0, "feature": 1.0}, True, id="paper"),
    pytest.param(dict.fromkeys(LOSS_TERMS, 1.0), True, id="every-term"),
])
def test_logits_of_real_positions_only_give_the_same_loss_and_gradients(
        weights, features, make_tiny_marian, tiny_tokenizer, tiny_train_set, tiny_batch):
    """``train`` projects only the real target positions onto the vocabulary ((1, N, V) logits, both
    models): every term and every gradient is what the full (B, T, V) logits give, with a non-zero
    final_logits_bias and label smoothing too; outside the step the models give (B, T, V) again."""
    teacher = make_tiny_marian()
    with torch.no_grad():
        teacher.final_logits_bias.normal_(generator=torch.Generator().manual_seed(1))
    student, ranks = build_student(teacher, [], RANK)
    feature_layers = resolve_feature_layers(teacher, [], ranks) if features else []
    results, shapes = [], []
    for real in (False, True):
        copy_ = copy.deepcopy(student)
        distiller = make_distiller(teacher, copy_, tiny_tokenizer, tiny_train_set, weights, feature_layers,
                                   label_smoothing=0.1)
        handle = copy_.lm_head.register_forward_hook(lambda _m, _a, out: shapes.append(tuple(out.shape[:2])))
        loss, terms = loss_on(distiller, tiny_batch, real_positions=real)
        handle.remove()
        loss.backward()
        results.append((loss, terms, {n: p.grad for n, p in copy_.named_parameters() if p.grad is not None}))
    real_count = int((tiny_batch["labels"] != IGNORE_INDEX).sum())
    assert shapes == [tuple(tiny_batch["labels"].shape), (1, real_count)]  # the second pass projected real positions
    (loss, terms, grads), (real_loss, real_terms, real_grads) = results
    assert real_loss.item() == pytest.approx(loss.item(), rel=1e-5) and set(real_terms) == set(terms)
    for name in terms:
        assert real_terms[name].item() == pytest.approx(terms[name].item(), rel=1e-5, abs=1e-7), name
    assert set(real_grads) == set(grads) and len(grads) > 2 * len(ranks)
    for name, grad in grads.items():
        torch.testing.assert_close(real_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    logits = student(input_ids=tiny_batch["input_ids"], attention_mask=tiny_batch["attention_mask"],
                     decoder_input_ids=tiny_batch["labels"].clamp(min=0)).logits
    assert logits.shape == (*tiny_batch["labels"].shape, teacher.config.vocab_size)  # the hooks are gone


def test_logits_of_real_positions_only_step_aside_for_a_feature_layer_on_the_output_projection(
        make_tiny_marian, tiny_tokenizer, tiny_train_set, tiny_batch):
    """A feature layer on the projection itself keeps its (B, T, V) output, so nothing is hooked."""
    teacher = make_tiny_marian()
    student, _ = build_student(teacher, [], RANK)
    distiller = make_distiller(teacher, student, tiny_tokenizer, tiny_train_set, {"ce": 1.0, "feature": 1.0},
                               ["lm_head"])
    with distiller._hooks():
        assert distiller.real_positions is None
    with torch.no_grad():
        real_loss, _ = loss_on(distiller, tiny_batch)
        loss, _ = loss_on(distiller, tiny_batch, real_positions=False)
    assert real_loss.item() == pytest.approx(loss.item()) and loss.item() > 0


def test_hidden_term_matches_every_layer_output_captured_by_hooks(make_tiny_marian, tiny_tokenizer,
                                                                   tiny_train_set, tiny_batch):
    teacher = make_tiny_marian()
    student, _ = build_student(teacher, [], RANK)
    distiller = make_distiller(teacher, student, tiny_tokenizer, tiny_train_set, {"hidden": 1.0})
    layers = [f"model.{side}.layers.{i}" for side in ("encoder", "decoder") for i in range(2)]
    source_mask, target_mask = tiny_batch["attention_mask"].bool(), tiny_batch["labels"] != IGNORE_INDEX
    with torch.no_grad(), capture_outputs(teacher, layers) as t_out, capture_outputs(student, layers) as s_out:
        _, terms = distiller._loss_step(tiny_batch, {}, {})
    expected = sum(feature_loss(s_out[n], t_out[n], source_mask if ".encoder." in n else target_mask)
                   for n in layers) / len(layers)
    assert terms["hidden"].item() == pytest.approx(expected.item(), rel=1e-6) and expected > 0


def test_the_teacher_runs_without_autograd(make_tiny_marian, tiny_tokenizer, tiny_train_set, tiny_batch):
    teacher = make_tiny_marian()
    student, ranks = build_student(teacher, [], RANK)
    distiller = make_distiller(teacher, student, tiny_tokenizer, tiny_train_set, {"ce": 1.0, "kd": 1.0})
    grad_enabled = []
    handle = teacher.register_forward_pre_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    try:
        loss, _ = distiller._loss_step(tiny_batch, {}, {})
    finally:
        handle.remove()
    assert grad_enabled == [False] and loss.requires_grad


def test_attention_term_switches_both_models_to_eager_attention(make_tiny_marian, tiny_tokenizer, tiny_train_set):
    teacher = make_tiny_marian()
    student, _ = build_student(teacher, [], RANK)
    make_distiller(teacher, student, tiny_tokenizer, tiny_train_set, {"attention": 1.0})
    assert teacher.config._attn_implementation == student.config._attn_implementation == "eager"


def test_length_grouped_sampler_pads_less_and_stays_random():
    lengths = np.random.default_rng(0).integers(2, 60, size=1000)
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=3, mega_batches=8)
    orders = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert sorted(orders[0]) == list(range(1000)) and orders[0] == orders[2] != orders[1]

    def padding(order):
        batches = [lengths[order[i:i + 16]] for i in range(0, len(order), 16)]
        return sum(int(b.max()) * len(b) - int(b.sum()) for b in batches)

    random_order = list(np.random.default_rng(1).permutation(1000))
    assert padding(orders[0]) < 0.2 * padding(random_order)
    longest = [lengths[orders[0][i:i + 16]].max() for i in range(0, 992, 16)]
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)  # batches in random order
    assert len(orders[0][992:]) == 8  # the smaller batch comes last, so every other batch is whole


def test_token_lengths_follow_the_dataset_rows(tiny_train_set):
    picked = tiny_train_set.select([5, 2, 30])
    assert token_lengths(picked).tolist() == [len(r["input_ids"]) + len(r["labels"]) for r in picked]


def test_length_grouped_batches_carry_less_padding(make_tiny_marian, tiny_tokenizer, tiny_train_set):
    teacher = make_tiny_marian()
    student, _ = build_student(teacher, [], RANK)

    def padded_positions(group_by_length: bool) -> int:
        distiller = make_distiller(teacher, student, tiny_tokenizer, tiny_train_set, {"ce": 1.0},
                                   group_by_length=group_by_length)
        batches = list(distiller.train_loader)
        assert sum(len(b["input_ids"]) for b in batches) == len(tiny_train_set)  # every pair once
        return sum(int((b["attention_mask"] == 0).sum() + (b["labels"] == IGNORE_INDEX).sum()) for b in batches)

    assert padded_positions(True) < 0.85 * padded_positions(False)  # most of these pairs fill max_*_length


# ---------------------------------------------------------------------------------------------
# A short recovery run


def test_a_few_steps_reduce_the_distillation_loss_and_leave_the_teacher_untouched(
        make_tiny_marian, tiny_tokenizer, tiny_train_set, tiny_batch):
    # init_std 0.3 instead of 0.02: a teacher with confident outputs, like a trained one (at 0.02 its outputs
    # are near uniform and the distillation terms, ~1e-3, drown in the noise of 30 AdamW steps)
    teacher = make_tiny_marian(init_std=0.3)
    student, ranks = build_student(teacher, [], RANK)
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    weights = {"ce": 1.0, "kd": 1.0, "feature": 1.0, "hidden": 1.0}
    settings = distillation_settings(epoch=100, max_steps=30, batch_size=16, learning_rate=1e-3, warmup_ratio=0.0,
                                     loss_weights=weights)
    feature_layers = resolve_feature_layers(teacher, [], ranks)

    probe = make_distiller(teacher, copy.deepcopy(student), tiny_tokenizer, tiny_train_set, weights, feature_layers)
    with torch.no_grad():
        loss_before, terms_before = loss_on(probe, tiny_batch)

    distiller = distill(teacher, student, tiny_tokenizer, tiny_train_set, None, settings, feature_layers)
    assert distiller.total_steps == 30 and distiller.history[-1]["step"] == 30
    assert not student.training  # train() leaves the student in eval mode, like the probe's copy
    probe.student = student
    with torch.no_grad():
        loss_after, terms_after = loss_on(probe, tiny_batch)

    assert loss_after < 0.8 * loss_before, (terms_before, terms_after)
    for name in weights:
        assert terms_after[name] < terms_before[name], (name, terms_before, terms_after)
    after_teacher = teacher.state_dict()
    assert before_teacher.keys() == after_teacher.keys()
    assert all(torch.equal(before_teacher[k], after_teacher[k]) for k in before_teacher)
    assert all_hooks_removed(teacher) and all_hooks_removed(student)


# ---------------------------------------------------------------------------------------------
# Which layers the feature loss matches


def test_resolve_feature_layers(make_tiny_marian):
    teacher = make_tiny_marian()
    ranks = {"model.encoder.layers.0.fc1": 4, "model.decoder.layers.1.self_attn.q_proj": 4}
    assert resolve_feature_layers(teacher, [], ranks) == list(ranks)
    keys = ["model.decoder.layers.1.fc2.weight", "model.encoder.layers.0", "model.decoder.layers.1.fc2.bias"]
    assert resolve_feature_layers(teacher, keys, ranks) == ["model.decoder.layers.1.fc2", "model.encoder.layers.0"]


@pytest.mark.parametrize("key", ["model.encoder.layers.9.fc1.weight", "decoder.layers.0.fc1", ""])
def test_resolve_feature_layers_rejects_unknown_layers(make_tiny_marian, key):
    with pytest.raises(DecompositionError, match=f"feature_layers: {key!r} is not a layer"):
        resolve_feature_layers(make_tiny_marian(), ["model.encoder.layers.0.fc1", key], {})


def test_a_whole_layer_can_be_a_feature_layer(make_tiny_marian, tiny_tokenizer):
    """Modules returning tuples (attention blocks, whole layers) contribute their first output."""
    model = make_tiny_marian()
    enc = tiny_tokenizer(["A short sentence."], return_tensors="pt")
    names = ["model.encoder.layers.0.self_attn", "model.decoder.layers.1"]
    with capture_outputs(model, names) as outputs:
        model(**enc, decoder_input_ids=enc["input_ids"])
    assert all(isinstance(outputs[n], torch.Tensor) and outputs[n].shape[-1] == 16 for n in names)


def test_kd_closed_form_gradient_matches_autograd():
    torch.manual_seed(0)
    student = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, 11, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.3
    t = 1.7
    loss = output_distillation_loss(student, teacher, mask, temperature=t)
    (fused,) = torch.autograd.grad(loss, student)
    reference_student = student.detach().clone().requires_grad_(True)
    log_p_s = torch.log_softmax(reference_student / t, -1)
    log_p_t = torch.log_softmax(teacher / t, -1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    reference = (kl * mask).sum() / mask.sum() * t * t
    (expected,) = torch.autograd.grad(reference, reference_student)
    assert torch.allclose(loss.double(), reference, atol=1e-6)
    assert torch.allclose(fused, expected, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("layout", ["(B, T, V)", "(1, N, V)"])
def test_cross_entropy_closed_form_gradient_matches_torch(smoothing, layout):
    torch.manual_seed(0)
    logits = (4 * torch.randn(3, 5, 11)).requires_grad_(True)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, 2:] = labels[2, 4] = IGNORE_INDEX
    if layout == "(1, N, V)":  # the logits of real positions only, as the training step computes them
        real = labels != IGNORE_INDEX
        logits = logits.detach()[real].unsqueeze(0).requires_grad_(True)
        labels = labels[real].unsqueeze(0)
    loss = cross_entropy_loss(logits, labels, label_smoothing=smoothing)
    (fused,) = torch.autograd.grad(3.0 * loss, logits)  # an upstream gradient other than 1
    reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                label_smoothing=smoothing)
    (expected,) = torch.autograd.grad(3.0 * reference, logits)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert torch.allclose(fused, expected, atol=1e-7)
    assert not fused[labels == IGNORE_INDEX].any()


def test_cross_entropy_returns_its_gradient_in_the_logits_dtype():
    logits = random_logits(0).to(torch.bfloat16).requires_grad_(True)
    labels = torch.tensor([[1, 4, IGNORE_INDEX], [0, IGNORE_INDEX, IGNORE_INDEX]])
    cross_entropy_loss(logits, labels).backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------
# Training settings: gradient accumulation, the schedule, evaluation steps, mixed precision


def test_gradient_accumulation_steps_once_per_group_and_the_schedule_ends_at_zero(
        make_tiny_marian, tiny_tokenizer, tiny_train_set):
    teacher = make_tiny_marian()
    student, _ = build_student(teacher, [], RANK)
    # 64 pairs in batches of 16: 4 batches an epoch, in groups of 3 (the last group is the epoch's last batch)
    distiller = make_distiller(teacher, student, tiny_tokenizer, tiny_train_set, {"ce": 1.0}, epoch=3,
                               gradient_accumulation_steps=3, warmup_ratio=0.34, learning_rate=1e-3)
    assert distiller.total_steps == 3 * 2
    learning_rates = []
    real_step = distiller.scheduler.step

    def step(*args, **kwargs):
        real_step(*args, **kwargs)
        if distiller.accelerator.sync_gradients:
            learning_rates.append(distiller.scheduler.get_last_lr()[0])

    distiller.scheduler.step = step
    distiller.train()
    parameter = next(p for p in distiller.unwrapped_student.parameters() if p.requires_grad)
    assert distiller.optimizer.state[parameter]["step"] == 6  # not once per batch (12)
    assert distiller.history[-1]["step"] == 6 and distiller.trained["pairs"] == 3 * 64
    # 2 warmup steps to the peak, then linearly down to exactly 0 at the 6th and last optimizer step
    assert learning_rates == pytest.approx([1e-3 * x for x in (0.5, 1.0, 0.75, 0.5, 0.25, 0.0)])


def test_eval_steps_evaluate_every_n_steps_and_at_each_epochs_end(make_tiny_marian, tiny_tokenizer, tiny_train_set):
    teacher = make_tiny_marian()
    student, _ = build_student(teacher, [], RANK)
    settings = distillation_settings(loss_weights={"ce": 1.0}, batch_size=16, epoch=4, eval_steps=5)
    distiller = Distiller(teacher, student, tiny_tokenizer, tiny_train_set, tiny_train_set.select(range(8)),
                          settings, [])
    history = distiller.train()
    # 4 steps an epoch: every 5th step, and the end of each epoch that did not fall on one
    assert [(h["epoch"], h["step"]) for h in history] == [(1, 4), (2, 5), (2, 8), (3, 10), (3, 12), (4, 15), (4, 16)]
    assert all(0 < h["eval_ce"] < 20 for h in history)


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one mixed-precision setting per process; let this test choose its own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_bf16_mixed_precision_computes_in_bf16_and_keeps_float32_weights(
        make_tiny_marian, tiny_tokenizer, tiny_train_set, fresh_accelerator_state):
    teacher = make_tiny_marian()
    student, _ = build_student(teacher, [], RANK)
    layer = next(m for m in student.modules() if isinstance(m, LowRankLinear))
    dtypes = []
    layer.register_forward_hook(lambda _m, _i, output: dtypes.append(output.dtype))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    distiller = make_distiller(teacher, student, tiny_tokenizer, tiny_train_set, {"ce": 1.0, "kd": 1.0},
                               mixed_precision="bf16", max_steps=2)
    distiller.train()
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the student's forward ran under bf16 autocast
    after = distiller.unwrapped_student.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values())  # the weights trained stay float32
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(torch.tensor(v)) for h in distiller.history for k, v in h.items() if k != "epoch")


# ---------------------------------------------------------------------------------------------
# Dropout while recovering


def dropout_values(model: nn.Module) -> set[float]:
    values = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    return values | {getattr(m, name) for m in model.modules() for name in DROPOUT_ATTRIBUTES
                     if isinstance(getattr(m, name, None), float)}


def train_mode_logits(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).logits


@pytest.mark.parametrize("dropout", [None, 0.0, 0.3])
def test_the_dropout_setting_reaches_every_dropout_of_the_student_and_nothing_else(
        make_tiny_marian, tiny_tokenizer, tiny_train_set, tiny_batch, dropout):
    teacher = make_tiny_marian(dropout=0.2, attention_dropout=0.1, activation_dropout=0.05)
    student = build_student(teacher, default_targets(teacher), RANK)[0]
    distiller = make_distiller(teacher, student, tiny_tokenizer, tiny_train_set, {"ce": 1.0}, dropout=dropout)
    trained = distiller.unwrapped_student.train()
    assert dropout_values(trained) == ({0.2, 0.1, 0.05} if dropout is None else {dropout})
    assert dropout_values(distiller.teacher) == {0.2, 0.1, 0.05}  # the teacher keeps its own
    assert (trained.config.dropout, trained.config.attention_dropout) == (0.2, 0.1)  # saved as it was
    torch.manual_seed(0)
    first = train_mode_logits(trained, tiny_batch)
    torch.manual_seed(1)
    second = train_mode_logits(trained, tiny_batch)
    assert torch.equal(first, second) == (dropout == 0.0)  # off: training-mode passes are deterministic


def test_set_dropout_sets_dropout_modules_and_float_attributes():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.dropout, self.activation_dropout, self.attention_dropout = 0.1, 0.2, 0.3
            self.drop, self.size = nn.Dropout(0.4), 7.0

    model = nn.Sequential(Layer(), nn.Dropout(0.5))
    set_dropout_(model, 0.0)
    assert dropout_values(model) == {0.0} and model[0].size == 7.0


def test_more_held_out_points_in_a_long_run_change_no_weight(make_tiny_marian, tiny_tokenizer, tiny_train_set,
                                                            monkeypatch):
    """eval_steps 0 evaluates once per epoch; a long enough run also evaluates every 1/HELD_OUT_POINTS of
    it for the held-out curve, and trains exactly the same weights as without those evaluations."""
    teacher = make_tiny_marian()
    student, _ = build_student(teacher, [], RANK)
    trained = []
    monkeypatch.setattr(knowledge_distillation, "HELD_OUT_MIN_STEPS", 8)
    for points in (0, 4):
        monkeypatch.setattr(knowledge_distillation, "HELD_OUT_POINTS", points)
        settings = distillation_settings(loss_weights={"ce": 1.0}, batch_size=16, epoch=2, dropout=0.1)
        distiller = Distiller(teacher, copy.deepcopy(student), tiny_tokenizer, tiny_train_set,
                              tiny_train_set.select(range(8)), settings, [])
        history = distiller.train()
        assert [h["step"] for h in history] == [4, 8]  # the per-epoch evaluations, as ever
        trained.append((distiller.unwrapped_student.state_dict(), distiller.held_out))
    (without, none), (with_points, points) = trained
    assert none == [] and [p["step"] for p in points] == [2, 4, 6] and all(0 < p["eval_ce"] < 20 for p in points)
    assert without.keys() == with_points.keys() and all(torch.equal(without[k], with_points[k]) for k in without)
