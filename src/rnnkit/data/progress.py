"""Progress of a pass over a corpus, counted in bytes read.

On a terminal a rich bar on stderr shows MB done, MB/s and the time left;
elsewhere (a log file, CI) plain lines go to ``log``: a quarter at a time for
big corpora, and one summary line per pass for anything over a megabyte.
Small texts, read in a blink, say nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

Log = Callable[[str], None]

SUMMARY_BYTES = 1 << 20  # a pass over less than this says nothing
STEPS_BYTES = 64 << 20  # a pass over more than this also says when each quarter is done


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


class ByteProgress:
    """``with ByteProgress("pass 1/2: ...", total, log=log) as bar: bar.advance(n)``."""

    def __init__(self, label: str, total: int, *, log: Log | None, live: bool | None = None) -> None:
        self.label = label
        self.total = max(int(total), 1)
        self.log = log
        self.done = 0
        self.start = time.perf_counter()
        self._next_quarter = 1
        self._bar: Any = None
        self._task: Any = None
        if live is None:
            live = log is not None and sys.stderr.isatty()
        if live and total >= SUMMARY_BYTES:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task(label, total=self.total)
            self._bar.start()

    def __enter__(self) -> ByteProgress:
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        elif self.log is not None and self.total >= STEPS_BYTES and self.done < self.total:
            while self._next_quarter < 4 and self.done >= self._next_quarter * self.total / 4:
                elapsed = max(time.perf_counter() - self.start, 1e-9)
                rate = self.done / elapsed
                left = (self.total - self.done) / max(rate, 1e-9)
                self.log(f"{self.label}: {_mb(self.done)} of {_mb(self.total)} ({self.done / self.total:.0%}), "
                         f"{rate / 1e6:,.1f} MB/s, about {left:,.0f} s left")
                self._next_quarter += 1

    def __exit__(self, kind: object, *rest: object) -> None:
        if self._bar is not None:
            self._bar.stop()
        if kind is None and self.log is not None and self.total >= SUMMARY_BYTES:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self.log(f"{self.label}: {_mb(self.done)} in {elapsed:,.1f} s ({self.done / elapsed / 1e6:,.1f} MB/s)")
