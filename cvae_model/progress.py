"""Progress of long work: a bar on a terminal, readable log lines everywhere else.

On a terminal ``Progress`` draws a tqdm bar. When stderr is a file or a pipe (a job's log, CI,
``ray job logs``), a bar would write a line fragment per update; instead it logs one complete
line every ``every_s`` seconds (``CVAE_PROGRESS_EVERY_S``, default 10), and at the end:
done / total, percent, rate and ETA, plus the latest ``note`` (e.g. the validation loss).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

__all__ = ["EVERY_ENV", "Progress"]

EVERY_ENV = "CVAE_PROGRESS_EVERY_S"
"""Seconds between progress lines when stderr is not a terminal (default 10)."""

logger = logging.getLogger("cvae.progress")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


class Progress:
    """``done`` of ``total`` units (rows, steps, files), shown as it moves."""

    def __init__(self, total: int | None, *, desc: str, unit: str = "rows", initial: int = 0,
                 every_s: float | None = None, enabled: bool = True,
                 terminal: bool | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done = self.start_done = initial
        self.every_s = float(os.environ.get(EVERY_ENV, 10.0)) if every_s is None else every_s
        self.enabled = enabled
        self.note = ""
        self.started = self.last_line = time.monotonic()
        if terminal is None:  # a notebook's stderr is no tty, but tqdm.auto draws a widget there
            terminal = sys.stderr.isatty() or "ipykernel" in sys.modules
        use_bar = terminal
        self.bar: Any = None
        if enabled and use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit.rstrip("s"),
                            dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last_line >= self.every_s:
            self._log_line()

    def set_note(self, note: str) -> None:
        """A short status (the latest validation loss, the file being read) shown beside."""
        self.note = note
        if self.bar is not None:
            self.bar.set_postfix_str(note, refresh=False)

    def line(self) -> str:
        """The status as one line: ``desc: done / total unit (pct), rate, ETA``."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        text = f"{self.desc}: {self.done:,}"
        if self.total:
            text += f" / {self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:,.0f} {self.unit}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {_duration((self.total - self.done) / rate)}"
        elif self.done and (not self.total or self.done >= self.total):
            text += f", {_duration(elapsed)}"
        return f"{text}, {self.note}" if self.note else text

    def _log_line(self) -> None:
        self.last_line = time.monotonic()
        if logger.hasHandlers():
            logger.info("%s", self.line())
        else:  # logging not configured (a plain script): still show the line
            print(self.line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.done > self.start_done:
            self._log_line()
        self.enabled = False
