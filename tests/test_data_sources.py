"""Where the pairs come from: the held-out split, folders of data files, renamed columns."""

import json

import pytest

from compress_model import Config
from mdcompress.data import DataError, load_data, load_pairs, write_pairs


@pytest.fixture
def csv_120(tmp_path, tiny_pairs):
    return write_pairs(tmp_path / "pairs.csv", tiny_pairs[:120])


def test_without_eval_dataset_path_eval_size_pairs_are_held_out(csv_120):
    config = Config(dataset_path=str(csv_120), eval_dataset_path=None, eval_size=24)
    train, evaluation = load_data(config)
    assert (len(train), len(evaluation)) == (96, 24)
    pairs = lambda ds: set(zip(ds["source_text"], ds["target_text"]))  # noqa: E731
    everything = pairs(load_data(Config(dataset_path=str(csv_120), eval_dataset_path=str(csv_120)))[0])
    assert len(everything) == 120
    assert not pairs(train) & pairs(evaluation) and pairs(train) | pairs(evaluation) == everything
    assert pairs(load_data(config)[1]) == pairs(evaluation)  # the seed fixes the split
    other = load_data(Config(dataset_path=str(csv_120), eval_dataset_path=None, eval_size=24, seed=7))[1]
    assert pairs(other) != pairs(evaluation)


def test_held_out_split_needs_pairs_left_to_train_on(csv_120):
    with pytest.raises(DataError, match="eval_size: 120 pairs cannot be held out of the 120 in dataset_path"):
        load_data(Config(dataset_path=str(csv_120), eval_dataset_path=None, eval_size=120))


def test_a_folder_of_data_files_is_read_whole(tmp_path, tiny_pairs):
    folder = tmp_path / "pairs"
    write_pairs(folder / "part-1.csv", tiny_pairs[:50])
    write_pairs(folder / "part-2.csv", tiny_pairs[50:80])
    (folder / "README.md").write_text("not data")  # other files are ignored
    write_pairs(tmp_path / "eval.csv", tiny_pairs[80:90])  # outside the folder: a file inside would be trained on
    train, _ = load_data(Config(dataset_path=str(folder), eval_dataset_path=str(tmp_path / "eval.csv")))
    assert list(zip(train["source_text"], train["target_text"])) == tiny_pairs[:80]  # in file-name order


@pytest.mark.parametrize("files, words", [
    ({}, "has no data files"),
    ({"a.csv": "source_text,target_text\nHi,Hallo\n", "b.jsonl": '{"source_text": "Hi", "target_text": "Hallo"}\n'},
     "has mixed data files"),
], ids=["empty", "mixed"])
def test_a_folder_without_one_kind_of_data_file_is_refused(tmp_path, files, words):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    with pytest.raises(DataError, match=f"dataset_path: folder '{folder}' {words}"):
        load_data(Config(dataset_path=str(folder), eval_dataset_path=None))


def test_source_and_target_columns_are_renamed(tmp_path, tiny_pairs):
    rows = [{"id": i, "de": t, "en": s} for i, (s, t) in enumerate(tiny_pairs[:30])]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = Config(dataset_path=str(data), eval_dataset_path=str(data), source_column="en", target_column="de")
    train, evaluation = load_data(config)
    for ds in (train, evaluation):
        assert ds.column_names == ["source_text", "target_text"]
        assert list(zip(ds["source_text"], ds["target_text"])) == tiny_pairs[:30]  # en → source, de → target
    with pytest.raises(DataError, match="has no column 'source_text'; columns found: id, de, en"):
        load_pairs(str(data), Config())
