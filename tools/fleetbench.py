"""The control plane at fleet scale (issue 15): N simulated gateways on one instance.

`python -m tools.fleetbench [--gateways N] [--steady-seconds S]` starts a real control plane
process, then worker processes that each run a share of the fleet with the appliance's own
link client (appliance/link.py, appliance/linkloop.py): an Ed25519 identity, a key from
`POST /gateway/activation-key`, activation through boto3 CreateGateway, then the real
long-poll loop for ever. Meanwhile the AWS API is driven at about 40 calls/s (GetGateway,
PutBandwidthRateLimitSchedule, PutMaintenanceStartTime, and ListGateways read page by
page), and the figures of issue 15 are printed for the run's N.

Why this shape:
- the gateways live in other processes, several of them, so the simulator's own CPU is not
  the control plane's (its CPU is read from /proc for its PID alone);
- the replay (nonce) log is brought to its steady size before the control plane starts
  (nonces with times spread over their lifetime, expiring as real ones arrive), so a
  short run measures the steady state, not the first minutes of an empty log;
- a schedule Put carries a unique rate; the gateway holding it reports when its link loop
  applied it, so "a Put reaching its gateway" is measured end to end on one clock;
- the registration throttle (120 new identities a minute for all sources) would make the
  activation of 10,000 gateways take 80 minutes: the bench's control plane process is the
  real `controlplane serve` with that one limit raised (`control-plane` subcommand below).

Diagnosis (environment): FLEETBENCH_PROFILE=FILE writes a cProfile of the control plane;
FLEETBENCH_WATCHDOG=SECONDS logs every event-loop stall longer than that, with where the
loop was, and every garbage collection over a fifth of it; FLEETBENCH_CONTROLPLANE_PATH=DIR
runs another control plane's sources (a "before" figure). docs/fleet.md has the figures.

Exit status: 1 on errors (failed calls, link errors, Puts that never reached their
gateway, a listing that missed gateways), 0 otherwise; missed goals are printed, not fatal.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import configparser
import contextlib
import json
import logging
import math
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PY = sys.executable
REGION = "us-west-2"
GOAL_MS = 100.0
NONCE_LIFETIME = 600.0  # the purge keeps nonces 2 x linkproto.MAX_SKEW_SECONDS
POLL_PERIOD = 20.0  # appliance.link.POLL_WAIT
MARK_BASE = 100_000  # schedule marks are rates >= MIN_RATE_BPS (51,200)
REACH_TIMEOUT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

# -- the control plane process ------------------------------------------------------------


def control_plane_main(argv: list[str]) -> int:
    """`controlplane serve` with the registration throttle raised (see the module doc)."""
    from controlplane import cli, linkops, throttle

    class Unthrottled(throttle.RegistrationThrottle):
        def __init__(self, clock: Callable[[], float] = time.monotonic, **_: Any) -> None:
            super().__init__(per_minute=1e9, burst=1e9, all_per_minute=1e9, all_burst=1e9,
                             clock=clock)

    linkops.RegistrationThrottle = Unthrottled  # type: ignore[misc]
    times_to = os.environ.get("FLEETBENCH_SERVER_TIMES")
    if times_to:
        _time_handlers(Path(times_to))
    if os.environ.get("FLEETBENCH_WATCHDOG"):
        _install_watchdog(float(os.environ["FLEETBENCH_WATCHDOG"]))
    profile_to = os.environ.get("FLEETBENCH_PROFILE")
    if not profile_to:
        return cli.main(argv)
    import cProfile  # the control plane's own profile, written when it stops

    profiler = cProfile.Profile()
    try:
        return int(profiler.runcall(cli.main, argv))
    finally:
        profiler.dump_stats(profile_to)


# The AWS API's operations the steady phase calls, by the row they are shown in.
SERVER_KINDS = {"GetGateway": "get", "PutBandwidthRateLimitSchedule": "put",
                "PutMaintenanceStartTime": "put", "ListGateways": "list_page"}


def _time_handlers(out: Path) -> None:
    """Record how long each of these API calls spent in the control plane, from its first
    middleware and from its bytes reaching the process to its answer, every WAL fsync's
    length, and how late the loop runs a due callback (sampled every 10 ms), and write them
    to `out` as JSON when the server stops: the bench then shows how much of a client's
    figure is the control plane's own. Whole run: the calls
    are the steady phase's but for the one listing before it (its pages are among the
    ListGateways ones), and the fsyncs include the activations'."""
    import atexit

    from aiohttp import web

    from controlplane import server

    kinds = set(SERVER_KINDS.values())
    times: dict[str, list[float]] = {k: [] for k in kinds | {f"{k}_arrival" for k in kinds}}
    make_app = server.ControlPlane.make_app
    data_received = server.GuardedProtocol.data_received

    arrivals: dict[Any, float] = {}  # aiohttp's RequestHandler has slots: kept beside it

    def stamped(self: Any, data: bytes) -> None:
        arrivals[self._handler] = time.perf_counter()
        data_received(self, data)

    connection_lost = server.GuardedProtocol.connection_lost

    def forget(self: Any, exc: Exception | None) -> None:
        arrivals.pop(self._handler, None)
        connection_lost(self, exc)

    times["loop_lag"] = []
    start = server.ControlPlane.start

    async def start_and_probe(self: Any, *args: Any, **kwargs: Any) -> Any:
        """Also sample how late the loop runs a callback due now (every 10 ms): the wait a
        request's bytes have before the loop reads them."""
        here = await start(self, *args, **kwargs)
        loop = asyncio.get_running_loop()

        def probe(due: float) -> None:
            now = loop.time()
            times["loop_lag"].append([time.time(), now - due])
            loop.call_at(now + 0.01, probe, now + 0.01)

        loop.call_soon(probe, loop.time())
        return here

    server.ControlPlane.start = start_and_probe  # type: ignore[method-assign]
    server.GuardedProtocol.data_received = stamped  # type: ignore[method-assign]
    server.GuardedProtocol.connection_lost = forget  # type: ignore[method-assign]

    @web.middleware
    async def timed(request: web.Request, handler: Any) -> Any:
        kind = SERVER_KINDS.get(request.headers.get("X-Amz-Target", "").rpartition(".")[2])
        t0 = time.perf_counter()
        arrival = arrivals.get(request.protocol, t0)
        try:
            return await handler(request)
        finally:
            if kind is not None:
                t1 = time.perf_counter()
                times[kind].append(t1 - t0)
                times[f"{kind}_arrival"].append(t1 - arrival)

    def timed_app(self: Any) -> Any:
        app = make_app(self)
        app.middlewares.insert(0, timed)
        return app

    server.ControlPlane.make_app = timed_app  # type: ignore[method-assign]

    from controlplane import walsync

    fsync_file = walsync._fsync_file
    times["fsync"] = []

    def timed_fsync(path: Path) -> None:
        t0 = time.perf_counter()
        try:
            fsync_file(path)
        finally:
            times["fsync"].append(time.perf_counter() - t0)

    walsync._fsync_file = timed_fsync
    atexit.register(lambda: out.write_text(json.dumps(times)))


