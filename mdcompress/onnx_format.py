"""What an ONNX export folder is: what ``onnx_export`` writes and ``translate`` reads.

    <model>/onnx/ or <model>/onnx-int8/ (``default_folder``)
      encoder.onnx, decoder.onnx   the two graphs (see ``onnx_export``)
      weights.bin                  their tensors above 1 KiB, each stored once, as external data
      onnx_export.json             what the graphs expect (``read_info``): format, precision,
                                   model_type, layers, heads, head_dim, max_positions (the longest
                                   source and translation), vocab_size, the layout the graphs restate
                                   (``onnx_bart.layout``), the cache's input and output names
      config.json, generation_config.json   the model's: the search settings ``translate`` applies
                                   (decoder start token, forced target-language code, ...)
      the tokenizer's files

A folder is an export when it holds ``onnx_export.json`` (``is_export``); ``load_model`` loads the
PyTorch model of a model folder, the one an export is made from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mdcompress.errors import ExportError

EXPORT_INFO = "onnx_export.json"
FORMAT = 1  # of onnx_export.json and the graphs' inputs and outputs; a reader refuses another
ENCODER, DECODER, WEIGHTS = "encoder.onnx", "decoder.onnx", "weights.bin"


def default_folder(model_path: str | os.PathLike, precision: str) -> Path:
    """Where ``export`` writes by default: ``onnx`` (float32) or ``onnx-int8`` inside the model folder."""
    return Path(model_path) / ("onnx" if precision == "float32" else f"onnx-{precision}")


def is_export(folder: str | os.PathLike) -> bool:
    return (Path(folder) / EXPORT_INFO).is_file()


def read_info(folder: str | os.PathLike) -> dict:
    """The export's ``onnx_export.json``; an export of another format is refused in one line."""
    info = json.loads((Path(folder) / EXPORT_INFO).read_text(encoding="utf-8"))
    if info.get("format") != FORMAT:
        raise ExportError(f"{str(folder)!r} is an ONNX export of format {info.get('format')}; this version reads "
                          f"format {FORMAT}: export it again")
    return info


def load_model(path: str):
    """(model, tokenizer) of a folder written by this tool (factorized), any model folder or a hub
    id (``matrix_decomposition.load_pretrained``); an ONNX export or a folder without a model config is
    refused in one line."""
    from matrix_decomposition import DecompositionError, load_pretrained

    local = Path(path)
    if local.is_dir() and is_export(local):
        raise ExportError(f"--model: {path!r} is already an ONNX export; give the model folder it came from")
    if local.is_dir() and not (local / "config.json").is_file():
        raise ExportError(f"--model: {path!r} has no config.json; it is not a model folder")
    try:
        return load_pretrained(path, "--model")
    except DecompositionError as e:
        raise ExportError(str(e)) from None
