"""The data: every layout read to the same pairs, hub-style splits, the tokenization cache and
what invalidates it, several tokenizing processes, and the refusals."""

import importlib
import json
import os
import signal
import sys
import time

import datasets
import pytest
from helpers import edit_config, make_run_dir, refused_in_one_line

import compress_model
from mdcompress import data

PAIRS = [("Hello.", "Hallo."), ('He said "no".', 'Er sagte "nein".'), ("NA", "null"), ("  ", "Leer."),
         ("Go, now!", "Geh, sofort!"), ("I\u2028see.", "Ich\u2028sehe.")]  # "NA"/"null" are sentences; one side blank
KEPT = [p for p in PAIRS if p[0].strip()]
CONFIG = compress_model.Config(source_lang="en", target_lang="de")
TRANSLATION = datasets.Features({"translation": datasets.Translation(languages=["de", "en"])})


def translation_rows(pairs):
    return {"translation": [{"en": s, "de": t} for s, t in pairs]}


def write_tsv(folder, pairs, name="pairs.tsv"):
    path = folder / name
    path.write_text("source_text\ttarget_text\n" + "".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    return path


def write_moses(folder, pairs, prefix="corpus"):
    for side, lang in enumerate(("en", "de")):
        (folder / f"{prefix}.{lang}").write_text("".join(p[side] + "\n" for p in pairs), encoding="utf-8")
    return folder / prefix


def write_translation_jsonl(folder, pairs):
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps({"translation": {"en": s, "de": t}}) + "\n" for s, t in pairs))
    return path


def save_dataset(folder, pairs):
    datasets.Dataset.from_dict({"source_text": [s for s, _ in pairs], "target_text": [t for _, t in pairs]}
                               ).save_to_disk(folder / "saved")
    return folder / "saved"


def save_hub_layout(folder, splits):
    """A DatasetDict in the hub's translation layout, saved to disk: stands in for e.g. wmt16 de-en."""
    datasets.DatasetDict({name: datasets.Dataset.from_dict(translation_rows(pairs), features=TRANSLATION)
                          for name, pairs in splits.items()}).save_to_disk(folder / "hub")
    return folder / "hub"


def write_tsv_folder(folder, pairs):
    (folder / "tsvs").mkdir()
    write_tsv(folder / "tsvs", pairs[:2], "a.tsv")
    write_tsv(folder / "tsvs", pairs[2:], "b.tsv")
    return folder / "tsvs"