def _install_watchdog(threshold: float) -> None:
    """Diagnosis: when the control plane's event loop is held longer than `threshold`
    seconds, log where its thread is (one stack per stall) on stderr."""
    import traceback

    from controlplane import server

    start = server.ControlPlane.start
    beat = [time.monotonic()]

    async def ticker() -> None:
        while True:
            beat[0] = time.monotonic()
            await asyncio.sleep(0.005)

    def watch(main_id: int) -> None:
        reported = 0.0
        while True:
            time.sleep(threshold / 4)
            held = time.monotonic() - beat[0]
            if held > threshold and beat[0] != reported:
                reported = beat[0]
                frame = sys._current_frames().get(main_id)
                stack = "".join(traceback.format_list(
                    traceback.extract_stack(frame)[-6:])) if frame else "?"
                sys.stderr.write(f"event=loop_held seconds>{held:.3f}\n{stack}\n")

    import gc

    gc_started = [0.0]

    def gc_timer(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
            return
        took = time.perf_counter() - gc_started[0]
        if took > threshold / 5:
            sys.stderr.write(f"event=gc generation={info['generation']} seconds={took:.3f} "
                             f"collected={info['collected']} frozen={gc.get_freeze_count()}\n")

    gc.callbacks.append(gc_timer)

    async def started(self: Any, *args: Any, **kw: Any) -> Any:
        bound = await start(self, *args, **kw)
        self._fleetbench_ticker = asyncio.create_task(ticker())
        threading.Thread(target=watch, args=(threading.get_ident(),), daemon=True).start()
        return bound

    server.ControlPlane.start = started  # type: ignore[method-assign]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]
    return float(sum(parts) - idle), float(sum(parts))


# -- the simulated gateways (worker processes) --------------------------------------------


class SimState:
    """An in-memory stand-in for appliance.gatewaystate.GatewayState: the link loop folds
    its answers here instead of into a state file (10,000 fsynced files would measure this
    machine's disk, not the control plane). A new schedule is validated by the appliance's
    model and reported, with the time it arrived, to the bench."""

    def __init__(self, report: Callable[[dict[str, Any]], None]) -> None:
        from appliance.state import State

        self.state = State()
        self._report = report

    def save(self, **changes: Any) -> Any:
        self.state = self.state.with_changes(**changes)
        return self.state

    def apply_schedule(self, intervals: list[dict[str, Any]], at_start: bool = False) -> bool:
        from gatewaycore.schedule import Schedule, ScheduleError

        try:
            Schedule.from_api(intervals)
        except ScheduleError:
            return False
        if intervals:
            self._report({"reach": intervals[0].get("AverageUploadRateLimitInBitsPerSec"),
                          "t": time.time()})
        return True

    def forget(self, arn: str | None) -> None:
        self.save(deleted=True, activated=False, gateway_arn=None, schedule=[])


class _Counts(logging.Handler):
    """Counts the link loop's retries (each one a failed poll) and keeps the first few."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.samples) < 5:
            self.samples.append(record.getMessage()[:300])


def boto_client(url: str, key: str, secret: str, attempts: int) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "backup-gateway", endpoint_url=url, region_name=REGION, aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(retries={"total_max_attempts": attempts, "mode": "standard"},
                      max_pool_connections=64, connect_timeout=30, read_timeout=60),
    )


async def worker_main(args: argparse.Namespace) -> int:
    """Activate `count` gateways, then long-poll with them until SIGTERM; JSON lines out."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from appliance.identity import Identity
    from appliance.link import LinkClient
    from appliance.linkloop import LinkLoop

    counts = _Counts()
    logging.getLogger("appliance").addHandler(counts)
    logging.getLogger("appliance").setLevel(logging.WARNING)
    logging.getLogger("appliance").propagate = False

    def out(doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    polls = 0

    class CountingClient(LinkClient):
        async def poll(self, after: int, wait: int = 20, **options: Any) -> Any:
            nonlocal polls
            polls += 1
            return await super().poll(after, wait, **options)

    local = threading.local()

    def create_gateway(activation_key: str, name: str) -> str:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = boto_client(args.url, args.access_key, args.secret, 5)
        return str(client.create_gateway(ActivationKey=activation_key, GatewayDisplayName=name,
                                          GatewayType="BACKUP_VM")["GatewayArn"])

    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.concurrency)
    gate = asyncio.Semaphore(args.concurrency)
    tasks: list[asyncio.Task[None]] = []
    clients: list[LinkClient] = []
    failures: list[str] = []
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def activate(index: int) -> None:
        async with gate:
            client = CountingClient(args.url, Identity(Ed25519PrivateKey.generate()))
            clients.append(client)
            state = SimState(lambda doc: out({**doc, "arn": state.state.gateway_arn}))
            for attempt in range(4):
                try:
                    issued = await client.request_activation_key(REGION, "STANDARD", None,
                                                                 None)
                    state.save(registered=True)
                    arn = await loop.run_in_executor(pool, create_gateway, issued.key,
                                                     f"fleet-{index:05d}")
                    break
                except Exception as exc:  # counted, retried
                    if attempt == 3:
                        failures.append(f"gateway {index}: {exc}")
                        return
                    await asyncio.sleep(1.0 + attempt)
            state.save(gateway_arn=arn)
            tasks.append(asyncio.create_task(LinkLoop(client, state, 30.0).run()))  # type: ignore[arg-type]

    started = time.monotonic()
    await asyncio.gather(*(activate(i) for i in range(args.first, args.first + args.count)))
    out({"activated": len(tasks), "failed": len(failures), "failures": failures[:5],
         "seconds": round(time.monotonic() - started, 1)})
    await stop.wait()
    out({"stats": {"polls": polls, "link_errors": counts.count,
                   "link_error_samples": counts.samples,
                   "cpu_seconds": cpu_seconds(os.getpid())}})
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in clients:
        await client.close()
    pool.shutdown(wait=False, cancel_futures=True)
    return 0


# -- the orchestrator ---------------------------------------------------------------------


@dataclass
class Samples:
    """Latencies (seconds) of one kind, and its failures."""

    values: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.values.append(seconds)

    def fail(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what[:300])

    def pct(self, p: float) -> float | None:
        if not self.values:
            return None
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def write_credentials(path: Path, count: int) -> list[tuple[str, str]]:
    """Several access keys (the API throttle is per key: activation and the measured calls
    each get their own), in the shared-credentials format the control plane reads."""
    keys = [("AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30))
            for _ in range(count)]
    parser = configparser.ConfigParser()
    for i, (key, secret) in enumerate(keys):
        parser[("default" if i == 0 else f"fleet{i}")] = {
            "aws_access_key_id": key, "aws_secret_access_key": secret}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        parser.write(fh)
    return keys


def prefill_nonces(state_dir: Path, gateways: int) -> int:
    """Bring the replay log to its steady size: NONCE_LIFETIME / POLL_PERIOD nonces per
    gateway, their times spread over the lifetime so they expire at the rate the fleet's
    polls add new ones (the size then stays steady from the first second)."""
    from controlplane.noncelog import NonceLog
    from controlplane.server import NONCES_DIR

    count = int(gateways * NONCE_LIFETIME / POLL_PERIOD)
    now = time.time()
    log = NonceLog(state_dir / NONCES_DIR, now=now)
    for seen in sorted(now - random.uniform(0, NONCE_LIFETIME - 30) for _ in range(count)):
        log.record(secrets.token_hex(16), secrets.token_hex(16), seen)
    log.close()
    return count


def nonce_rows(state_dir: Path) -> int:
    """The nonces in the replay log's live files (a line each)."""
    from controlplane.server import NONCES_DIR

    total = 0
    for path in (state_dir / NONCES_DIR).glob("*.log"):
        with contextlib.suppress(FileNotFoundError), path.open("rb") as fh:
            total += sum(1 for _ in fh)
    return total


class ApiDriver:
    """The AWS API at a fixed rate (open loop: a slow answer does not slow the next call),
    plus full ListGateways listings, page by page, from another thread."""

    def __init__(self, url: str, keys: list[tuple[str, str]], arns: list[str],
                 rate: float, list_rate: float, page_size: int) -> None:
        self.url = url
        self.keys = keys
        self.arns = arns
        self.rate = rate
        self.list_rate = list_rate
        self.page_size = page_size
        self.samples: dict[str, Samples] = {
            k: Samples() for k in ("list_all", "list_page", "get", "put", "reach",
                                   "list_page_http", "get_http", "put_http")}
        self._http = threading.local()  # the last HTTP exchange's seconds, per thread
        self.calls = 0
        self.put_marks: dict[int, tuple[str, float]] = {}
        self.reached: dict[int, float] = {}
        self._lock = threading.Lock()
        # One client per role, shared by the threads (botocore clients are thread-safe),
        # each warmed by one call so the first measured call does not pay for the setup.
        self._clients = [boto_client(url, key, secret, 1) for key, secret in keys[:2]]
        for client in self._clients:
            self._time_exchanges(client)
            client.list_gateways(MaxResults=1)
        self._order = list(arns)
        random.shuffle(self._order)
        self._next = 0
        self._mark = MARK_BASE

    def _time_exchanges(self, client: Any) -> None:
        """Time botocore's HTTP exchange alone (request sent to response read), so the
        figures split into boto3's own work in this process and the exchange."""
        send = client._endpoint._send

        def timed_send(request: Any) -> Any:
            t0 = time.monotonic()
            try:
                return send(request)
            finally:
                self._http.seconds = time.monotonic() - t0

        client._endpoint._send = timed_send

    def _exchange(self, kind: str) -> None:
        seconds = getattr(self._http, "seconds", None)
        if seconds is not None:
            self.samples[f"{kind}_http"].add(seconds)

    def _pick(self) -> str:
        with self._lock:
            arn = self._order[self._next % len(self._order)]
            self._next += 1
            return arn

    def one_call(self, kind: str) -> None:
        client = self._clients[0]
        arn = self._pick()
        t0 = time.monotonic()
        try:
            if kind == "get":
                client.get_gateway(GatewayArn=arn)
            elif kind == "schedule":
                with self._lock:
                    self._mark += 1
                    mark = self._mark
                    self.put_marks[mark] = (arn, time.time())
                client.put_bandwidth_rate_limit_schedule(
                    GatewayArn=arn, BandwidthRateLimitIntervals=[{
                        "StartHourOfDay": 0, "StartMinuteOfHour": 0, "EndHourOfDay": 23,
                        "EndMinuteOfHour": 59, "DaysOfWeek": [0, 1, 2, 3, 4, 5, 6],
                        "AverageUploadRateLimitInBitsPerSec": mark}])
            else:
                client.put_maintenance_start_time(GatewayArn=arn, HourOfDay=random.randrange(24),
                                                  MinuteOfHour=0, DayOfWeek=random.randrange(7))
        except Exception as exc:  # every failure is counted and shown
            self.samples["get" if kind == "get" else "put"].fail(f"{kind}: {exc}")
            if kind == "schedule":
                with self._lock:
                    self.put_marks.pop(mark, None)
            return
        finally:
            with self._lock:
                self.calls += 1
        self.samples["get" if kind == "get" else "put"].add(time.monotonic() - t0)
        self._exchange("get" if kind == "get" else "put")

    def listing(self, stop: threading.Event) -> None:
        """Whole listings back to back, pages as fast as they come, then a pause that keeps
        the page rate near `list_rate`."""
        client = self._clients[1]
        while not stop.is_set():
            t0 = time.monotonic()
            seen, token, pages = 0, None, 0
            try:
                while True:
                    kw: dict[str, Any] = {"MaxResults": self.page_size}
                    if token:
                        kw["NextToken"] = token
                    p0 = time.monotonic()
                    page = client.list_gateways(**kw)
                    self.samples["list_page"].add(time.monotonic() - p0)
                    self._exchange("list_page")
                    pages += 1
                    with self._lock:
                        self.calls += 1
                    seen += len(page.get("Gateways", []))
                    token = page.get("NextToken")
                    if not token:
                        break
            except Exception as exc:
                self.samples["list_all"].fail(f"list: {exc}")
                stop.wait(1.0)
                continue
            took = time.monotonic() - t0
            if seen < len(self.arns):
                self.samples["list_all"].fail(f"listing saw {seen} of {len(self.arns)}")
            else:
                self.samples["list_all"].add(took)
            stop.wait(max(0.1, pages / self.list_rate - took))

    def run(self, seconds: float) -> None:
        stop = threading.Event()
        lister = threading.Thread(target=self.listing, args=(stop,), daemon=True)
        lister.start()
        kinds = ["get", "get", "schedule", "schedule", "maintenance"]
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            start = time.monotonic()
            n = 0
            while True:
                due = start + n / self.rate
                now = time.monotonic()
                if due - start >= seconds:
                    break
                if due > now:
                    time.sleep(due - now)
                pool.submit(self.one_call, kinds[n % len(kinds)])
                n += 1
        stop.set()
        lister.join(60)

    def note_reach(self, mark: Any, at: float) -> None:
        if isinstance(mark, int):
            with self._lock:
                self.reached.setdefault(mark, at)

    def reach_figures(self) -> None:
        s = self.samples["reach"]
        for mark, (arn, sent) in sorted(self.put_marks.items()):
            at = self.reached.get(mark)
            if at is None:
                s.fail(f"schedule {mark} for {arn} never reached its gateway")
            else:
                s.add(max(0.0, at - sent))


class Worker:
    """One simulator process and the lines it sends back."""

    def __init__(self, proc: asyncio.subprocess.Process, driver_ref: list[ApiDriver]) -> None:
        self.proc = proc
        self.activated: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future())
        self.stats: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._driver_ref = driver_ref
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            doc = json.loads(line)
            if "reach" in doc:
                if self._driver_ref:
                    self._driver_ref[0].note_reach(doc["reach"], doc["t"])
            elif "activated" in doc:
                self.activated.set_result(doc)
            elif "stats" in doc:
                self.stats.set_result(doc["stats"])
        for fut in (self.activated, self.stats):
            if not fut.done():
                fut.set_exception(RuntimeError(f"worker {self.proc.pid} exited "
                                               f"(status {self.proc.returncode})"))


async def start_control_plane(state_dir: Path, port: int, log_file: Path
                              ) -> asyncio.subprocess.Process:
    env, cwd = {**os.environ, "PYTHONUNBUFFERED": "1"}, None
    env["FLEETBENCH_SERVER_TIMES"] = str(log_file.with_name("server-times.json"))
    other = os.environ.get("FLEETBENCH_CONTROLPLANE_PATH")
    if other:
        # Another control plane's sources first (a "before" figure: `git archive` of an
        # older commit unpacked there; `-m` puts the working directory first), the bench's
        # own after them.
        cwd = other
        env["PYTHONPATH"] = os.pathsep.join([other, str(Path(__file__).resolve().parents[1])])
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "tools.fleetbench", "control-plane", "serve", "--listen",
        f"127.0.0.1:{port}", "--state-dir", str(state_dir),
        stdout=asyncio.subprocess.PIPE, stderr=log_file.open("ab"), env=env, cwd=cwd,
    )
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if not line:
            raise RuntimeError(f"the control plane exited; see {log_file}")
        if b"event=ready" in line:
            return proc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def orchestrate(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="fleetbench-", dir=args.workdir))
    state_dir = workdir / "controlplane"
    state_dir.mkdir(mode=0o700)
    n, workers_n = args.gateways, args.workers or max(2, math.ceil(args.gateways / 2500))
    keys = write_credentials(state_dir / "credentials", 2 + workers_n)
    where = ("SCHED_IDLE" if args.fleet_nice == "idle" else f"nice {args.fleet_nice}")
    print(f"fleetbench: {n} gateways in {workers_n} simulator processes at {where}, "
          f"{os.cpu_count()} cores, state in {workdir}", flush=True)
    prefilled = prefill_nonces(state_dir, n) if args.prefill else 0
    if prefilled:
        print(f"fleetbench: replay log brought to its steady size: {prefilled} nonces",
              flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_file = workdir / "controlplane.log"
    cp = await start_control_plane(state_dir, port, log_file)
    driver_ref: list[ApiDriver] = []
    workers: list[Worker] = []
    code = 1
    try:
        share = [n // workers_n + (1 if i < n % workers_n else 0) for i in range(workers_n)]
        first = 0
        t_act = time.monotonic()
        cpu_act = cpu_seconds(cp.pid)
        for i, count in enumerate(share):
            key, secret = keys[2 + i]
            proc = await asyncio.create_subprocess_exec(
                PY, "-m", "tools.fleetbench", "worker", "--url", url, "--first", str(first),
                "--count", str(count), "--access-key", key, "--secret", secret,
                "--concurrency", str(args.concurrency),
                stdout=asyncio.subprocess.PIPE, stderr=(workdir / f"worker{i}.log").open("ab"),
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, limit=1 << 20,
                preexec_fn=lambda: lower_priority(args.fleet_nice),
            )
            workers.append(Worker(proc, driver_ref))
            first += count
        done = await asyncio.gather(*(w.activated for w in workers))
        act_seconds = time.monotonic() - t_act
        act_cpu = cpu_seconds(cp.pid) - cpu_act
        activated = sum(d["activated"] for d in done)
        act_failed = sum(d["failed"] for d in done)
        print(f"fleetbench: activated {activated}/{n} in {act_seconds:.1f} s "
              f"({activated / act_seconds:.0f}/s; control plane CPU {act_cpu:.1f} s)",
              flush=True)
        for d in done:
            for f in d["failures"]:
                print(f"  activation failed: {f}", flush=True)

        # Polls only: every gateway is in its 20 s long-poll cycle.
        await asyncio.sleep(POLL_PERIOD + 2)
        t0, c0, m0 = time.monotonic(), cpu_seconds(cp.pid), machine_busy()
        await asyncio.sleep(args.idle_seconds)
        idle_cpu = (cpu_seconds(cp.pid) - c0) / (time.monotonic() - t0)
        m1 = machine_busy()
        idle_machine = (m1[0] - m0[0]) / (m1[1] - m0[1])
        rows_before = nonce_rows(state_dir)

        # Steady state: polls and the API at ~40 calls/s.
        loop = asyncio.get_running_loop()
        arns = await loop.run_in_executor(None, list_all_arns, url, keys[1])
        driver = ApiDriver(url, keys, arns, args.rate - args.list_rate, args.list_rate,
                           args.page_size)
        driver_ref.append(driver)
        print(f"fleetbench: polls-only CPU measured; steady phase {args.steady_seconds:.0f} s "
              f"at {args.rate:.0f} calls/s", flush=True)
        t0, c0, m0 = time.monotonic(), cpu_seconds(cp.pid), machine_busy()
        steady_from = time.time()
        await loop.run_in_executor(None, driver.run, args.steady_seconds)
        steady_window = (steady_from, time.time())
        steady_wall = time.monotonic() - t0
        steady_cpu = (cpu_seconds(cp.pid) - c0) / steady_wall
        m1 = machine_busy()
        steady_machine = (m1[0] - m0[0]) / (m1[1] - m0[1])
        deadline = time.monotonic() + REACH_TIMEOUT
        while time.monotonic() < deadline and set(driver.put_marks) - set(driver.reached):
            await asyncio.sleep(0.2)
        driver.reach_figures()
        rows_after = nonce_rows(state_dir)

        for w in workers:
            w.proc.send_signal(signal.SIGTERM)
        stats = await asyncio.gather(*(asyncio.wait_for(w.stats, 60) for w in workers))
        link_errors = sum(s["link_errors"] for s in stats)
        polls = sum(s["polls"] for s in stats)
        sim_cpu = sum(s["cpu_seconds"] for s in stats)
        s = driver.samples
        errors = act_failed + link_errors + sum(x.errors for x in s.values())
        rows = [
            ("ListGateways (all pages) p50 / p99",
             f"{ms(s['list_all'].pct(50))} / {ms(s['list_all'].pct(99))}", None,
             s["list_all"]),
            ("ListGateways page p99", ms(s["list_page"].pct(99)), s["list_page"].pct(99),
             s["list_page"]),
            ("GetGateway p99", ms(s["get"].pct(99)), s["get"].pct(99), s["get"]),
            ("Put* p99", ms(s["put"].pct(99)), s["put"].pct(99), s["put"]),
            ("schedule Put reaching its gateway p99", ms(s["reach"].pct(99)),
             s["reach"].pct(99), s["reach"]),
        ]
        print(f"\nfleetbench results: {n} gateways, steady state (replay log {rows_before} "
              f"-> {rows_after} nonces, {rows_after / max(1, n):.1f} per gateway), "
              f"{steady_wall:.0f} s at {driver.calls / steady_wall:.1f} calls/s")
        for label, shown, value, sample in rows:
            goal = "" if value is None else (
                f"  goal < {GOAL_MS:.0f} ms: {'met' if value * 1000 < GOAL_MS else 'MISSED'}")
            print(f"  {label:<42} {shown:>20}   (n={len(sample.values)}){goal}")
        print(f"  {'control plane CPU, polls only':<42} {idle_cpu * 100:>18.0f} %   "
              f"(machine busy {idle_machine * 100:.0f} % of {os.cpu_count()} cores)")
        print(f"  {'control plane CPU, polls + API':<42} {steady_cpu * 100:>18.0f} %   "
              f"(machine busy {steady_machine * 100:.0f} %)")
        print(f"  {'polls answered (all phases)':<42} {polls:>20}   simulator CPU "
              f"{sim_cpu:.0f} s")
        print(f"  {'activation':<42} {activated / act_seconds:>16.0f} /s   "
              f"({act_seconds:.0f} s for {activated})")
        print(f"  {'errors':<42} {errors:>20}")
        print("  the same calls' HTTP exchange at the client (request sent to response read,"
              " without boto3's own work):")
        for label, kind in CALL_ROWS:
            print_p99(label, s[f"{kind}_http"].values)
        for name, sample in s.items():
            for e in sample.error_samples:
                print(f"    {name}: {e}")
        for st in stats:
            for e in st["link_error_samples"]:
                print(f"    link: {e}")
        code = 1 if errors else 0
    finally:
        for w in workers:
            if w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()
        cp.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(cp.wait(), 30)
        except TimeoutError:
            cp.kill()
            await cp.wait()
        print_server_times(workdir / "server-times.json", steady_window)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(workdir)], check=False)
        else:
            print(f"fleetbench: kept {workdir}")
    return code


