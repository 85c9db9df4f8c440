"""The configuration: the keys of ``config.json``, their defaults, help texts and checks.

``Config`` is the one source of them: ``load_config`` reads a JSON file into it (unknown keys, wrong
types and out-of-range values refused in one line), ``config_help`` lists the keys for ``--help``, and

    python -m mdcompress.config --markdown > docs/configuration.md

writes the configuration reference, one table per section (``SECTIONS``; the JSON keys stay flat).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from mdcompress.errors import ConfigError
from mdcompress.translate import DEFAULT_MAX_LENGTH_FACTOR, MAX_LENGTH_MARGIN

EXPORTS = ("onnx", "onnx-int8")
DEFAULT_RANK = 32  # k_info when neither it nor target_ratio is given
LOSS_TERMS = ("ce", "kd", "feature", "hidden", "attention")  # the keys of loss_weights
SWEEPABLE = ("target_ratio", "k_info")  # the keys a list of values turns into a size sweep
SECTIONS = ("model and data", "decomposition", "recovery", "evaluation and export", "the run")


def _key(section: str, default, help: str):
    """A ``Config`` field: its ``default`` (a list or dict is copied for every Config), its ``help``
    text and the ``section`` of the reference it is listed in."""
    assert section in SECTIONS, section
    metadata = {"section": section, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


data_key, decomposition_key, recovery_key, evaluation_key, run_key = (partial(_key, section) for section in SECTIONS)


@dataclass
class Config:
    """The keys of ``config.json``. Only ``teacher_model_path`` and ``dataset_path`` matter to get started."""

    teacher_model_path: str = data_key("models/teacher-en-de",
        "teacher: a local folder or a hub id (e.g. Helsinki-NLP/opus-mt-en-de)")
    student_model_path: str | None = data_key(None,
        "the model that is factorized and trained (a folder or a hub id sharing the teacher's vocabulary, "
        "e.g. a smaller model to distill a big teacher into); null = the teacher itself")
    dataset_path: str = data_key("data/tatoeba_en_de/train.csv",
        "training pairs: a .csv/.tsv/.json/.jsonl/.parquet file or a folder of them, a folder saved with "
        "datasets (save_to_disk), the prefix of line-aligned text files (corpus → corpus.en + corpus.de), "
        "or a hub dataset id (owner/name, e.g. wmt/wmt16)")
    eval_dataset_path: str | None = data_key("data/tatoeba_en_de/eval.csv",
        "held-out pairs for BLEU/chrF (same forms); null: eval_split of dataset_path, or eval_size pairs "
        "held out of it")
    dataset_config: str | None = data_key(None, "configuration of a hub dataset (e.g. \"de-en\" for wmt/wmt16)")
    train_split: str = data_key("train",
        "split of dataset_path to train on (hub datasets and saved DatasetDicts; a file has one)")
    eval_split: str | None = data_key(None,
        "split to evaluate on (e.g. \"validation\"): of eval_dataset_path, or of dataset_path when "
        "eval_dataset_path is null; null = eval_dataset_path's \"train\", or eval_size held-out pairs")
    source_lang: str | None = data_key(None,
        "source language key (e.g. \"en\") of the translation layout ({\"translation\": {\"en\": …, "
        "\"de\": …}}) and the suffix of line-aligned text files; null = flat columns")
    target_lang: str | None = data_key(None, "target language key (e.g. \"de\"), likewise")
    output_path: str = run_key("outputs/compressed-en-de",
        "folder for the compressed model, tokenizer, config used and report.json")
    overwrite_output: bool = run_key(False, "replace a non-empty output_path")
    source_column: str = data_key("source_text", "column of source sentences")
    target_column: str = data_key("target_text", "column of reference translations")
    eval_size: int = data_key(1000, "pairs held out for evaluation when eval_dataset_path is null")
    max_train_samples: int | None = data_key(None, "use only the first N training pairs")
    max_eval_samples: int | None = data_key(None, "use only the first N evaluation pairs")
    max_source_length: int = data_key(128, "source tokens kept (truncation)")
    max_target_length: int = data_key(128, "target tokens kept (truncation)")
    preprocessing_num_workers: int | None = data_key(None,
        "processes that tokenize the pairs; null = the main process alone")
    source_lang_code: str | None = data_key(None,
        "language code of the sources for a multilingual tokenizer (NLLB: \"eng_Latn\", M2M100: \"en\", "
        "mBART-50: \"en_XX\"); null: the tokenizer's own")
    target_lang_code: str | None = data_key(None,
        "language code to translate into (NLLB: \"deu_Latn\", M2M100: \"de\", mBART-50: \"de_DE\"): "
        "tokenizes the references and is forced as the first generated token (forced_bos_token_id, saved "
        "in generation_config.json); null: the teacher's own")

    trim_vocabulary: bool = decomposition_key(False,
        "before factorizing, keep only the vocabulary the pairs use: the special tokens, the language codes of "
        "source_lang_code / target_lang_code, and every token of the training and evaluation pairs (one union of "
        "source and target tokens for a shared vocabulary); the embeddings, the output projection and the tokenizer "
        "keep those tokens alone (teacher and student alike), and a piece outside them reads as <unk> (in a "
        "tokenizer.json: as smaller kept pieces where there are some) (docs/vocabulary.md)")
    trim_vocabulary_files: list[str] = decomposition_key([],
        "text files (UTF-8, one sentence a line) whose tokens trim_vocabulary keeps too, e.g. sentences of the "
        "languages the model must still read")
    trim_vocabulary_min_count: int = decomposition_key(1,
        "trim_vocabulary keeps a token of the pairs and files only when it occurs at least this many times (the "
        "special tokens and language codes always)")
    decompose_layers: list[str] = decomposition_key([],
        "state-dict keys of the nn.Linear weights to factorize, or patterns (\"model.decoder.*\"); "
        "[] = every linear in the encoder/decoder layers; model.shared.weight factorizes the shared "
        "embedding together with its tied output layer; [\"*\"] = all of these")
    k_info: int | dict[str, int] | list[int] | None = decomposition_key(None,
        "rank r of each factorization: one int, or {key or pattern: rank} with an optional \"default\" "
        "(a layer's own key wins over the first pattern that matches it); left out: "
        f"{DEFAULT_RANK}, or allocated when target_ratio is set; a list of ints: a size sweep, one model per "
        "rank")
    target_ratio: float | list[float] | None = decomposition_key(None,
        "fraction of the total parameters (embeddings included) of the model factorized (the teacher, or "
        "student_model_path) the student keeps, e.g. 0.5; leave k_info out: per-layer ranks are "
        "allocated to meet it (see rank_allocation); a list: a size sweep, one model per value, in its "
        "own subfolder of output_path")
    rank_allocation: str = decomposition_key("sensitivity",
        "how target_ratio shares the budget: sensitivity (least drift, in KL, of the teacher's predictions "
        "on calibration_samples pairs, each layer measured at a few ranks, as ASVD does) | spectrum (least "
        "relative truncation error of the weights; fast, but starves the shared embedding)")
    svd: str = decomposition_key("auto", "SVD algorithm: auto | exact | lowrank (randomized)")
    init: str = decomposition_key("svd",
        "factor initialization: svd (best approximation of W) | activation (SVD-LLM: best approximation "
        "of each layer's outputs on calibration_samples training pairs; for a token embedding, of its vectors "
        "weighted by how often each token occurs there, and of the logits of the output projection tied to it) | "
        "fisher (activation, with each linear's output rows weighted by their Fisher information, the squared "
        "gradients of the teacher's cross-entropy on those pairs, as Fisher-weighted SVD does)")
    calibration_samples: int = decomposition_key(256,
        "training pairs the activation (and fisher) init and the sensitivity allocation measure on")

    feature_layers: list[str] = recovery_key([],
        "layers whose outputs the feature loss matches; [] = every decomposed layer")
    loss_weights: dict[str, float] = recovery_key(
        {"ce": 1.0, "kd": 1.0, "feature": 1.0, "hidden": 0.0, "attention": 0.0},
        "weight per loss term: ce (references), kd (teacher outputs), feature, hidden, attention")
    temperature: float = recovery_key(2.0, "softmax temperature of the output distillation")
    kd_top_k: int = recovery_key(0,
        "0: the teacher runs at every step; k > 0: its k largest logits and the log-normalizer at every "
        "target position are computed once before training (one forward pass per pair), kept in cache_dir "
        "for every epoch and later run on the same teacher, pairs and temperature (4·k + 4 bytes per "
        "target token), and the kd term matches them (the rest of the vocabulary as one outcome): a step "
        "then costs what fine-tuning does, for about 1 BLEU less at equal steps (BENCHMARKS.md, "
        "recovery); the feature, hidden and attention terms need the teacher at every step and must be 0")
    label_smoothing: float = recovery_key(0.0, "label smoothing of the cross-entropy term")
    freeze: list[str] = recovery_key([],
        "parameters kept as they are during recovery: state-dict keys, module names or patterns of them "
        "(a factorized layer's key names both its factors, its bias key the bias), e.g. [\"model.shared.weight\"] "
        "keeps the token embedding and its tied output layer as the factorization left them; [] = train "
        "every parameter")
    dropout: float | None = recovery_key(None,
        "every dropout probability of the student while it is recovered (hidden states, attention, "
        "activations); null = the model's own (the shipped teacher: 0.1 on hidden states); 0 = off. The saved "
        "model's config keeps its own")
    epoch: int = recovery_key(1, "passes over the training pairs")
    batch_size: int = recovery_key(32, "pairs per step (per process)")
    group_by_length: bool = recovery_key(True,
        "batch pairs of similar length together (less padding; the order of the batches stays random)")
    max_steps: int | None = recovery_key(None, "stop after this many optimizer steps")
    learning_rate: float = recovery_key(3e-4, "peak AdamW learning rate")
    weight_decay: float = recovery_key(0.01, "AdamW weight decay (not on biases/norms)")
    warmup_ratio: float = recovery_key(0.06, "fraction of steps of linear warmup")
    gradient_accumulation_steps: int = recovery_key(1, "batches per optimizer step")
    max_grad_norm: float = recovery_key(1.0, "gradient clipping (0 = off)")
    mixed_precision: str = recovery_key("no", "no | fp16 (GPU only) | bf16")
    eval_steps: int = recovery_key(0, "held-out loss every N steps (0 = once per epoch)")

    sequence_level_kd: bool = recovery_key(False,
        "train on the teacher's own translations of the training sources (generated once with num_beams "
        "and max_new_tokens, cached in cache_dir) instead of the reference translations")
    cache_dir: str | None = run_key(None,
        "where the tokenized pairs, the teacher's top-k logits (kd_top_k) and the rank sensitivity curves "
        "(target_ratio) are cached (reused by any run with the same data, tokenizer and preprocessor, or "
        "teacher) and sequence_level_kd keeps the teacher's translations; null = datasets' cache "
        "(HF_DATASETS_CACHE/matrix-decomposition) for the pairs, logits and curves, <output_path>-cache for "
        "the translations")

    quantize_int8: bool = evaluation_key(False,
        "also evaluate the student with int8 dynamically quantized linear layers (CPU): adds a student_int8 "
        "row to the report; the saved weights stay float32 (load_compressed_model(path, quantize=\"int8\"))")
    export: list[str] = evaluation_key([],
        "deployable copies of the student written into output_path and evaluated in the report: \"onnx\" "
        "(ONNX Runtime, float32) and/or \"onnx-int8\" (int8 weights); a finished run is exported with "
        "python -m mdcompress.onnx_export --model <output_path> [--int8]")
    num_beams: int = evaluation_key(1, "beams for the BLEU evaluation (1 = greedy)")
    eval_batch_size: int = evaluation_key(64, "sentences per generate() call")
    max_new_tokens: int = evaluation_key(128,
        "longest translation generated; also saved in generation_config.json when the teacher sets no "
        "length limit")
    max_length_factor: float | None = evaluation_key(DEFAULT_MAX_LENGTH_FACTOR,
        f"bounds each translation by its source, as Marian's max-length-factor does: at most "
        f"ceil(max_length_factor × source tokens) + {MAX_LENGTH_MARGIN} new tokens (and never more than "
        f"max_new_tokens), so that a degenerate output stops near the length of a real one instead of running to "
        f"max_new_tokens; applies to the BLEU evaluations and sequence_level_kd's translations (python -m "
        f"mdcompress.translate: --max-length-factor); null = max_new_tokens alone")
    checkpoint_steps: int = run_key(500,
        "save a checkpoint every N optimizer steps, to continue with --resume (0 = never)")
    checkpoint_dir: str | None = run_key(None,
        "where checkpoints go; null = <output_path>-checkpoints (deleted when the run finishes)")
    seed: int = run_key(42, "seed for data order, dropout and held-out split")
    num_threads: int | None = run_key(None,
        "CPU threads for torch; null = OMP_NUM_THREADS if set, else the cores the load average leaves free "
        "(set 1 on a machine other jobs may start using)")
    progress: bool = run_key(True, "show progress bars (a plain line every 30 s when standard error is not a terminal)")
    plan: bool = run_key(False,
        "only print the plan (layers, ranks, parameters, sizes, predicted speed-up, estimated time) and "
        "stop, writing nothing; the same as --plan")


    def __post_init__(self) -> None:
        # JSON's NaN, Infinity and -Infinity parse as floats and slip past every range check below (NaN < 0
        # is false): refused first, wherever they sit (a float key, a loss weight, a value of a sweep)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            items = value.items() if isinstance(value, dict) else [(None, v) for v in value] \
                if isinstance(value, list) else [(None, value)]
            for term, v in items:
                if isinstance(v, float) and not math.isfinite(v):
                    where = f"{term} " if term is not None else "every value " if isinstance(value, list) else ""
                    got = json.dumps(value) if isinstance(value, list) else json.dumps(v)
                    raise ConfigError(f"{f.name}: {where}must be a finite number, got {got}")
        positive = ["epoch", "batch_size", "eval_size", "max_source_length", "max_target_length",
                    "gradient_accumulation_steps", "num_beams", "eval_batch_size", "max_new_tokens",
                    "calibration_samples", "trim_vocabulary_min_count"]
        for name in positive + ["max_train_samples", "max_eval_samples", "max_steps", "num_threads",
                                "preprocessing_num_workers"]:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be at least 1, got {value}")
        if self.max_length_factor is not None and not self.max_length_factor > 0:
            raise ConfigError(f"max_length_factor: must be positive (or null: no bound but max_new_tokens), got "
                              f"{self.max_length_factor}")
        for name in ("learning_rate", "temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "max_grad_norm", "eval_steps", "label_smoothing", "warmup_ratio", "checkpoint_steps",
                     "kd_top_k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative, got {getattr(self, name)}")
        for name in SWEEPABLE:
            value = getattr(self, name)
            if isinstance(value, list) and (not value or len(set(value)) < len(value)):
                raise ConfigError(f"{name}: the sweep {json.dumps(value)} needs one or more different values")
        for ratio in self.target_ratio if isinstance(self.target_ratio, list) else [self.target_ratio]:
            if ratio is not None and not 0 < ratio < 1:
                raise ConfigError(f"target_ratio: must be above 0 and below 1 (a fraction of the teacher's "
                                  f"parameters), got {ratio}")
        if self.target_ratio is not None and self.k_info is not None:  # given, whatever its value
            raise ConfigError(f"k_info: {json.dumps(self.k_info)} is ignored when target_ratio is set; "
                              f"remove one of them")
        if self.target_ratio is None and self.k_info is None:
            self.k_info = DEFAULT_RANK
        if not self.trim_vocabulary and (self.trim_vocabulary_files or self.trim_vocabulary_min_count != 1):
            key = "trim_vocabulary_files" if self.trim_vocabulary_files else "trim_vocabulary_min_count"
            raise ConfigError(f"{key}: {json.dumps(getattr(self, key))} is for trim_vocabulary, which is false; "
                              f"set \"trim_vocabulary\": true, or leave {key} out")
        one_language = (self.source_lang is None) != (self.target_lang is None)
        if one_language or (self.source_lang is not None and self.source_lang == self.target_lang):
            raise ConfigError(f"source_lang and target_lang: give two different languages or neither, got "
                              f"{json.dumps(self.source_lang)} and {json.dumps(self.target_lang)}")
        if self.eval_split and self.eval_split == self.train_split and not self.eval_dataset_path:
            raise ConfigError(f"eval_split: {self.eval_split!r} is the split trained on (train_split); evaluate on "
                              f"another split, or leave eval_split null to hold out eval_size pairs")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: must be at least 0 and below 1 (a probability), or null for the model's own, "
                              f"got {self.dropout}")
        if self.warmup_ratio >= 1 or self.label_smoothing >= 1:
            raise ConfigError("warmup_ratio and label_smoothing must be below 1, got "
                              f"{self.warmup_ratio} and {self.label_smoothing}")
        choices = {"svd": ("auto", "exact", "lowrank"), "mixed_precision": ("no", "fp16", "bf16"),
                   "init": ("svd", "activation", "fisher"), "rank_allocation": ("sensitivity", "spectrum")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in self.export:
            if name not in EXPORTS:
                raise ConfigError(f"export: {name!r} is not one of {', '.join(EXPORTS)}")
        if len(set(self.export)) < len(self.export):
            raise ConfigError(f"export: {json.dumps(self.export)} names a format twice")
        for term, weight in self.loss_weights.items():
            if term not in LOSS_TERMS:
                raise ConfigError(f"loss_weights: unknown term {term!r}; valid terms: {', '.join(LOSS_TERMS)}")
            if weight < 0:
                raise ConfigError(f"loss_weights: {term} must not be negative, got {weight}")
        if not any(self.loss_weights.values()):
            raise ConfigError("loss_weights: every weight is 0; nothing would be trained")
        internal = [term for term in ("feature", "hidden", "attention") if self.loss_weights.get(term)]
        if self.feature_layers and not self.loss_weights.get("feature"):
            raise ConfigError(f"feature_layers: {len(self.feature_layers)} layer(s) given, but loss_weights has no "
                              f"feature term; add it, e.g. \"loss_weights\": "
                              f"{{\"ce\": 1, \"kd\": 1, \"feature\": 1}}")
        if self.kd_top_k and internal:
            terms = f"{' and '.join(internal)} term{'s' if len(internal) > 1 else ''}"
            raise ConfigError(f"kd_top_k: {self.kd_top_k} keeps only the teacher's outputs, but the loss_weights "
                              f"{terms} compare{'' if len(internal) > 1 else 's'} its internal states at every step; "
                              f"set kd_top_k to 0 or {'those weights' if len(internal) > 1 else 'that weight'} to 0")



def sweep_key(config: Config) -> str | None:
    """The config key swept over (its value is a list), or None for a single run."""
    return next((key for key in SWEEPABLE if isinstance(getattr(config, key), list)), None)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_type(name: str, value, tp) -> None:
    """Raise ConfigError unless ``value`` (parsed JSON) fits the annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if any(_fits(value, option) for option in args):
            return
        raise ConfigError(f"{name}: expected {' or '.join(_type_name(a) for a in args)}, got {json.dumps(value)}")
    if tp is type(None):
        ok = value is None
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is list:
        ok = isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    elif origin is dict:
        ok = isinstance(value, dict) and all(_fits(v, args[1]) for v in value.values())
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {json.dumps(value)}")


