"""Files and folders written whole or not at all, with the permissions the user's umask gives.

What a run leaves on disk (outputs, exports, checkpoints, caches) is written under a temporary
name beside its final place, ``.<name>.tmp-…``, and renamed there when complete: a rename inside
one folder is atomic, so a reader, a crash or a Ctrl-C never meets half a file. On an exception
(KeyboardInterrupt and SIGTERM's ``Terminated`` included) the temporary is removed and the final
place is left as it was.

Text read from the user's files must be UTF-8: ``not_utf8`` says where it is not.
"""

from __future__ import annotations

import codecs
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
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


# ---------------------------------------------------------------------------------------------
# Text read


def not_utf8(chunks: Iterable[bytes], where: str) -> str | None:
    """None if the bytes of ``chunks`` (a file read piece by piece, or all of it) are UTF-8; else the
    message saying which byte on which line is not, and how to convert the file: "<where> is not UTF-8
    text (byte 0xfc on line 3); convert it first, e.g. iconv -f latin1 -t utf-8"."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 1
    for chunk in itertools.chain(chunks, [None]):  # None: the end, where a sequence may be cut short
        try:
            decoder.decode(chunk or b"", final=chunk is None)
        except UnicodeDecodeError as e:  # e.object: the bytes held back from the last chunk (never a newline) + chunk
            line = lines + e.object[: e.start].count(b"\n")
            return (f"{where} is not UTF-8 text (byte 0x{e.object[e.start]:02x} on line {line}); "
                    f"convert it first, e.g. iconv -f latin1 -t utf-8")
        lines += (chunk or b"").count(b"\n")
    return None


def file_chunks(path: str | os.PathLike, size: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of ``path``, ``size`` at a time (``not_utf8`` on a file of any size)."""
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk
