"""Translate text with a model written by this tool: one sentence per line in, one translation per line out.

    python -m mdcompress.translate --model outputs/compressed-en-de < input.txt > output.txt                # PyTorch
    python -m mdcompress.translate --model outputs/compressed-en-de/onnx-int8 < input.txt > output.txt      # ONNX Runtime
    python -m mdcompress.translate --model outputs/compressed-en-de --backend onnx --num-beams 4 --threads 2 < in.txt

``--model`` is a folder written by ``compress_model.py`` (factorized; any model folder or hub id of
the families it compresses works too) or an ONNX export of one (``onnx_export.py``, for MarianMT,
M2M100/NLLB, mBART and BART; recognised by its ``onnx_export.json``).
``--backend onnx`` on a model folder uses its ``onnx`` (or, with ``--int8``, ``onnx-int8``) export.
Sentences are sorted by length and translated in batches; the output keeps the input's order,
and an empty line stays an empty line. A sentence longer than the model's positions is cut to them
(one warning says which lines were). Greedy search by default, beam search with ``--num-beams``.

The compression run translates with the same code: ``translate`` (a PyTorch model in memory,
token ids or sentences) for its BLEU evaluations (``evaluation``) and the teacher's translations of
sequence-level KD; ``translate_ids`` batches every backend.

The ONNX Runtime backend needs neither PyTorch nor transformers' models: numpy, onnxruntime and
the tokenizer (and PyTorch only to check ``--source-lang``/``--target-lang``). Its search follows
transformers' ``generate()`` (``OnnxTranslator``): the model's forced first token (a target
language's code, left out of the output), ``bad_words_ids``, ``forced_eos_token_id``, minimum
lengths and ``no_repeat_ngram_size`` apply, finished sentences are padded, and beam hypotheses are
scored by sum of log-probabilities / length ** length_penalty and stopped as ``early_stopping`` says.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mdcompress.errors import ExportError, TranslateError, UserError
from mdcompress.files import not_utf8, write_text_atomic
from mdcompress.onnx_format import DECODER, ENCODER, WEIGHTS, default_folder, is_export, load_model, read_info
from mdcompress.process import exit_with, program_name, quiet_transformers
from mdcompress.vocabulary import warn_unknown

BACKENDS = ("auto", "torch", "onnx")
# A translation is bounded by its source, as Marian's --max-length-factor bounds it: at most
# ceil(factor × source tokens) + MAX_LENGTH_MARGIN new tokens (and never more than max_new_tokens), so that a
# degenerate output ("Erddddungssss…") stops near the length of a real one instead of running to max_new_tokens
DEFAULT_MAX_LENGTH_FACTOR = 2.0
MAX_LENGTH_MARGIN = 10


def length_bounds(source_lengths: Sequence[int], max_new_tokens: int, factor: float | None) -> list[int]:
    """The most new tokens each source (its length in tokens, </s> included) may be translated into:
    ``min(max_new_tokens, ceil(factor · length) + MAX_LENGTH_MARGIN)``; ``factor`` None: ``max_new_tokens``."""
    import math

    if factor is None:
        return [max_new_tokens] * len(source_lengths)
    return [min(max_new_tokens, math.ceil(factor * n) + MAX_LENGTH_MARGIN) for n in source_lengths]



# Settings of a generation config that transformers' generate() applies to greedy and beam search and the
# ONNX search does not, with the value that leaves them off: a folder that sets one is refused, not translated otherwise
NOT_APPLIED = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0,
                "sequence_bias": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                "exponential_decay_length_penalty": None, "num_beam_groups": 1, "diversity_penalty": 0.0,
                "renormalize_logits": False, "force_words_ids": None, "constraints": None}


def _generation_settings(folder: Path) -> dict:
    """The search settings of an export: its ``generation_config.json``, with the token ids it lacks
    from ``config.json`` (all of them from there when it has none, as transformers derives one)."""
    path = folder / "generation_config.json"
    settings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    derived = ("forced_bos_token_id", "bad_words_ids", "no_repeat_ngram_size", "min_length", "length_penalty",
               "early_stopping") if not path.is_file() else ()
    for key in ("decoder_start_token_id", "eos_token_id", "pad_token_id", "forced_eos_token_id", *derived):
        if settings.get(key) is None and config.get(key) is not None:
            settings[key] = config.get(key)
    return settings


def _one_id(settings: dict, key: str, folder: Path):
    """A token id of the generation settings: an int, or a list holding one; None stays None."""
    value = settings.get(key)
    if isinstance(value, list):
        if len(value) != 1:
            raise TranslateError(f"--model: {str(folder)!r} has {key} {value} in its generation config; the ONNX "
                                 f"search takes one id: translate with --backend torch on its model folder")
        value = value[0]
    return value


class OnnxTranslator:
    """Greedy and beam search over the two graphs of an ``onnx_export`` folder, in ONNX Runtime,
    with the search settings of its generation config as generate() applies them: the decoder's
    start token, a forced first token (the target language's code of NLLB, M2M100, mBART-50: no part
    of the translation, so left out of the output as ``TorchTranslator`` leaves it out), a forced
    </s> at the last position, bad words, ``min_length``, ``min_new_tokens``, ``no_repeat_ngram_size``,
    the beams' ``length_penalty`` and ``early_stopping``. A setting it does not apply is refused in one line.
    ``generation_config`` holds the start and forced tokens, which ``choose_languages_`` may change."""

    backend = "onnx"

    def __init__(self, folder: str | os.PathLike, threads: int = 1) -> None:
        import types

        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        try:
            self.info = read_info(folder)
        except ExportError as e:
            raise TranslateError(f"--model: {e}") from None
        settings = _generation_settings(self.folder)
        for key, off in NOT_APPLIED.items():
            if settings.get(key) not in (None, off, []):
                raise TranslateError(f"--model: {str(self.folder)!r} sets {key} {settings[key]!r} in its "
                                     f"generation_config.json, which the ONNX search does not apply; translate with "
                                     f"--backend torch on its model folder, or remove {key} from that file")
        early = settings.get("early_stopping", False)
        if early not in (True, False, "never"):
            raise TranslateError(f"--model: early_stopping {early!r} in {str(self.folder)!r}'s generation config is "
                                 f"not one of true, false, \"never\"")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(self.folder / ENCODER), options, providers=providers)
        self.decoder = ort.InferenceSession(str(self.folder / DECODER), options, providers=providers)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.generation_config = types.SimpleNamespace(
            decoder_start_token_id=_one_id(settings, "decoder_start_token_id", self.folder),
            forced_bos_token_id=_one_id(settings, "forced_bos_token_id", self.folder))
        self.eos = _one_id(settings, "eos_token_id", self.folder)
        self.pad = _one_id(settings, "pad_token_id", self.folder)
        self.forced_eos = _one_id(settings, "forced_eos_token_id", self.folder)
        self.banned = [ids[0] for ids in settings.get("bad_words_ids") or [] if len(ids) == 1]
        self.length_penalty = settings.get("length_penalty", 1.0)
        self.early_stopping = early
        self.min_length = settings.get("min_length") or 0  # of the decoder's sequence, its start token included
        self.min_new_tokens = settings.get("min_new_tokens") or 0  # generate()'s unless a call gives its own
        self.no_repeat = settings.get("no_repeat_ngram_size") or 0
        self.max_positions = self.info["max_positions"]

    @property
    def start(self) -> int:
        return self.generation_config.decoder_start_token_id

    def _encode(self, input_ids, attention_mask):
        return self.encoder.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})

    def _step(self, tokens, attention_mask, past, cross, step: int, max_new_tokens: int, min_new_tokens: int = 0,
              normalize: bool = False, bounds=None, history=None):
        """Scores of the next token (B, V) with the search constraints applied, in generate()'s order, and
        the grown cache: logits, or with ``normalize`` log-probabilities (taken before the constraints, as
        generate() does). ``bounds`` (B,): each row's most new tokens; at its last one the row gets </s>
        (``EndAtBound``). ``history``: each row's tokens so far, the start token first (for
        ``no_repeat_ngram_size``)."""
        import numpy as np

        feed = {"input_ids": tokens[:, None], "attention_mask": attention_mask,
                **dict(zip(self.info["past"], past)), **dict(zip(self.info["cross"], cross))}
        scores, *past = self.decoder.run(None, feed)
        if normalize:
            top = scores.max(axis=-1, keepdims=True)
            scores -= top + np.log(np.exp(scores - top).sum(axis=-1, keepdims=True))
        if self.no_repeat and history is not None:
            for row, tokens_so_far in enumerate(history):
                scores[row, _repeated_ngram_ends(tokens_so_far, self.no_repeat)] = -np.inf
        if self.banned:
            scores[:, self.banned] = -np.inf
        if step < max(min_new_tokens or self.min_new_tokens, self.min_length - 1):  # min_length counts the start token
            scores[:, self.eos] = -np.inf
        forced = self.generation_config.forced_bos_token_id
        if forced is not None and step == 0:  # the first new token: the target language's code
            scores[:] = -np.inf
            scores[:, forced] = 0.0  # as transformers' ForcedBOSTokenLogitsProcessor scores it
        if self.forced_eos is not None and step == max_new_tokens - 1:  # the last position: end the sentence
            scores[:] = -np.inf
            scores[:, self.forced_eos] = 0.0  # as transformers' ForcedEOSTokenLogitsProcessor scores it
        if bounds is not None:
            ending = bounds == step + 1
            if ending.any():
                scores[ending] = -np.inf
                scores[ending, self.eos] = 0.0
        return scores, past

    def _empty_cache(self, batch: int):
        import numpy as np

        return [np.zeros((batch, self.info["heads"], 0, self.info["head_dim"]), np.float32) for _ in self.info["past"]]

    def generate(self, input_ids, attention_mask, num_beams: int = 1, max_new_tokens: int = 128,
                 min_new_tokens: int = 0, bounds: Sequence[int] | None = None) -> list[list[int]]:
        """Token ids of the translations of a padded batch (numpy int64 arrays (B, S)), without the
        start token; ``min_new_tokens`` keeps </s> out until then (as in generate()); ``bounds``: the most
        new tokens of each sentence (``length_bounds``), </s> at the last."""
        import numpy as np

        if self.max_positions:  # None: relative positions (T5), no limit
            max_new_tokens = min(max_new_tokens, self.max_positions)
        if bounds is not None:
            bounds = np.asarray(bounds, dtype=np.int64)
            max_new_tokens = min(max_new_tokens, int(bounds.max()))
        if num_beams > 1:
            return self._beam_search(input_ids, attention_mask, num_beams, max_new_tokens, min_new_tokens, bounds)

        cross = self._encode(input_ids, attention_mask)
        batch = input_ids.shape[0]
        out: list[list[int]] = [[] for _ in range(batch)]
        alive = np.arange(batch)  # rows still translating; finished ones leave the batch
        tokens = np.full(batch, self.start, dtype=np.int64)
        past, mask = self._empty_cache(batch), attention_mask
        for step in range(max_new_tokens):
            history = [[self.start, *out[row]] for row in alive] if self.no_repeat else None
            logits, past = self._step(tokens, mask, past, cross, step, max_new_tokens, min_new_tokens,
                                      bounds=None if bounds is None else bounds[alive], history=history)
            tokens = logits.argmax(-1).astype(np.int64)
            for row, token in zip(alive, tokens):
                out[row].append(int(token))
            keep = np.flatnonzero(tokens != self.eos)
            if len(keep) == 0:
                break
            if len(keep) < len(alive):
                alive, tokens, mask = alive[keep], tokens[keep], mask[keep]
                past = [p[keep] for p in past]
                cross = [c[keep] for c in cross]
        return self._without_forced(out)

    def _without_forced(self, rows: list[list[int]]) -> list[list[int]]:
        return without_forced(rows, self.generation_config.forced_bos_token_id)

    def _beam_search(self, input_ids, attention_mask, num_beams: int, max_new_tokens: int,
                     min_new_tokens: int, bounds=None) -> list[list[int]]:
        import numpy as np

        batch, beams, lp = input_ids.shape[0], num_beams, self.length_penalty
        cross = [np.repeat(c, beams, axis=0) for c in self._encode(input_ids, attention_mask)]
        mask = np.repeat(attention_mask, beams, axis=0)
        past = self._empty_cache(batch * beams)
        tokens = np.full(batch * beams, self.start, dtype=np.int64)
        scores = np.zeros((batch, beams), np.float32)
        scores[:, 1:] = -1e9  # the beams start equal: only the first is expanded at the first step
        sequences = np.zeros((batch, beams, 0), np.int64)
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]  # (score, tokens), best first
        alive = np.arange(batch)  # sentences still searching; finished ones leave the batch
        for step in range(max_new_tokens):
            history = [[self.start, *seq] for seq in sequences.reshape(len(alive) * beams, step).tolist()] \
                if self.no_repeat else None
            log_probs, past = self._step(tokens, mask, past, cross, step, max_new_tokens, min_new_tokens, normalize=True,
                                         bounds=None if bounds is None else np.repeat(bounds[alive], beams),
                                         history=history)
            vocab = log_probs.shape[-1]
            candidates = (scores[:, :, None] + log_probs.reshape(len(alive), beams, vocab)).reshape(len(alive), -1)
            part = np.argpartition(-candidates, 2 * beams - 1, axis=1)[:, : 2 * beams]
            values = np.take_along_axis(candidates, part, axis=1)
            rank = np.argsort(-values, axis=1, kind="stable")
            top, values = np.take_along_axis(part, rank, axis=1), np.take_along_axis(values, rank, axis=1)  # (A, 2K)
            beam, token = top // vocab, top % vocab
            last = step == max_new_tokens - 1
            ends = np.ones_like(token, bool) if last else token == self.eos
            norm = (step + 1) ** lp
            for row, k in zip(*np.nonzero(ends[:, :beams])):  # endings among the best K become hypotheses
                pool = finished[alive[row]]
                pool.append((float(values[row, k]) / norm, [*sequences[row, beam[row, k]].tolist(), int(token[row, k])]))
                pool.sort(key=lambda h: -h[0])
                del pool[beams:]
            running = np.argsort(ends, axis=1, kind="stable")[:, :beams]  # the best K that did not end
            source = np.take_along_axis(beam, running, axis=1)
            next_tokens, next_scores = np.take_along_axis(token, running, axis=1), np.take_along_axis(values, running, axis=1)
            # a sentence is done once no running beam can beat the worst of its K finished hypotheses (as
            # generate() guesses it: the best running score at this length, or at the longest with early_stopping
            # "never" and a positive length_penalty), or, with early_stopping true, once it has K
            best = (max_new_tokens ** lp) if self.early_stopping == "never" and lp > 0 else norm
            keep = np.array([not last and not (len(finished[b]) == beams and (
                self.early_stopping is True or finished[b][-1][0] >= next_scores[row, 0] / best))
                for row, b in enumerate(alive)], bool)
            if not keep.any():
                break
            sequences = np.concatenate([np.take_along_axis(sequences, source[:, :, None], axis=1),
                                        next_tokens[:, :, None]], axis=2)[keep]
            past = [p[(np.arange(len(alive))[:, None] * beams + source)[keep].reshape(-1)] for p in past]
            if not keep.all():  # the beams of the sentences still searching
                rows = (np.flatnonzero(keep)[:, None] * beams + np.arange(beams)).reshape(-1)
                cross, mask = [c[rows] for c in cross], mask[rows]
            alive, tokens, scores = alive[keep], next_tokens[keep].reshape(-1), next_scores[keep]
        return self._without_forced([finished[b][0][1] for b in range(batch)])


def without_forced(rows: list[list[int]], forced: int | None) -> list[list[int]]:
    """The rows less the forced first token ``forced`` (the target language's code of NLLB, M2M100,
    mBART-50: it says which language, it is not part of the translation), in both backends."""
    return [row[1:] if forced is not None and row[:1] == [forced] else row for row in rows]


def _repeated_ngram_ends(tokens: Sequence[int], size: int) -> list[int]:
    """The tokens that would repeat an n-gram of ``size`` tokens already in ``tokens`` (transformers'
    NoRepeatNGramLogitsProcessor): those that followed the last ``size - 1`` tokens before."""
    if len(tokens) + 1 < size:
        return []
    prefix = tuple(tokens[len(tokens) + 1 - size:])
    return [tokens[i + size - 1] for i in range(len(tokens) - size + 1) if tuple(tokens[i:i + size - 1]) == prefix]


class TorchTranslator:
    """``generate()`` of a PyTorch model: one in memory, or (``load``) the one in a folder written by
    this tool (or any model folder or hub id of the families it compresses)."""

    backend = "torch"

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_positions = getattr(model.config, "max_position_embeddings", None)  # None: unlimited

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int = 1) -> "TorchTranslator":
        import torch

        torch.set_num_threads(threads)
        try:
            return cls(*load_model(str(path)))
        except ExportError as e:
            raise TranslateError(str(e)) from None

    def generate(self, input_ids, attention_mask, num_beams: int = 1, max_new_tokens: int = 128,
                 min_new_tokens: int = 0, bounds: Sequence[int] | None = None) -> list[list[int]]:
        import torch
        from transformers import LogitsProcessorList

        if self.max_positions:  # the decoder reads position k to choose token k + 1: no more than it has
            max_new_tokens = min(max_new_tokens, self.max_positions)
        extra = {}
        if bounds is not None:
            max_new_tokens = min(max_new_tokens, max(bounds))
            eos = self.model.generation_config.eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
            extra["logits_processor"] = LogitsProcessorList([EndAtBound(bounds, num_beams, eos)])
        min_new_tokens = min(min_new_tokens, max_new_tokens)
        device = next(self.model.parameters()).device
        if min_new_tokens:  # else the model's own min_length
            extra["min_new_tokens"] = min_new_tokens
        with torch.no_grad():  # not inference_mode: a model in memory may be trained afterwards
            out = self.model.generate(input_ids=torch.from_numpy(input_ids).to(device),
                                      attention_mask=torch.from_numpy(attention_mask).to(device),
                                      num_beams=num_beams, do_sample=False, max_new_tokens=max_new_tokens, **extra)
        rows = [row[1:] for row in out.tolist()]  # without the decoder start token
        return without_forced(rows, self.model.generation_config.forced_bos_token_id)


class EndAtBound:
    """A logits processor of ``generate()``: sentence ``i`` of the batch (its beams: rows ``i·beams`` to
    ``i·beams + beams - 1``) gets </s> as its ``bounds[i]``-th new token, as ``forced_eos_token_id`` ends every
    sentence at ``max_new_tokens``; the ONNX search (``OnnxTranslator._step``) does the same."""

    def __init__(self, bounds: Sequence[int], beams: int, eos: int) -> None:
        import torch

        self.bounds = torch.tensor(list(bounds), dtype=torch.long).repeat_interleave(beams)
        self.eos = eos

    def __call__(self, input_ids, scores):
        ending = (self.bounds.to(input_ids.device) == input_ids.shape[1])  # the start token + bound - 1 new ones
        if ending.any():
            scores = scores.clone()
            scores[ending] = -float("inf")
            scores[ending, self.eos] = 0.0
        return scores


def load_translator(path: str | os.PathLike, backend: str = "auto", threads: int = 1, int8: bool = False):
    """A translator for ``path``: an ONNX export folder runs in ONNX Runtime, a model folder (or hub
    id) in PyTorch; ``backend="onnx"`` on a model folder uses its ``onnx`` / ``onnx-int8`` export."""
    if backend not in BACKENDS:
        raise TranslateError(f"--backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if threads < 1:
        raise TranslateError(f"--threads: {threads} must be at least 1")
    folder = Path(path)
    exported = is_export(folder)
    if int8 and exported:  # the export's precision is fixed: --int8 cannot change it, and must not be ignored
        _check_int8_export(folder)
    if backend == "onnx" and not exported:
        candidate = default_folder(folder, "int8" if int8 else "float32")
        other = default_folder(folder, "float32" if int8 else "int8")
        if not is_export(candidate):
            command = f"run: python -m mdcompress.onnx_export --model {folder}{' --int8' if int8 else ''}"
            if is_export(other):  # the other precision is there: perhaps that was meant
                raise TranslateError(f"--backend onnx{' --int8' if int8 else ''}: {str(folder)!r} has no "
                                     f"{candidate.name}/ export but has {other.name}/: "
                                     f"{'leave out' if int8 else 'add'} --int8 to use it, or {command}")
            raise TranslateError(f"--backend onnx: {str(folder)!r} is not an ONNX export and has no {candidate.name}/ "
                                 f"export; {command}")
        folder, exported = candidate, True
    if backend == "torch" and exported:
        raise TranslateError(f"--backend torch: {str(folder)!r} is an ONNX export; give the model folder it came from")
    if int8 and not exported:
        raise TranslateError("--int8 goes with --backend onnx (PyTorch runs the saved float32 weights)")
    return OnnxTranslator(folder, threads) if exported else TorchTranslator.load(path, threads)


def choose_languages_(translator, source: str | None, target: str | None) -> None:
    """``--source-lang`` / ``--target-lang`` on a multilingual model (NLLB, M2M100, mBART-50), in
    PyTorch or an ONNX export of it: its tokenizer reads the sources as ``source`` and generation is
    forced into ``target`` (``models.set_languages_``, on the translator's generation settings);
    either left out stays as the model was compressed (its tokenizer's ``src_lang``, its generation
    config's forced code). A model without language codes, or a code its tokenizer does not know,
    is refused in one line."""
    if not (source or target):
        return
    from mdcompress.models import set_languages_  # here: it loads torch, which an ONNX translation does without

    tokenizer = translator.tokenizer
    model = getattr(translator, "model", translator)  # PyTorch: the model; ONNX: the translator's generation_config
    multilingual = hasattr(tokenizer, "src_lang") and hasattr(tokenizer, "tgt_lang")
    if not multilingual:
        flag = "--source-lang" if source else "--target-lang"
        raise TranslateError(f"{flag}: {source or target!r} given, but the model's tokenizer "
                             f"({type(tokenizer).__name__}) has no language codes (they are for NLLB/M2M100 and "
                             f"mBART-50 models); leave {flag} out")
    generation = model.generation_config
    kept = generation.forced_bos_token_id, generation.decoder_start_token_id
    if target:  # the references' layout (code first or last) is read off the tokenizer with this target
        try:
            tokenizer.tgt_lang = target
        except (KeyError, ValueError):
            pass  # not a code of this tokenizer: set_languages_ says so in one line
    try:
        set_languages_(model, tokenizer, source, target, keys=("--source-lang", "--target-lang"), whose="model")
    except UserError as e:
        raise TranslateError(str(e)) from None
    if not target:  # set_languages_ forced the tokenizer's own target: the model's generation config decides
        generation.forced_bos_token_id, generation.decoder_start_token_id = kept
    if source:
        tokenizer.src_lang = source


def _check_int8_export(folder: Path) -> None:
    """``--int8`` with an export folder as ``--model``: fine for an int8 export; a float32 one is refused
    (rather than translated in float32 as if --int8 had been honoured), naming the int8 export beside it."""
    try:
        precision = read_info(folder).get("precision")
    except ExportError as e:
        raise TranslateError(f"--model: {e}") from None
    if precision == "int8":
        return
    sibling = default_folder(folder.parent, "int8")
    if sibling != folder and is_export(sibling) and read_info(sibling).get("precision") == "int8":
        fix = f"give its int8 export --model {str(sibling)!r}"
    else:
        model = str(folder.parent) if (folder.parent / "config.json").is_file() else "<its model folder>"
        fix = f"export one with: python -m mdcompress.onnx_export --model {model} --int8"
    raise TranslateError(f"--int8: {str(folder)!r} is already an ONNX export, of {precision} weights, and --int8 "
                         f"cannot change that; leave out --int8 to use it, or {fix}")


def translate_lines(translator, sentences: Sequence[str], batch_size: int = 32, num_beams: int = 1,
                    max_new_tokens: int = 128, max_source_length: int = 512, progress: bool | None = None,
                    warn=None, max_length_factor: float | None = DEFAULT_MAX_LENGTH_FACTOR) -> list[str]:
    """Translations of ``sentences`` in their order (empty ones stay empty); see ``translate_ids``.
    A sentence of more tokens than the model has positions (or than ``max_source_length``) is cut to
    them, and ``warn`` (default: a line on standard error) is told in one line how many were."""
    limit = min(max_source_length, translator.max_positions or max_source_length)
    todo = [i for i, s in enumerate(sentences) if s.strip()]
    texts = [sentences[i] for i in todo]
    tokenizer = translator.tokenizer
    ids = tokenizer(texts, truncation=True, max_length=limit + 1)["input_ids"] if todo else []
    warn_unknown(tokenizer, ids, warn or _warn)  # a trimmed vocabulary: how many pieces read as <unk>
    long = [k for k, x in enumerate(ids) if len(x) > limit]  # longer than the model reads
    if long:  # tokenized again by the tokenizer's own truncation, which keeps the end-of-sentence token
        for k, x in zip(long, tokenizer([texts[k] for k in long], truncation=True, max_length=limit)["input_ids"]):
            ids[k] = x
        (warn or _warn)(truncated_message([todo[k] + 1 for k in long], limit))
    out = [""] * len(sentences)
    for i, text in zip(todo, translate_ids(translator, ids, batch_size, num_beams, max_new_tokens, progress,
                                           max_length_factor=max_length_factor)):
        out[i] = text
    return out


def truncated_message(lines: Sequence[int], limit: int) -> str:
    """The warning for sources cut to ``limit`` tokens: how many, and the first of their line numbers."""
    shown = ", ".join(map(str, lines[:5])) + (f" and {len(lines) - 5} more" if len(lines) > 5 else "")
    many = len(lines) > 1
    return (f"{len(lines)} line{'s' if many else ''} (line{'s' if many else ''} {shown}) had more tokens than the "
            f"model reads and {'were' if many else 'was'} cut to the first {limit}; the rest is not translated")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def translate_ids(translator, inputs: Sequence[Sequence[int]], batch_size: int = 32, num_beams: int = 1,
                  max_new_tokens: int = 128, progress: bool | None = None, desc: str | None = None,
                  max_length_factor: float | None = DEFAULT_MAX_LENGTH_FACTOR) -> list[str]:
    """Translations of tokenized sources (lists of ids ending with </s>) in their order: sorted by
    length into padded batches, so that little time goes into padding. Each translation is bounded by
    its source (``length_bounds``: ``max_length_factor`` × its tokens + ``MAX_LENGTH_MARGIN``, at most
    ``max_new_tokens``; None: ``max_new_tokens`` alone), the same bound in every backend. ``progress``
    shows a bar on standard error, plain lines when it is not a terminal (None: a bar on a terminal,
    nothing otherwise); one labelled ``desc`` (a stage of a run) stays once done, an unlabelled one is
    cleared."""
    import numpy as np

    from mdcompress.progress import interactive, progress_bar

    tokenizer = translator.tokenizer
    order = sorted(range(len(inputs)), key=lambda k: len(inputs[k]))
    out = [""] * len(inputs)
    show = interactive() if progress is None else progress
    with progress_bar(total=len(inputs), desc=desc or "translating", unit="sentences", enabled=show,
                      leave=desc is not None) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            longest = max(len(inputs[k]) for k in chunk)
            input_ids = np.full((len(chunk), longest), tokenizer.pad_token_id, dtype=np.int64)  # (B, S)
            attention_mask = np.zeros((len(chunk), longest), dtype=np.int64)
            for row, k in enumerate(chunk):
                input_ids[row, :len(inputs[k])] = inputs[k]
                attention_mask[row, :len(inputs[k])] = 1
            bounds = length_bounds([len(inputs[k]) for k in chunk], max_new_tokens, max_length_factor)
            generated = translator.generate(input_ids, attention_mask, num_beams=num_beams,
                                            max_new_tokens=max_new_tokens, bounds=bounds)
            for k, text in zip(chunk, tokenizer.batch_decode(generated, skip_special_tokens=True)):
                out[k] = text
            bar.update(len(chunk))
    return out


def translate(model, tokenizer, inputs: Sequence[str] | Sequence[Sequence[int]], batch_size: int = 64,
              num_beams: int = 1, max_new_tokens: int = 128, max_source_length: int = 128, progress: bool = False,
              desc: str = "translating", max_length_factor: float | None = DEFAULT_MAX_LENGTH_FACTOR) -> list[str]:
    """Translations by the PyTorch ``model`` (in memory) of ``inputs`` in their order: token-id lists
    (as ``data_preprocessor`` returns them, used as they are) or raw sentences (tokenized here,
    truncated to ``max_source_length``); batched by ``translate_ids``."""
    model.eval()
    if inputs and isinstance(inputs[0], str):
        inputs = tokenizer(list(inputs), truncation=True, max_length=max_source_length)["input_ids"]
    return translate_ids(TorchTranslator(model, tokenizer), inputs, batch_size, num_beams, max_new_tokens, progress,
                         desc, max_length_factor)


def folder_mb(folder: str | os.PathLike) -> float:
    """Megabytes on disk of an ONNX export's graphs and weights (the tokenizer and configs aside)."""
    folder = Path(folder)
    files = [*folder.glob("*.onnx"), folder / WEIGHTS]
    return round(sum(f.stat().st_size for f in files if f.is_file()) / 2**20, 3)


def main(argv: list[str] | None = None) -> int:
    prog = program_name() if argv is None else "translate.py"  # called from Python: the module's file
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a folder written by compress_model.py, or its ONNX export")
    parser.add_argument("--backend", default="auto", help="auto (by the folder) / torch / onnx")
    parser.add_argument("--int8", action="store_true", help="with --backend onnx: use the model's onnx-int8 export (an export folder as --model "
                             "keeps its own precision: --int8 with a float32 one is refused)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per batch (default 32)")
    parser.add_argument("--num-beams", type=int, default=1, help="1 = greedy (default); more = beam search")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="longest translation in tokens (default 256; at most the model's positions)")
    parser.add_argument("--max-length-factor", default=str(DEFAULT_MAX_LENGTH_FACTOR), metavar="FACTOR",
                        help=f"bound each translation by its source: at most ceil(FACTOR × source tokens) + "
                             f"{MAX_LENGTH_MARGIN} new tokens, as Marian's max-length-factor (default "
                             f"{DEFAULT_MAX_LENGTH_FACTOR:g}; none: --max-new-tokens alone)")
    parser.add_argument("--source-lang", metavar="CODE",
                        help="language code of the input for a multilingual model (NLLB: eng_Latn, M2M100: en, "
                             "mBART-50: en_XX; default: the one it was compressed with)")
    parser.add_argument("--target-lang", metavar="CODE",
                        help="language code to translate into, likewise (NLLB: deu_Latn, M2M100: de, mBART-50: "
                             "de_DE; default: the one it was compressed for, from its generation config)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: robust when other jobs share the cores; raise it on a dedicated machine)")
    parser.add_argument("--input", default="-", help="input file, one sentence per line (default: standard input)")
    parser.add_argument("--output", default="-", help="output file (default: standard output)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress on standard error: a bar on a terminal, a plain line every 30 s "
                             "elsewhere (default: the bar on a terminal, nothing elsewhere)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    writing = False  # the translations are going to standard output
    try:
        quiet_transformers()  # imports transformers: Ctrl-C may come already
        for name in ("batch_size", "num_beams", "max_new_tokens"):
            if getattr(args, name) < 1:
                raise TranslateError(f"--{name.replace('_', '-')}: {getattr(args, name)} must be at least 1")
        if args.input != "-" and not Path(args.input).is_file():
            raise TranslateError(f"--input: {args.input!r} is not a file")
        factor = _length_factor(args.max_length_factor)
        _check_output(args.output, args.input)  # before the model is loaded and the input translated
        translator = load_translator(args.model, args.backend, args.threads, args.int8)
        choose_languages_(translator, args.source_lang, args.target_lang)
        if args.input == "-" and sys.stdin.isatty():  # else it would wait for the end of input in silence
            print(f"{prog}: reading sentences from standard input, one per line; end with Ctrl-D (Ctrl-Z Enter "
                  "on Windows), or give --input FILE", file=sys.stderr, flush=True)
        text = _read_text(args.input)
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        translations = translate_lines(translator, lines, args.batch_size, args.num_beams, args.max_new_tokens,
                                       progress=args.progress, max_length_factor=factor,
                                       warn=lambda message: print(f"{prog}: warning: {message}", file=sys.stderr))
        result = "".join(t + "\n" for t in translations)
        if args.output == "-":
            writing = True
            sys.stdout.write(result)
        else:
            _write_atomically(Path(args.output), result)
    except TranslateError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line saying what was written, not a traceback (as compress_model.py)
        what = ("while writing to standard output" if writing else "nothing written to standard output") \
            if args.output == "-" else f"nothing written to {args.output!r}"
        print(f"{prog}: interrupted; {what}", file=sys.stderr, flush=True)
        return 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
    return 0


def _length_factor(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        factor = float(text)
    except ValueError:
        factor = float("nan")
    if not (factor > 0 and factor != float("inf")):
        raise TranslateError(f"--max-length-factor: {text!r} is not a positive number; give e.g. "
                             f"{DEFAULT_MAX_LENGTH_FACTOR:g}, or none for no bound but --max-new-tokens")
    return factor


def _read_text(path: str) -> str:
    """The input as text: a file, or standard input ("-") read as bytes and decoded as UTF-8 whatever
    the locale (under the C locale Python would let invalid bytes through to the tokenizer)."""
    where = "standard input" if path == "-" else repr(path)
    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise TranslateError(f"--input: {not_utf8([data], where)}") from None


def _check_output(path: str, input_path: str = "-") -> None:
    if path == "-":
        return
    output = Path(path)
    if output.is_dir():
        raise TranslateError(f"--output: {path!r} is a folder; name the file to write")
    if not output.parent.is_dir():
        raise TranslateError(f"--output: the folder {str(output.parent)!r} of {path!r} does not exist")
    if input_path != "-" and _same_file(output, Path(input_path)):  # the translations would replace the sentences
        same = "" if path == input_path else f" (the same file as --input {input_path!r})"
        raise TranslateError(f"--output: {path!r} is the input file{same}; writing it would destroy the "
                             f"sentences: name another file")


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file: the same file on disk (through a link, a relative path, a
    hard link), or, where one does not exist yet, the same resolved path."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file beside it (``write_text_atomic``): a reader never
    sees half a file, and a failed write leaves neither a half-written output nor the temporary file."""
    try:
        write_text_atomic(path, text)
    except OSError as e:
        raise TranslateError(f"--output: cannot write {str(path)!r}: {e.strerror or e}") from None


if __name__ == "__main__":
    exit_with(main())
