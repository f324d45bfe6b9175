"""The broker server process's garbage collector, set for a long-running server.

Issue 14's load benchmark, each collection timed (``gc.callbacks``, one diagnostic run): a
replica spent 22–24 s of 143 s in Python's cyclic garbage collector, during which none of its
threads runs: 40–49 full collections of ~280 ms on average and up to 587 ms, besides ~5,000
young ones. Those pauses are what the event loop's lateness (p99 up to 1 s) and the
requests' p99s were made of. Two causes:

- a full collection walks every tracked object, and ~190,000 of them are the modules and the
  app the process built at start-up, which live as long as it does. ``gc.freeze()`` moves
  them out of every later collection (6.3 s, at most 337 ms, in the next run);
- the first generation's threshold of 700 allocations collects many times a second under
  load, promoting the objects of requests in flight (a thousand agents' long polls) towards
  the full collections. At 10,000, objects mostly die first (reference counting frees a
  request's objects; the collector is there for cycles): 2 full collections in the run,
  ~5.5 s of collection in all, and the replicas used 0.94 cores instead of 1.03.

Only the ``parallex broker`` server process does this: a broker built inside another
program (the tests, a notebook) keeps that program's collector as it is.
"""

from __future__ import annotations

import gc

#: Allocations (minus deallocations) of tracked objects between young collections
#: (Python's default: 700).
YOUNG_THRESHOLD = 10_000


def set_for_server() -> None:
    """Freeze what start-up made and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