# The API calls whose p99 is split below the results: (row label, sample kind).
CALL_ROWS = (("ListGateways page p99", "list_page"), ("GetGateway p99", "get"),
             ("Put* p99", "put"))


def print_p99(label: str, values: list[float]) -> None:
    """One indented row of a split: a p99 and its sample count."""
    sample = Samples(values=list(values))
    print(f"    {label:<40} {ms(sample.pct(99)):>20}   (n={len(sample.values)})")


def print_server_times(path: Path, steady: tuple[float, float]) -> None:
    """The same calls' p99 inside the control plane (its handlers, `_time_handlers`): what
    is left of a client's figure is the loop's queue, the machine's scheduling and boto3;
    and the event loop's lag during the steady phase (`steady`, wall-clock times)."""
    try:
        times = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    print("  the same calls inside the control plane (first middleware to answer):")
    for label, kind in (*CALL_ROWS, ("a durable commit's WAL fsync p99", "fsync")):
        print_p99(label, times.get(kind, []))
    print("  the same calls from their bytes reaching the control plane to the answer:")
    for label, kind in CALL_ROWS:
        print_p99(label, times.get(f"{kind}_arrival", []))
    lag = Samples()
    for at, seconds in times.get("loop_lag", []):
        if steady[0] <= at <= steady[1]:
            lag.add(seconds)
    worst = max(lag.values, default=None)
    print(f"  {'the event loop running a due callback late by, p99':<42} {ms(lag.pct(99)):>20}"
          f"   (n={len(lag.values)}, worst {ms(worst)})")


