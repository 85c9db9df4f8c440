"""The paper's pipeline on a loaded teacher: choose the ranks, factorize, evaluate, distill, evaluate.

``compress_model.run`` loads the teacher (and a separate student model, if any) and the tokenized
pairs, then calls these stages in order:
  decompose        the ranks (``k_info``, or allocated to ``target_ratio`` by ``rank_allocation``) and
                   the factorized student (``matrix_decomposition``), fitted to the weights or, with the
                   activation init, to the layers' inputs on calibration pairs (``calibration``);
  evaluate_before  BLEU and chrF of the teacher and the decomposed student (``evaluation``);
  distill          the recovery (``distillation.knowledge_distillation``);
  result           the recovered student's BLEU and chrF, and the run's report.
Each stage is usable on its own from Python.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from distillation.knowledge_distillation import DistillationSettings, Distiller
from mdcompress.config import Config
from mdcompress.evaluation import evaluate_translation
from matrix_decomposition import (
    DecompositionError,
    LowRankEmbedding,
    LowRankLinear,
    count_parameters,
    describe_ranks,
    factorize_,
    init_notes,
    module_name,
    quantize_int8,
    resolve_ranks,
)
from mdcompress.calibration import calibration_batches, fisher_weighted, gather_fisher_rows, gather_input_grams
from mdcompress.rank_allocation import check_target_ratio, ranks_for_ratio, stored_sensitivity_errors
from mdcompress.sweep import SweepMemory

# ---------------------------------------------------------------------------------------------
# The inputs: a separate student model and the loss terms that compare layers


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

# ---------------------------------------------------------------------------------------------
# Parameters kept as they are during recovery (``freeze``)


def parameter_keys(model: nn.Module, will_factorize: Iterable[str] = ()) -> dict[int, tuple[nn.Parameter, list[str]]]:
    """{id: (parameter, the names it answers to)}: every state-dict name of the parameter (tied ones
    have several: Marian's ``model.shared.weight`` is also each embedding's and ``lm_head.weight``)
    and the name of its module; for a factor of a factorized layer (``x.up.weight``, ``x.down.weight``,
    ``x.up.bias``) also the key and name its layer had before (``x.weight``, ``x.bias``, ``x``), so one
    key names a layer before and after. ``will_factorize`` (module names) adds to a layer not yet
    factorized the names its factors will have."""
    will_factorize = set(will_factorize)
    low_rank = {name for name, m in model.named_modules(remove_duplicate=False)
                if isinstance(m, (LowRankLinear, LowRankEmbedding))}
    found: dict[int, tuple[nn.Parameter, list[tuple[str, str]]]] = {}  # id: (parameter, [(module, leaf)])
    for name, param in model.named_parameters(remove_duplicate=False):
        module, _, leaf = name.rpartition(".")
        found.setdefault(id(param), (param, []))[1].append((module, leaf))
    keys = {}
    for key, (param, places) in found.items():
        names = []
        factorized_later = any(module in will_factorize for module, _ in places)
        for module, leaf in places:
            names += [f"{module}.{leaf}", module]
            layer, _, factor = module.rpartition(".")
            if layer in low_rank and factor in ("up", "down"):
                names += [f"{layer}.{leaf}", layer]
            elif factorized_later:
                names += [f"{module}.up.{leaf}", f"{module}.up"]
                if leaf == "weight":
                    names += [f"{module}.down.weight", f"{module}.down"]
        keys[key] = (param, list(dict.fromkeys(names)))
    return keys


def frozen_parameters(model: nn.Module, patterns: Sequence[str],
                      will_factorize: Iterable[str] = ()) -> list[nn.Parameter]:
    """The trainable parameters of ``model`` that ``freeze`` names: state-dict keys, module names or
    shell-style patterns (``*`` crosses dots) matched against every name of each (``parameter_keys``).
    A pattern that matches nothing, or patterns that leave nothing to train, are an error."""
    if not patterns:
        return []
    keys = [(p, names) for p, names in parameter_keys(model, will_factorize).values() if p.requires_grad]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for _, names in keys for n in names):
            close = difflib.get_close_matches(pattern, [n for _, names in keys for n in names], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f" (they look like {keys[0][1][0]!r})"
            raise DecompositionError(f"freeze: {pattern!r} matches no trainable parameter of this model{hint}")
    frozen = [p for p, names in keys if any(fnmatch.fnmatchcase(n, pat) for n in names for pat in patterns)]
    if len(frozen) == len(keys):
        raise DecompositionError(f"freeze: {json.dumps(list(patterns))} names every trainable parameter of the "
                                 "model; nothing would be trained")
    return frozen


def freeze_(model: nn.Module, patterns: Sequence[str]) -> int:
    """Keep the parameters ``freeze`` names out of training (``requires_grad`` off); return how many
    weights that is."""
    frozen = frozen_parameters(model, patterns)
    for param in frozen:
        param.requires_grad_(False)
    return sum(p.numel() for p in frozen)

# ---------------------------------------------------------------------------------------------
# Choose the ranks, factorize


@dataclass
class Decomposed:
    """The factorized student and how it was made."""

    model: nn.Module
    ranks: dict[str, int]  # {module name: rank}, in model order
    feature_layers: list[str]  # the layers whose outputs the feature loss matches
    notes: dict[str, str]  # {module name: why its activation init fell back to plain SVD}
    seconds: float  # how long choosing the ranks and factorizing took
    cached_seconds: float = 0.0  # of those, the sensitivity measured and kept in cache_dir (a later run reads it)
    frozen_params: int = 0  # weights ``freeze`` keeps as they are during recovery


@dataclass(frozen=True)
class Targets:
    """What the config asks of the model factorized, resolved on it once per run (``check_decomposition``)
    and passed down."""

    layers: list[str]  # the module names factorized, in model order
    ranks: dict[str, int] | None  # {module name: rank} from k_info; None: allocated to target_ratio later
    feature_layers: list[str]  # the layers whose outputs the feature loss matches


def check_decomposition(teacher: nn.Module, base: nn.Module, config: Config) -> Targets:
    """The layers, ranks and feature layers ``config`` names, resolved on ``base``; or a one-line
    DecompositionError for what depends on the config and the models alone: a decompose_layers,
    k_info, feature_layers or freeze key this model does not have, a rank that saves nothing, a
    target_ratio out of reach, loss terms that need layers a separate student has in other shapes.
    Cheap: ``run()`` calls it as soon as the models are loaded, before the pairs are tokenized."""
    budget = config.target_ratio is not None
    ranks = resolve_ranks(base, config.decompose_layers, 1 if budget else config.k_info)
    target_layers = list(ranks)
    if budget:
        check_target_ratio(base, target_layers, config.target_ratio)
    feature_layers = resolve_feature_layers(base, config.feature_layers, target_layers)
    frozen_parameters(base, config.freeze, target_layers)
    if base is not teacher:  # the loss terms that compare layers need layers of the same shapes
        check_student_shapes(teacher, base, config.loss_weights, feature_layers)
    return Targets(target_layers, None if budget else ranks, feature_layers)


def decompose(teacher: nn.Module, base: nn.Module, tokenizer, train_set, config: Config, targets: Targets,
              saved_ranks=None, shared: SweepMemory | None = None, progress: bool = False, say=print,
              cache_dir=None) -> Decomposed:
    """Factorize ``base`` (the teacher, or a separate student model) into the student, as ``config``
    (the run's ``Config``) asks: the ``targets`` (``check_decomposition``), their ranks (``k_info``, or
    allocated to ``target_ratio`` by the ``rank_allocation`` method, measured on ``calibration_samples``
    of the tokenized ``train_set``), the factors (``init``: svd, or activation-aware on the same
    calibration pairs). ``saved_ranks`` are an interrupted run's allocation, reused; ``shared`` is a
    sweep's memory, whose sensitivity curves (``errors``) are measured once; ``cache_dir`` keeps them for
    later runs on the same model, layers and calibration pairs. ``say`` prints progress."""
    started = time.time()
    budget = config.target_ratio is not None
    target_layers = targets.layers

    # calibration: the input statistics of the layers (activation init), their sensitivity (allocation)
    input_grams, errors = None, shared.errors if shared is not None else None  # a sweep measures it once
    cached_seconds = 0.0
    reused = saved_ranks if budget else None  # an allocation is measured once per run
    sensitivity = budget and config.rank_allocation == "sensitivity" and not reused and errors is None
    if config.init in ("activation", "fisher") or sensitivity:
        batches = calibration_batches(train_set, tokenizer, config.calibration_samples, config.batch_size)
    if config.init in ("activation", "fisher"):
        input_grams = gather_input_grams(base, target_layers, batches)
    if config.init == "fisher":
        input_grams = fisher_weighted(input_grams, gather_fisher_rows(base, target_layers, batches))
    if sensitivity:
        measured = time.time()
        errors, stored = stored_sensitivity_errors(base, target_layers, batches, cache_dir, svd=config.svd,
                                                   input_grams=input_grams, progress=progress)
        if stored:
            say(f"rank sensitivity of {len(target_layers)} layers read from {cache_dir} (measured by an earlier run "
                f"on the same model and calibration pairs)", flush=True)
        else:
            measured = time.time() - measured
            say(f"rank sensitivity of {len(target_layers)} layers measured on {len(batches)} calibration batches "
                f"in {measured:.0f} s", flush=True)
            cached_seconds = measured if cache_dir is not None else 0.0
        if shared is not None:
            shared.errors = errors

    # the ranks, then the factorization
    if reused:
        ranks = reused
        say("ranks allocated to target_ratio reused from the interrupted run", flush=True)
    elif budget:
        ranks = ranks_for_ratio(base, target_layers, config.target_ratio, input_grams, errors)
    else:
        ranks = targets.ranks
    student, ranks = factorized_copy(base, {name: ranks[name] for name in target_layers}, config.svd,
                                     input_grams=input_grams)
    notes = init_notes(student)
    for name, note in notes.items():
        say(f"note: {name}: {note}", flush=True)
    base_params, student_params = count_parameters(base), count_parameters(student)
    target = f", target {100 * config.target_ratio:g}%" if budget else ""
    of = "" if base is teacher else " of the student model"
    say(f"{describe_ranks(ranks)} decomposed ({config.init} init); {base_params:,} → {student_params:,} params{of} "
        f"({100 * student_params / base_params:.1f}%{target})", flush=True)
    frozen = freeze_(student, config.freeze)
    if frozen:
        say(f"frozen during recovery: {frozen:,} of the {student_params:,} params ({json.dumps(config.freeze)})",
            flush=True)
    return Decomposed(student, ranks, targets.feature_layers, notes, time.time() - started, cached_seconds, frozen)


def build_student(model: nn.Module, decompose_layers: Sequence[str], k_info, svd: str = "auto",
                  input_grams: Mapping[str, torch.Tensor] | None = None):
    """A deep copy of ``model`` (the teacher, or a separate student model) with the chosen layers
    factorized (activation-aware when ``input_grams`` are given, see ``calibration.gather_input_grams``);
    returns (student, ranks)."""
    return factorized_copy(model, resolve_ranks(model, decompose_layers, k_info), svd, input_grams)


def factorized_copy(model: nn.Module, ranks: Mapping[str, int], svd: str = "auto",
                    input_grams: Mapping[str, torch.Tensor] | None = None):
    """``build_student`` with the layers and ranks already resolved ({module name: rank})."""
    student = copy.deepcopy(model)
    return student, factorize_(student, ranks, svd=svd, input_grams=input_grams)

# ---------------------------------------------------------------------------------------------
# Evaluate, distill, evaluate


def evaluate_before(teacher: nn.Module, base: nn.Module, student: nn.Module, tokenizer, sources, references,
                    generate: Mapping, shared: SweepMemory | None = None) -> dict:
    """The report's rows (``evaluate_translation``) of the teacher, the separate student model (when
    there is one) and the decomposed ``student``, before recovery; ``generate`` holds the settings of
    the translations. A sweep evaluates its teacher once (``shared.teacher``)."""
    models = {"teacher": teacher, "student_base": base, "decomposed": student}
    if base is teacher:
        del models["student_base"]
    report = {}
    for name, model in models.items():
        if name == "teacher" and shared is not None and shared.teacher:
            report[name] = shared.teacher
            continue
        report[name] = evaluate_translation(model, tokenizer, sources, references,
                                            desc=f"BLEU {name.replace('_', ' ')}", **generate)
    if shared is not None:
        shared.teacher = report["teacher"]
    print("BLEU " + ", ".join(f"{name.replace('_', ' ')} {report[name]['bleu']:.2f}" for name in models)
          + " (before recovery)", flush=True)
    return report


def distill(teacher: nn.Module, student: nn.Module, tokenizer, train_dataset, eval_dataset,
            settings: DistillationSettings, feature_layers: Sequence[str]) -> Distiller:
    """Train ``student`` (in place) to imitate ``teacher``; returns the finished ``Distiller``
    (its ``history`` and ``train_seconds`` describe the run)."""
    distiller = Distiller(teacher, student, tokenizer, train_dataset, eval_dataset, settings, list(feature_layers))
    distiller.train()
    return distiller

def result(report: dict, teacher: nn.Module, student: Decomposed, distiller: Distiller, tokenizer, sources,
           references, config: Config, generate: Mapping, train_pairs: int) -> tuple[nn.Module, dict]:
    """(the recovered student, ready to save; the run's report): ``report``'s rows of the models
    before recovery, the student's (and with ``quantize_int8`` its int8 copy's: CPU only, never
    saved), and how the student was made and trained."""
    model = distiller.unwrapped_student
    report["student"] = evaluate_translation(model, tokenizer, sources, references, desc="BLEU student", **generate)
    if config.quantize_int8:
        model = model.cpu()
        report["student_int8"] = {**evaluate_translation(quantize_int8(model), tokenizer, sources, references,
                                                         desc="BLEU student int8", **generate),
                                  "params": report["student"]["params"]}  # the same weights, in int8
    budget = config.target_ratio is not None
    trained = distiller.trained
    report.update({
        "compression_ratio": round(count_parameters(model) / count_parameters(teacher), 4),
        "layers_decomposed": len(student.ranks), "ranks": student.ranks, "target_ratio": config.target_ratio,
        "rank_allocation": config.rank_allocation if budget else None,
        "teacher_model_path": config.teacher_model_path, "student_model_path": config.student_model_path,
        "init": config.init, "init_notes": student.notes, "sequence_level_kd": config.sequence_level_kd,
        "feature_layers": student.feature_layers, "frozen_params": student.frozen_params,
        "train_seconds": round(distiller.train_seconds, 1), "train_pairs": trained["pairs"],
        "kd_top_k": config.kd_top_k, "teacher_cache_seconds": round(distiller.teacher_cache_seconds, 2),
        "train_source_tokens": trained["source_tokens"], "train_target_tokens": trained["target_tokens"],
        "train_dataset_pairs": train_pairs, "eval_pairs": len(references), "optimizer_steps": distiller.total_steps,
        "processes": distiller.accelerator.num_processes, "history": distiller.history, "loss_curve": distiller.curve,
        "held_out_curve": distiller.held_out,
        "bleu_signature": "sacrebleu corpus_bleu/corpus_chrf defaults (13a tokenization), "
                          f"{'greedy' if config.num_beams == 1 else f'beam {config.num_beams}'} decoding",
    })
    set_generation_limit_(model, config.max_new_tokens)  # a plain generate() of the saved model: no 20-token cut
    return model, report


def set_generation_limit_(model: nn.Module, max_new_tokens: int) -> None:
    """Give ``model``'s generation config a length limit when it has none, so that a plain
    ``model.generate(**batch)`` after loading does not fall back to transformers' ``max_length`` of
    20 tokens and cut longer translations: the run's ``max_new_tokens``. A limit the teacher came
    with (OPUS-MT: ``max_length`` 512) is kept."""
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.max_length is None \
            and generation_config.max_new_tokens is None:
        generation_config.max_new_tokens = max_new_tokens
