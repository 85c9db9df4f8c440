"""The training and evaluation pairs: read from the layouts translation data comes in, then turned
into model inputs by the preprocessing hook, once (cached, optionally in several processes).

Layouts (``load_pairs``), each ending as a ``datasets.Dataset`` with the columns ``source_text``
and ``target_text``:
  flat           .csv / .tsv / .json / .jsonl / .parquet with a source and a target column, or a folder of them
  translation    one ``translation`` column of {language: sentence} (wmt/wmt16, Helsinki-NLP/opus_books…),
                 read with ``source_lang`` / ``target_lang``
  parallel text  line-aligned ``corpus.en`` + ``corpus.de`` (the Moses format of OPUS), named by ``corpus``
  saved          a folder written by ``datasets``' ``save_to_disk``: a Dataset, or a DatasetDict with splits
  hub            a dataset id (owner/name) on the Hugging Face hub, with ``dataset_config`` and a split
The pairs and the model inputs stay in memory-mapped Arrow files: memory follows the batch, not the corpus.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import inspect
import json
import os
import tempfile
import types
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.fingerprint import Hasher
from mdcompress.config import Config
from mdcompress.errors import DataError
from mdcompress.files import atomic_file, file_chunks, not_utf8, temporary_folder, write_text_atomic

TEXT_COLUMNS = ("source_text", "target_text")
TRANSLATION_COLUMN = "translation"  # the Hugging Face translation layout, as in run_translation.py
FILE_TYPES = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
READERS = {  # file type → datasets builder and its options ("NA", "null"… are sentences here, not missing values)
    "csv": ("csv", {"keep_default_na": False}),
    "tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}),
    "json": ("json", {}),
    "parquet": ("parquet", {}),
}
# config keys whose values a preprocessor may read to shape its output: part of the tokenized data's cache key
PREPROCESSING_KEYS = ("max_source_length", "max_target_length", "source_column", "target_column",
                      "source_lang", "target_lang")



# ---------------------------------------------------------------------------------------------
# Reading pairs


def load_pairs(path: str, config: Config, key: str = "dataset_path", split: str = "train",
               split_key: str = "train_split"):
    """A ``datasets.Dataset`` of the pairs at ``path`` (any layout of the module docstring) with the
    columns ``source_text`` and ``target_text``, rows with an empty side dropped. ``split`` picks
    the split of a hub dataset or a saved DatasetDict (files have one); ``key`` and ``split_key``
    name the config keys an error message points at."""
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its read errors become our one-line message
    try:
        ds = _read(path, config, key, split, split_key)
    except DataError:
        raise
    except Exception as e:  # datasets wraps parser and hub errors in many types
        raise _read_error(e, path, key) from None
    return _as_pairs(ds, path, config, key)


def _read(path: str, config: Config, key: str, split: str, split_key: str):
    local = Path(path)
    parallel = _parallel_text_files(path, config, key)
    if parallel:
        return _read_parallel_text(*parallel, key)
    if local.is_file():
        kind = FILE_TYPES.get(local.suffix.lower())
        if kind is None:
            hint = ("" if config.source_lang else
                    " (line-aligned text files such as corpus.en + corpus.de: set source_lang and target_lang)")
            raise DataError(f"{key}: {path!r} has an unsupported type {local.suffix!r}; use "
                            f"{', '.join(FILE_TYPES)}{hint}")
        return _read_files(kind, [local], key)
    if local.is_dir():
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            return _read_saved(local, key, split, split_key)
        files = sorted(p for p in local.iterdir() if p.suffix.lower() in FILE_TYPES)
        kinds = {FILE_TYPES[p.suffix.lower()] for p in files}
        if len(kinds) != 1:
            found = "no" if not files else "mixed"
            raise DataError(f"{key}: folder {path!r} has {found} data files; it needs files of one type among "
                            f"{', '.join(FILE_TYPES)}, or a dataset saved with save_to_disk")
        return _read_files(kinds.pop(), files, key)
    # owner/name is a hub id unless "owner" is a local folder (as for models): then it is a missing local path
    if local.suffix.lower() in FILE_TYPES or path.startswith((".", "/")) or path.count("/") != 1 \
            or local.parent.is_dir():
        also = (f" (nor {path + '.' + config.source_lang!r} + {path + '.' + config.target_lang!r})"
                if config.source_lang and config.target_lang else "")
        hub = ("; a hub dataset id has the form owner/name, e.g. 'wmt/wmt16'"
               if "/" not in path and local.suffix.lower() not in FILE_TYPES else
               f"; not taken for a hub id, since the folder {str(local.parent)!r} is here"
               if path.count("/") == 1 and not path.startswith((".", "/")) and local.suffix.lower() not in FILE_TYPES
               else "")
        raise DataError(f"{key}: {path!r} does not exist{also}{looked_for(path)}{hub}")
    return _read_hub(path, config, key, split)


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _read_hub(path: str, config: Config, key: str, split: str):
    """``split`` of the hub dataset ``path``. Offline (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)
    only the local cache is read, and one that is not there is told so."""
    try:
        return datasets.load_dataset(path, config.dataset_config, split=split)
    except Exception as e:
        if not (datasets.config.HF_HUB_OFFLINE and _not_reachable(e)):
            raise
    named = f"{path!r}" + (f" (configuration {config.dataset_config!r})" if config.dataset_config else "")
    set_ = [v for v in OFFLINE_VARIABLES if os.environ.get(v, "").upper() in datasets.config.ENV_VARS_TRUE_VALUES]
    names = " and ".join(set_)
    offline, go_online = ((f"{names} {'is' if len(set_) == 1 else 'are'} set", f"unset {names}") if set_ else
                          ("offline mode is on", "go online"))
    raise DataError(f"{key}: {named} is not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}) and "
                    f"{offline}, so the hub was not asked; {go_online} to download it, or give a local copy (a "
                    f"folder saved with save_to_disk)")


def _not_reachable(e: BaseException) -> bool:
    """Whether ``e`` (or an error it came from) says the hub could not be asked or the dataset is not cached."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, ConnectionError) or type(e).__name__ == "OfflineModeIsEnabled" or "is not cached" in str(e):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def looked_for(path: str) -> str:
    """Where a relative ``path`` was looked for (it is read from the current folder, not the config's),
    to end a "does not exist" message; nothing for an absolute one."""
    return "" if os.path.isabs(path) else f" (relative to the current folder: looked for {os.path.abspath(path)!r})"


