"""Files and folders written whole or not at all, with the permissions the user's umask gives.

What a run leaves on disk (outputs, exports, checkpoints, caches) is written under a temporary
name beside its final place, ``.<name>.tmp-…``, and renamed there when complete: a rename inside
one folder is atomic, so a reader, a crash or a Ctrl-C never meets half a file. On an exception
(KeyboardInterrupt and SIGTERM's ``Terminated`` included) the temporary is removed and the final
place is left as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


def umask() -> int:
    """The process's umask (reading it means setting it: it is put back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def chmod_as_umask(path: str | os.PathLike, mode: int = 0o666) -> None:
    """Give ``path`` the permissions a plain ``open()`` (``mode`` 0o666) or ``mkdir()`` (0o777)
    would have given it under the user's umask: safetensors writes its files 0600, ``tempfile``
    makes its folders 0700."""
    os.chmod(path, mode & ~umask())


# ---------------------------------------------------------------------------------------------
# Files


@contextmanager
def atomic_file(path: str | os.PathLike, newline: str | None = None) -> Iterator[TextIO]:
    """``path`` opened for writing text (UTF-8), as ``.<name>.tmp-<pid>`` beside it (each process
    its own), renamed to ``path`` when the block ends; on an exception the temporary file is
    removed and ``path`` is untouched. ``newline`` as for ``open`` (``""`` for the csv module)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline=newline) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (``atomic_file``)."""
    with atomic_file(path) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (``atomic_file``)."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Folders


@contextmanager
def temporary_folder(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A new folder in ``parent`` (``tempfile.mkdtemp``: private to this process, 0700), removed
    with what it holds when the block ends, by an exception or not, unless renamed away by then."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling folder of ``path`` (``.<name>.tmp-…``) to fill; renamed to ``path``
    (``replace_folder``) when the block ends, removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_folder(path.parent, f".{path.name}.tmp-") as tmp:
        yield tmp
        replace_folder(tmp, path)


def replace_folder(tmp: Path, path: Path) -> None:
    """Rename the finished temporary folder ``tmp`` to ``path``, with the permissions a folder the
    user makes gets (not mkdtemp's 0700). What was at ``path`` is renamed aside first and removed
    only once the new folder is in: an interrupt between the two renames puts it back whole."""
    chmod_as_umask(tmp, 0o777)
    old = path.with_name(f".{path.name}.old-{os.getpid()}") if path.exists() else None
    if old is not None:
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
