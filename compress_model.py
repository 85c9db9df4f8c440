"""Compress a translation model (MarianMT, NLLB/M2M100, mBART, BART, T5/mT5) by matrix decomposition,
then recover it by distillation.

    python compress_model.py                     # reads ./config.json
    python compress_model.py --config my.json    # another config
    python compress_model.py --plan              # what the run would do: layers, ranks, sizes, time; writes nothing
    torchrun --nproc_per_node 2 compress_model.py   # data-parallel distillation

The chosen ``nn.Linear`` weights W (n×d) of the teacher are replaced by truncated-SVD factors
B'·C' of rank ``k_info`` (Ben Noach & Goldberg, AACL 2020); the factorized student is then
trained to imitate the untouched teacher. The run writes the compressed model and a
``report.json`` comparing teacher, decomposed and recovered student (params, BLEU, chrF).
Beyond that: factors fitted to the layers' activations (``init``), ranks allocated to a
parameter budget (``target_ratio``), the shared embedding factorized too (``model.shared.weight``),
training on the teacher's own translations (``sequence_level_kd``) and an int8 evaluation
(``quantize_int8``). ``target_ratio`` or ``k_info`` given as a list runs a size sweep (``run_sweep``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
import types
import typing
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from mdcompress.errors import ConfigError, UserError

# ---------------------------------------------------------------------------------------------
# Preprocessing hook: replace this function (edit it here, or assign
# ``compress_model.data_preprocessor = your_function`` before calling ``main()``).


def data_preprocessor(batch: dict[str, list[str]], tokenizer, config: "Config") -> dict[str, list]:
    """Turn a batch of raw pairs into model inputs.

    ``batch`` holds the columns ``source_text`` and ``target_text`` (lists of strings), ``tokenizer``
    is the teacher's, ``config`` the run's ``Config``. Return at least ``input_ids``,
    ``attention_mask`` and ``labels`` (lists of token ids per example). The default tokenizes the
    source and the target, truncated to ``max_source_length`` / ``max_target_length``; padding
    happens per batch later, with labels padded by -100 so padded positions are ignored by the loss.

    Example override, straightening typographic quotes in the sources (the shipped Tatoeba data
    writes them straight)::

        def data_preprocessor(batch, tokenizer, config):
            straight = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"'})
            batch = {**batch, "source_text": [s.translate(straight) for s in batch["source_text"]]}
            return default_data_preprocessor(batch, tokenizer, config)

    A target-language tag (``">>fra<< " + s``) belongs only to multilingual OPUS-MT models such
    as opus-mt-en-ROMANCE; a bilingual model never saw one, and it costs it most of its BLEU.
    T5's task prefix (``"translate English to German: " + s``) belongs here too; the language codes
    of NLLB/M2M100 and mBART are config keys (``source_lang_code``, ``target_lang_code``), not text.
    """
    return default_data_preprocessor(batch, tokenizer, config)


def default_data_preprocessor(batch: dict[str, list[str]], tokenizer, config: "Config") -> dict[str, list]:
    inputs = tokenizer(batch["source_text"], max_length=config.max_source_length, truncation=True)
    targets = tokenizer(text_target=batch["target_text"], max_length=config.max_target_length, truncation=True)
    return {**inputs, "labels": targets["input_ids"]}


# ---------------------------------------------------------------------------------------------
# Configuration


EXPORTS = ("onnx", "onnx-int8")
DEFAULT_RANK = 32  # k_info when neither it nor target_ratio is given


@dataclass
class Config:
    """The keys of ``config.json``. Only ``teacher_model_path`` and ``dataset_path`` matter to get started."""

    teacher_model_path: str = field(default="models/teacher-en-de", metadata={
        "help": "teacher: a local folder or a hub id (e.g. Helsinki-NLP/opus-mt-en-de)"})
    student_model_path: str | None = field(default=None, metadata={
        "help": "the model that is factorized and trained (a folder or a hub id sharing the teacher's vocabulary, "
                "e.g. a smaller model to distill a big teacher into); null = the teacher itself"})
    dataset_path: str = field(default="data/tatoeba_en_de/train.csv", metadata={
        "help": "training pairs: a .csv/.tsv/.json/.jsonl/.parquet file or a folder of them, a folder saved with "
                "datasets (save_to_disk), the prefix of line-aligned text files (corpus → corpus.en + corpus.de), "
                "or a hub dataset id (owner/name, e.g. wmt/wmt16)"})
    eval_dataset_path: str | None = field(default="data/tatoeba_en_de/eval.csv", metadata={
        "help": "held-out pairs for BLEU/chrF (same forms); null: eval_split of dataset_path, or eval_size pairs "
                "held out of it"})
    dataset_config: str | None = field(default=None, metadata={
        "help": "configuration of a hub dataset (e.g. \"de-en\" for wmt/wmt16)"})
    train_split: str = field(default="train", metadata={
        "help": "split of dataset_path to train on (hub datasets and saved DatasetDicts; a file has one)"})
    eval_split: str | None = field(default=None, metadata={
        "help": "split to evaluate on (e.g. \"validation\"): of eval_dataset_path, or of dataset_path when "
                "eval_dataset_path is null; null = eval_dataset_path's \"train\", or eval_size held-out pairs"})
    source_lang: str | None = field(default=None, metadata={
        "help": "source language key (e.g. \"en\") of the translation layout ({\"translation\": {\"en\": …, "
                "\"de\": …}}) and the suffix of line-aligned text files; null = flat columns"})
    target_lang: str | None = field(default=None, metadata={"help": "target language key (e.g. \"de\"), likewise"})
    output_path: str = field(default="outputs/compressed-en-de", metadata={
        "help": "folder for the compressed model, tokenizer, config used and report.json"})
    overwrite_output: bool = field(default=False, metadata={"help": "replace a non-empty output_path"})
    source_column: str = field(default="source_text", metadata={"help": "column of source sentences"})
    target_column: str = field(default="target_text", metadata={"help": "column of reference translations"})
    eval_size: int = field(default=1000, metadata={
        "help": "pairs held out for evaluation when eval_dataset_path is null"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training pairs"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N evaluation pairs"})
    max_source_length: int = field(default=128, metadata={"help": "source tokens kept (truncation)"})
    max_target_length: int = field(default=128, metadata={"help": "target tokens kept (truncation)"})
    preprocessing_num_workers: int | None = field(default=None, metadata={
        "help": "processes that tokenize the pairs; null = the main process alone"})
    source_lang_code: str | None = field(default=None, metadata={
        "help": "language code of the sources for a multilingual tokenizer (NLLB: \"eng_Latn\", M2M100: \"en\", "
                "mBART-50: \"en_XX\"); null: the tokenizer's own"})
    target_lang_code: str | None = field(default=None, metadata={
        "help": "language code to translate into (NLLB: \"deu_Latn\", M2M100: \"de\", mBART-50: \"de_DE\"): "
                "tokenizes the references and is forced as the first generated token (forced_bos_token_id, saved "
                "in generation_config.json); null: the teacher's own"})

    decompose_layers: list[str] = field(default_factory=list, metadata={
        "help": "state-dict keys of the nn.Linear weights to factorize, or patterns (\"model.decoder.*\"); "
                "[] = every linear in the encoder/decoder layers; model.shared.weight factorizes the shared "
                "embedding together with its tied output layer; [\"*\"] = all of these"})
    k_info: int | dict[str, int] | list[int] | None = field(default=None, metadata={
        "help": "rank r of each factorization: one int, or {key or pattern: rank} with an optional \"default\" "
                "(a layer's own key wins over the first pattern that matches it); left out: "
                f"{DEFAULT_RANK}, or allocated when target_ratio is set; a list of ints: a size sweep, one model per "
                "rank"})
    target_ratio: float | list[float] | None = field(default=None, metadata={
        "help": "fraction of the total parameters (embeddings included) of the model factorized (the teacher, or "
                "student_model_path) the student keeps, e.g. 0.5; leave k_info out: per-layer ranks are "
                "allocated to meet it (see rank_allocation); a list: a size sweep, one model per value, in its "
                "own subfolder of output_path"})
    rank_allocation: str = field(default="sensitivity", metadata={
        "help": "how target_ratio shares the budget: sensitivity (least drift, in KL, of the teacher's predictions "
                "on calibration_samples pairs, each layer measured at a few ranks, as ASVD does) | spectrum (least "
                "relative truncation error of the weights; fast, but starves the shared embedding)"})
    svd: str = field(default="auto", metadata={"help": "SVD algorithm: auto | exact | lowrank (randomized)"})
    init: str = field(default="svd", metadata={
        "help": "factor initialization: svd (best approximation of W) | activation (SVD-LLM: best approximation "
                "of each layer's outputs on calibration_samples training pairs; for a token embedding, of its vectors "
                "weighted by how often each token occurs there, and of the logits of the output projection tied to it) | "
                "fisher (activation, with each linear's output rows weighted by their Fisher information, the squared "
                "gradients of the teacher's cross-entropy on those pairs, as Fisher-weighted SVD does)"})
    calibration_samples: int = field(default=256, metadata={
        "help": "training pairs the activation (and fisher) init and the sensitivity allocation measure on"})

    feature_layers: list[str] = field(default_factory=list, metadata={
        "help": "layers whose outputs the feature loss matches; [] = every decomposed layer"})
    loss_weights: dict[str, float] = field(default_factory=lambda: {
        "ce": 1.0, "kd": 1.0, "feature": 1.0, "hidden": 0.0, "attention": 0.0}, metadata={
        "help": "weight per loss term: ce (references), kd (teacher outputs), feature, hidden, attention"})
    temperature: float = field(default=2.0, metadata={"help": "softmax temperature of the output distillation"})
    kd_top_k: int = field(default=0, metadata={
        "help": "0: the teacher runs at every step; k > 0: its k largest logits and the log-normalizer at every "
                "target position are computed once before training (one forward pass per pair), kept in cache_dir "
                "for every epoch and later run on the same teacher, pairs and temperature (4·k + 4 bytes per "
                "target token), and the kd term matches them (the rest of the vocabulary as one outcome): a step "
                "then costs what fine-tuning does, for about 1 BLEU less at equal steps (BENCHMARKS.md, "
                "recovery); the feature, hidden and attention terms need the teacher at every step and must be 0"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the cross-entropy term"})
    freeze: list[str] = field(default_factory=list, metadata={
        "help": "parameters kept as they are during recovery: state-dict keys, module names or patterns of them "
                "(a factorized layer's key names both its factors, its bias key the bias), e.g. [\"model.shared.weight\"] "
                "keeps the token embedding and its tied output layer as the factorization left them; [] = train "
                "every parameter"})
    dropout: float | None = field(default=None, metadata={
        "help": "every dropout probability of the student while it is recovered (hidden states, attention, "
                "activations); null = the model's own (the shipped teacher: 0.1 on hidden states); 0 = off. The saved "
                "model's config keeps its own"})
    epoch: int = field(default=1, metadata={"help": "passes over the training pairs"})
    batch_size: int = field(default=32, metadata={"help": "pairs per step (per process)"})
    group_by_length: bool = field(default=True, metadata={
        "help": "batch pairs of similar length together (less padding; the order of the batches stays random)"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    learning_rate: float = field(default=3e-4, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases/norms)"})
    warmup_ratio: float = field(default=0.06, metadata={"help": "fraction of steps of linear warmup"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 (GPU only) | bf16"})
    eval_steps: int = field(default=0, metadata={"help": "held-out loss every N steps (0 = once per epoch)"})

    sequence_level_kd: bool = field(default=False, metadata={
        "help": "train on the teacher's own translations of the training sources (generated once with num_beams "
                "and max_new_tokens, cached in cache_dir) instead of the reference translations"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "where the tokenized pairs, the teacher's top-k logits (kd_top_k) and the rank sensitivity curves "
                "(target_ratio) are cached (reused by any run with the same data, tokenizer and preprocessor, or "
                "teacher) and sequence_level_kd keeps the teacher's translations; null = datasets' cache "
                "(HF_DATASETS_CACHE/matrix-decomposition) for the pairs, logits and curves, <output_path>-cache for "
                "the translations"})

    quantize_int8: bool = field(default=False, metadata={
        "help": "also evaluate the student with int8 dynamically quantized linear layers (CPU): adds a student_int8 "
                "row to the report; the saved weights stay float32 (load_compressed_model(path, quantize=\"int8\"))"})
    export: list[str] = field(default_factory=list, metadata={
        "help": "deployable copies of the student written into output_path and evaluated in the report: \"onnx\" "
                "(ONNX Runtime, float32) and/or \"onnx-int8\" (int8 weights); a finished run is exported with "
                "python -m mdcompress.onnx_export --model <output_path> [--int8]"})
    num_beams: int = field(default=1, metadata={"help": "beams for the BLEU evaluation (1 = greedy)"})
    eval_batch_size: int = field(default=64, metadata={"help": "sentences per generate() call"})
    max_new_tokens: int = field(default=128, metadata={
        "help": "longest translation generated; also saved in generation_config.json when the teacher sets no "
                "length limit"})
    checkpoint_steps: int = field(default=500, metadata={
        "help": "save a checkpoint every N optimizer steps, to continue with --resume (0 = never)"})
    checkpoint_dir: str | None = field(default=None, metadata={
        "help": "where checkpoints go; null = <output_path>-checkpoints (deleted when the run finishes)"})
    seed: int = field(default=42, metadata={"help": "seed for data order, dropout and held-out split"})
    num_threads: int | None = field(default=None, metadata={
        "help": "CPU threads for torch; null = OMP_NUM_THREADS if set, else the cores the load average leaves free "
                "(set 1 on a machine other jobs may start using)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    plan: bool = field(default=False, metadata={
        "help": "only print the plan (layers, ranks, parameters, sizes, predicted speed-up, estimated time) and "
                "stop, writing nothing; the same as --plan"})

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
                    "calibration_samples"]
        for name in positive + ["max_train_samples", "max_eval_samples", "max_steps", "num_threads",
                                "preprocessing_num_workers"]:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be at least 1, got {value}")
        for name in ("learning_rate", "temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "max_grad_norm", "eval_steps", "label_smoothing", "warmup_ratio", "checkpoint_steps",
                     "kd_top_k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative, got {getattr(self, name)}")
        for name in ("target_ratio", "k_info"):
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
        from distillation.knowledge_distillation import LOSS_TERMS
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
        raise ConfigError(f"unknown config key {unknown[0]!r}; valid keys: {', '.join(hints)}")
    for name, value in raw.items():
        _check_type(name, value, hints[name])
    return Config(**raw)


def config_help() -> str:
    lines = ["config.json keys (default):"]
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {f.name:28} {f.metadata['help']} ({json.dumps(default)})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Model


def set_languages_(model, tokenizer, source_lang_code: str | None, target_lang_code: str | None) -> None:
    """Check the language codes asked for against a multilingual tokenizer (NLLB, M2M100, mBART:
    it has ``src_lang`` / ``tgt_lang``; the config's source_lang_code / target_lang_code) and make the target language's token the first generated one,
    as the references start with it (``generation_config.forced_bos_token_id``; for mBART-25, whose
    references end with it, ``decoder_start_token_id``), which every ``generate()`` call of the run
    and of the saved model then uses. A multilingual teacher with no target language anywhere
    (config, tokenizer, generation config) is refused: it would translate into whatever it likes."""
    name = type(tokenizer).__name__
    multilingual = hasattr(tokenizer, "src_lang") and hasattr(tokenizer, "tgt_lang")
    given = {k: v for k, v in (("source_lang_code", source_lang_code), ("target_lang_code", target_lang_code)) if v}
    if given and not multilingual:
        key = next(iter(given))
        raise ConfigError(f"{key}: {given[key]!r} given, but the teacher's tokenizer ({name}) has no language codes "
                          f"(they are for NLLB/M2M100 and mBART-50 teachers); leave {key} out")
    if not multilingual:
        return
    target = target_lang_code or tokenizer.tgt_lang
    if not target:
        if model.generation_config.forced_bos_token_id is None:
            raise ConfigError(f"target_lang_code: the teacher's tokenizer ({name}) is multilingual and nothing says which "
                              f"language to translate into; set target_lang_code (e.g. \"deu_Latn\" for NLLB)")
        return
    ids = {}
    for key, code in {**given, "target_lang_code": target}.items():
        try:  # M2M100 names its codes "de" (token "__de__"), NLLB and mBART-50 by their tokens
            ids[key] = tokenizer.get_lang_id(code) if hasattr(tokenizer, "get_lang_id") else \
                tokenizer.convert_tokens_to_ids(code)
        except KeyError:
            ids[key] = None
        if ids[key] in (None, tokenizer.unk_token_id):
            codes = [t for t in tokenizer.all_special_tokens if not t.startswith("<")]  # not <pad>, </s>…
            raise ConfigError(f"{key}: {code!r} is not a language code of the teacher's tokenizer ({name}); "
                              f"its codes look like {', '.join(map(repr, codes[:3])) or 'nothing'}")
    if tokenizer(text_target="a")["input_ids"][0] == ids["target_lang_code"]:  # NLLB, M2M100, mBART-50
        model.generation_config.forced_bos_token_id = ids["target_lang_code"]
    else:  # mBART-25 puts the code last; the model's shift of the labels moves it first: decoding starts with it
        model.generation_config.decoder_start_token_id = ids["target_lang_code"]


def load_models(config: Config) -> tuple:
    """(teacher, the model factorized into the student, the teacher's tokenizer): the model is
    ``student_model_path``, or the teacher itself by default. A multilingual tokenizer gets the
    language codes, and the target language is forced when generating (``set_languages_``). An
    export the teacher cannot have, or a kd_top_k above its vocabulary, is refused now, not after the
    training."""
    from decomposition import check_same_vocabulary
    from matrix_decomposition import load_pretrained

    languages = {k: v for k, v in (("src_lang", config.source_lang_code), ("tgt_lang", config.target_lang_code)) if v}
    teacher, tokenizer = load_pretrained(config.teacher_model_path, "teacher_model_path", languages)
    set_languages_(teacher, tokenizer, config.source_lang_code, config.target_lang_code)
    if config.export:  # the ONNX export takes MarianMT only
        from mdcompress.onnx_export import ExportError, _check_exportable
        try:
            _check_exportable(teacher)
        except ExportError as e:
            raise ConfigError(f"export: {e}; leave export out") from None
    vocab = teacher.get_output_embeddings().out_features
    if config.kd_top_k > vocab:
        raise ConfigError(f"kd_top_k: {config.kd_top_k} is more than the teacher's vocabulary ({vocab} tokens)")
    base = teacher
    if config.student_model_path:
        base, base_tokenizer = load_pretrained(config.student_model_path, "student_model_path", languages)
        set_languages_(base, base_tokenizer, config.source_lang_code, config.target_lang_code)
        check_same_vocabulary(teacher, tokenizer, base, base_tokenizer)
    return teacher, base, tokenizer


def fit_lengths(config: Config, *models) -> Config:
    """``config`` with max_source_length, max_target_length and max_new_tokens cut to the positions
    the ``models`` can represent: longer sequences are truncated, not crashed on."""
    positions = min((getattr(m.config, "max_position_embeddings", None) or 10**9) for m in models)
    if positions >= 10**9:
        return config
    return dataclasses.replace(config, max_source_length=min(config.max_source_length, positions),
                               max_target_length=min(config.max_target_length, positions),
                               max_new_tokens=min(config.max_new_tokens, positions - 1))


# ---------------------------------------------------------------------------------------------
# Data


def model_inputs(config: Config, tokenizer, train_pairs, eval_pairs, state, say=print, teacher=None,
                 generate: dict | None = None) -> tuple:
    """(train_set, eval_set): the pairs (``data.load_data``) turned into model inputs by the
    preprocessing hook, looked up now (so a replaced ``data_preprocessor`` is the one used) and
    cached (``data.preprocess``). With ``sequence_level_kd`` and a ``teacher``, the training
    targets are the teacher's translations of the training inputs (``generate``: their settings),
    generated once and shared among the processes (``distillation.sequence_level_kd``)."""
    from mdcompress import data
    from distillation.sequence_level_kd import teacher_translations

    preprocessor = globals()["data_preprocessor"]

    def preprocess(pairs):  # tokenized once: a later run with the same data, tokenizer and code reads the cache
        return data.preprocess(pairs, tokenizer, config, preprocessor, cache_dir=data.tokenized_cache_dir(config),
                               num_workers=config.preprocessing_num_workers, code=[default_data_preprocessor], say=say)

    with state.main_process_first():
        train_set = preprocess(train_pairs)
        eval_set = preprocess(eval_pairs)
    if config.sequence_level_kd and teacher is not None:
        targets, cache_file, reused = teacher_translations(teacher, tokenizer, train_set["input_ids"],
                                                           cache_dir(config), config.teacher_model_path, **generate)
        say(f"sequence-level KD: teacher translations of {len(targets):,} training sources "
            f"{'reused from' if reused else 'cached in'} {cache_file}", flush=True)
        train_pairs = train_pairs.remove_columns("target_text").add_column("target_text", targets)
        with state.main_process_first():
            train_set = preprocess(train_pairs)
    return train_set, eval_set


# ---------------------------------------------------------------------------------------------
# The run


def print_report(report: dict) -> None:
    teacher_params = report["teacher"]["params"]
    print(f"\n{'model':<18}{'params':>12}{'% teacher':>11}{'BLEU':>8}{'chrF':>8}{'MB':>9}")
    for name in ("teacher", "student_base", "decomposed", "student", "student_int8", "student_onnx", "student_onnx_int8"):
        row = report.get(name)
        if row is None:
            continue
        print(f"{name:<18}{row['params']:>12,}{100 * row['params'] / teacher_params:>10.1f}%"
              f"{row['bleu']:>8.2f}{row['chrf']:>8.2f}{row.get('size_mb', float('nan')):>9.2f}")
    epochs = report["train_pairs"] / report["train_dataset_pairs"]
    print(f"compression ratio {report['compression_ratio']:.3f} (student params / teacher params); "
          f"{report['layers_decomposed']} layers decomposed; recovered in {report['train_seconds'] / 60:.1f} min "
          + (f"(+ {report['teacher_cache_seconds']:.0f} s for the teacher's top-{report['kd_top_k']} logits) "
             if report.get("teacher_cache_seconds") else "") +
          f"on {report['train_pairs']:,} pairs ({epochs:.3g} epoch{'' if epochs == 1 else 's'} of "
          f"{report['train_dataset_pairs']:,}; "
          f"{report['train_target_tokens']:,} target tokens); evaluated on {report['eval_pairs']:,} pairs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=config_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.json", help="the JSON config to run (default: ./config.json)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue an interrupted run from its latest checkpoint (same config)")
    mode.add_argument("--plan", action="store_true",
                      help="print the layers, ranks, sizes, predicted speed-up and estimated time of the run, then "
                           "stop; writes nothing")
    args = parser.parse_args(argv)
    config = None

    def what_is_kept(signum: int) -> str:  # the line after a signal: config as loaded by then
        return after_interrupt(config, signum, plan=args.plan or bool(config and config.plan))

    interrupt = _InterruptWatch(what_is_kept)
    try:
        config = load_config(args.config)
        if args.resume and config.plan:
            raise ConfigError("plan: true only plans a run; remove it (or --resume) to continue the interrupted run")
        from mdcompress.sweep import sweep_key
        if sweep_key(config):
            code = run_sweep(config, sweep_key(config), resume=args.resume, config_path=args.config,
                             plan_only=args.plan or config.plan)
        else:
            code = run(config, resume=args.resume, config_path=args.config, plan_only=args.plan or config.plan)
        leave_process_group()
        return code
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line saying what is kept and how to go on, no traceback
        return interrupt.stopped(e)
    except Exception as e:
        if (stop := _interrupt_behind(e)) is not None:  # a library's own error while it was being interrupted
            return interrupt.stopped(stop)
        if not isinstance(e, (UserError, FloatingPointError)):
            raise
        print(f"compress_model.py: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, FloatingPointError) else 2  # 2: the input was wrong; 1: the run failed
    finally:
        interrupt.close()


def leave_process_group() -> None:
    """Destroy the process group of a multi-process run (torchrun) once this process's part is done.
    Left to the interpreter's exit, gloo's worker threads can abort the process at random (SIGABRT,
    "terminate called without an active exception", pytorch/pytorch#190489). Called only after a
    run that returned: a process that failed leaves it alone, as destroying a group another process
    may still wait on in a collective can hang (the processes exchange nothing after training)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


# Keys that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = {"progress", "overwrite_output", "num_threads", "cache_dir", "preprocessing_num_workers"}


def checkpoint_dir(config: Config) -> Path:
    return Path(config.checkpoint_dir or f"{config.output_path.rstrip('/')}-checkpoints")


def cache_dir(config: Config) -> Path:
    return Path(config.cache_dir or f"{config.output_path.rstrip('/')}-cache")


def remove_checkpoints(folder: Path) -> None:
    """Delete what runs write in a checkpoint folder (run.json and the training checkpoints), then the
    folder itself if nothing else is left in it: never a file this tool did not write."""
    if not folder.is_dir():
        return
    from distillation.knowledge_distillation import CHECKPOINT_ENTRIES

    for pattern in ("run.json", ".run.json.tmp", *CHECKPOINT_ENTRIES):
        for entry in folder.glob(pattern):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    try:
        folder.rmdir()
    except OSError:
        pass  # it holds something else: left alone


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, Slurm, ``docker stop``) while ``main()`` runs, raised in the main
    thread: the run stops the way Ctrl-C stops it (temporary folders removed, one line), with exit
    status 143 (128 + SIGTERM)."""


def _interrupt_behind(e: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (or Terminated) during whose handling ``e`` was raised, if any: a library
    cleaning up after an interrupt can raise an error of its own (datasets' worker pool, stopped while
    it tokenizes, a TimeoutError), which is no failure of the run."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__context__
    return None


class _InterruptWatch:
    """Ctrl-C (SIGINT) and SIGTERM stop the run within seconds, whatever it was doing: the first
    signal raises KeyboardInterrupt (for SIGTERM its subclass ``Terminated``) in the main thread, and a
    watchdog thread hears of it at once through the signal wakeup file descriptor, which the C-level
    handler writes to even while the main thread is stuck in a library call (where Python's own
    handler cannot run) or deadlocked after the interrupt. Should ``main()`` not have returned after a
    grace time, the watchdog reports and exits. A signal that was ignored, or had a handler of its
    own, when ``main()`` started is left alone; the handlers are restored by ``close``. Processes
    forked meanwhile (datasets' tokenizing workers) get the default SIGTERM back and ignore SIGINT,
    which a terminal's Ctrl-C sends them too: the parent stops them, and their tracebacks stay out of
    the way of the one line."""

    GRACE_SECONDS = 15
    active: "_InterruptWatch | None" = None  # the installed watch, for the fork hook
    _fork_hook = False

    def __init__(self, describe) -> None:
        import socket
        import threading

        self.describe = describe  # signal number → the one line saying what is kept
        self.done, self.installed, self.previous = threading.Event(), False, {}
        self.report_lock, self.reported = threading.Lock(), False
        if threading.current_thread() is not threading.main_thread():
            return
        ours = {signal.SIGINT: (signal.default_int_handler, self._on_sigint),
                signal.SIGTERM: (signal.SIG_DFL, self._on_sigterm)}
        ours = {signum: handler for signum, (default, handler) in ours.items() if signal.getsignal(signum) == default}
        if not ours:
            return
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)  # the C handler must never block on it
        self.previous_fd = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        self.previous = {signum: signal.signal(signum, handler) for signum, handler in ours.items()}
        self.installed = True
        _InterruptWatch.active = self
        if not _InterruptWatch._fork_hook:
            os.register_at_fork(after_in_child=_InterruptWatch._after_fork_in_child)
            _InterruptWatch._fork_hook = True
        threading.Thread(target=self._watchdog, name="interrupt-watchdog", daemon=True).start()

    def _on_sigint(self, signum, frame):
        raise KeyboardInterrupt

    def _on_sigterm(self, signum, frame):
        raise Terminated

    @staticmethod
    def _after_fork_in_child() -> None:
        watch, _InterruptWatch.active = _InterruptWatch.active, None
        if watch is None or not watch.installed:
            return
        try:
            signal.set_wakeup_fd(-1)  # the parent's watchdog must not hear of the child's signals
            for signum, previous in watch.previous.items():
                signal.signal(signum, signal.SIG_IGN if signum == signal.SIGINT else previous)
        except ValueError:  # not the child's main thread: nothing can be changed
            pass

    def _watchdog(self) -> None:
        with self.reader:
            while True:  # the wakeup fd carries the number of every signal caught; wait for one of ours
                try:
                    received = self.reader.recv(64)
                except OSError:
                    return
                if not received:  # close(): main() returned
                    return
                signum = next((s for s in received if s in self.previous), None)
                if signum is not None:
                    break
        if self.done.wait(self.GRACE_SECONDS):
            return
        self.report(signum, raw=True)
        for name in ("multiprocess", "multiprocessing"):  # workers ignoring SIGINT must not outlive us
            if name in sys.modules:
                for child in sys.modules[name].active_children():
                    child.terminate()
        os._exit(128 + signum)

    def stopped(self, interrupt: KeyboardInterrupt) -> int:
        """Report ``interrupt`` (Ctrl-C, or SIGTERM if ``Terminated``); the exit status a shell gives a
        command the signal stopped."""
        signum = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
        self.report(signum)
        return 128 + signum

    def report(self, signum: int, raw: bool = False) -> None:
        """The one line after an interrupt, once (from main(), or the watchdog with ``raw`` writes,
        which bypass Python's stderr buffer in case the stuck main thread holds it)."""
        if not self.report_lock.acquire(timeout=1):
            return
        try:
            if self.reported or int(os.environ.get("RANK", "0")) != 0:
                return
            self.reported = True
            line = f"compress_model.py: {self.describe(signum)}\n"
            if raw:
                os.write(2, line.encode())
            else:
                print(line, end="", file=sys.stderr, flush=True)
        finally:
            self.report_lock.release()

    def close(self) -> None:
        self.done.set()
        if self.installed:
            for signum, previous in self.previous.items():
                signal.signal(signum, previous)
            signal.set_wakeup_fd(self.previous_fd)
            self.writer.close()  # the watchdog reads end-of-file and leaves
            self.installed = False
            _InterruptWatch.active = None


def after_interrupt(config: Config | None, signum: int = signal.SIGINT, plan: bool = False) -> str:
    """What a run stopped by ``signum`` (SIGINT: Ctrl-C, or SIGTERM) leaves, and how to go on (one
    line). A checkpoint folder holding nothing to resume from is removed, so that the same command
    simply starts over; a plan and a sweep, which keep no checkpoints, leave it alone."""
    from mdcompress.sweep import sweep_key

    stopped = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    if config is None:
        return stopped
    if plan:
        return f"{stopped}; a plan keeps nothing: run the same command to plan again"
    if sweep_key(config):
        return f"{stopped}; a sweep keeps no checkpoints, so nothing was kept; run the same command to start over"
    folder = checkpoint_dir(config)
    if (folder / "latest").is_file():
        latest = folder / (folder / "latest").read_text().strip()
        step = int(latest.name.split("-")[-1])
        try:
            finished = json.loads((latest / "progress.json").read_text()).get("finished", False)
        except (OSError, ValueError):
            finished = False
        if finished:
            return (f"{stopped} after training; the trained student (step {step}) is kept in {folder}: run the "
                    f"same command with --resume to evaluate and save it without training again")
        return (f"{stopped}; the checkpoint of step {step} is kept in {folder}: run the same "
                f"command with --resume to continue from it")
    if signum == signal.SIGTERM and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun stops every process with SIGTERM when one of them fails: what that failure left (run.json,
        # the evaluations) is kept for --resume, as after the failure itself
        return (f"{stopped} (torchrun stops every process when one of them fails: see the other processes' errors); "
                f"{folder} is kept: run the same command with --resume to reuse what it holds")
    remove_checkpoints(folder)
    if not config.checkpoint_steps:
        return f"{stopped}; checkpoint_steps is 0, so nothing was kept; run the same command to start over"
    return f"{stopped} before the first checkpoint, so nothing was kept; run the same command to start over"


def check_resume(config: Config, resume: bool) -> dict | None:
    """The saved state of the run to resume ({"config", "report", "ranks"}), or None for a fresh run.
    Refuses to start over a checkpoint silently, and to resume with a different config. A run
    stopped before its first checkpoint left only run.json: nothing to lose by starting over, and
    --resume distills from the start, reusing its evaluations and ranks."""
    folder = checkpoint_dir(config)
    run_file = folder / "run.json"
    if not resume:
        if (folder / "latest").is_file() and not config.overwrite_output:
            raise ConfigError(f"checkpoint_dir: {str(folder)!r} holds an unfinished run; add --resume to continue "
                              f"it, or delete the folder (or set \"overwrite_output\": true) to start over")
        return None
    if not run_file.is_file():
        raise ConfigError(f"--resume: no checkpoint of an interrupted run in {str(folder)!r} (checkpoint_steps is "
                          f"{config.checkpoint_steps}); run without --resume to start")
    saved = json.loads(run_file.read_text(encoding="utf-8"))
    now = dataclasses.asdict(config)
    # a key the interrupted run's version did not have yet ran at its default
    before = {**dataclasses.asdict(Config()), **saved["config"]}
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and before.get(k) != now[k])
    if changed:
        k = changed[0]
        raise ConfigError(f"--resume: {k} was {json.dumps(before.get(k))} in the interrupted run and is "
                          f"{json.dumps(now[k])} now; resume with the same config")
    return saved


def torch_threads(num_threads: int | None, environ=os.environ, cores: int | None = None,
                  load: float | None = None, torch_default: int | None = None) -> tuple[int, str]:
    """(threads for torch, why). ``num_threads`` if given, else ``OMP_NUM_THREADS`` if set, else
    torch's default (a thread per core) less the cores the 1-minute load average says other jobs
    keep busy: on shared cores, OpenMP threads waiting for each other slowed training 10-30×."""
    import torch

    if num_threads:
        return num_threads, "num_threads"
    if environ.get("OMP_NUM_THREADS", "").isdigit() and int(environ["OMP_NUM_THREADS"]) > 0:
        return int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = max(1, min(torch_default or torch.get_num_threads(), cores - round(load)))
    return threads, f"{cores} cores, load average {load:.1f}; set num_threads or OMP_NUM_THREADS to choose"


def run_inputs(config: Config, config_path: str | os.PathLike | None = None) -> dict[str, str]:
    """{key: local path} of what the run reads (every ``*_path`` key but output_path that names a local
    file or folder, and the config file): the folders it writes must stay clear of them."""
    inputs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name.endswith("_path") and f.name != "output_path" and isinstance(getattr(config, f.name), str)
              and Path(getattr(config, f.name)).exists()}
    if config_path is not None:
        inputs["config file"] = str(config_path)
    return inputs


def quiet_transformers() -> None:
    """Silence transformers' warnings and "Loading weights" bars: ours are the messages that matter."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")


def check_before_work(config: Config, config_path: str | os.PathLike | None, device) -> None:
    """Refuse, before any work: fp16 on a CPU; an output or checkpoint folder that would clobber
    something or overlaps the run's inputs; a cache folder that is a file."""
    from mdcompress import data
    from mdcompress.output_folder import check_clear_of, check_output_path

    if config.mixed_precision == "fp16" and device.type == "cpu":
        raise ConfigError("mixed_precision: 'fp16' needs a GPU (on a CPU, Accelerate trains in float32 without "
                          "saying so); use \"bf16\" or \"no\"")
    inputs = run_inputs(config, config_path)
    check_output_path(config.output_path, config.overwrite_output, inputs)
    check_clear_of("checkpoint_dir", checkpoint_dir(config), {**inputs, "output_path": config.output_path})
    if config.sequence_level_kd and cache_dir(config).exists() and not cache_dir(config).is_dir():
        raise ConfigError(f"cache_dir: {str(cache_dir(config))!r} is a file; give a folder path")
    data.tokenized_cache_dir(config)  # refuses a cache_dir that is a file


def start_checkpoints(folder: Path, run_state: dict) -> None:
    """A fresh checkpoint folder holding run.json (``run_state``: the config, the report so far and the
    ranks, what --resume reuses); an abandoned run's checkpoints (nothing to resume, or
    overwrite_output given) are removed first."""
    from mdcompress.files import write_json_atomic

    remove_checkpoints(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "run.json", run_state)


def run(config: Config, resume: bool = False, config_path: str | os.PathLike | None = None, plan_only: bool = False,
        shared: dict | None = None) -> int:
    """One compression: data, teacher, decomposition, distillation, evaluation, saved outputs.
    ``plan_only`` stops after the decomposition and prints the plan (``plan.print_plan``) instead,
    writing nothing. ``shared`` is a sweep's memory across its runs: the teacher's evaluation
    ("teacher") and the sensitivity curves ("errors") are taken from it when there, stored otherwise;
    the outputs go to its "save_into" folder (the sweep's temporary one) instead of output_path."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from accelerate import PartialState

    from mdcompress import data
    import decomposition
    from distillation.knowledge_distillation import DistillationSettings, distributed_on_cpu
    from mdcompress.evaluation import evaluate_export
    from mdcompress.output_folder import save_outputs
    from mdcompress.pictures import write_run_pictures
    from mdcompress.plan import layer_spectra, no_saving_bounds, print_plan

    quiet_transformers()
    state = PartialState(cpu=distributed_on_cpu())  # one process, or one of several under torchrun / accelerate launch
    main_process = state.is_main_process
    say = print if main_process else (lambda *a, **k: None)

    # Seed and threads; refuse an output or checkpoint folder that would be clobbered, before any work
    torch.manual_seed(config.seed)
    threads, why = torch_threads(config.num_threads)
    torch.set_num_threads(threads)
    check_before_work(config, config_path, state.device)
    saved = check_resume(config, resume)  # an interrupted run's config, evaluations and ranks
    requested = dataclasses.asdict(config)  # as the user wrote it; lengths may be clamped below
    say(f"torch threads: {threads} ({why})", flush=True)

    # Data
    with state.main_process_first():
        train_pairs, eval_pairs = data.load_data(config)
    if (seen := data.shared_pairs(train_pairs, eval_pairs)):
        say(f"warning: {seen:,} of the {len(eval_pairs):,} evaluation pairs are also training pairs; "
            f"their BLEU is not on unseen sentences", flush=True)

    # Model: the teacher, and the model factorized into the student (the teacher itself by default)
    teacher, base, tokenizer = load_models(config)
    config = fit_lengths(config, teacher, base)
    # the layers, ranks, target_ratio, feature_layers and freeze keys checked on them before the pairs are tokenized
    decomposition.check_decomposition(teacher, base, config)
    generate = {"batch_size": config.eval_batch_size, "num_beams": config.num_beams,
                "max_new_tokens": config.max_new_tokens, "max_source_length": config.max_source_length,
                "progress": config.progress and main_process}

    # Model inputs, by the preprocessing hook (sequence_level_kd: the teacher's translations as targets);
    # evaluation translates what the model is trained on: the preprocessor's inputs
    train_set, eval_set = model_inputs(config, tokenizer, train_pairs, eval_pairs, state, say,
                                       teacher=None if plan_only else teacher, generate=generate)
    sources, references = eval_set["input_ids"], eval_pairs["target_text"]

    # Decompose: choose the ranks (k_info, or allocated to target_ratio), factorize
    student = decomposition.decompose(teacher, base, tokenizer, train_set, config, (saved or {}).get("ranks"), shared,
                                      progress=config.progress and main_process, say=say,
                                      cache_dir=data.tokenized_cache_dir(config))
    folder = checkpoint_dir(config)
    resume_training = bool(saved) and (folder / "latest").is_file()  # else distilled from the start
    settings = DistillationSettings.from_config(config, str(folder), resume=resume_training,
                                                cache_dir=str(data.tokenized_cache_dir(config)))
    if plan_only:  # the plan: these layers and ranks, their sizes, speed and time; nothing written
        if main_process:
            print_plan(teacher, student.model, student.ranks, tokenizer, train_set, eval_set, config, settings,
                       student.feature_layers, decompose_seconds=student.seconds, shared=shared,
                       cached_seconds=student.cached_seconds)
        return 0

    # Evaluate the teacher and the decomposed model before recovery (once: a resumed run reuses it)
    if saved:
        report = saved["report"]
        say(f"resuming from {folder}" + ("" if resume_training else " (no checkpoint yet: distilling from the start)"),
            flush=True)
    elif main_process:
        report = decomposition.evaluate_before(teacher, base, student.model, tokenizer, sources, references, generate,
                                               shared)
        if config.checkpoint_steps:
            start_checkpoints(folder, {"config": requested, "report": report, "ranks": student.ranks})

    # Distill
    distiller = decomposition.distill(teacher, student.model, tokenizer, train_set, eval_set, settings,
                                      student.feature_layers)
    if not main_process:
        return 0

    # Evaluate the recovered student; the report
    model, report = decomposition.result(report, teacher, student, distiller, tokenizer, sources, references, config,
                                         generate, len(train_set))

    # Save (atomically, with the exports asked for and the pictures); then drop the run's checkpoints
    pictures = partial(write_run_pictures, spectra=layer_spectra(base, student.ranks),
                       bounds=no_saving_bounds(base, student.ranks))
    save_outputs((shared or {}).get("save_into", config.output_path), model, tokenizer, report,
                 dataclasses.asdict(config), exports=config.export,
                 evaluate=partial(evaluate_export, sources=sources, references=references, **generate),
                 write_more=pictures)
    remove_checkpoints(folder)
    print_report(report)
    print(f"saved to {config.output_path}" + (" (when the sweep ends)" if shared else ""))
    return 0


def run_sweep(config: Config, key: str, resume: bool = False, config_path: str | os.PathLike | None = None,
              plan_only: bool = False) -> int:
    """One ``run`` per value of the list ``key`` (target_ratio or k_info) holds, sharing the teacher's
    evaluation and the sensitivity measurement; each model goes to its own subfolder of output_path,
    with the sweep's table, report.json and BLEU-against-size curve next to them. The whole folder
    appears at the end, atomically, like a single run's."""
    import tempfile

    from matrix_decomposition import load_pretrained, resolve_ranks
    from mdcompress.files import replace_folder, write_json_atomic
    from mdcompress.output_folder import check_output_path
    from mdcompress.pictures import write_sweep_pictures
    from mdcompress.rank_allocation import check_target_ratio
    from mdcompress.sweep import folder_name, print_sweep, sweep_report, sweep_row

    values = getattr(config, key)
    if resume:
        raise ConfigError(f"--resume: a sweep ({key} {json.dumps(values)}) keeps no checkpoints and cannot be "
                          f"resumed; run it again")
    inputs = run_inputs(config, config_path)
    final = check_output_path(config.output_path, config.overwrite_output, inputs)
    quiet_transformers()
    # every value checked on the model that is factorized before hours go into the first
    key_path = "student_model_path" if config.student_model_path else "teacher_model_path"
    base, _ = load_pretrained(getattr(config, key_path), key_path)
    for value in values:
        layers = resolve_ranks(base, config.decompose_layers, 1 if key == "target_ratio" else value)
        if key == "target_ratio":
            check_target_ratio(base, layers, value)
    del base

    def one(value) -> Config:  # its own subfolder, the sweep's sequence-level KD cache, no checkpoints
        return dataclasses.replace(config, **{key: value}, output_path=str(final / folder_name(key, value)),
                                   plan=False, checkpoint_steps=0,
                                   cache_dir=str(cache_dir(config)) if config.sequence_level_kd else config.cache_dir)

    shared: dict = {}
    if plan_only:
        for value in values:
            print(f"\nsweep: {key} {value}")
            run(one(value), config_path=config_path, plan_only=True, shared=shared)
        return 0
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        rows = []
        for i, value in enumerate(values, 1):
            print(f"\nsweep {i}/{len(values)}: {key} {value} → {final / folder_name(key, value)}", flush=True)
            shared["save_into"] = str(tmp / folder_name(key, value))
            run(one(value), config_path=config_path, shared=shared)
            report = json.loads((tmp / folder_name(key, value) / "report.json").read_text(encoding="utf-8"))
            rows.append(sweep_row(key, value, report))
        summary = sweep_report(key, rows, shared["teacher"])
        write_json_atomic(tmp / "report.json", summary)
        write_json_atomic(tmp / "compression_config.json", dataclasses.asdict(config))
        write_sweep_pictures(tmp, summary)
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print_sweep(summary)
    print(f"saved to {config.output_path} (one subfolder per model; report.md shows the table and the curve)")
    return 0


if __name__ == "__main__":
    code = main()
    if code in (130, 143):  # Ctrl-C, SIGTERM: leave at once, not waiting for threads a library left running
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
