"""CPython's cyclic garbage collector, kept from pausing the event loop for long.

Why: a connected gateway holds about a hundred live Python objects (its connection,
protocol, parser, its waiting poll...), and CPython's automatic collection of the oldest
generation walks every one of them. It runs whenever a quarter more objects have survived
into that generation, which long-polls do all the time (each lives 20 s). Measured with
5,000 gateways: 490,000 objects, such a collection every few tens of seconds, 0.4-0.5 s
each, during which no request is answered (docs/fleet.md).

So while the server runs, the oldest generation is never collected automatically (its
threshold is out of reach); the young generations still are, and reference counting frees
almost everything anyway. Only garbage cycles that lived long enough to reach the oldest
generation wait, for the full collection run every FULL_SECONDS: one pause an hour instead
of one every half minute. The thresholds are put back when the server stops.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger("controlplane.gc")

FULL_SECONDS = 3600.0
NEVER = 2**31 - 1  # gen-1 collections before an automatic full one: out of reach


def full_collection() -> tuple[int, float]:
    """Collect every generation now: (objects collected, seconds)."""
    started = time.perf_counter()
    collected = gc.collect()
    return collected, time.perf_counter() - started


_running: list[int] = []  # the oldest threshold to put back, while any run() is active


async def run(full_every: float = FULL_SECONDS) -> None:
    """Until cancelled: no automatic full collection, one every `full_every` seconds.
    Several servers in one process (tests) share the setting: the last one to stop puts
    the threshold back."""
    young, middle, oldest = gc.get_threshold()
    _running.append(oldest if not _running else _running[0])
    gc.set_threshold(young, middle, NEVER)
    try:
        while True:
            await asyncio.sleep(full_every)
            collected, seconds = full_collection()
            log.info("event=gc_full collected=%d seconds=%.3f", collected, seconds)
    finally:
        restore = _running.pop()
        if not _running:
            young, middle, _ = gc.get_threshold()
            gc.set_threshold(young, middle, restore)
