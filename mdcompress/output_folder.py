"""The output folder: checked before any work, written whole at the end.

``check_output_path`` refuses, before hours go into a run, a folder that would be clobbered: a
file, a non-empty folder this tool did not write, a folder that is or holds one of the run's
inputs, a place nothing can be written. ``save_outputs`` writes the compressed model, its exports,
the config used and the report into a temporary sibling folder and renames it into place, so
that a folder is there complete or not at all.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from matrix_decomposition import save_compressed_model
from mdcompress.errors import ExportError, OutputError
from mdcompress.files import atomic_folder
from mdcompress.onnx_export import export
from mdcompress.process import interrupt_behind

OUTPUT_MARKERS = ("compression_config.json", "report.json")  # what save_outputs writes next to the model


def check_clear_of(key: str, path: str | os.PathLike, inputs: Mapping[str, str | os.PathLike]) -> None:
    """Refuse a folder the run writes (and may replace or delete) that is, contains or lies inside
    one of its ``inputs`` ({config key: local path}: the teacher, the data, the config file…)."""
    mine = Path(path).resolve()
    for name, other in inputs.items():
        theirs = Path(other).resolve()
        relation = ("is" if mine == theirs else "contains" if mine in theirs.parents
                    else "lies inside" if theirs in mine.parents else None)
        if relation:
            raise OutputError(f"{key}: {str(path)!r} {relation} the {name} {str(other)!r}; a run replaces "
                              f"and deletes what it writes there: choose a folder apart from its inputs")


def check_output_path(path: str | os.PathLike, overwrite: bool,
                      inputs: Mapping[str, str | os.PathLike] | None = None) -> Path:
    """Refuse an output path that is a file, is, contains or lies inside one of the run's
    ``inputs`` (``check_clear_of``), or is a non-empty folder, unless ``overwrite`` and the folder is
    one this tool wrote (it holds ``OUTPUT_MARKERS``): overwriting replaces the whole folder.
    Checked before any work so that nothing is lost or half-written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output_path: {str(path)!r} is a file; give a folder path")
    check_clear_of("output_path", path, inputs or {})
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise OutputError(f"output_path: {str(path)!r} exists and is not empty; choose another path "
                              f"or set \"overwrite_output\": true")
        if not all((path / name).is_file() for name in OUTPUT_MARKERS):
            raise OutputError(f"output_path: {str(path)!r} was not written by this tool (it has no "
                              f"{' and '.join(OUTPUT_MARKERS)}), and overwrite_output only replaces a "
                              f"folder this tool wrote; choose another path")
    ancestor = path.resolve().parent  # the nearest folder that exists must take new entries
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"output_path: {str(path)!r} lies under {str(ancestor)!r}, which is a file")
    try:  # a real probe: permissions, read-only file systems and quotas all show up here
        tempfile.TemporaryDirectory(prefix=".probe-", dir=ancestor).cleanup()
    except OSError as e:
        raise OutputError(f"output_path: cannot write under {str(ancestor)!r} ({e.strerror})") from None
    return path


def save_outputs(path: str | os.PathLike, student: nn.Module, tokenizer, report: dict, config: dict,
                 exports: Sequence[str] = (), evaluate=None, write_more=None) -> dict[str, str]:
    """Write the compressed model, tokenizer, the config used and ``report.json`` to ``path``,
    atomically: everything goes to a temporary sibling folder that is then renamed into place
    (an existing folder is replaced only once the new one is complete). Each of ``exports``
    ("onnx", "onnx-int8") becomes a subfolder of that name; ``evaluate(folder)`` gives its report row.
    ``write_more(folder, report)`` adds files of its own (the pictures and report.md).

    An export that fails costs no trained student: the folder is written without it, the report
    says why under ``export_failed``, and the returned {export: reason} lets the caller say how to
    export again."""
    path = Path(path)
    failed: dict[str, str] = {}
    with atomic_folder(path) as tmp:
        save_compressed_model(student, tmp, tokenizer)
        for name in exports:
            try:
                folder = export(path, tmp / name, "int8" if name.endswith("int8") else "float32", model=student,
                                tokenizer=tokenizer)
            except Exception as e:  # our refusal (ExportError) or the exporter's own failure on a layout it lacks
                if interrupt_behind(e) is not None:  # a library's own error while Ctrl-C or SIGTERM stopped it
                    raise
                failed[name] = str(e) if isinstance(e, ExportError) else f"{type(e).__name__}: {e}"
                continue
            if evaluate is not None:
                report[f"student_{name.replace('-', '_')}"] = {"params": report["student"]["params"], **evaluate(folder)}
        if failed:
            report["export_failed"] = failed
        (tmp / "compression_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if write_more is not None:
            write_more(tmp, report)
    return failed