def _read_files(kind: str, files: Sequence[Path], key: str):
    builder, options = READERS[kind]
    if kind == "json":  # Arrow's JSON reader takes invalid UTF-8 in: the first row read would fail, mid-run
        if (error := _not_utf8(files, key)) is not None:
            raise error
    for f in files:  # pandas would rename a second 'target_text' 'target_text.1' and the first be used, unsaid
        _check_unique_columns(kind, f, key)
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **options)
    except Exception:
        if kind == "json":  # a key twice in a later line fails with pandas' "If using all scalar values…"
            for f in files:
                _check_unique_keys(f, key, every_line=True)
        raise


def _check_unique_columns(kind: str, file: Path, key: str) -> None:
    """Refuse a CSV/TSV header or a parquet schema that names a column twice."""
    if kind in ("csv", "tsv"):
        options = {k: v for k, v in READERS[kind][1].items() if k in ("delimiter", "quoting")}
        with open(file, encoding="utf-8-sig", errors="replace", newline="") as f:
            names = next((row for row in csv.reader(f, **options) if row), [])  # pandas skips blank lines too
    elif kind == "json":
        _check_unique_keys(file, key)
        return
    elif kind == "parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(file).names
    else:
        return
    twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if twice is not None:
        raise DataError(f"{key}: {str(file)!r} has two columns named {twice!r}; give each column its own name, "
                        f"or remove the one not wanted")


class _KeyTwice(Exception):
    pass


