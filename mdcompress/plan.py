"""The plan: what a run will do, before it does it (``python compress_model.py --plan``).

The layers and ranks are resolved exactly as the run resolves them (the allocation to
``target_ratio`` included); this module turns them into the numbers a user wants before paying for
hours: per layer the shape, rank, no-saving bound, parameters before → after and the share of the
weight's spectral energy kept; in total the parameters, the size of the weights in float32 and int8,
the speed-up the multiply-adds predict, and an estimate of the run's wall time from a few timed
distillation steps on this machine.

The multiply-add model (also used by ``benchmarks/bench_speed.py``) counts what factorization
changes and what it cannot touch: every linear (r·(n+d) per token factorized, n·d dense), the
attention score and value matmuls (2·Lq·Lk·d_model per layer) and the output projection (V·d per
decoded token). Layer norms, activations, softmax, embedding look-ups and Python overhead are left
out: they are the same for every model and pull a measured speed-up below the prediction.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
import time
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from distillation.knowledge_distillation import DistillationSettings, Distiller, uses_teacher
from distillation.teacher_cache import cache_folder
from matrix_decomposition import (
    LowRankEmbedding,
    LowRankLinear,
    count_parameters,
    max_saving_rank,
    quantize_int8,
    singular_values,
    size_mb,
)
from mdcompress.config import Config
from mdcompress.rank_allocation import spectrum_errors
from mdcompress.sweep import SweepMemory
from mdcompress.translate import translate

# ---------------------------------------------------------------------------------------------
# Multiply-adds


def linear_macs(model: nn.Module) -> dict[str, int]:
    """Module name → multiply-adds per token of every linear map: r·(n+d) for a ``LowRankLinear``,
    n·d for an ``nn.Linear`` (the two halves of a ``LowRankLinear`` are not listed again, nor the
    factors of a ``LowRankEmbedding``: ``embedding_macs`` counts its look-up)."""
    macs, low_rank = {}, []
    for name, module in model.named_modules():
        if any(name.startswith(f"{parent}.") for parent in low_rank):
            continue
        if isinstance(module, LowRankEmbedding):
            low_rank.append(name)
        elif isinstance(module, LowRankLinear):
            low_rank.append(name)
            macs[name] = module.rank * (module.in_features + module.out_features)
        elif isinstance(module, nn.Linear):
            macs[name] = module.in_features * module.out_features
    return macs


def embedding_macs(model: nn.Module) -> int:
    """Multiply-adds per token of the token embeddings' look-ups: r·d for a ``LowRankEmbedding`` (a row
    of A times B), nothing for a dense table (a copy). MarianMT's encoder and decoder share one table."""
    return sum(m.rank * m.embedding_dim for m in model.modules() if isinstance(m, LowRankEmbedding))


def role(name: str) -> str:
    """Which tokens a linear runs on: 'source' (encoder, and the cross-attention k/v of the
    source, computed once per sequence), 'target' (decoder, once per decoded token) or 'lm_head'."""
    if name == "lm_head":
        return "lm_head"
    if name.startswith("model.encoder.layers.") or name.endswith(("encoder_attn.k_proj", "encoder_attn.v_proj")):
        return "source"
    assert name.startswith("model.decoder.layers."), name  # MarianMTModel has no other linears
    return "target"


