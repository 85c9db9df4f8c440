"""Plain helpers of the tests (fixtures live in conftest.py): run folders and configs, commands run
in a fresh process, benchmarks, the three ways to load a saved folder, tokenized pairs, and tiny
random models of each family (``FAMILIES``)."""

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForSeq2SeqLM, BartConfig, M2M100Config, MarianConfig, MBartConfig, MT5Config, T5Config,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

from compress_model import Config
from distillation.knowledge_distillation import DistillationSettings
from matrix_decomposition import (  # importing it registers marian_low_rank
    LOW_RANK_WEIGHTS_NAME, WEIGHTS_NAME, load_compressed_model,
)
from mdcompress.data import write_pairs

REPO = Path(__file__).resolve().parent.parent
TRAIN_CSV = REPO / "data" / "tatoeba_en_de" / "train.csv"
# what a command started by a test runs with: this checkout importable (conftest.py puts it on PYTHONPATH),
# one thread, the hub offline, no tokenizer threads
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
CLI = [sys.executable, str(REPO / "compress_model.py"), "--config", "config.json"]


def run_command(args, cwd=None, timeout: int = 300, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """``args`` run in a fresh Python-started process (``ENV``, output captured as text unless told);
    with ``check``, the test fails with the end of its stderr unless it exits 0."""
    result = subprocess.run(args, cwd=cwd, timeout=timeout, **{"env": ENV, "capture_output": True, "text": True,
                                                               **kwargs})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_benchmark(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m benchmarks.<script> args`` run as its docstring says (from the repository, one thread,
    the hub offline, no tokenizer threads), output captured; the test fails with the end of its stderr
    unless it exits 0."""
    return run_command([sys.executable, "-m", f"benchmarks.{script.removesuffix('.py')}", *args], cwd=REPO,
                       timeout=timeout)


def benchmark_json(script: str, tmp_path: Path, *args: str, timeout: int = 300) -> tuple[dict, str]:
    """Run ``script`` with ``args --json <tmp_path>/<script>.json``: (the JSON it wrote, what it printed)."""
    out = tmp_path / f"{script.removesuffix('.py')}.json"
    result = run_benchmark(script, *args, "--json", str(out), timeout=timeout)
    return json.loads(out.read_text()), result.stdout


def benchmark_in_process(script: str, tmp_path: Path, capsys, *args: str) -> tuple[dict, str]:
    """``python -m benchmarks.<script> args --json <tmp_path>/<script>.json`` as its ``main(argv)`` in this
    process, where torch and transformers are imported already; what the scripts change in the process (torch
    threads, transformers' verbosity and progress bars, datasets' progress bars, warning filters) is put back
    after it: (the JSON it wrote, what it printed)."""
    import importlib
    import warnings

    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    name = script.removesuffix(".py")
    out = tmp_path / f"{name}.json"
    threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    hf_bars, datasets_bars = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    try:
        with warnings.catch_warnings():
            assert importlib.import_module(f"benchmarks.{name}").main([*args, "--json", str(out)]) in (0, None)
    finally:
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if hf_bars else hf_logging.disable_progress_bar)()
        (datasets.enable_progress_bars if datasets_bars else datasets.disable_progress_bars)()
    return json.loads(out.read_text()), capsys.readouterr().out


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
    """Rewrite the folder the way folders were written before the marian_low_rank type: plain "marian",
    the weights in model.safetensors."""
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "marian", "architectures": ["MarianMTModel"]}))
    (folder / LOW_RANK_WEIGHTS_NAME).rename(folder / WEIGHTS_NAME)
    return load_compressed_model(folder)


def with_weights_in_model_safetensors(folder):
    """The folder as written before model.low_rank.safetensors (type marian_low_rank, the weights in
    model.safetensors), loaded by the Auto classes."""
    (folder / LOW_RANK_WEIGHTS_NAME).rename(folder / WEIGHTS_NAME)
    return load_with_auto_classes(folder)


LOADERS = {"load_compressed_model": load_compressed_model, "auto-classes": load_with_auto_classes,
           "older-folder": as_an_older_folder, "older-weights-name": with_weights_in_model_safetensors}


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


# ---------------------------------------------------------------------------------------------
# Tiny random models of each family

BART_LIKE = dict(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
T5_LIKE = dict(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
               relative_attention_num_buckets=8)


@dataclass
class Family:
    """One architecture, with what its layers are called spelled out here, independently of the code."""

    name: str
    config_class: type
    kwargs: dict
    layers: tuple[str, str]  # prefixes of the encoder's and the decoder's layers
    linears: tuple[int, int]  # nn.Linear per encoder / decoder layer
    cross_kv: tuple[str, str]  # the decoder's cross-attention key and value projections
    embedding: str  # the token embedding's module name
    tied_head: bool = True

    def make(self, tokenizer):
        ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        starts_with_pad = self.config_class in (MarianConfig, T5Config, MT5Config)  # the others with </s>
        start = tokenizer.pad_token_id if starts_with_pad else tokenizer.eos_token_id
        if self.config_class not in (T5Config, MT5Config):
            ids.update(bos_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        config = self.config_class(**ids, decoder_start_token_id=start, **self.kwargs)
        model = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING[self.config_class](config)
        if self.tied_head:
            return model.eval()
        # transformers builds T5 models tied and unties a head only when loading a checkpoint that holds
        # its own table, as mT5's and MADLAD's do: made here the same way
        model.lm_head.weight = nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.1)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            return AutoModelForSeq2SeqLM.from_pretrained(folder).eval()


MARIAN_NAMES = dict(layers=("model.encoder.layers.", "model.decoder.layers."), linears=(6, 10),
                    cross_kv=("encoder_attn.k_proj", "encoder_attn.v_proj"), embedding="model.shared")
T5_NAMES = dict(layers=("encoder.block.", "decoder.block."), cross_kv=("EncDecAttention.k", "EncDecAttention.v"),
                embedding="shared")
FAMILIES = [
    Family("marian", MarianConfig, BART_LIKE, **MARIAN_NAMES),
    # sinusoidal positions counted from the pad id: 299 in the tiny vocabulary (1 in NLLB's)
    Family("nllb-m2m100", M2M100Config, {**BART_LIKE, "scale_embedding": True, "max_position_embeddings": 320},
           **MARIAN_NAMES),
    Family("mbart", MBartConfig, {**BART_LIKE, "scale_embedding": True}, **MARIAN_NAMES),
    Family("bart", BartConfig, BART_LIKE, **MARIAN_NAMES),
    Family("t5", T5Config, T5_LIKE, linears=(6, 10), **T5_NAMES),  # no biases; tied head scaled by d_model^-0.5
    Family("mt5", MT5Config, {**T5_LIKE, "feed_forward_proj": "gated-gelu"},
           linears=(7, 11), tied_head=False, **T5_NAMES),  # wi_0, wi_1; the head is a layer of its own
]


def varied_(model, scale: float, norms: bool = True, positions: bool = True):
    """Seeded noise on the parameters, in place: a fresh tiny model says nearly the same thing for every
    input. ``norms=False`` leaves the layer norms alone, ``positions=False`` the fixed (not trained)
    sinusoidal position tables."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (norms or "norm" not in name) and (positions or p.requires_grad):
                p.add_(scale * torch.randn_like(p))
    return model
