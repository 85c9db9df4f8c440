"""Progress on standard error: a bar on a terminal, plain lines in a log file, nothing when off."""
import io

from tqdm import tqdm

from mdcompress import progress as progress_module
from mdcompress.progress import PlainLines, progress_bar
from mdcompress.translate import translate_ids


class _Tokenizer:
    pad_token_id = 0

    def batch_decode(self, generated, skip_special_tokens=True):
        return ["x"] * len(generated)


class _Translator:
    tokenizer = _Tokenizer()

    def generate(self, input_ids, attention_mask, num_beams=1, max_new_tokens=128, min_new_tokens=0, bounds=None):
        return input_ids


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_file_gets_plain_lines_every_so_often_not_bar_redraws(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    with progress_bar(total=100, desc="distilling", unit="steps") as bar:
        for _ in range(100):
            now[0] += 10.0  # a step takes 10 s
            bar.update(1)
            bar.set_postfix_str("loss 2.31")
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and len(lines) == 34, err  # a line per 30 s and the last, not one per step
    assert lines[0] == "distilling: 3/100 steps (3%), 0:00:30 elapsed, about 0:16:10 left; loss 2.31"
    assert lines[-1] == "distilling: 100/100 steps (100%), 0:16:40 elapsed; loss 2.31"


def test_progress_false_shows_neither_bar_nor_lines(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "LINE_SECONDS", 0.0)
    for _ in progress_bar(range(5), desc="rank sensitivity", enabled=False):
        pass
    monkeypatch.setattr("sys.stderr", _Terminal())
    bar = progress_bar(total=5, enabled=False)
    assert not isinstance(bar, tqdm) or bar.disable
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    monkeypatch.setattr("sys.stderr", _Terminal())
    bar = progress_bar(total=5, desc="BLEU student")
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()


def test_translations_write_lines_to_a_log(monkeypatch, capsys):
    """The BLEU translations print plain lines, without a carriage return, when standard error is a
    file (the training loop, the rank sensitivity and the teacher top-k use the same helper)."""
    monkeypatch.setattr(progress_module, "LINE_SECONDS", 0.0)
    translate_ids(_Translator(), [[5, 6, 2], [7, 2], [8, 9, 10, 2]], batch_size=2, progress=True,
                  desc="BLEU student")
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1].startswith("BLEU student: 3/3 sentences (100%), "), err
    translate_ids(_Translator(), [[5, 2]], progress=None)  # the translate command's default: a bar on a terminal
    assert capsys.readouterr().err == ""


def test_iterating_counts_every_item(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "LINE_SECONDS", 1e9)
    bar = PlainLines(range(4), total=4, desc="teacher top-8", unit="batches")
    assert list(bar) == [0, 1, 2, 3] and bar.n == 4
    assert capsys.readouterr().err.startswith("teacher top-8: 4/4 batches (100%), ")
