"""The collector's settings of a long-running runtime (the scorer, the stream worker), set
once after start-up by `settle_heap`."""

from __future__ import annotations

import gc

# Generation 0 allocations, then collections of 0 and 1.  Per request or event the runtimes
# allocate thousands of short-lived, acyclic objects while their long-lived state (per-user
# states, the drift window) stays: at the default (700, 10, 10) the collections rescan that
# state again and again (a 1,000-row batch ran about 30 collections, 3.5 ms of its CPU;
# docs/benchmarks.md).  Cycles are still collected, in larger steps.
GC_THRESHOLDS = (100_000, 50, 100)


def settle_heap() -> None:
    """After start-up: collect, move the start-up objects (Feast registry, model, libraries),
    which live as long as the process, out of the collector's reach, so that a full
    collection is not a latency spike, and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