def predicted_macs(model: nn.Module, config, batch: int, src_len: int, tgt_len: int, mode: str) -> dict[str, int]:
    """Multiply-adds of one call, split into 'layers' (the linears inside encoder/decoder layers,
    the part factorization changes), 'lm_head', 'attention' (score and value matmuls) and 'embedding'
    (the look-ups of a factorized token embedding; none for a dense one).

    mode 'forward': one teacher-forced pass over ``tgt_len`` target tokens (full T×T self-attention
    scores, as computed). mode 'generate': ``tgt_len`` decoder steps of one token with KV cache.
    """
    d, s, t = config.d_model, src_len, tgt_len
    parts = {"layers": 0, "lm_head": 0}
    for name, macs in linear_macs(model).items():
        kind = role(name)
        tokens = s if kind == "source" else t
        parts["lm_head" if kind == "lm_head" else "layers"] += macs * tokens
    parts["embedding"] = embedding_macs(model) * (s + t)  # every source and every target token is looked up
    encoder_attention = config.encoder_layers * 2 * s * s * d  # QKᵀ and AV
    if mode == "forward":
        self_attention = 2 * t * t * d
    else:  # step i (1-based) attends over i cached positions
        self_attention = 2 * d * t * (t + 1) // 2
    cross_attention = 2 * t * s * d
    parts["attention"] = encoder_attention + config.decoder_layers * (self_attention + cross_attention)
    parts = {k: v * batch for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


# ---------------------------------------------------------------------------------------------
# Per layer


def layer_spectra(model: nn.Module, names: Iterable[str]) -> dict[str, list[float]]:
    """{name: the singular values of its weight, descending} for the named layers of an unfactorized model."""
    return {name: singular_values(model.get_submodule(name).weight).tolist() for name in names}


def no_saving_bounds(model: nn.Module, names: Iterable[str]) -> dict[str, int]:
    """{name: the largest rank that still saves weights} for the named layers of an unfactorized model."""
    return {name: max_saving_rank(*model.get_submodule(name).weight.shape) for name in names}


def energy_kept(spectrum: list[float], rank: int) -> float:
    """Σ_{i≤r} σ_i² / Σ_i σ_i²: the share of the weight's spectral energy the rank-r factorization keeps."""
    return 1.0 - spectrum_errors(torch.tensor(spectrum, dtype=torch.float64))[rank]


# ---------------------------------------------------------------------------------------------
# The plan


def layer_rows(teacher: nn.Module, ranks: Mapping[str, int], spectra: Mapping[str, list[float]]) -> list[dict]:
    """Per decomposed layer: key, shape, rank, no-saving bound, parameters before and after, energy kept."""
    rows = []
    for name, rank in ranks.items():
        module = teacher.get_submodule(name)
        n, d = module.weight.shape
        bias = module.bias.numel() if getattr(module, "bias", None) is not None else 0
        rows.append({"key": f"{name}.weight", "shape": [n, d], "rank": rank, "bound": max_saving_rank(n, d),
                     "params_before": n * d + bias, "params_after": rank * (n + d) + bias,
                     "energy_kept": energy_kept(spectra[name], rank)})
    return rows


def int8_mb(model: nn.Module) -> float:
    """Megabytes of ``model`` with int8 linear layers (``quantize_int8``: what the int8 evaluation runs)."""
    return size_mb(quantize_int8(copy.deepcopy(model).cpu()))


def speedups(teacher: nn.Module, student: nn.Module, source_tokens: int, target_tokens: int) -> dict[str, float] | None:
    """Dense / factorized multiply-adds for a greedy translation (one decoder step per target token,
    KV cache) and for a teacher-forced pass, at the given lengths, batch 1; None for a model whose
    linears are not laid out as MarianMT's (the multiply-add model knows no other)."""
    if not all(name == "lm_head" or name.startswith(("model.encoder.layers.", "model.decoder.layers."))
               for name in linear_macs(teacher)):
        return None
    result = {}
    for mode in ("generate", "forward"):
        dense = predicted_macs(teacher, teacher.config, 1, source_tokens, target_tokens, mode)["total"]
        factorized = predicted_macs(student, teacher.config, 1, source_tokens, target_tokens, mode)["total"]
        result[mode] = dense / factorized
    return result


def optimizer_steps(pairs: int, config: Config) -> tuple[int, int]:
    """(optimizer steps of the run, of one epoch) over ``pairs`` training pairs (one process), as the
    ``Distiller`` counts them."""
    per_epoch = math.ceil(math.ceil(pairs / config.batch_size) / config.gradient_accumulation_steps)
    steps = per_epoch * config.epoch
    return (min(steps, config.max_steps) if config.max_steps else steps), per_epoch


def timed_steps(teacher, student, tokenizer, train_set, eval_set, settings: DistillationSettings, feature_layers,
                warmup: int = 1, timed: int = 3) -> tuple[float, float, float]:
    """(seconds per optimizer step, seconds per held-out batch, seconds per pair of the teacher's top-k
    cache): ``warmup`` + ``timed`` real distillation steps of a copy of ``student`` on the first
    training pairs (their cache built in a temporary folder first, with ``kd_top_k``), then one
    held-out pass over a couple of evaluation batches, on this machine, with the run's settings."""
    config = settings.config
    steps = warmup + timed
    pairs = min(len(train_set), steps * config.batch_size * config.gradient_accumulation_steps)
    held_out = eval_set.select(range(min(len(eval_set), 2 * config.batch_size)))
    with tempfile.TemporaryDirectory() as cache:  # no checkpoints, no resuming
        quick = DistillationSettings(dataclasses.replace(config, epoch=steps, max_steps=steps, eval_steps=0,
                                                         progress=False), cache_dir=cache)
        distiller = Distiller(teacher, copy.deepcopy(student), tokenizer, train_set.select(range(pairs)), None, quick,
                              list(feature_layers))
        distiller.train()
    cache_per_pair = distiller.teacher_cache_seconds / pairs
    curve = distiller.curve
    per_step = ((curve[-1]["seconds"] - curve[warmup - 1]["seconds"]) / (len(curve) - warmup)
                if len(curve) > warmup else curve[-1]["seconds"])
    distiller.eval_loader = distiller.accelerator.prepare(torch.utils.data.DataLoader(
        held_out, batch_size=config.batch_size, collate_fn=distiller.train_loader.collate_fn))
    started = time.perf_counter()
    distiller.evaluate()
    per_batch = (time.perf_counter() - started) / max(1, math.ceil(len(held_out) / config.batch_size))
    return per_step, per_batch, cache_per_pair


def translation_seconds(model, tokenizer, sources, config: Config, sample: int | None = None) -> float:
    """Seconds ``model`` takes to translate the token-id lists ``sources`` with the run's generation
    settings, extrapolated from its first ``sample`` (one generate() call's worth by default)."""
    sample = min(len(sources), sample or config.eval_batch_size)
    started = time.perf_counter()
    translate(model, tokenizer, sources[:sample], batch_size=config.eval_batch_size, num_beams=config.num_beams,
              max_new_tokens=config.max_new_tokens, max_length_factor=config.max_length_factor,
              max_source_length=config.max_source_length)
    return (time.perf_counter() - started) * len(sources) / max(sample, 1)


def _minutes(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def print_plan(teacher, student, ranks: Mapping[str, int], tokenizer, train_set, eval_set,
               settings: DistillationSettings, feature_layers, decompose_seconds: float,
               shared: SweepMemory | None = None, cached_seconds: float = 0.0, trimmed=None) -> dict:
    """Print (and return) the plan of a run whose teacher, factorized student and ranks are given,
    resolved by ``decomposition.decompose`` exactly as the run resolves them, and which would train
    with ``settings`` (the run's ``Config`` in them). ``cached_seconds`` of ``decompose_seconds`` went
    to the rank sensitivity, measured for this plan and kept in the cache the run reads it from: not
    part of the run's estimate. ``trimmed`` (``vocabulary.Trimmed``): the vocabulary and parameters
    before and after ``trim_vocabulary``, which ``teacher`` and ``student`` already are."""
    config = settings.config
    spectra = layer_spectra(teacher, ranks)
    rows = layer_rows(teacher, ranks, spectra)
    teacher_params, student_params = count_parameters(teacher), count_parameters(student)
    source_len = round(sum(map(len, eval_set["input_ids"])) / len(eval_set))
    target_len = round(sum(map(len, eval_set["labels"])) / len(eval_set))
    speed = speedups(teacher, student, source_len, target_len)
    sizes = {"teacher": (size_mb(teacher), int8_mb(teacher)), "student": (size_mb(student), int8_mb(student))}

    # the time: the decomposition as just measured, the distillation steps timed here, the evaluations
    steps, per_epoch = optimizer_steps(len(train_set), config)
    per_step, per_batch, cache_per_pair = timed_steps(teacher, student, tokenizer, train_set, eval_set, settings,
                                                      feature_layers)
    cached = config.kd_top_k and config.loss_weights.get("kd") and \
        cache_folder(teacher, train_set, config.kd_top_k, config.temperature, settings.cache_dir).is_dir()
    evaluations = math.ceil(steps / (config.eval_steps or per_epoch))
    held_out = evaluations * per_batch * math.ceil(len(eval_set) / config.batch_size)
    one_pass = translation_seconds(teacher, tokenizer, eval_set["input_ids"], config)
    # the teacher, the decomposed model, the student and its int8 / ONNX versions (a sweep evaluates the teacher once)
    passes = 2 + (shared is None or not shared.teacher_planned) + bool(config.quantize_int8) + len(config.export)
    if shared is not None:
        shared.teacher_planned = True
    seq_kd = translation_seconds(teacher, tokenizer, train_set["input_ids"], config) if config.sequence_level_kd else 0
    parts = {"decomposition": decompose_seconds - cached_seconds,
             "the teacher's top-k logits (kd_top_k)": 0 if cached else cache_per_pair * len(train_set),
             "distillation" if uses_teacher(config.loss_weights) else "fine-tuning": steps * per_step,
             "held-out loss": held_out,
             "BLEU translations": passes * one_pass, "teacher translations (sequence_level_kd)": seq_kd}
    total = sum(parts.values())

    width = max(len(row["key"]) for row in rows)
    print(f"\nplan ({'target_ratio ' + str(config.target_ratio) if config.target_ratio is not None else 'k_info'}, "
          f"{config.init} init): the layers and ranks the run will use")
    print(f"{'key':<{width}}  {'shape':>11}  {'rank':>5}  {'bound':>5}  {'params before → after':>25}  "
          f"{'energy kept':>11}")
    for row in rows:
        shape = "×".join(map(str, row["shape"]))
        change = f"{row['params_before']:,} → {row['params_after']:,}"
        print(f"{row['key']:<{width}}  {shape:>11}  {row['rank']:>5}  {row['bound']:>5}  {change:>25}  "
              f"{100 * row['energy_kept']:>10.1f}%")
    vocabulary = None
    if trimmed is not None:
        trim = trimmed.trim
        vocabulary = {**trimmed.report(), "student_params": student_params}
        target = "" if trim.shared else f" (target side {trim.before[1]:,} → {len(trim.target):,})"
        print(f"vocabulary (trim_vocabulary): {trim.before[0]:,} → {len(trim.source):,} tokens{target}; parameters "
              f"{trimmed.params_before:,} → {trimmed.params_after:,} "
              f"({100 * trimmed.params_after / trimmed.params_before:.1f}%) before factorizing")
    print(f"parameters: {teacher_params:,} → {student_params:,} ({100 * student_params / teacher_params:.1f}%)"
          + (f"; of the untrimmed teacher's {trimmed.params_before:,}: "
             f"{100 * student_params / trimmed.params_before:.1f}%" if trimmed is not None else ""))
    print(f"size of the weights: float32 {sizes['teacher'][0]:.2f} → {sizes['student'][0]:.2f} MB; "
          f"int8 linear layers {sizes['teacher'][1]:.2f} → {sizes['student'][1]:.2f} MB")
    if speed is None:
        print("predicted speed-up from multiply-adds: not predicted (the model is not laid out as MarianMT)")
    else:
        print(f"predicted speed-up from multiply-adds: {speed['generate']:.2f}× translating (greedy, batch 1, "
              f"{source_len} source and {target_len} target tokens, the evaluation pairs' mean), "
              f"{speed['forward']:.2f}× teacher-forced; layer norms, softmax and overheads are not counted, so "
              f"expect less")
    detail = ", ".join(f"{name} {_minutes(seconds)}" for name, seconds in parts.items() if seconds)
    print(f"estimated wall time of the run: {_minutes(total)} ({detail}; {steps:,} steps at {per_step:.3f} s, "
          f"timed on 3 steps after 1 warm-up on this machine: an estimate)")
    if cached_seconds:
        print(f"the rank sensitivity took {_minutes(cached_seconds)} of this plan; kept in {settings.cache_dir}, "
              f"the run reads it instead (not counted above)")
    print(f"nothing written to {config.output_path}; run without --plan to compress into it")
    return {"layers": rows, "ranks": dict(ranks), "teacher_params": teacher_params, "student_params": student_params,
            "size_mb": sizes, "speedup": speed, "seconds": parts, "estimated_seconds": total, "vocabulary": vocabulary}