def list_all_arns(url: str, key: tuple[str, str]) -> list[str]:
    client = boto_client(url, key[0], key[1], 5)
    arns: list[str] = []
    for page in client.get_paginator("list_gateways").paginate(PaginationConfig={"PageSize": 1000}):
        arns += [g["GatewayArn"] for g in page["Gateways"]]
    return arns


def fleet_priority(text: str) -> str | int:
    """`--fleet-nice`: 'idle' or a niceness 0-19."""
    if text == "idle":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 19:
        raise argparse.ArgumentTypeError(f"{text!r}: accepted values are 'idle' or 0 to 19")
    return value


def lower_priority(priority: str | int) -> None:
    """In a simulator process before it runs: SCHED_IDLE, or a niceness."""
    if priority == "idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif priority:
        os.nice(int(priority))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.fleetbench", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--gateways", type=int, default=1000, help="fleet size (default 1,000)")
    p.add_argument("--fleet-10k", action="store_true", help="10,000 gateways")
    p.add_argument("--steady-seconds", type=float, default=60.0,
                   help="the measured phase with API calls (default 60)")
    p.add_argument("--idle-seconds", type=float, default=20.0,
                   help="the polls-only CPU measurement (default 20)")
    p.add_argument("--rate", type=float, default=40.0, help="API calls/s in all (default 40)")
    p.add_argument("--list-rate", type=float, default=10.0,
                   help="of which ListGateways pages/s (default 10)")
    p.add_argument("--page-size", type=int, default=100, help="ListGateways MaxResults")
    p.add_argument("--workers", type=int, default=0,
                   help="simulator processes (default: 1 per 2,500 gateways, at least 2)")
    p.add_argument("--concurrency", type=int, default=16,
                   help="activations in flight per simulator process")
    p.add_argument("--fleet-nice", type=fleet_priority, default="idle",
                   help="the simulated gateways' CPU priority: 'idle' (default: Linux's "
                        "SCHED_IDLE, they run on the CPU the control plane leaves, as a "
                        "remote fleet would) or a niceness 0-19 (0 shares the CPU equally)")
    p.add_argument("--no-prefill", dest="prefill", action="store_false",
                   help="start with an empty replay table (the 'fresh' figures)")
    p.add_argument("--workdir", default=None, help="where the temporary state goes")
    p.add_argument("--keep", action="store_true", help="keep the state and logs")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["control-plane"]:
        return control_plane_main(argv[1:])
    if argv[:1] == ["worker"]:
        wp = argparse.ArgumentParser()
        for name in ("--url", "--access-key", "--secret"):
            wp.add_argument(name, required=True)
        for name in ("--first", "--count", "--concurrency"):
            wp.add_argument(name, type=int, required=True)
        return asyncio.run(worker_main(wp.parse_args(argv[1:])))
    args = build_parser().parse_args(argv)
    if args.fleet_10k:
        args.gateways = 10_000
    return asyncio.run(orchestrate(args))


if __name__ == "__main__":
    sys.exit(main())