def _check_unique_keys(file: Path, key: str, every_line: bool = False) -> None:
    """Refuse a JSON file with an object that holds a key twice (Python's json keeps the last value, Arrow
    fails): in JSON lines the first line (a writer's every line has the same keys) or, ``every_line``, all
    of them; a file that is one JSON document (an array of objects) is read whole, as datasets reads it."""
    def refuse_twice(pairs):
        names = [name for name, _ in pairs]
        twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
        if twice is not None:
            raise _KeyTwice(twice)
        return dict(pairs)

    def refused(name: str, line: int | None = None) -> DataError:
        return DataError(f"{key}: {str(file)!r} has the key {name!r} twice in one object"
                         f"{f' (line {line})' if line else ''}; give each key its own name, or remove the one "
                         f"not wanted")

    with open(file, encoding="utf-8", errors="replace") as f:
        number = 0
        try:
            for number, line in enumerate(f, 1):
                if line.strip():
                    json.loads(line, object_pairs_hook=refuse_twice)
                    if not every_line:
                        return
            return
        except _KeyTwice as e:
            raise refused(e.args[0], number) from None
        except ValueError:  # not JSON lines: one document
            pass
        f.seek(0)
        try:
            json.loads(f.read(), object_pairs_hook=refuse_twice)
        except _KeyTwice as e:
            raise refused(e.args[0]) from None
        except ValueError:
            pass  # not JSON: datasets' own message says so


def _parallel_text_files(path: str, config: Config, key: str) -> tuple[Path, Path] | None:
    """(source file, target file) when ``path`` names line-aligned parallel text: the prefix
    ``corpus`` of ``corpus.<source_lang>`` + ``corpus.<target_lang>``, or one of the two files."""
    src, tgt = config.source_lang, config.target_lang
    if not (src and tgt) or Path(path).is_dir():
        return None
    prefix = path
    for lang in (src, tgt):
        if path.endswith(f".{lang}") and Path(path).is_file():
            prefix = path[: -len(lang) - 1]
    files = Path(f"{prefix}.{src}"), Path(f"{prefix}.{tgt}")
    if files[0].is_file() != files[1].is_file():
        there, missing = files if files[0].is_file() else files[::-1]
        raise DataError(f"{key}: {str(there)!r} has no {str(missing)!r} next to it; line-aligned parallel text "
                        f"needs one file per language")
    return files if files[0].is_file() else None


def _read_parallel_text(source_file: Path, target_file: Path, key: str):
    """One pair per line number of the two files (datasets' text reader: a line ends at \\n, \\r\\n or \\r)."""
    sides = [datasets.load_dataset("text", data_files=str(f), split="train") for f in (source_file, target_file)]
    if len(sides[0]) != len(sides[1]):
        raise DataError(f"{key}: {str(source_file)!r} has {len(sides[0]):,} lines and {str(target_file)!r} "
                        f"{len(sides[1]):,}; line-aligned parallel text needs the same number in both")
    return datasets.concatenate_datasets([side.rename_column("text", column)
                                          for side, column in zip(sides, TEXT_COLUMNS)], axis=1)


def _read_saved(folder: Path, key: str, split: str, split_key: str):
    """A dataset saved with ``save_to_disk`` (memory-mapped, not copied): a Dataset, or ``split`` of a DatasetDict."""
    saved = datasets.load_from_disk(str(folder))
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"{key}: {str(folder)!r} has no split {split!r}; splits found: "
                            f"{', '.join(saved) or 'none'} (set {split_key})")
        return saved[split]
    return saved


