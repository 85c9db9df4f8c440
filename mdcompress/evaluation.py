"""BLEU and chrF of translations against references: sacrebleu's corpus scores with its defaults
(13a tokenization), for a PyTorch model or an ONNX export translating held-out sources (``translate``),
as the rows of a run's report. The benchmarks and ``scripts/train_teacher.py`` score with the same
``corpus_scores``."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import sacrebleu
import torch
from torch import nn

from matrix_decomposition import count_parameters, size_mb
from mdcompress.translate import DEFAULT_MAX_LENGTH_FACTOR, OnnxTranslator, folder_mb, translate, translate_ids


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU and chrF (sacrebleu defaults), rounded to two decimals."""
    refs = [list(references)]
    return {"bleu": round(sacrebleu.corpus_bleu(list(hypotheses), refs).score, 2),
            "chrf": round(sacrebleu.corpus_chrf(list(hypotheses), refs).score, 2)}


def evaluate_translation(model: nn.Module, tokenizer, sources: Sequence[str] | Sequence[Sequence[int]],
                         references: Sequence[str], **generate_kwargs) -> dict:
    """BLEU and chrF of ``model`` translating ``sources`` (token-id lists or sentences, see
    ``translate``) against ``references``, with its size (parameters and megabytes in memory) and
    the time the translation took."""
    start = time.perf_counter()
    hypotheses = translate(model, tokenizer, sources, **generate_kwargs)
    seconds = time.perf_counter() - start
    return {"params": count_parameters(model), "size_mb": size_mb(model), **corpus_scores(hypotheses, references),
            "translate_seconds": round(seconds, 2)}


def evaluate_export(folder: str | os.PathLike, sources: Sequence[Sequence[int]], references: Sequence[str],
                    batch_size: int = 64, num_beams: int = 1, max_new_tokens: int = 128,
                    max_length_factor: float | None = DEFAULT_MAX_LENGTH_FACTOR, **_) -> dict:
    """BLEU and chrF of an ONNX export (``onnx_export``) translating the token-id lists ``sources``
    in ONNX Runtime, with its size on disk and the time the translation took."""
    translator = OnnxTranslator(folder, threads=torch.get_num_threads())
    start = time.perf_counter()
    hypotheses = translate_ids(translator, sources, batch_size, num_beams, max_new_tokens, progress=False,
                               max_length_factor=max_length_factor)
    seconds = time.perf_counter() - start
    return {"size_mb": folder_mb(folder), **corpus_scores(hypotheses, references), "translate_seconds": round(seconds, 2)}
