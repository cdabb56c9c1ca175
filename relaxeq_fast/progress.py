"""Progress display that suits where stderr goes: a tqdm bar on a terminal, plain lines in a log file.

A bar redrawn with carriage returns turns a log file into thousands of frames on one line; when stderr
is not a terminal the same calls print nothing per step and one line when the work (an epoch, a study)
ends, or every ``log_every`` seconds for long work.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Optional


def stderr_is_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


class _LogLines:
    """The tqdm calls the package uses (iteration, update, set_postfix, write, close), as log lines."""

    def __init__(self, iterable: Optional[Iterable], total: Optional[int], desc: str, log_every: float):
        self.iterable, self.total, self.desc, self.log_every = iterable, total, desc, log_every
        self.n, self.postfix, self.t0 = 0, {}, time.perf_counter()
        self._last_line = self.t0

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.log_every and now - self._last_line >= self.log_every and (self.total is None or self.n < self.total):
            self._line()
            self._last_line = now

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = values

    def write(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def _line(self) -> None:
        done = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        extra = ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {done} in {time.perf_counter() - self.t0:.0f} s" + (f" ({extra})" if extra else ""),
              file=sys.stderr, flush=True)

    def close(self) -> None:
        self._line()


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
             log_every: float = 0.0, leave: bool = True):
    """tqdm(iterable, total=, desc=) on a terminal; otherwise an object with the same calls that writes
    one line at close() (and every ``log_every`` seconds if > 0)."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if stderr_is_terminal():
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True, file=sys.stderr)
    return _LogLines(iterable, total, desc, log_every)