def _read_error(e: Exception, path: str, key: str) -> DataError:
    """The one-line message for a reading error: datasets wraps the parser's error (pandas' "Expected 2
    fields in line 4, saw 3") in its own ("An error occurred while generating the dataset"); the cause
    at the bottom of the chain is the one that tells the user what is wrong with the file."""
    cause = e
    while True:
        if isinstance(cause, UnicodeDecodeError):
            return _not_utf8(_text_files(path), key) or DataError(f"{key}: {path!r} is not valid UTF-8 text")
        if type(cause).__name__ == "EmptyDataError":  # pandas: a file with not even a header
            return DataError(f"{key}: {path!r} is empty (no header, no rows)")
        if cause.__cause__ is None and cause.__context__ is None:
            break
        cause = cause.__cause__ or cause.__context__
    if "corresponds to no data" in str(e):  # datasets' words for a file with no rows
        return DataError(f"{key}: {path!r} holds no pairs (no rows under the header)")
    message = _first_line(cause).removeprefix("Error tokenizing data. C error: ")
    if "Expected" in message and "fields" in message and path.lower().endswith(".csv"):
        message += " (a field that holds the delimiter needs double quotes)"
    return DataError(f"{key}: cannot load {path!r}: {message}")


def _text_files(path: str) -> list[Path]:
    """The text files read for ``path``: the file, the data files of a folder, or the files
    ``<path>.<language>`` of line-aligned parallel text (parquet is binary: its strings are checked by Arrow)."""
    local = Path(path)
    files = ([local] if local.is_file() else sorted(local.iterdir()) if local.is_dir()
             else sorted(local.parent.glob(f"{glob.escape(local.name)}.*")))
    return [f for f in files if f.is_file() and f.suffix.lower() != ".parquet"]


def _not_utf8(files: Iterable[Path], key: str) -> DataError | None:
    """The error for the first of ``files`` that is not UTF-8 text (which byte on which line), if any."""
    for f in files:
        if (problem := not_utf8(file_chunks(f), repr(str(f)))) is not None:
            return DataError(f"{key}: {problem}")
    return None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _as_pairs(ds, path: str, config: Config, key: str):
    """``ds`` in the flat layout (the configured columns) or the translation layout, as the columns
    ``source_text`` / ``target_text``, without the pairs that have an empty side."""
    columns = ds.column_names
    flat = [config.source_column, config.target_column]
    if TRANSLATION_COLUMN in columns and not set(flat) & set(columns):
        ds, wanted = _flatten_translation(ds, path, config, key), [f"{TRANSLATION_COLUMN}.{config.source_lang}",
                                                                   f"{TRANSLATION_COLUMN}.{config.target_lang}"]
    else:
        wanted = flat
        missing = [c for c in wanted if c not in columns]
        if missing:
            if len(columns) == 1 and columns[0] == "text":
                hint = " (set source_column/target_column; for line-aligned text files give their common prefix " \
                       "with source_lang/target_lang)"
            elif any("\t" in c for c in columns):
                hint = " (its header holds tabs: a tab-separated file needs the .tsv extension)"
            elif key == "eval_dataset_path":
                hint = (f" (source_column/target_column, here {config.source_column!r}/{config.target_column!r}, "
                        f"name the columns of dataset_path and eval_dataset_path both: give the evaluation file "
                        f"the same columns)")
            else:
                hint = " (set source_column/target_column)"
            found = ", ".join(repr(c) if "\t" in c else c for c in columns) or "none"
            raise DataError(f"{key}: {path!r} has no column {missing[0]!r}; columns found: {found}{hint}")
    for column in wanted:
        feature = ds.features[column]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise DataError(f"{key}: {path!r}: column {column!r} holds {_describe(feature)}, expected text")
    ds = ds.select_columns(wanted)
    if wanted != list(TEXT_COLUMNS):
        ds = ds.rename_columns(dict(zip(wanted, TEXT_COLUMNS)))
    filled = ds.with_format("arrow").filter(_both_sides_filled, batched=True, batch_size=10_000,
                                            keep_in_memory=True).with_format(None)  # an index list, not a copy
    if len(filled) < len(ds):  # else the data stays as it is: reading through an index list is slower
        ds = filled
    if len(ds) == 0:
        raise DataError(f"{key}: {path!r} holds no pairs with both {wanted[0]!r} and {wanted[1]!r} filled")
    return ds


