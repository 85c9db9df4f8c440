"""The pipeline: copy the teacher (or a separate student model), decompose the chosen layers,
distill, evaluate, save.

``compress_model.py`` calls these stages in order; each is usable on its own from Python.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq

from distillation.distillation_loss import IGNORE_INDEX
from distillation.knowledge_distillation import DistillationSettings, Distiller
from matrix_decomposition import (
    DecompositionError,
    decompose_,
    module_name,
)
from evaluation import evaluate_translation
from rank_allocation import sensitivity_errors
from teacher_forcing import source_positioned, teacher_forced


def build_student(model: nn.Module, decompose_layers: Sequence[str], k_info, svd: str = "auto",
                  input_grams: Mapping[str, torch.Tensor] | None = None):
    """A deep copy of ``model`` (the teacher, or a separate student model) with the chosen layers
    factorized (activation-aware when ``input_grams`` are given, see ``gather_input_grams``);
    returns (student, ranks)."""
    student = copy.deepcopy(model)
    ranks = decompose_(student, decompose_layers, k_info, svd=svd, input_grams=input_grams)
    return student, ranks


def calibration_batches(train_dataset, tokenizer, samples: int, batch_size: int) -> list[dict]:
    """The first ``samples`` tokenized training pairs, padded into batches (labels padded with -100)."""
    subset = train_dataset.select(range(min(samples, len(train_dataset))))
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
    return list(DataLoader(subset, batch_size=batch_size, collate_fn=collator))


@torch.no_grad()
def gather_input_grams(model: nn.Module, names: Sequence[str], batches) -> dict[str, torch.Tensor]:
    """{name: XᵀX} (d×d, float64) of the inputs X each named ``nn.Linear`` of ``model`` receives in
    teacher-forced forward passes over ``batches``, summed over real positions only: source
    positions for the encoder and the cross-attention key/value projections, target positions
    for the rest (``source_positioned``). Forward pre-hooks, removed on exit."""
    grams = {name: torch.zeros(model.get_submodule(name).in_features, model.get_submodule(name).in_features,
                               dtype=torch.float64) for name in names}
    masks: dict[str, torch.Tensor] = {}  # the current batch's {"source": (B, S), "target": (B, T)}
    sources = source_positioned(model, names)

    def hook(_module, args, name):
        x = args[0][masks["source" if name in sources else "target"]]  # (B, L, d) → (N, d)
        grams[name] += (x.T.double() @ x.double()).cpu()  # (d, d)

    handles = [model.get_submodule(name).register_forward_pre_hook(partial(hook, name=name)) for name in names]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            masks.update(source=batch["attention_mask"].bool(), target=batch["labels"] != IGNORE_INDEX)
            teacher_forced(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return grams


def resolve_feature_layers(model: nn.Module, feature_layers: Sequence[str], decomposed: Iterable[str]) -> list[str]:
    """Module names whose outputs are matched by the feature loss; empty means every ``nn.Linear``
    among the ``decomposed`` module names (a factorized embedding is called by both encoder and
    decoder: not one feature)."""
    if not feature_layers:
        return [name for name in decomposed if isinstance(model.get_submodule(name), nn.Linear)]
    modules = dict(model.named_modules())
    names: list[str] = []
    for key in feature_layers:
        name = module_name(key)
        if not name or name not in modules:
            close = difflib.get_close_matches(key, [n for n in modules if n], n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise DecompositionError(f"feature_layers: {key!r} is not a layer of this model{hint}")
        if isinstance(modules[name], nn.Embedding):
            raise DecompositionError(f"feature_layers: {key!r} is an embedding, whose outputs the teacher and a "
                                     f"factorized student produce in different calls; use loss_weights.hidden")
        if name not in names:
            names.append(name)
    return names


def check_same_vocabulary(teacher: nn.Module, teacher_tokenizer, student: nn.Module, student_tokenizer) -> None:
    """Refuse a separate student whose vocabulary is not the teacher's: its output distribution would
    not be over the same tokens, and the teacher's tokenizer prepares the data for both."""
    sizes = student.config.vocab_size, teacher.config.vocab_size
    if sizes[0] != sizes[1]:
        raise DecompositionError(f"student_model_path: the student's vocabulary has {sizes[0]:,} tokens and the "
                                 f"teacher's {sizes[1]:,}; the student must share the teacher's vocabulary")
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise DecompositionError(f"student_model_path: the student's vocabulary has the teacher's size ({sizes[0]:,} "
                                 f"tokens) but other tokens; the student must share the teacher's vocabulary")


def check_student_shapes(teacher: nn.Module, student: nn.Module, loss_weights: Mapping[str, float],
                         feature_layers: Sequence[str]) -> None:
    """Refuse the loss terms that compare a separate student's layers with the teacher's when their
    shapes differ: feature (the same-named ``feature_layers`` must have as many outputs), hidden
    (as many layers, as wide) and attention (as many layers and heads). Output distillation and
    cross-entropy compare vocabulary distributions and work with any student."""
    fix = "output distillation and cross-entropy work with any student"

    def shape(model, *keys):
        return tuple(getattr(model.config, k, None) for k in keys)

    if loss_weights.get("feature"):
        teacher_modules = dict(teacher.named_modules())
        for name in feature_layers:
            theirs = teacher_modules.get(name)
            ours = student.get_submodule(name).out_features
            if getattr(theirs, "out_features", None) != ours:
                found = (f"the teacher has no layer {name!r}" if theirs is None else
                         f"the student's {name} has {ours} outputs and the teacher's {theirs.out_features}")
                raise DecompositionError(f"loss_weights: feature needs teacher and student layers of the same name and "
                                         f"shape, but {found}; set feature to 0 or list matching feature_layers "
                                         f"({fix})")
    checks = {"hidden": ("encoder_layers", "decoder_layers", "d_model"),
              "attention": ("encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads")}
    for term, keys in checks.items():
        if loss_weights.get(term) and shape(teacher, *keys) != shape(student, *keys):
            described = lambda m: ", ".join(f"{k} {v}" for k, v in zip(keys, shape(m, *keys)))  # noqa: E731
            raise DecompositionError(f"loss_weights: {term} needs a student with the teacher's {', '.join(keys)} "
                                     f"(teacher: {described(teacher)}; student: {described(student)}); set {term} "
                                     f"to 0 ({fix})")


def distill(teacher: nn.Module, student: nn.Module, tokenizer, train_dataset, eval_dataset,
            settings: DistillationSettings, feature_layers: Sequence[str]) -> Distiller:
    """Train ``student`` (in place) to imitate ``teacher``; returns the finished ``Distiller``
    (its ``history`` and ``train_seconds`` describe the run)."""
    distiller = Distiller(teacher, student, tokenizer, train_dataset, eval_dataset, settings, list(feature_layers))
    distiller.train()
    return distiller


def set_generation_limit_(model: nn.Module, max_new_tokens: int) -> None:
    """Give ``model``'s generation config a length limit when it has none, so that a plain
    ``model.generate(**batch)`` after loading does not fall back to transformers' ``max_length`` of
    20 tokens and cut longer translations: the run's ``max_new_tokens``. A limit the teacher came
    with (OPUS-MT: ``max_length`` 512) is kept."""
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.max_length is None \
            and generation_config.max_new_tokens is None:
        generation_config.max_new_tokens = max_new_tokens
