"""Shared test fixtures: a sentencepiece vocabulary trained on a few hundred Tatoeba lines, the
Marian tokenizer built on it, and tiny MarianMT models (d_model 16) that run in milliseconds. The
plain helpers the tests import are in helpers.py; ``-m "not slow"`` leaves out the slow tests.

This file imports only the standard library and pytest at its top: with ``-n 2`` (pytest-xdist, what
CI runs) the process that hands the tests to the two workers loads it too and runs none of them, so
torch, transformers and the project are imported by the fixtures, in the processes that run tests."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")  # runs in the tests (and their subprocesses) use one thread
# datasets' cache (Arrow copies of the test files, tokenized pairs) in a folder of this session only
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="matrix-decomposition-tests-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

import pytest  # noqa: E402

if TYPE_CHECKING:
    from transformers import MarianTokenizer

REPO = Path(__file__).resolve().parent.parent
# commands the tests start (python -m mdcompress.translate, benchmarks, scripts) import this checkout's package
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Tiny models gain nothing from threads, and on busy cores two-threaded LAPACK calls stall (a 512×512
    SVD took 100× longer with 2 threads than with 1 next to a training job)."""
    import torch

    torch.set_num_threads(1)


VOCAB_SIZE = 300  # sentencepiece pieces + </s> + <pad>


@pytest.fixture(scope="session")
def tiny_pairs() -> list[tuple[str, str]]:
    """The first 400 English–German pairs of the committed training CSV."""
    from helpers import TRAIN_CSV  # after the environment above: helpers.ENV copies it
    from mdcompress.data import read_pairs

    return read_pairs(TRAIN_CSV)[:400]


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory, tiny_pairs) -> Path:
    """A folder with ``spm.model`` (unigram, joint en+de) and ``vocab.json`` laid out like
    OPUS-MT's: ``</s>`` = 0, ``<unk>`` = 1, the pieces, ``<pad>`` last."""
    from scripts.train_teacher import build_tokenizer

    folder = tmp_path_factory.mktemp("spm")
    build_tokenizer(tiny_pairs, folder, VOCAB_SIZE, seed=0)  # the shipped teacher's recipe, at toy size
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(spm_dir) -> MarianTokenizer:
    from transformers import MarianTokenizer

    spm_path = str(spm_dir / "spm.model")
    return MarianTokenizer(source_spm=spm_path, target_spm=spm_path, vocab=str(spm_dir / "vocab.json"))


@pytest.fixture
def make_tiny_marian(tiny_tokenizer):
    """Factory: ``make_tiny_marian(**config_overrides)`` → a seeded MarianMTModel in eval mode
    (d_model 16, 2+2 layers, 2 heads, ffn 32, tied embeddings)."""
    import torch
    from transformers import MarianConfig, MarianMTModel

    tok = tiny_tokenizer

    def make(**overrides) -> MarianMTModel:
        config = dict(
            vocab_size=len(tok), d_model=16, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
            max_position_embeddings=64, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.pad_token_id, forced_eos_token_id=tok.eos_token_id,
        )
        torch.manual_seed(0)
        return MarianMTModel(MarianConfig(**{**config, **overrides})).eval()

    return make


@pytest.fixture
def tiny_teacher_dir(tmp_path, make_tiny_marian, tiny_tokenizer) -> Path:
    """A saved tiny teacher (model + tokenizer) in a fresh folder."""
    from helpers import save_model_folder

    return save_model_folder(make_tiny_marian(), tiny_tokenizer, tmp_path / "teacher")


@pytest.fixture(autouse=True)
def _runs_draw_no_pictures(request, monkeypatch):
    """The tool's runs inside a test write no pictures and no report.md: drawing them is about 40% of a
    tiny run. Tests marked ``pictures`` keep them, and so does every run in a fresh process (the CLI
    end to end checks them)."""
    if request.node.get_closest_marker("pictures") is None:
        import compress_model

        monkeypatch.setattr(compress_model, "write_run_pictures", lambda folder, report, spectra, bounds: [])
