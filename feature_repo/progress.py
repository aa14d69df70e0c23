"""Progress of long jobs (training, backfill, materialization, batch features).

`progress(...)` shows a tqdm bar on stderr when stderr is a terminal and nothing otherwise (CI
logs, pipes, the tests), then logs one INFO line at the end: what was done, how many, how long.
It lives at the bottom layer because the materialization engine reports through it too.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger("progress")


class Progress:
    """A bar that also counts when it is hidden (tqdm's own count stops when disabled)."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar
        self.count = 0
        self.note = ""  # appended to the INFO line, e.g. "(61,234 rows)"

    def update(self, n: int = 1) -> None:
        self.count += n
        self.bar.update(n)

    def step(self, name: str) -> None:
        """Say what is running now (shown after the bar)."""
        self.bar.set_postfix_str(name, refresh=True)


@contextmanager
def progress(desc: str, total: int | None = None, unit: str = "it",
             file: TextIO | None = None, logger: logging.Logger | None = None
             ) -> Iterator[Progress]:
    """A progress bar for `total` units (None: unknown), silent unless `file` (default stderr)
    is a TTY; on success, one INFO line `<desc>: <count> <unit> in <seconds> s`."""
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit=unit, file=file, disable=None,
               mininterval=0.5)
    p = Progress(bar)
    try:
        yield p
    finally:
        bar.close()
    (logger or log).info("%s: %s %s in %.1f s%s", desc, f"{p.count:,}", unit,
                         time.perf_counter() - t0, f" {p.note}" if p.note else "")


def show_summaries() -> None:
    """For a CLI job: print the INFO summaries on stderr (the `progress` logger only, so the
    libraries' own INFO logging stays as configured)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False  # printed once, whatever the root logger does
    log.setLevel(logging.INFO)
