"""CPython's cyclic garbage collector, kept from pausing the event loop while it serves.

Why: a connected gateway holds about 120 live Python objects (its connection, protocol,
parser, its waiting poll...), 1.2 million at 10,000 gateways. CPython's automatic
collections then stall the loop: the oldest generation's walked every object (0.4-0.5 s at
5,000 gateways, every few tens of seconds), and even the young generations' ran 5-110 ms,
several times a second, under a fleet's polls. Those pauses were the API's whole p99 at
10,000 gateways: with them GetGateway 120-180 ms, a schedule Put 150-180 ms; with the
collector off 12 and 16 ms (docs/fleet.md, `python -m tools.fleetbench --fleet-10k`).

And the collector has little to do: reference counting frees almost everything the server
makes. Measured at 10,000 gateways with it off, the objects it tracks grew by about 110 a
second in the steady state (the garbage cycles, and nothing else, since nothing is
collected), about 400,000 an hour.

So while the server runs the automatic collector is off (`gc.disable`), and this task
collects itself when the tracked objects have grown by GROWTH_LIMIT since the last
collection (a bound on what garbage can hold; after a fleet's activation the count grows
by its live objects too). Each collection then freezes what survived it (`gc.freeze`: a
generation no collection walks), so the next walks only what came since: about 0.2 s
instead of 1 s at 10,000 gateways, a pause short enough for the p99s. Every FULL_SECONDS
the frozen objects are put back and everything is collected (about 1 s at 10,000
gateways, once an hour): cycles among objects that were alive at a freeze and died since
(a gateway's connection closing) are taken then. The collector is put back as it was, and
nothing stays frozen, when the server stops.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger("controlplane.gc")

FULL_SECONDS = 3600.0
GROWTH_LIMIT = 200_000  # tracked objects added since the last collection (about 30-60 MB)
CHECK_SECONDS = 10.0


def full_collection() -> tuple[int, float]:
    """Collect everything now, the frozen objects too, then freeze the survivors:
    (objects collected, seconds)."""
    gc.unfreeze()  # the frozen objects back in the oldest generation: a list splice
    return collection_since_last()


def collection_since_last() -> tuple[int, float]:
    """Collect what is not frozen (what came since the last collection), then freeze the
    survivors: (objects collected, seconds)."""
    started = time.perf_counter()
    collected = gc.collect()
    gc.freeze()
    return collected, time.perf_counter() - started


def grown() -> int:
    """Tracked objects allocated (less those freed) since the last collection."""
    return gc.get_count()[0]


_running: list[bool] = []  # whether the collector was on, while any run() is active


async def run(full_every: float = FULL_SECONDS, growth_limit: int = GROWTH_LIMIT,
              check_every: float = CHECK_SECONDS) -> None:
    """Until cancelled: no automatic collection; one of what came since the last when
    `growth_limit` objects were added, a full one every `full_every` seconds. Several
    servers in one process (tests) share the setting: the last one to stop puts the
    collector back and unfreezes."""
    _running.append(gc.isenabled() if not _running else _running[0])
    gc.disable()
    loop = asyncio.get_running_loop()
    last_full = loop.time()
    try:
        while True:
            await asyncio.sleep(min(check_every, full_every))
            growth = grown()
            if loop.time() - last_full >= full_every:
                collected, seconds = full_collection()
                last_full = loop.time()
                kind = "full"
            elif growth >= growth_limit:
                collected, seconds = collection_since_last()
                kind = "since_last"
            else:
                continue
            log.info("event=gc_collected kind=%s collected=%d seconds=%.3f grown=%d "
                     "frozen=%d", kind, collected, seconds, growth, gc.get_freeze_count())
    finally:
        enabled = _running.pop()
        if not _running:
            gc.unfreeze()
            if enabled:
                gc.enable()
