"""Benchmark of the upload shaper over real loopback HTTP: `python -m tools.bench` (make bench).

The shaper and the upload client (appliance.upload) run in this process; the receiving end is
a separate process (this module with `--sink`) that implements `PUT /gateway/data/{name}` as
the control plane does (signature checked, body hashed on receipt) and counts the bytes it
receives in 10 ms bins per stream. Both sides bin the payload bytes (this side when a piece
leaves the shaper), so a burst hidden by the sender's bookkeeping still shows at the sink.

For each run it prints: aligned one-second windows (min..max, % of the limit), the worst
sliding one-second windows (10 ms steps, sink and sender), Jain's fairness index across
streams, CPU seconds per GB (sender and sink), and the achieved rate. Then the lag of a
schedule switch at a UTC boundary (the shaper's clock is offset so a minute boundary falls a
few seconds into the run): where the bucket put the rate step, how late the boundary timer
ran, and the first second after the boundary at the sink. Last, with no limit, the throughput
against the same upload path without any shaper: short legs, shaped and plain alternating
(A-B, B-A, ...), one ratio per adjacent pair, reported as the median with its spread, since a
single long leg on a shared host moves by 10-20 % from host noise alone.

Figures only: nothing here asserts. Absolute throughput varies between runs on shared hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import logging
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import psutil
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.identity import Identity
from appliance.shaping import (
    BURST_SECONDS,
    MAX_PIECE,
    MIN_PIECE,
    PIECE_SECONDS,
    UNLIMITED_PIECE,
    ScheduledShaper,
)
from appliance.upload import upload
from gatewaycore import linkproto
from gatewaycore.schedule import Schedule, format_rate

BIN = 0.01  # 10 ms
BINS_PER_SEC = 100
CHUNK = bytes(range(256)) * (4 << 12)  # 4 MiB of source data, sliced into pieces


def _bin(t: float) -> int:
    return int(t * BINS_PER_SEC)


# --- the sink process ---------------------------------------------------------------------


class Sink:
    def __init__(self, public_raw: bytes):
        self.public_raw = public_raw
        self.bins: dict[str, Counter[int]] = defaultdict(Counter)
        self.seen: set[str] = set()

    async def put(self, request: web.Request) -> web.Response:
        try:
            nonce, _ = linkproto.verify(
                request.headers, request.method, request.path_qs, self.public_raw
            )
        except linkproto.LinkAuthError as exc:
            return web.json_response({"error": "InvalidSignature", "message": str(exc)}, status=401)
        if nonce in self.seen:
            return web.json_response({"error": "InvalidSignature", "message": "replay"}, status=401)
        self.seen.add(nonce)
        name = request.match_info["name"]
        bins = self.bins[name]
        h = hashlib.sha256()
        size = 0
        mono = time.monotonic
        async for chunk in request.content.iter_any():
            bins[int(mono() * BINS_PER_SEC)] += len(chunk)
            h.update(chunk)
            size += len(chunk)
        return web.json_response({"name": name, "size": size, "sha256": h.hexdigest()}, status=201)

    async def stats(self, request: web.Request) -> web.Response:
        """Hand over the bins of the streams whose name starts with `prefix`, and forget them."""
        prefix = request.query.get("prefix", "")
        out = {k: dict(v) for k, v in self.bins.items() if k.startswith(prefix)}
        for k in out:
            del self.bins[k]
        cpu = psutil.Process().cpu_times()
        return web.json_response({"bins": out, "cpu": cpu.user + cpu.system})


def run_sink(public_b64: str) -> None:
    sink = Sink(linkproto.decode_public_key(public_b64))
    app = web.Application()
    app.router.add_put("/gateway/data/{name}", sink.put)
    app.router.add_get("/stats", sink.stats)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(runner.addresses[0][1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# --- measurements -------------------------------------------------------------------------


def aligned_windows(bins: Counter[int], t0: float, seconds: int) -> list[int]:
    b0 = _bin(t0)
    return [
        sum(bins.get(b, 0) for b in range(b0 + k * BINS_PER_SEC, b0 + (k + 1) * BINS_PER_SEC))
        for k in range(seconds)
    ]


def sliding_windows(bins: Counter[int], t0: float, seconds: int) -> list[int]:
    b0, b1 = _bin(t0), _bin(t0) + seconds * BINS_PER_SEC
    series = [bins.get(b, 0) for b in range(b0, b1)]
    if len(series) < BINS_PER_SEC:
        return []
    total = sum(series[:BINS_PER_SEC])
    out = [total]
    for i in range(BINS_PER_SEC, len(series)):
        total += series[i] - series[i - BINS_PER_SEC]
        out.append(total)
    return out


def jain(values: list[float]) -> float:
    if not values or not any(values):
        return 0.0
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def pct(values: list[int], limit_bytes: float) -> str:
    if not values:
        return "   -  ..   -  "
    return f"{min(values) / limit_bytes * 100:6.1f}..{max(values) / limit_bytes * 100:6.1f}"


class MeasuredShaper(ScheduledShaper):
    """The real shaper, binning what it releases and noting its planned rate steps."""

    def __init__(self, *args, **kwargs):
        self.bins: Counter[int] = Counter()
        # (the instant the bucket's rate stepped, when the bookkeeping ran, the new limit)
        self.switches: list[tuple[float, float, int | None]] = []
        super().__init__(*args, **kwargs)

    async def acquire(self, nbytes: int) -> None:
        await super().acquire(nbytes)
        self.bins[int(time.monotonic() * BINS_PER_SEC)] += nbytes

    def _commit(self, now: float) -> None:
        plan = self._plan
        assert plan is not None
        self.switches.append((plan.at, time.monotonic(), plan.limit_bps))
        super()._commit(now)


def whole_week(rate: int | None) -> Schedule:
    if rate is None:
        return Schedule.empty()
    return Schedule.from_api(
        [
            {
                "AverageUploadRateLimitInBitsPerSec": rate,
                "StartHourOfDay": 0,
                "StartMinuteOfHour": 0,
                "EndHourOfDay": 23,
                "EndMinuteOfHour": 59,
                "DaysOfWeek": [0, 1, 2, 3, 4, 5, 6],
            }
        ]
    )


def minute_item(t: datetime, rate: int) -> dict:
    return {
        "AverageUploadRateLimitInBitsPerSec": rate,
        "StartHourOfDay": t.hour,
        "StartMinuteOfHour": t.minute,
        "EndHourOfDay": t.hour,
        "EndMinuteOfHour": t.minute,
        "DaysOfWeek": [(t.weekday() + 1) % 7],
    }


class Bench:
    def __init__(self, url: str, identity: Identity, sink_proc: psutil.Process):
        self.url = url
        self.identity = identity
        self.sink_proc = sink_proc
        self.session: aiohttp.ClientSession
        self.seq = 0
        self.plain_cpu_per_gb: list[float] = []

    async def source(
        self, deadline: float, shaper: ScheduledShaper | None
    ) -> AsyncIterator[memoryview]:
        # One piece at a time, so the stream ends at the deadline even at 51,200 bit/s.
        view = memoryview(CHUNK)
        while time.monotonic() < deadline:
            yield view[: shaper.piece_size if shaper is not None else UNLIMITED_PIECE]

    async def streams(
        self, n: int, seconds: float, shaper: ScheduledShaper | None
    ) -> tuple[str, float, float, float]:
        """Run n concurrent uploads for `seconds`; return (prefix, start, client CPU, wall)."""
        self.seq += 1
        prefix = f"r{self.seq:03d}-"
        cpu0 = time.process_time()
        start = time.monotonic()
        deadline = start + seconds
        await asyncio.gather(
            *(
                upload(
                    self.session,
                    self.url,
                    self.identity,
                    f"{prefix}{i:02d}",
                    self.source(deadline, shaper),
                    shaper,
                )
                for i in range(n)
            )
        )
        return prefix, start, time.process_time() - cpu0, time.monotonic() - start

    async def sink_stats(self, prefix: str) -> tuple[dict[str, Counter[int]], float]:
        async with self.session.get(f"{self.url}/stats", params={"prefix": prefix}) as resp:
            data = await resp.json()
        bins = {k: Counter({int(b): n for b, n in v.items()}) for k, v in data["bins"].items()}
        return bins, data["cpu"]

    async def limited(self, rate: int, n: int, seconds: int) -> None:
        shaper = MeasuredShaper(whole_week(rate))
        shaper.start()
        sink_cpu0 = (await self.sink_stats("none"))[1]
        prefix, start, cpu, _wall = await self.streams(n, seconds + 0.3, shaper)
        shaper.close()
        per_stream, sink_cpu1 = await self.sink_stats(prefix)
        total: Counter[int] = Counter()
        for c in per_stream.values():
            total.update(c)
        limit = rate / 8
        t0 = start + 0.2
        full = seconds
        sent = sum(total.values())
        gb = sent / 1e9
        aligned = aligned_windows(total, t0, full)
        slide_sink = sliding_windows(total, t0, full)
        slide_client = sliding_windows(shaper.bins, t0, full)
        in_window = [sum(aligned_windows(c, t0, full)) for c in per_stream.values()]
        print(
            f"{format_rate(rate):>13} {n:3d}  {pct(aligned, limit)}   {pct(slide_sink, limit)}"
            f"   {pct(slide_client, limit)}  {jain(in_window):6.4f}  "
            f"{cpu / gb:8.2f} {(sink_cpu1 - sink_cpu0) / gb:8.2f}  "
            f"{sum(aligned) * 8 / full / 1e6:10.3f}",
            flush=True,
        )

    async def switch(self, before: int, after: int, n: int, lead: float, tail: float) -> None:
        """A boundary `lead` seconds into the run, from `before` to `after` bit/s."""
        now = datetime.now(UTC)
        boundary = (now + timedelta(minutes=2)).replace(second=0, microsecond=0)
        fake_start = boundary - timedelta(seconds=lead)
        offset = fake_start.timestamp() - time.time()
        schedule = Schedule.from_api(
            [minute_item(boundary - timedelta(minutes=1), before), minute_item(boundary, after)]
        )
        boundary_mono = time.monotonic() + (boundary.timestamp() - (time.time() + offset))
        # Move the shaper's clock a few ms so the boundary falls on the edge of a 10 ms bin:
        # then the bins after it hold no bytes from before it.
        shift = boundary_mono - _bin(boundary_mono) / BINS_PER_SEC
        boundary_mono -= shift

        def clock(offset: float = offset + shift) -> float:
            return time.time() + offset

        shaper = MeasuredShaper(schedule, clock=clock)
        shaper.start()
        prefix, start, _cpu, _ = await self.streams(n, lead + tail, shaper)
        shaper.close()
        per_stream, _ = await self.sink_stats(prefix)
        total: Counter[int] = Counter()
        for c in per_stream.values():
            total.update(c)
        step, late = next(
            (((at - boundary_mono) * 1000, (ran - at) * 1000)
             for at, ran, lim in shaper.switches if lim == after),
            (float("nan"), float("nan")),
        )
        a, b = before / 8, after / 8
        one = sum(
            total.get(x, 0)
            for x in range(_bin(boundary_mono), _bin(boundary_mono) + BINS_PER_SEC)
        )
        sent_one = sum(
            shaper.bins.get(x, 0)
            for x in range(_bin(boundary_mono), _bin(boundary_mono) + BINS_PER_SEC)
        )
        # How long the old rate effectively went on: the bytes of the first second after the
        # boundary, against the new limit, in seconds of the difference between the rates.
        equiv_lag = (one - b) / (a - b) * 1000
        whole = int(boundary_mono - start - 0.2)
        pre = aligned_windows(total, boundary_mono - whole, whole)
        post = aligned_windows(total, boundary_mono, int(start + lead + tail - boundary_mono))
        print(
            f"{format_rate(before):>13} -> {format_rate(after):<13} {n:3d}  "
            f"step {step:+5.2f} ms  timer late {late:4.2f} ms  first 1 s: sent "
            f"{sent_one / b * 100:5.1f} %, sink {one / b * 100:5.1f} % (lag {equiv_lag:4.2f} ms)"
            f"  before {pct(pre, a)} %  after {pct(post, b)} %",
            flush=True,
        )

    async def unlimited_leg(self, n: int, seconds: float, shaper: ScheduledShaper | None
                            ) -> tuple[float, float]:
        """One leg: (bytes/s received by the sink, client CPU seconds per GB)."""
        prefix, _start, cpu, wall = await self.streams(n, seconds, shaper)
        bins, _ = await self.sink_stats(prefix)
        got = sum(sum(c.values()) for c in bins.values())
        return got / wall, cpu / (got / 1e9)

    async def unlimited(self, n: int, seconds: float, pairs: int) -> None:
        shaper = ScheduledShaper(Schedule.empty())
        shaper.start()
        await self.unlimited_leg(n, seconds / 2, shaper)  # warm-up: connections, caches
        ratios: list[float] = []
        rates: dict[str, list[float]] = {"plain": [], "shaped": []}
        cpus: dict[str, list[float]] = {"plain": [], "shaped": []}
        for r in range(pairs):
            # A-B, B-A, ...: a drift of the host's speed weighs on both sides alike
            got = {}
            for label in ("plain", "shaped") if r % 2 == 0 else ("shaped", "plain"):
                rate, cpu = await self.unlimited_leg(
                    n, seconds, shaper if label == "shaped" else None
                )
                got[label] = rate
                rates[label].append(rate)
                cpus[label].append(cpu)
            ratios.append(got["shaped"] / got["plain"])
        shaper.close()
        self.plain_cpu_per_gb.extend(cpus["plain"])
        med = statistics.median
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        print(
            f"{'no limit':>13} {n:3d}  shaper {med(rates['shaped']) * 8 / 1e9:6.2f} Gbit/s  "
            f"plain {med(rates['plain']) * 8 / 1e9:6.2f} Gbit/s  ratio median "
            f"{med(ratios):5.3f}  IQR {q[0]:5.3f}..{q[2]:5.3f}  "
            f"range {min(ratios):5.3f}..{max(ratios):5.3f}  CPU s/GB "
            f"{med(cpus['shaped']):5.2f} vs {med(cpus['plain']):5.2f}",
            flush=True,
        )


async def fast_path_cost(plain_cpu_per_gb: float, calls: int = 200_000, repeats: int = 7) -> None:
    """The no-limit `acquire` against an empty coroutine, in CPU per call, interleaved.

    Host noise moves whole-path throughput by tens of percent from one second to the next;
    the shaper's own share is this per-call cost times the calls a GB takes, which a tight
    loop measures to a few nanoseconds.
    """
    shaper = ScheduledShaper(Schedule.empty())
    shaper.start()

    async def empty(nbytes: int) -> None:
        return None

    costs: dict[str, list[float]] = {"shaper": [], "empty": []}
    for _ in range(repeats):
        for label, fn in (("empty", empty), ("shaper", shaper.acquire)):
            t0 = time.process_time_ns()
            for _ in range(calls):
                await fn(UNLIMITED_PIECE)
            costs[label].append((time.process_time_ns() - t0) / calls)
    shaper.close()
    per_call = statistics.median(costs["shaper"]) - statistics.median(costs["empty"])
    per_gb = per_call * 1e-9 * (1e9 / UNLIMITED_PIECE)
    print(
        f"fast path: {statistics.median(costs['shaper']):.0f} ns a call against "
        f"{statistics.median(costs['empty']):.0f} ns for an empty coroutine: "
        f"{per_gb * 1000:.2f} ms CPU a GB ({1e9 / UNLIMITED_PIECE:.0f} pieces), "
        f"{per_gb / plain_cpu_per_gb * 100:.2f} % of the plain path's {plain_cpu_per_gb:.2f} s/GB",
        flush=True,
    )


async def bench(args: argparse.Namespace) -> None:
    key = Ed25519PrivateKey.generate()
    identity = Identity(key)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.bench", "--sink", identity.public_b64],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        b = Bench(f"http://127.0.0.1:{port}", identity, psutil.Process(proc.pid))
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
        ) as b.session:
            print(
                f"upload shaper benchmark: sink pid {proc.pid} on 127.0.0.1:{port}, "
                f"{psutil.cpu_count()} CPUs, 10 ms bins"
            )
            print(
                f"bucket: burst {BURST_SECONDS * 1000:.0f} ms of the rate, starts empty; "
                f"pieces {PIECE_SECONDS * 1000:.0f} ms of the rate "
                f"({MIN_PIECE} B..{MAX_PIECE // 1024} KiB)"
            )
            print(
                f"{'limit':>13} {'n':>3}  {'aligned 1 s %':>14}   {'sliding sink %':>14}"
                f"   {'sliding send %':>14}  {'Jain':>6}  {'CPU s/GB':>8} {'sink':>8}"
                f"  {'Mbit/s':>10}"
            )
            for rate, seconds in ((51_200, args.slow), (100_000_000, args.secs),
                                  (1_000_000_000, args.secs)):
                for n in (1, 4, 16):
                    await b.limited(rate, n, seconds)
            print(
                "schedule switch at a UTC boundary (shaper clock offset). step: where the"
                " bucket changed rate, against the boundary; first 1 s: bytes released by the"
                " shaper / received by the sink in the second after it, against the new limit;"
                " lag: the sink's excess as time at the old rate:"
            )
            for _ in range(3):  # the drop is where bytes in flight show: three times
                await b.switch(1_000_000_000, 100_000_000, 4, 3.0, 3.0)
            await b.switch(100_000_000, 1_000_000_000, 4, 3.0, 3.0)
            await b.switch(51_200, 100_000_000, 16, 3.0, 3.0)
            print(
                f"no limit, against the same upload path without a shaper ({args.pairs} "
                f"alternating pairs of {args.unlimited:g} s legs, median and spread of the "
                f"pair ratios):"
            )
            for n in (1, 4, 16):
                await b.unlimited(n, args.unlimited, args.pairs)
            await fast_path_cost(statistics.median(b.plain_cpu_per_gb))
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sink", metavar="PUBLIC_KEY_B64", help=argparse.SUPPRESS)
    parser.add_argument("--secs", type=int, default=5, help="seconds per limited run (5)")
    parser.add_argument("--slow", type=int, default=4, help="seconds per 51,200 bit/s run (4)")
    parser.add_argument(
        "--unlimited", type=float, default=0.5, help="seconds per no-limit leg (0.5)"
    )
    parser.add_argument(
        "--pairs", type=int, default=15, help="shaped/plain pairs per no-limit figure (15)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.sink:
        base64.b64decode(args.sink)
        run_sink(args.sink)
        return
    started = time.monotonic()
    asyncio.run(bench(args))
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
