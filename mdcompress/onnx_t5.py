"""The step functions of T5 and mT5 for ``onnx_export`` (same interface as ``onnx_bart``): not
written yet, so ``check`` refuses these models in one line."""

from __future__ import annotations

from mdcompress.errors import ExportError


def check(model) -> None:
    raise ExportError(f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', None)!r}) cannot "
                      f"be exported yet: supported is MarianMT, compressed by this tool or not")


def describe(model) -> dict:
    raise NotImplementedError


def graphs(model):
    raise NotImplementedError
