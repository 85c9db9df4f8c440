"""The teacher's top-k logits computed once (distillation/teacher_cache.py) and the kd term that uses them."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DataCollatorForSeq2Seq

import compress_model
from helpers import tokenized_pairs
from decomposition import build_student, distill
from distillation.distillation_loss import IGNORE_INDEX, output_distillation_loss, top_k_distillation_loss
from distillation.knowledge_distillation import DistillationSettings, Distiller
from distillation.teacher_cache import build_teacher_cache
from mdcompress.teacher_forcing import decoder_inputs

K = 8


@pytest.fixture(scope="module")
def train_set(tiny_pairs, tiny_tokenizer):
    return tokenized_pairs(tiny_pairs, tiny_tokenizer, 48, max_source_length=16, max_target_length=20)


@pytest.fixture
def collator(tiny_tokenizer):
    return DataCollatorForSeq2Seq(tiny_tokenizer, label_pad_token_id=IGNORE_INDEX)


def settings_for(cache_dir, **config) -> DistillationSettings:
    config = compress_model.Config(**{"progress": False, "group_by_length": False, **config})
    return DistillationSettings(config, cache_dir=str(cache_dir))


def teacher_logits(teacher, batch):
    with torch.no_grad():
        return teacher.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              decoder_input_ids=decoder_inputs(teacher, batch["labels"])).logits


# ---------------------------------------------------------------------------------------------
# The loss


def top_k_of(teacher: torch.Tensor, k: int, t: float):
    values, ids = teacher.topk(k, dim=-1)
    return ids, values, (teacher / t).logsumexp(dim=-1)


def test_top_k_loss_over_the_whole_vocabulary_is_the_full_kd():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5, 40), 3 * torch.randn(3, 5, 40)
    mask = torch.rand(3, 5) > 0.3
    for t in (1.0, 2.0, 4.0):
        assert top_k_distillation_loss(student, *top_k_of(teacher, 40, t), mask, t).item() == pytest.approx(
            output_distillation_loss(student, teacher, mask, t).item(), rel=1e-4)


def test_top_k_loss_matches_a_hand_computation_with_the_rest_as_one_outcome():
    torch.manual_seed(1)
    student, teacher = torch.randn(1, 1, 6, requires_grad=True), torch.randn(1, 1, 6)
    ids, values, log_norm = top_k_of(teacher, 2, 2.0)
    p_all, q_all = torch.softmax(teacher[0, 0] / 2, dim=-1), torch.softmax(student[0, 0] / 2, dim=-1)
    top = ids[0, 0]
    rest = torch.ones(6, dtype=torch.bool)
    rest[top] = False
    p = torch.cat([p_all[top], p_all[rest].sum()[None]])  # the teacher's 2 tokens, then everything else
    q = torch.cat([q_all[top], q_all[rest].sum()[None]])
    expected = 4 * (p * (p.log() - q.log())).sum()
    loss = top_k_distillation_loss(student, ids, values, log_norm, torch.ones(1, 1, dtype=torch.bool), 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert (student.grad != 0).all() and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_closed_form_gradient_matches_autograd(k):
    torch.manual_seed(3)
    student = torch.randn(2, 3, 40, dtype=torch.float64, requires_grad=True)
    teacher, mask = 3 * torch.randn(2, 3, 40, dtype=torch.float64), torch.rand(2, 3) > 0.3
    ids, values, log_norm = top_k_of(teacher, k, 2.0)
    closed, = torch.autograd.grad(top_k_distillation_loss(student, ids, values, log_norm, mask, 2.0), student)

    scaled = student / 2.0  # the same KL written with autograd-friendly operations
    log_q = scaled.gather(-1, ids) - scaled.logsumexp(-1, keepdim=True)
    log_q_rest = (scaled.scatter(-1, ids, float("-inf")).logsumexp(-1) - scaled.logsumexp(-1)).clamp(min=-27.6)
    log_p = values / 2.0 - log_norm.unsqueeze(-1)
    p_rest = (1 - log_p.exp().sum(-1)).clamp(min=0)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) + p_rest * (p_rest.clamp(min=1e-12).log() - log_q_rest)
    reference, = torch.autograd.grad(4 * (kl * mask).sum() / mask.sum(), student)
    torch.testing.assert_close(closed, reference, atol=1e-6, rtol=1e-5)


def test_top_k_loss_is_zero_for_the_teacher_itself_and_positive_otherwise():
    torch.manual_seed(2)
    teacher = 3 * torch.randn(2, 4, 30)
    mask = torch.ones(2, 4, dtype=torch.bool)
    for k in (1, 4, 30):
        assert abs(top_k_distillation_loss(teacher, *top_k_of(teacher, k, 2.0), mask, 2.0).item()) < 1e-5
        assert top_k_distillation_loss(torch.randn(2, 4, 30), *top_k_of(teacher, k, 2.0), mask, 2.0).item() > 0.01


def test_top_k_loss_with_everything_masked_is_zero():
    ids = torch.zeros(2, 3, 4, dtype=torch.long)
    loss = top_k_distillation_loss(torch.randn(2, 3, 10), ids, torch.randn(2, 3, 4), torch.zeros(2, 3),
                                   torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0


# ---------------------------------------------------------------------------------------------
# The cache


def test_the_cache_holds_the_teachers_top_k_at_every_real_target_position(make_tiny_marian, train_set, collator,
                                                                          tmp_path):
    teacher = make_tiny_marian(init_std=0.3)
    cache, reused = build_teacher_cache(teacher, train_set, collator, decoder_inputs, K, 2.0, tmp_path, batch_size=5,
                                        progress=False)
    assert not reused and len(cache) == len(train_set)
    assert cache.ids.shape == (sum(len(x) for x in train_set["labels"]), K)
    rows = torch.tensor([7, 0, 31, 12])
    batch = collator([train_set[int(i)] for i in rows])
    ids, logits, log_norm = cache.lookup(rows, batch["labels"])
    full = teacher_logits(teacher, batch)
    values, expected = full.topk(K, dim=-1)
    real = batch["labels"] != IGNORE_INDEX
    assert torch.equal(ids[real], expected[real])
    torch.testing.assert_close(logits[real], values[real], atol=2e-2, rtol=1e-2)  # stored in float16
    torch.testing.assert_close(log_norm[real], (full / 2.0).logsumexp(dim=-1)[real], atol=1e-4, rtol=1e-5)
    assert (ids[~real] == 0).all() and (log_norm[~real] == 0).all()
    assert [p.name for p in tmp_path.iterdir()] == [cache.folder.name]  # no temporary folder left


def test_the_cache_is_reused_for_the_same_teacher_and_pairs_and_remade_otherwise(make_tiny_marian, train_set,
                                                                                 collator, tmp_path):
    teacher = make_tiny_marian()
    first, _ = build_teacher_cache(teacher, train_set, collator, decoder_inputs, K, 2.0, tmp_path, progress=False)

    def no_forward(*args, **kwargs):
        raise AssertionError("the teacher ran although its outputs were cached")
    same = copy.deepcopy(teacher)
    same.forward = no_forward
    again, reused = build_teacher_cache(same, train_set, collator, decoder_inputs, K, 2.0, tmp_path, progress=False)
    assert reused and again.folder == first.folder

    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        changed.model.decoder.layers[0].fc1.weight[0, 0] += 1.0
    others = [build_teacher_cache(changed, train_set, collator, decoder_inputs, K, 2.0, tmp_path, progress=False),
              build_teacher_cache(teacher, train_set, collator, decoder_inputs, K + 1, 2.0, tmp_path, progress=False),
              build_teacher_cache(teacher, train_set.select(range(40)), collator, decoder_inputs, K, 2.0, tmp_path,
                                  progress=False),
              build_teacher_cache(teacher, train_set, collator, decoder_inputs, K, 1.0, tmp_path, progress=False)]
    assert all(not reused for _, reused in others)
    assert len({first.folder, *(c.folder for c, _ in others)}) == 5


def test_a_half_written_cache_is_never_read(make_tiny_marian, train_set, collator, tmp_path, monkeypatch):
    teacher = make_tiny_marian()
    calls = {"n": 0}
    forward = teacher.forward

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)
    teacher.forward = failing
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(teacher, train_set, collator, decoder_inputs, K, 2.0, tmp_path, batch_size=8, progress=False)
    assert list(tmp_path.iterdir()) == []
    teacher.forward = forward
    cache, reused = build_teacher_cache(teacher, train_set, collator, decoder_inputs, K, 2.0, tmp_path, progress=False)
    assert not reused and len(cache) == len(train_set)


def test_k_outside_the_vocabulary_is_refused(make_tiny_marian, train_set, collator, tmp_path):
    teacher = make_tiny_marian()
    vocab = teacher.config.vocab_size
    for k in (0, vocab + 1):
        with pytest.raises(ValueError, match=rf"kd_top_k: {k} must be between 1 and the vocabulary size \({vocab}\)"):
            build_teacher_cache(teacher, train_set, collator, decoder_inputs, k, 2.0, tmp_path, progress=False)


# ---------------------------------------------------------------------------------------------
# Distilling from the cache


def test_with_the_cache_the_teacher_runs_once_per_pair_and_the_kd_term_uses_its_top_k(
        make_tiny_marian, tiny_tokenizer, train_set, collator, tmp_path):
    teacher = make_tiny_marian(init_std=0.3)
    student, _ = build_student(teacher, [], 4)
    forwards = []
    teacher.register_forward_hook(lambda module, args, kwargs_or_out: forwards.append(1))
    settings = settings_for(tmp_path, loss_weights={"ce": 1.0, "kd": 1.0}, kd_top_k=K, batch_size=8, epoch=2)
    distiller = Distiller(teacher, student, tiny_tokenizer, train_set, None, settings, [])
    built = len(forwards)
    assert built == -(-len(train_set) // 64)  # the cache: one forward pass per batch of 64 pairs

    batch = next(iter(distiller.train_loader))
    assert (batch["labels"] == IGNORE_INDEX).any()  # padded: the step's (1, N, k) lookup has rows to drop
    _, terms = distiller._loss_step(batch, {}, {})
    with distiller._hooks():  # as in train: the logits and the cache's rows of real positions only
        _, real_terms = distiller._loss_step(batch, {}, {})
    assert real_terms["kd"].item() == pytest.approx(terms["kd"].item(), rel=1e-5)
    assert len(forwards) == built  # no teacher forward in the step
    with torch.no_grad():
        logits = distiller.unwrapped_student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                             decoder_input_ids=decoder_inputs(student, batch["labels"])).logits
    expected = top_k_distillation_loss(logits, *top_k_of(teacher_logits(teacher, batch), K, 2.0),
                                       batch["labels"] != IGNORE_INDEX, 2.0)
    assert terms["kd"].item() == pytest.approx(expected.item(), rel=1e-3)

    before = len(forwards)
    distiller.train()
    assert len(forwards) == before  # training ran no teacher forward either
    assert distiller.total_steps == 2 * len(train_set) // 8


def test_the_cache_learns_like_the_full_kd(make_tiny_marian, tiny_tokenizer, train_set, tmp_path):
    teacher = make_tiny_marian(init_std=0.3)
    student, _ = build_student(teacher, [], 4)
    settings = settings_for(tmp_path, loss_weights={"kd": 1.0}, kd_top_k=K, batch_size=8, epoch=100, max_steps=30,
                            learning_rate=1e-3, warmup_ratio=0.0)
    distiller = distill(teacher, student, tiny_tokenizer, train_set, None, settings, [])
    first, last = distiller.curve[0]["kd"], distiller.curve[-1]["kd"]
    assert last < 0.7 * first, distiller.curve


@pytest.mark.parametrize("term", ["feature", "hidden", "attention"])
def test_terms_that_need_the_teachers_internals_are_refused_with_the_cache(tmp_path, term):
    # one rule, the Config's (in one line on the command line: test_cli): a library user cannot make the
    # settings of such a loop either
    with pytest.raises(ValueError, match=f"kd_top_k: {K} keeps only the teacher's outputs, but the loss_weights "
                                         f"{term} term compares its internal states"):
        settings_for(tmp_path, loss_weights={"ce": 1.0, "kd": 1.0, term: 1.0}, kd_top_k=K)
    assert list(tmp_path.iterdir()) == []


def test_two_runs_writing_the_same_cache_at_once_both_go_on(make_tiny_marian, train_set, collator, tmp_path,
                                                            monkeypatch):
    teacher = make_tiny_marian()
    import distillation.teacher_cache as teacher_cache
    replace = teacher_cache.os.replace

    def the_other_run_finished_first(src, dst):  # it renamed its own copy into place a moment before
        monkeypatch.setattr(teacher_cache.os, "replace", replace)
        other, _ = build_teacher_cache(teacher, train_set, collator, decoder_inputs, K, 2.0, tmp_path / "other",
                                       progress=False)
        replace(other.folder, dst)
        replace(src, dst)  # fails: the folder is there and not empty
    monkeypatch.setattr(teacher_cache.os, "replace", the_other_run_finished_first)
    cache, reused = build_teacher_cache(teacher, train_set, collator, decoder_inputs, K, 2.0, tmp_path / "root",
                                        progress=False)
    assert not reused and len(cache) == len(train_set)
    assert [p.name for p in (tmp_path / "root").iterdir()] == [cache.folder.name]  # ours removed, theirs kept