def _fits(value, tp) -> bool:
    try:
        _check_type("", value, tp)
        return True
    except ConfigError:
        return False


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a JSON config: unknown keys, wrong types and out-of-range values are
    errors; keys left out take their defaults."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {e.msg} at line {e.lineno} "
                          f"column {e.colno}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a JSON object, got {type(raw).__name__}")
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(unknown_key_message(unknown[0], hints))
    for name, value in raw.items():
        _check_type(name, value, hints[name])
    return Config(**raw)


KEYS_DOCUMENTED = "the keys are listed in docs/configuration.md and by --help"  # the command's own


def unknown_key_message(key: str, valid) -> str:
    """The one line for a config key that is not one: the closest valid key first (a typo such as
    ``epochs``), then where the keys are documented; not the list of all of them (over 900 characters)."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    if close:
        return f"unknown config key {key!r}; did you mean {close[0]!r}? ({KEYS_DOCUMENTED})"
    return f"unknown config key {key!r}; {KEYS_DOCUMENTED}"


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def config_help() -> str:
    lines = ["config.json keys (default):"]
    for f in dataclasses.fields(Config):
        lines.append(f"  {f.name:28} {f.metadata['help']} ({json.dumps(_default(f))})")
    return "\n".join(lines)



def markdown() -> str:
    """The configuration reference (docs/configuration.md): per section a table of the keys, their
    types, defaults (as JSON) and help texts."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["# Configuration", "",
             "<!-- generated by `python -m mdcompress.config --markdown > docs/configuration.md`; edit the help texts "
             "in mdcompress/config.py, not here -->", "",
             "`config.json` holds one JSON object with the keys below, all optional: only `teacher_model_path` and "
             "`dataset_path` matter to get started, the others have the defaults shown, and an unknown key is "
             "refused, with the closest valid key suggested."]
    for section in SECTIONS:
        lines += ["", f"## {section[0].upper()}{section[1:]}", "", "| key | type | default | meaning |",
                  "|---|---|---|---|"]
        for f in dataclasses.fields(Config):
            if f.metadata["section"] == section:
                lines.append(f"| `{f.name}` | `{cell(f.type)}` | `{cell(json.dumps(_default(f)))}` "
                             f"| {cell(f.metadata['help'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The keys of config.json.")
    parser.add_argument("--markdown", action="store_true", help="print the configuration reference (markdown)")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(), end="")
    else:
        print(config_help())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