def _flatten_translation(ds, path: str, config: Config, key: str):
    """The ``translation`` column split into ``translation.<lang>`` columns (Arrow, no copy)."""
    feature = ds.features[TRANSLATION_COLUMN]
    if isinstance(feature, datasets.Translation):
        languages = list(feature.languages)
    elif isinstance(feature, dict):
        languages = list(feature)
    else:
        raise DataError(f"{key}: {path!r}: column {TRANSLATION_COLUMN!r} holds {_describe(feature)}, "
                        f"expected {{language: sentence}} (the Hugging Face translation layout)")
    if not (config.source_lang and config.target_lang):
        raise DataError(f"{key}: {path!r} holds a {TRANSLATION_COLUMN!r} column of {{language: sentence}} with the "
                        f"languages {', '.join(sorted(languages))}; set source_lang and target_lang")
    for lang, name in ((config.source_lang, "source_lang"), (config.target_lang, "target_lang")):
        if lang not in languages:
            raise DataError(f"{key}: {path!r} has no language {lang!r} in its {TRANSLATION_COLUMN!r} column; "
                            f"languages found: {', '.join(sorted(languages)) or 'none'} (set {name})")
    return ds.select_columns([TRANSLATION_COLUMN]).flatten()


def _describe(feature) -> str:
    if isinstance(feature, datasets.Value):
        return f"{feature.dtype} values"
    return f"{type(feature).__name__ if not isinstance(feature, dict) else 'dict'} values"


def _both_sides_filled(batch: pa.Table) -> pa.Array:
    keep = None
    for column in TEXT_COLUMNS:
        filled = pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(batch[column]), ""), False)
        keep = filled if keep is None else pc.and_(keep, filled)
    return keep


def load_data(config: Config):
    """(train, eval) pair datasets: ``train_split`` of ``dataset_path``; for evaluation
    ``eval_dataset_path`` (its ``eval_split``, or "train"), else ``eval_split`` of ``dataset_path``,
    else ``eval_size`` pairs held out of the training pairs."""
    if config.eval_dataset_path:
        _check_eval_outside_training(config.dataset_path, config.eval_dataset_path)
    train = load_pairs(config.dataset_path, config, split=config.train_split)
    if config.eval_dataset_path:
        evaluation = load_pairs(config.eval_dataset_path, config, key="eval_dataset_path",
                                split=config.eval_split or "train", split_key="eval_split")
    elif config.eval_split:
        evaluation = load_pairs(config.dataset_path, config, split=config.eval_split, split_key="eval_split")
    else:
        if len(train) <= config.eval_size:
            raise DataError(f"eval_size: {config.eval_size} pairs cannot be held out of the {len(train)} in "
                            f"dataset_path; lower eval_size or set eval_dataset_path")
        # train_test_split's partition, as index lists kept in memory: nothing written next to the user's data
        order = np.random.default_rng(config.seed).permutation(len(train))
        evaluation = train.select(order[:config.eval_size], keep_in_memory=True)
        train = train.select(order[config.eval_size:], keep_in_memory=True)
    if config.max_train_samples:
        train = train.select(range(min(config.max_train_samples, len(train))))
    if config.max_eval_samples:
        evaluation = evaluation.select(range(min(config.max_eval_samples, len(evaluation))))
    return train, evaluation


def _check_eval_outside_training(dataset_path: str, eval_path: str) -> None:
    """Refuse a training folder that holds the evaluation file: every file of the folder is read as
    training pairs, so the evaluation pairs would be trained on (the shipped data/tatoeba_en_de holds both)."""
    folder, evaluation = Path(dataset_path), Path(eval_path)
    if not (folder.is_dir() and evaluation.is_file()) or (folder / "dataset_dict.json").is_file() \
            or (folder / "state.json").is_file():
        return
    if evaluation.resolve().parent == folder.resolve() and evaluation.suffix.lower() in FILE_TYPES:
        others = sorted(p.name for p in folder.iterdir()
                        if p.suffix.lower() in FILE_TYPES and p.resolve() != evaluation.resolve())
        name = f"the training file(s) ({', '.join(str(folder / o) for o in others)})" if others else "a training file"
        raise DataError(f"dataset_path: folder {dataset_path!r} also holds eval_dataset_path {eval_path!r}, so its "
                        f"pairs would be trained on; set dataset_path to {name} or move the evaluation file out")


