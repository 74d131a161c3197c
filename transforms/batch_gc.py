"""Python's cyclic garbage collector in batch worker processes: it runs far less often.

CPython starts a young-generation collection whenever the tracked containers
(tuples, lists, dicts, sets, accumulators) allocated since the last one
outnumber those freed by the first threshold, 700 by default; every 10 young
collections make an older one, and every 10 of those a full pass over every
live object. A collection only finds garbage that forms cycles, and a batch
worker's bulk makes none: a batch of parsed signals, an hour's accumulators
and their sets, a pack of signals for the shuffle. They are freed by their
reference counts the moment they are done with. But they are alive, in their
hundreds of thousands, when a collection comes, and each one scans them all.

A batch worker's DoFns (``ParseSignalBatchFn``, which reads a backtest's
lines, and ``PreAggregateFn``, which folds its hours) raise the thresholds in
``setup``, once per worker process. Cyclic garbage, if anything makes it, is
still collected, after a million net allocations instead of 700. Streaming
workers keep Python's defaults: their elements come a few at a time, and a
streaming job runs for weeks.

Measured with a ``gc.callbacks`` timer in each worker of a 1M-signal backtest
(benchmarks/README.md, change 39): with the young threshold at 100,000 and
raised only in the fold's stage, as before, each worker spent 2.6 to 2.8 s
collecting: 1.2 s while reading and validating, at Python's defaults there,
and 1.0 to 1.1 s in 17 or 18 young collections of the fold's live
accumulators. Raised to 1,000,000 in both stages, it spent 0.1 s.
"""

from __future__ import annotations

import gc

BATCH_GC_THRESHOLD = (1_000_000, 20, 100)


def tune_gc_for_batch() -> None:
    """Collect less often in this worker process (idempotent; only ever raises the thresholds)."""
    current = gc.get_threshold()
    gc.set_threshold(*(max(a, b) for a, b in zip(current, BATCH_GC_THRESHOLD, strict=True)))
