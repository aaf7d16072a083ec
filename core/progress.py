"""Progress of long stages, the same everywhere: a tqdm bar when stderr is a terminal; otherwise (Slurm logs, pipes)
one plain line every N steps and one at the end, instead of thousands of carriage-return updates."""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

LINES_PER_STAGE = 10  # lines a stage of known length writes when stderr is not a terminal
EVERY_UNKNOWN = 100  # steps between lines when the length is unknown


class LineProgress:
    """Iterates ``iterable``, writing ``desc: i/total (p %) elapsed s, rate/s, postfix`` to stderr at step
    ``every``, 2 ``every``, ... and after the last step. ``set_postfix`` as tqdm's (shown on the next line)."""

    def __init__(self, iterable: Iterable, desc: str, total: int | None, every: int | None = None):
        self.iterable, self.desc, self.total = iterable, desc, total
        self.every = every or (max(1, -(-total // LINES_PER_STAGE)) if total else EVERY_UNKNOWN)
        self.postfix: dict[str, Any] = {}
        self.n = 0

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def set_postfix(self, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = kwargs

    def _line(self, elapsed: float) -> None:
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f} %)" if self.total else f"{self.n}"
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        rate = self.n / elapsed if elapsed > 0 else float("inf")
        print(f"{self.desc}: {done} {elapsed:.1f} s, {rate:.3g}/s{extra}", file=sys.stderr, flush=True)

    def __iter__(self) -> Iterator:
        t0 = time.perf_counter()
        last = 0
        for item in self.iterable:
            yield item
            self.n += 1
            if self.n % self.every == 0:
                self._line(time.perf_counter() - t0)
                last = self.n
        if self.n != last:
            self._line(time.perf_counter() - t0)


def progress_bar(iterable: Iterable, desc: str, total: int | None = None, enabled: bool = True,
                 every: int | None = None) -> tqdm | LineProgress:
    """``iterable`` with progress on stderr: nothing when not ``enabled``; a tqdm bar on a terminal; else a
    ``LineProgress`` line every ``every`` steps (default: a tenth of ``total``, or 100 when the length is unknown).
    ``total``: the number of items, for iterables without ``len``."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
    return LineProgress(iterable, desc, total, every)
