"""Shared test fixtures: a sentencepiece vocabulary trained on a few hundred Tatoeba lines, the
Marian tokenizer built on it, and tiny MarianMT models (d_model 16) that run in milliseconds."""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")  # runs in the tests (and their subprocesses) use one thread
# datasets' cache (Arrow copies of the test files, tokenized pairs) in a folder of this session only
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="matrix-decomposition-tests-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSeq2SeqLM, MarianConfig, MarianMTModel, MarianTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# commands the tests start (python -m mdcompress.translate, benchmarks, scripts) import this checkout's package
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])

from compress_model import Config  # noqa: E402
from mdcompress.data import read_pairs, write_pairs  # noqa: E402  (the CSV helpers of the tests' runs)
from distillation.knowledge_distillation import DistillationSettings  # noqa: E402
from matrix_decomposition import load_compressed_model  # noqa: E402  (importing it registers marian_low_rank)
from scripts.train_teacher import build_tokenizer  # noqa: E402

# Tiny models gain nothing from threads, and on busy cores two-threaded LAPACK calls stall (a 512×512
# SVD took 100× longer with 2 threads than with 1 next to a training job).
torch.set_num_threads(1)

TRAIN_CSV = REPO / "data" / "tatoeba_en_de" / "train.csv"
VOCAB_SIZE = 300  # sentencepiece pieces + </s> + <pad>


def run_benchmark(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``benchmarks/<script> args`` run as its docstring says (from the repository, one thread, the
    hub offline, no tokenizer threads), output captured; the test fails with the end of its stderr
    unless it exits 0."""
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{script.removesuffix('.py')}", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                 "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def distillation_settings(**keys) -> DistillationSettings:
    """The training settings of a ``Config`` with ``keys`` on top; unless given, batches in random
    order (not grouped by length) and no progress bars."""
    return DistillationSettings(Config(**{"group_by_length": False, "progress": False, **keys}))


def make_run_dir(folder: Path, teacher_dir: Path, train_pairs, eval_pairs, **config) -> Path:
    """A folder to run the tool in: train.csv, eval.csv and a config.json naming them, the teacher
    and ``folder/out`` (progress bars off), with ``config`` on top."""
    base = {"teacher_model_path": str(teacher_dir), "dataset_path": str(write_pairs(folder / "train.csv", train_pairs)),
            "eval_dataset_path": str(write_pairs(folder / "eval.csv", eval_pairs)),
            "output_path": str(folder / "out"), "progress": False}
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    return folder


def edit_config(run_dir: Path, drop=(), **changes) -> None:
    """Rewrite ``run_dir/config.json`` with ``changes`` applied and the keys in ``drop`` removed."""
    path = run_dir / "config.json"
    config = {k: v for k, v in json.loads(path.read_text()).items() if k not in drop}
    path.write_text(json.dumps({**config, **changes}))


def refused_in_one_line(run_dir: Path, capsys, monkeypatch, words) -> str:
    """Run the CLI on ``run_dir/config.json``: it must exit with 2 after one line
    ``compress_model.py: error: …`` holding each of ``words``, and write nothing in ``run_dir``."""
    import compress_model

    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    monkeypatch.chdir(run_dir)
    assert compress_model.main(["--config", "config.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("compress_model.py: error: "), err
    for word in words:
        assert word in err, (word, err)
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # nothing written
    return err


def save_model_folder(model, tokenizer, folder: Path) -> Path:
    """A folder ``from_pretrained`` can read (model.safetensors, config, tokenizer): a teacher."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# Three ways to load a folder save_compressed_model wrote; each must give the model that was saved.


def load_with_auto_classes(folder):
    """The folder loaded the plain transformers way (matrix_decomposition imported): every weight found."""
    model, info = AutoModelForSeq2SeqLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def as_an_older_folder(folder):
    """Rewrite config.json the way folders were written before the marian_low_rank type: plain "marian"."""
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "marian", "architectures": ["MarianMTModel"]}))
    return load_compressed_model(folder)


LOADERS = {"load_compressed_model": load_compressed_model, "auto-classes": load_with_auto_classes,
           "older-folder": as_an_older_folder}



def tokenized_pairs(pairs, tokenizer, count: int, max_source_length: int, max_target_length: int):
    """The first ``count`` of ``pairs`` tokenized as ``compress_model`` does, truncated to the given lengths."""
    import datasets

    import compress_model
    from mdcompress import data

    datasets.disable_progress_bars()
    subset = datasets.Dataset.from_dict({"source_text": [s for s, _ in pairs[:count]],
                                         "target_text": [t for _, t in pairs[:count]]})
    config = compress_model.Config(max_source_length=max_source_length, max_target_length=max_target_length)
    return data.preprocess(subset, tokenizer, config, compress_model.default_data_preprocessor)


@pytest.fixture(scope="session")
def tiny_pairs() -> list[tuple[str, str]]:
    """The first 400 English–German pairs of the committed training CSV."""
    return read_pairs(TRAIN_CSV)[:400]


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory, tiny_pairs) -> Path:
    """A folder with ``spm.model`` (unigram, joint en+de) and ``vocab.json`` laid out like
    OPUS-MT's: ``</s>`` = 0, ``<unk>`` = 1, the pieces, ``<pad>`` last."""
    folder = tmp_path_factory.mktemp("spm")
    build_tokenizer(tiny_pairs, folder, VOCAB_SIZE, seed=0)  # the shipped teacher's recipe, at toy size
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(spm_dir) -> MarianTokenizer:
    spm_path = str(spm_dir / "spm.model")
    return MarianTokenizer(source_spm=spm_path, target_spm=spm_path, vocab=str(spm_dir / "vocab.json"))


@pytest.fixture
def make_tiny_marian(tiny_tokenizer):
    """Factory: ``make_tiny_marian(**config_overrides)`` → a seeded MarianMTModel in eval mode
    (d_model 16, 2+2 layers, 2 heads, ffn 32, tied embeddings)."""
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
    return save_model_folder(make_tiny_marian(), tiny_tokenizer, tmp_path / "teacher")
