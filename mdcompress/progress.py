"""Progress of the long stages (training, BLEU translations, rank sensitivity, teacher top-k), one
helper for all of them: a tqdm bar on a terminal; when standard error is a file or a pipe, a plain
line every ``LINE_SECONDS`` seconds and one when done, instead of the bar's redraws (a log would
otherwise hold thousands of carriage-return lines)."""
from __future__ import annotations

import sys
import time

LINE_SECONDS = 30.0  # between two plain lines when standard error is not a terminal


def interactive() -> bool:
    """Whether standard error shows a bar as intended: a terminal, or a notebook (its widget)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def progress_bar(iterable=None, *, total: int | None = None, desc: str | None = None, enabled: bool = True,
             initial: int = 0, unit: str = "it", leave: bool = True):
    """A bar (``tqdm``'s API: iterate over it or call ``update``, ``set_postfix_str``, ``close``;
    a context manager) for ``iterable`` or ``total`` steps: tqdm on a terminal, ``PlainLines``
    elsewhere, nothing shown when not ``enabled``."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if enabled and interactive():
        from tqdm.auto import tqdm
        return tqdm(iterable, total=total, desc=desc, initial=initial, unit=unit, leave=leave, file=sys.stderr)
    return PlainLines(iterable, total=total, desc=desc, enabled=enabled, initial=initial, unit=unit)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainLines:
    """A progress bar's API that prints a line such as ``distilling: 120/1,000 steps (12%), 0:00:45
    elapsed, about 0:05:30 left; loss 2.31`` to standard error at most every ``LINE_SECONDS``
    seconds, and one when closed (nothing when not ``enabled``)."""

    def __init__(self, iterable=None, *, total: int | None = None, desc: str | None = None, enabled: bool = True,
                 initial: int = 0, unit: str = "it"):
        self.iterable, self.total, self.desc, self.enabled, self.unit = iterable, total, desc, enabled, unit
        self.n = self._start = initial
        self.postfix = ""
        self._began = self._last = time.monotonic()
        self._closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.enabled and time.monotonic() - self._last >= LINE_SECONDS:
            self._print()

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        if self.enabled and not self._closed and self.n > self._start:
            self._print()
        self._closed = True

    def line(self) -> str:
        """The line printed now: where the stage is, how long it took, how long it has left."""
        elapsed = time.monotonic() - self._began
        done = f"{self.n:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"
        if self.total:
            done += f" ({100 * self.n / self.total:.0f}%)"
        text = f"{self.desc or 'progress'}: {done}, {_clock(elapsed)} elapsed"
        if self.total and self._start < self.n < self.total:
            text += f", about {_clock(elapsed / (self.n - self._start) * (self.total - self.n))} left"
        return text + (f"; {self.postfix}" if self.postfix else "")

    def _print(self) -> None:
        self._last = time.monotonic()
        print(self.line(), file=sys.stderr, flush=True)