LAYOUTS = {  # layout → writes PAIRS in it under a folder, returns the dataset_path naming them
    "tsv": lambda d: write_tsv(d, PAIRS),
    "folder-of-tsv": lambda d: write_tsv_folder(d, PAIRS),
    "translation-jsonl": lambda d: write_translation_jsonl(d, PAIRS),
    "moses-prefix": lambda d: write_moses(d, PAIRS),
    "moses-source-file": lambda d: write_moses(d, PAIRS).with_suffix(".en"),
    "saved-dataset": lambda d: save_dataset(d, PAIRS),
    "saved-datasetdict": lambda d: save_hub_layout(d, {"train": PAIRS, "validation": PAIRS[:1]}),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_to_the_same_pairs(tmp_path, layout):
    path = LAYOUTS[layout](tmp_path)
    before = sorted(tmp_path.rglob("*"))
    pairs = data.load_pairs(str(path), CONFIG)
    assert pairs.column_names == ["source_text", "target_text"]
    assert list(zip(pairs["source_text"], pairs["target_text"])) == KEPT
    assert sorted(tmp_path.rglob("*")) == before  # nothing written next to the user's data


def test_hub_layout_splits_train_and_evaluate(tmp_path):
    hub = save_hub_layout(tmp_path, {"train": PAIRS[:4], "validation": PAIRS[4:], "test": PAIRS[:2]})
    config = compress_model.Config(dataset_path=str(hub), eval_dataset_path=None, eval_split="validation",
                                   source_lang="en", target_lang="de")
    train, evaluation = data.load_data(config)
    assert list(train["source_text"]) == [s for s, _ in KEPT[:3]]
    assert list(evaluation["source_text"]) == [s for s, _ in PAIRS[4:]]
    config = compress_model.Config(dataset_path=str(hub), eval_dataset_path=str(hub), eval_split="test",
                                   train_split="validation", source_lang="en", target_lang="de")
    train, evaluation = data.load_data(config)
    assert (len(train), list(evaluation["target_text"])) == (2, [t for _, t in PAIRS[:2]])


def test_held_out_pairs_are_index_lists_and_the_data_stays_on_disk(tmp_path):
    saved = save_dataset(tmp_path, PAIRS * 50)
    config = compress_model.Config(dataset_path=str(saved), eval_dataset_path=None, eval_size=10)
    train, evaluation = data.load_data(config)
    assert (len(train), len(evaluation)) == (5 * 50 - 10, 10)
    assert train.cache_files and all(str(saved) in f["filename"] for f in train.cache_files)  # memory-mapped
    assert sorted(p.name for p in saved.iterdir()) == ["data-00000-of-00001.arrow", "dataset_info.json",
                                                      "state.json"]


# ---------------------------------------------------------------------------------------------
# Tokenization: cached, invalidated by what changes the result, in several processes


def counting(preprocessor, calls):
    def counted(batch, tokenizer, config):
        calls.append(len(batch["source_text"]))
        return preprocessor(batch, tokenizer, config)
    return counted


@pytest.fixture
def pairs(tiny_pairs):
    return datasets.Dataset.from_dict({"source_text": [s for s, _ in tiny_pairs[:40]],
                                       "target_text": [t for _, t in tiny_pairs[:40]]})


def test_tokenized_pairs_are_cached_and_reused(pairs, tiny_tokenizer, tmp_path):
    calls = []
    hook = counting(compress_model.default_data_preprocessor, calls)
    first = data.preprocess(pairs, tiny_tokenizer, CONFIG, hook, cache_dir=tmp_path, num_workers=1)
    assert sum(calls) == 40 and first.cache_files  # in this process (one worker), written to Arrow files in cache_dir
    calls.clear()
    second = data.preprocess(pairs, tiny_tokenizer, CONFIG, hook, cache_dir=tmp_path)
    assert calls == [] and second[:] == first[:]
    uncached = data.preprocess(pairs, tiny_tokenizer, CONFIG, compress_model.default_data_preprocessor)
    assert uncached[:] == first[:]


def test_a_changed_tokenizer_preprocessor_or_length_tokenizes_again(pairs, tiny_tokenizer, tmp_path):
    calls = []
    hook = counting(compress_model.default_data_preprocessor, calls)
    data.preprocess(pairs, tiny_tokenizer, CONFIG, hook, cache_dir=tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path / "tok")  # the same tokenizer with one more token
    vocab = {**tiny_tokenizer.get_vocab(), "extra": len(tiny_tokenizer)}
    (tmp_path / "tok" / "vocab.json").write_text(json.dumps(vocab))
    other_tokenizer = type(tiny_tokenizer).from_pretrained(tmp_path / "tok")
    shouting = counting(lambda b, tok, c: compress_model.default_data_preprocessor(
        {**b, "source_text": [s.upper() for s in b["source_text"]]}, tok, c), calls)
    for args in [(pairs, other_tokenizer, CONFIG, hook), (pairs, tiny_tokenizer, CONFIG, shouting),
                 (pairs, tiny_tokenizer, compress_model.Config(max_source_length=5), hook),
                 (pairs.select(range(39)), tiny_tokenizer, CONFIG, hook)]:
        calls.clear()
        data.preprocess(*args, cache_dir=tmp_path)
        assert sum(calls) == len(args[0])


def test_an_edited_data_file_tokenizes_again(tiny_tokenizer, tmp_path):
    calls = []
    hook = counting(compress_model.default_data_preprocessor, calls)
    for pairs, rewrite, tokenized_again in [(PAIRS, True, True), (PAIRS[::-1], True, True),
                                            (PAIRS[::-1], False, False)]:
        if rewrite:
            write_tsv(tmp_path, pairs)  # the same file, edited
        calls.clear()
        tokenized = data.preprocess(data.load_pairs(str(tmp_path / "pairs.tsv"), CONFIG), tiny_tokenizer, CONFIG,
                                    hook, cache_dir=tmp_path / "cache")
        assert bool(calls) == tokenized_again
        first_target = next(t for s, t in pairs if s.strip())
        assert tokenized["labels"][0] == tiny_tokenizer(text_target=first_target)["input_ids"]


def test_an_edited_preprocessor_module_tokenizes_again(pairs, tiny_tokenizer, tmp_path, monkeypatch):
    """datasets hashes a function of an importable module by its name only: its source file counts too."""
    module = tmp_path / "my_hook.py"
    module.write_text("import compress_model\ncalls = []\ndef hook(b, tok, c):\n    calls.append(1)\n"
                      "    return compress_model.default_data_preprocessor(b, tok, c)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    my_hook = importlib.import_module("my_hook")
    data.preprocess(pairs, tiny_tokenizer, CONFIG, my_hook.hook, cache_dir=tmp_path / "cache")
    module.write_text(module.read_text().replace("(b, tok, c)\n", "({**b, 'source_text': b['target_text']}, tok, c)\n"))
    my_hook = importlib.reload(my_hook)
    changed = data.preprocess(pairs, tiny_tokenizer, CONFIG, my_hook.hook, cache_dir=tmp_path / "cache")
    assert my_hook.calls and changed["input_ids"][0] == tiny_tokenizer(pairs["target_text"][0])["input_ids"]
    sys.modules.pop("my_hook")


def test_several_processes_tokenize_the_same_and_reuse_the_cache(pairs, tiny_tokenizer, tmp_path):
    one = data.preprocess(pairs, tiny_tokenizer, CONFIG, compress_model.default_data_preprocessor)
    two = data.preprocess(pairs, tiny_tokenizer, CONFIG, compress_model.default_data_preprocessor,
                          cache_dir=tmp_path, num_workers=2)
    assert len(two.cache_files) == 2 and two[:] == one[:]
    reused = data.preprocess(pairs, tiny_tokenizer, CONFIG, compress_model.default_data_preprocessor,
                             cache_dir=tmp_path, num_workers=2)
    assert reused.cache_files == two.cache_files and reused[:] == one[:]


def test_a_bad_preprocessor_leaves_no_cache(pairs, tiny_tokenizer, tmp_path):
    def no_labels(batch, tokenizer, config):
        return dict(tokenizer(batch["source_text"]))

    with pytest.raises(data.DataError, match="returned no labels"):
        data.preprocess(pairs, tiny_tokenizer, CONFIG, no_labels, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The CLI on the hub layout, and its refusals


@pytest.fixture
def run_dir(tmp_path, tiny_teacher_dir, tiny_pairs):
    return make_run_dir(tmp_path, tiny_teacher_dir, tiny_pairs[:64], tiny_pairs[300:316], k_info=4, batch_size=16,
                        max_steps=2, max_new_tokens=8, checkpoint_steps=0)


def test_cli_trains_on_a_hub_layout_dataset_and_evaluates_on_its_validation_split(run_dir, monkeypatch, capsys,
                                                                                  tiny_pairs):
    monkeypatch.chdir(run_dir)
    hub = save_hub_layout(run_dir, {"train": tiny_pairs[:48], "validation": tiny_pairs[300:312]})
    edit_config(run_dir, dataset_path=str(hub), eval_dataset_path=None, eval_split="validation", source_lang="en",
                target_lang="de", preprocessing_num_workers=2, cache_dir=str(run_dir / "cache"))
    assert compress_model.main(["--config", "config.json"]) == 0
    report = json.loads((run_dir / "out" / "report.json").read_text())
    assert (report["train_dataset_pairs"], report["eval_pairs"]) == (48, 12)
    assert report["train_pairs"] == 2 * 16  # max_steps 2 of batch 16
    assert "tokenized 48 pairs, cached in" in capsys.readouterr().out
    edit_config(run_dir, output_path=str(run_dir / "again"))
    assert compress_model.main(["--config", "config.json"]) == 0
    assert "tokenized 48 pairs reused from" in capsys.readouterr().out


def _swap(path, old, new):
    path.write_text(path.read_text().replace(old, new))


def _write(path, text):
    path.write_text(text)


def _write_parquet(path, names):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table([pa.array([f"{name} {i}."]) for i, name in enumerate(names)], names=names), path)


def _write_bytes(path, text, encoding="latin-1"):
    path.write_bytes(text.encode(encoding))


BAD_DATA = [  # (id, how to break the run folder, words the one-line message must contain)
    ("translation-without-languages", lambda d: edit_config(d, dataset_path=str(write_translation_jsonl(d, PAIRS))),
     ["dataset_path", "pairs.jsonl", "'translation' column", "languages de, en", "set source_lang and target_lang"]),
    ("missing-language", lambda d: edit_config(d, dataset_path=str(write_translation_jsonl(d, PAIRS)),
                                               source_lang="en", target_lang="fr"),
     ["dataset_path", "no language 'fr'", "languages found: de, en", "target_lang"]),
    ("moses-lines-differ", lambda d: (edit_config(d, dataset_path=str(write_moses(d, PAIRS)), source_lang="en",
                                                  target_lang="de"), _swap(d / "corpus.de", "Leer.\n", "")),
     ["dataset_path", "corpus.en' has 6 lines", "corpus.de' 5", "same number"]),
    ("moses-one-side", lambda d: (edit_config(d, dataset_path=str(write_moses(d, PAIRS)), source_lang="en",
                                              target_lang="fr")),
     ["dataset_path", "corpus.en' has no", "corpus.fr'"]),
    ("moses-without-languages", lambda d: edit_config(d, dataset_path=str(write_moses(d, PAIRS).with_suffix(".en"))),
     ["dataset_path", "unsupported type '.en'", "set source_lang and target_lang"]),
    ("missing-split", lambda d: edit_config(d, dataset_path=str(save_hub_layout(d, {"train": PAIRS})),
                                            eval_dataset_path=None, eval_split="validation", source_lang="en",
                                            target_lang="de"),
     ["dataset_path", "no split 'validation'", "splits found: train", "eval_split"]),
    ("eval-split-is-train-split", lambda d: edit_config(d, eval_dataset_path=None, eval_split="train"),
     ["eval_split", "'train' is the split trained on"]),
    ("one-language", lambda d: edit_config(d, source_lang="en"), ["source_lang and target_lang", '"en" and null']),
    ("not-text", lambda d: (_write(d / "n.jsonl", '{"source_text": 1, "target_text": "eins"}\n'),
                            edit_config(d, dataset_path=str(d / "n.jsonl"))),
     ["dataset_path", "n.jsonl", "'source_text' holds int64"]),
    ("folder-of-nothing", lambda d: ((d / "empty").mkdir(), edit_config(d, dataset_path=str(d / "empty"))),
     ["dataset_path", "has no data files", "save_to_disk"]),
    ("csv-row-of-three-fields", lambda d: (_write(d / "t.csv", "source_text,target_text\nHello.,Hallo.\nA,B,C\n"),
                                           edit_config(d, dataset_path=str(d / "t.csv"))),
     ["dataset_path", "t.csv", "Expected 2 fields in line 3, saw 3", "double quotes"]),
    ("csv-empty-file", lambda d: (_write(d / "e.csv", ""), edit_config(d, dataset_path=str(d / "e.csv"))),
     ["dataset_path", "e.csv", "is empty"]),
    ("tab-separated-csv", lambda d: (_write(d / "t.csv", "source_text\ttarget_text\nHi, you.\tHallo, du.\nGo.\tGeh.\n"),
                                     edit_config(d, dataset_path=str(d / "t.csv"))),
     ["dataset_path", "t.csv", "no column 'source_text'", "'source_text\\ttarget_text'", ".tsv extension"]),
    ("eval-file-in-training-folder", lambda d: ((d / "pairs").mkdir(), (d / "train.csv").rename(d / "pairs/train.csv"),
                                                (d / "eval.csv").rename(d / "pairs/eval.csv"),
                                                edit_config(d, dataset_path=str(d / "pairs"),
                                                            eval_dataset_path=str(d / "pairs/eval.csv"))),
     ["dataset_path", "also holds eval_dataset_path", "eval.csv", "would be trained on", "train.csv"]),
    ("eval-file-without-the-columns", lambda d: (write_tsv(d, PAIRS, "p.tsv"),
                                                 _swap(d / "p.tsv", "source_text\ttarget_text", "en\tde"),
                                                 edit_config(d, dataset_path=str(d / "p.tsv"), source_column="en",
                                                             target_column="de")),
     ["eval_dataset_path", "no column 'en'", "name the columns of dataset_path and eval_dataset_path both"]),
    # text that is not UTF-8: which byte on which line of which file, and how to convert it (as md-translate says)
    ("csv-not-utf8", lambda d: (_write_bytes(d / "l.csv", "source_text,target_text\nHi.,Hallo.\nGrüße.,Hallo.\n"),
                                edit_config(d, dataset_path=str(d / "l.csv"))),
     ["dataset_path: '", "l.csv' is not UTF-8 text (byte 0xfc on line 3); convert it first, e.g. iconv -f latin1 -t utf-8"]),
    # Arrow's JSON reader takes the bytes in: the run failed with a traceback when the row was first read
    ("jsonl-not-utf8", lambda d: (_write_bytes(d / "l.jsonl", '{"source_text": "Hi.", "target_text": "Hallo."}\n'
                                                              '{"source_text": "Grüße.", "target_text": "Hallo."}\n'),
                                  edit_config(d, dataset_path=str(d / "l.jsonl"))),
     ["dataset_path: '", "l.jsonl' is not UTF-8 text (byte 0xfc on line 2); convert it first"]),
    ("moses-not-utf8", lambda d: (edit_config(d, dataset_path=str(write_moses(d, PAIRS)), source_lang="en",
                                              target_lang="de"), _write_bytes(d / "corpus.de", "Hallo.\nTschüß.\n")),
     ["dataset_path: '", "corpus.de' is not UTF-8 text (byte 0xfc on line 2); convert it first"]),
    # a column named twice: pandas renamed the second 'target_text.1' and the first was trained on, unsaid
    ("csv-column-twice", lambda d: (_write(d / "t.csv", "source_text,target_text,target_text\nHi.,Hallo.,Servus.\n"),
                                    edit_config(d, dataset_path=str(d / "t.csv"))),
     ["dataset_path: '", "t.csv' has two columns named 'target_text'; give each column its own name"]),
    ("tsv-column-twice", lambda d: (_write(d / "t.tsv", "source_text\tsource_text\ttarget_text\nHi.\tHey.\tHallo.\n"),
                                    edit_config(d, dataset_path=str(d / "t.tsv"))),
     ["dataset_path: '", "t.tsv' has two columns named 'source_text'"]),
    ("parquet-column-twice", lambda d: (_write_parquet(d / "t.parquet", ["source_text", "target_text", "target_text"]),
                                        edit_config(d, dataset_path=str(d / "t.parquet"))),
     ["dataset_path: '", "t.parquet' has two columns named 'target_text'"]),
    ("jsonl-key-twice", lambda d: (_write(d / "t.jsonl", '{"source_text": "Hi.", "target_text": "Hallo."}\n'
                                                         '{"source_text": "Go.", "target_text": "Geh.", '
                                                         '"target_text": "Los."}\n'),
                                   edit_config(d, dataset_path=str(d / "t.jsonl"))),
     ["dataset_path: '", "t.jsonl' has the key 'target_text' twice in one object (line 2); give each key its own name"]),
    ("json-array-key-twice", lambda d: (_write(d / "t.json", '[{"source_text": "Hi.", "target_text": "Hallo."},\n'
                                                             ' {"source_text": "Go.", "source_text": "Run.", '
                                                             '"target_text": "Geh."}]\n'),
                                        edit_config(d, dataset_path=str(d / "t.json"))),
     ["dataset_path: '", "t.json' has the key 'source_text' twice in one object; give each key its own name"]),
    ("cache-dir-is-file", lambda d: edit_config(d, cache_dir="config.json"), ["cache_dir", "'config.json' is a file"]),
    ("workers-zero", lambda d: edit_config(d, preprocessing_num_workers=0),
     ["preprocessing_num_workers", "at least 1", "0"]),
    ("hub-id-without-owner", lambda d: edit_config(d, dataset_path="wmt16", dataset_config="de-en"),
     ["dataset_path", "'wmt16' does not exist", "a hub dataset id has the form owner/name, e.g. 'wmt/wmt16'"]),
    # "data" is a folder here (the run folder's data/): a missing data/x is a local path, not a hub id
    ("missing-file-in-a-local-folder", lambda d: ((d / "data").mkdir(), edit_config(d, eval_dataset_path="data/train_de")),
     ["eval_dataset_path", "'data/train_de' does not exist", "relative to the current folder", "/data/train_de'",
      "not taken for a hub id, since the folder 'data' is here"]),
]


@pytest.mark.parametrize("case, breaks, words", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_is_one_line_error_and_writes_nothing(run_dir, capsys, monkeypatch, case, breaks, words):
    breaks(run_dir)
    refused_in_one_line(run_dir, capsys, monkeypatch, words)


@pytest.mark.parametrize("variables", [["HF_HUB_OFFLINE"], ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"]])
def test_a_hub_dataset_not_cached_offline_says_so(run_dir, capsys, monkeypatch, variables):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    for name in variables:  # datasets read them when imported: offline either way
        monkeypatch.setenv(name, "1")
    edit_config(run_dir, eval_dataset_path="nobody-at-all/no-such-dataset", dataset_config="de-en",
                eval_split="validation")
    named = " and ".join(variables)
    refused_in_one_line(run_dir, capsys, monkeypatch, [
        "eval_dataset_path: 'nobody-at-all/no-such-dataset' (configuration 'de-en') is not in the local datasets cache "
        f"({datasets.config.HF_DATASETS_CACHE})", f"{named} {'is' if len(variables) == 1 else 'are'} set",
        f"so the hub was not asked; unset {named} to download it"])


def test_ctrl_c_while_workers_tokenize_is_one_line_and_leaves_no_files(run_dir, monkeypatch, capfd, tmp_path_factory):
    """A terminal's Ctrl-C reaches the tokenizing workers too: they ignore it (no tracebacks from the
    pool), the run stops with one line and exit 130, and the interrupted map leaves nothing in
    cache_dir: neither the shard a worker finished nor datasets' tmp* files."""
    monkeypatch.chdir(run_dir)
    edit_config(run_dir, preprocessing_num_workers=2, cache_dir=str(run_dir / "cache"))
    parent, first = os.getpid(), tmp_path_factory.mktemp("signals") / "first"

    def ctrl_c(batch, tokenizer, config):  # in a worker: the first one tokenizes its shard, the other is stopped
        try:
            os.close(os.open(first, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            time.sleep(2)  # the first shard is written meanwhile
            os.kill(os.getpid(), signal.SIGINT)  # the signal a terminal sends every process of the job
            os.kill(parent, signal.SIGINT)
            time.sleep(60)
        return compress_model.default_data_preprocessor(batch, tokenizer, config)

    monkeypatch.setattr(compress_model, "data_preprocessor", ctrl_c)
    # as a terminal's job takes Ctrl-C: a suite started in the background of a non-interactive shell
    # (``cmd &``, nohup) ignores SIGINT, and the run would leave it so
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert compress_model.main(["--config", "config.json"]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    out, err = capfd.readouterr()
    assert err.strip().splitlines() == ["compress_model.py: interrupted; checkpoint_steps is 0, so nothing was kept; "
                                        "run the same command to start over"]
    assert list((run_dir / "cache").iterdir()) == []


def test_shared_pairs_counts_evaluation_pairs_that_are_trained_on():
    """Same source and same target; a pair whose target differs is not shared; a selection (an index
    list over the Arrow table, as max_train_samples makes) is read as selected."""
    train = datasets.Dataset.from_dict({"source_text": ["a", "b", "c", "d"], "target_text": ["A", "B", "C", "D"]})
    evaluation = datasets.Dataset.from_dict({"source_text": ["b", "c", "e", "b"], "target_text": ["B", "x", "E", "B"]})
    assert data.shared_pairs(train, evaluation) == 2  # ("b", "B") twice; ("c", "x") is another translation
    assert data.shared_pairs(train.select([0, 2, 3]), evaluation) == 0
    assert data.shared_pairs(train.select([1]), evaluation) == 2


def test_a_run_warns_when_evaluation_pairs_are_trained_on(run_dir, capsys, monkeypatch):
    monkeypatch.chdir(run_dir)
    edit_config(run_dir, eval_dataset_path="train.csv", max_eval_samples=3)
    assert compress_model.main(["--config", "config.json", "--plan"]) == 0
    assert "warning: 3 of the 3 evaluation pairs are also training pairs" in capsys.readouterr().out