def shared_pairs(train, evaluation) -> int:
    """How many evaluation pairs are also training pairs (same source and same target): BLEU on them
    does not measure translation of unseen sentences. One pass over the training pairs in Arrow."""
    def keys(table: pa.Table) -> pa.Array:
        source, target = (table[c].cast(pa.large_string()) for c in TEXT_COLUMNS)  # string or large_string
        return pc.binary_join_element_wise(source, target, pa.scalar("\x00", pa.large_string()))

    evaluated = keys(evaluation.select_columns(list(TEXT_COLUMNS)).with_format("arrow")[:])
    wanted, found = pc.unique(evaluated), set()
    for batch in train.select_columns(list(TEXT_COLUMNS)).with_format("arrow").iter(batch_size=100_000):
        batch_keys = keys(batch)
        found.update(batch_keys.filter(pc.is_in(batch_keys, value_set=wanted)).to_pylist())
    return sum(key in found for key in evaluated.to_pylist())


# the keys ``load_pairs`` reads, as the flat layout of the shipped CSVs has them
FLAT = types.SimpleNamespace(source_column=TEXT_COLUMNS[0], target_column=TEXT_COLUMNS[1], source_lang=None,
                             target_lang=None, dataset_config=None)


def read_pairs(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The (source, target) pairs of a file in the flat layout with the columns ``source_text`` and
    ``target_text`` (the shipped CSVs), as ``load_pairs`` reads them, in a list."""
    pairs = load_pairs(str(path), FLAT, key="pairs")
    return list(zip(pairs[TEXT_COLUMNS[0]], pairs[TEXT_COLUMNS[1]]))


def write_pairs(path: str | os.PathLike, pairs: Iterable[tuple[str, str]]) -> Path:
    """Write (source, target) pairs as a CSV with the header ``source_text,target_text``, atomically
    (a temporary file, then a rename); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(TEXT_COLUMNS)
        writer.writerows(pairs)
    return path


# ---------------------------------------------------------------------------------------------
# Model inputs


def tokenized_cache_dir(config: Config) -> Path:
    """Where tokenized pairs are cached: ``cache_dir``, or a folder of datasets' own cache
    (``HF_DATASETS_CACHE``, by default ~/.cache/huggingface/datasets), shared by every run."""
    folder = Path(config.cache_dir or Path(datasets.config.HF_DATASETS_CACHE) / "matrix-decomposition")
    if folder.exists() and not folder.is_dir():
        raise DataError(f"cache_dir: {str(folder)!r} is a file; give a folder path")
    return folder


def preprocess(pairs, tokenizer, config: Config, preprocessor: Callable, cache_dir: str | os.PathLike | None = None,
               num_workers: int | None = None, code: Sequence[Callable] = (), say: Callable = lambda *a, **k: None):
    """The model inputs of ``pairs``: the preprocessing hook applied to every pair (batched, in
    ``num_workers`` processes), keeping only the columns it returns.

    With ``cache_dir`` the result is written there as Arrow files named by a hash of the pairs
    (their datasets fingerprint), the tokenizer's files, the preprocessor (its code and the source
    files of ``preprocessor`` and of the functions in ``code``, e.g. the default preprocessor it
    calls) and the ``PREPROCESSING_KEYS`` of ``config``: a later run with the same of all of these
    reads them instead of tokenizing again; any change gives new files. They are written in a
    temporary subfolder and moved there when whole, so an interrupted or failed call leaves nothing."""
    num_proc = num_workers if num_workers and num_workers > 1 else None  # datasets forks a pool even for 1
    if cache_dir is None:
        ds = pairs.map(lambda batch: dict(preprocessor(batch, tokenizer, config)), batched=True,
                       remove_columns=pairs.column_names, load_from_cache_file=False, num_proc=num_proc)
        return _checked(ds, pairs, [])
    cache_dir = Path(cache_dir)
    key = _cache_key(pairs, tokenizer, config, [preprocessor, *code])
    manifest = cache_dir / f"tokenized-{key}.json"
    ds = _read_cached(manifest, len(pairs))
    if ds is not None:
        say(f"tokenized {len(ds):,} pairs reused from {manifest.with_suffix('.arrow')}", flush=True)
        return ds
    cache_dir.mkdir(parents=True, exist_ok=True)
    # written in a folder of this call's own and moved next to the manifest when whole: a map that is
    # interrupted (Ctrl-C, SIGTERM) or fails leaves none of its files behind, datasets' tmp* ones included
    with temporary_folder(cache_dir, f".tokenizing-{key}-") as work:
        ds = pairs.map(lambda batch: dict(preprocessor(batch, tokenizer, config)), batched=True,
                       remove_columns=pairs.column_names, cache_file_name=str(work / f"{manifest.stem}.arrow"),
                       load_from_cache_file=False, new_fingerprint=key, num_proc=num_proc)
        files = [Path(f["filename"]) for f in ds.cache_files]
        ds = _checked(ds, pairs, files)
        for f in files:
            os.replace(f, cache_dir / f.name)
        # written last: a manifest means complete files
        write_text_atomic(manifest, json.dumps({"files": [f.name for f in files], "rows": len(ds)}))
    say(f"tokenized {len(ds):,} pairs, cached in {manifest.with_suffix('.arrow')}", flush=True)
    return _read_cached(manifest, len(pairs))  # the files where they are now


def _checked(ds, pairs, written: list[Path]):
    """``ds`` if the preprocessor returned one example per pair with the model inputs; otherwise
    the files it was written to are deleted and the problem raised."""
    missing = {"input_ids", "attention_mask", "labels"} - set(ds.column_names)
    problem = None
    if missing:
        problem = (f"data_preprocessor returned no {', '.join(sorted(missing))}; "
                   f"it must return input_ids, attention_mask and labels")
    elif len(ds) != len(pairs):
        problem = (f"data_preprocessor returned {len(ds):,} examples for {len(pairs):,} pairs; "
                   f"it must return one per pair")
    if problem:
        for f in written:
            f.unlink(missing_ok=True)
        raise DataError(problem)
    return ds


def _read_cached(manifest: Path, rows: int):
    """The tokenized pairs a manifest lists, or None when it is missing or its files are not whole."""
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8"))
        parts = [datasets.Dataset.from_file(str(manifest.parent / name)) for name in listed["files"]]
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return ds if len(ds) == rows == listed["rows"] else None


def _cache_key(pairs, tokenizer, config: Config, functions: Sequence[Callable]) -> str:
    import transformers

    digest = hashlib.sha256(json.dumps({
        "pairs": pairs._fingerprint, "config": {k: getattr(config, k, None) for k in PREPROCESSING_KEYS},
        "versions": [datasets.__version__, transformers.__version__],
    }, sort_keys=True).encode())
    with tempfile.TemporaryDirectory() as folder:  # the tokenizer as its files: vocabulary, models, settings
        tokenizer.save_pretrained(folder)
        for f in sorted(Path(folder).rglob("*")):
            digest.update(f.name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b""))
    for function in functions:
        try:
            # datasets' hash of a function: its code and, for closures and scripts, the values it uses;
            # a function of an importable module is hashed by name only, so its source file is added
            digest.update(Hasher.hash(function).encode())
        except Exception:
            return f"uncached-{uuid.uuid4().hex[:16]}"  # cannot tell when it changes: never reused
        try:
            digest.update(Path(inspect.getsourcefile(function)).read_bytes())
        except (TypeError, OSError):
            pass  # defined interactively: its code is in the hash above
    return digest.hexdigest()[:24]
