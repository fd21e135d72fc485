"""The hypervisor agent: tests and discovers hypervisors when the control plane asks.

The gateway, not the control plane, is on the hypervisor's network, so it is the one that
connects (docs/link-protocol.md, "Hypervisors"). The link loop hands this part each poll
answer's `hypervisor` and `tests` (`offer`); the part

- keeps the associated hypervisor in the gateway state (arn, host, username and the
  password *still sealed*: only this part opens it, in memory, right before connecting);
- runs each requested test once, at most `max_tests` at a time, and posts its result;
- syncs the inventory when a new `syncRequest` arrives and every `period` seconds while
  associated, one sync at a time (a single loop runs them), and posts it;
- remembers the last test and sync outcome and time in the state, for the status view.

Connectors block (libvirt, vSphere), so every connection runs in a worker thread
(`asyncio.to_thread`): the event loop, and with it the poll and the local API, never waits
on a hypervisor. A sync is owed until its report is accepted, so a daemon stopped mid-sync
syncs again at its next start, and the control plane only ever holds a whole inventory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from appliance.gatewaystate import GatewayState
from appliance.hypervisors import (
    HYPERVISOR_ERROR,
    Connector,
    DiscoveredVm,
    HypervisorError,
    Target,
    connector_for,
)
from appliance.hypervisors.model import BackupConnector
from appliance.link import (
    Backoff,
    HypervisorOrder,
    LinkClient,
    LinkError,
    Refused,
    TestRequest,
    sleep_or_wake,
)
from appliance.localerror import LocalError
from appliance.sealkey import SealKey
from appliance.state import NO_HYPERVISOR
from gatewaycore import sealed, utctime

log = logging.getLogger(__name__)

SYNC_PERIOD = 15 * 60.0  # seconds between syncs of an associated hypervisor
MAX_TESTS = 2  # tests connecting at once (each holds a worker thread)
MAX_PENDING_TESTS = 16  # tests accepted and not yet reported; more wait for a later poll
SEEN_TTL = 300.0  # a test id is run once: remembered well past the control plane's 60 s
MESSAGE_MAX = 500
REPORT_TRIES = 4

ConnectorFactory = Callable[[Target, float], Connector]


@dataclass(frozen=True)
class Outcome:
    """What one test or inventory found; `vms` only for a successful inventory."""

    ok: bool
    code: str | None = None
    message: str | None = None
    vms: list[dict[str, Any]] = field(default_factory=list)

    def record(self, at: str, **extra: Any) -> dict[str, Any]:
        """The state's (and status view's) form: no VM list, never a secret."""
        return {"ok": self.ok, "errorCode": self.code, "message": self.message, "at": at,
                **extra}


def vm_json(vm: DiscoveredVm) -> dict[str, Any]:
    """A discovered VM in the inventory report's shape."""
    return {"uuid": vm.uuid, "name": vm.name, "path": vm.path, "hostName": vm.host_name,
            "tags": [{"key": k, "value": v} for k, v in vm.tags]}


class HypervisorAgent:
    """Tests and syncs hypervisors for the control plane; the one owner of the hypervisor
    fields of the state (written through `gateway`, the one writer of the state file)."""

    def __init__(
        self,
        gateway: GatewayState,
        link: LinkClient,
        seal_key: SealKey,
        connect: ConnectorFactory = connector_for,
        period: float = SYNC_PERIOD,
        max_tests: int = MAX_TESTS,
        connect_timeout: float = 20.0,
        retry_max: float = 60.0,
    ) -> None:
        self._gateway = gateway
        self._link = link
        self._seal_key = seal_key
        self._connect = connect
        self._period = period
        self._connect_timeout = connect_timeout
        self._retry_max = retry_max
        self._test_slots = asyncio.Semaphore(max_tests)
        self._seen: dict[str, float] = {}  # test id -> monotonic time it was accepted
        self._tests: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._next_sync = self._first_sync_due()
        self.syncing = False

    # -- from the link loop ---------------------------------------------------------------

    def offer(self, hypervisor: HypervisorOrder | None, tests: Sequence[TestRequest]) -> None:
        """Fold one poll answer's hypervisor part in: the association, and new tests."""
        self._associate(hypervisor)
        now = time.monotonic()
        for test_id, accepted in list(self._seen.items()):
            if now - accepted > SEEN_TTL:
                del self._seen[test_id]
        for request in tests:
            if request.test_id in self._seen or len(self._tests) >= MAX_PENDING_TESTS:
                continue
            self._seen[request.test_id] = now
            task = asyncio.create_task(self._run_test(request), name="hypervisor-test")
            self._tests.add(task)
            task.add_done_callback(self._tests.discard)

    def _associate(self, order: HypervisorOrder | None) -> None:
        st = self._gateway.state
        if order is None:
            if st.hypervisor_arn is not None:
                log.info("event=hypervisor_disassociated hypervisor_arn=%s", st.hypervisor_arn)
                self._gateway.save(**NO_HYPERVISOR)
                self._wake.set()
            return
        changes: dict[str, Any] = {
            "hypervisor_arn": order.hypervisor_arn,
            "hypervisor_host": order.host,
            "hypervisor_username": order.username,
            "hypervisor_password": order.password,
            "hypervisor_password_pending": order.password_pending,
            "hypervisor_sync_request": order.sync_request,
        }
        if order.hypervisor_arn != st.hypervisor_arn:
            log.info("event=hypervisor_associated hypervisor_arn=%s host=%s sync_request=%d",
                     order.hypervisor_arn, order.host, order.sync_request)
            changes.update(hypervisor_synced_request=0, hypervisor_last_test=None,
                           hypervisor_last_sync=None)
        elif (order.host, order.username) != (st.hypervisor_host, st.hypervisor_username):
            log.info("event=hypervisor_updated hypervisor_arn=%s host=%s",
                     order.hypervisor_arn, order.host)
        if any(getattr(st, k) != v for k, v in changes.items()):
            self._gateway.save(**changes)
            self._wake.set()  # a new syncRequest, or a password that was pending

    # -- the sync loop ----------------------------------------------------------------------

    def _first_sync_due(self) -> float:
        """When the periodic sync is next due, counted from the last one (kept across restarts)."""
        last = self._gateway.state.hypervisor_last_sync or {}
        try:
            elapsed = time.time() - utctime.parse_utc(str(last.get("at"))).timestamp()
        except (ValueError, TypeError):
            return time.monotonic()
        return time.monotonic() + min(self._period, max(0.0, self._period - elapsed))

    def _sync_owed(self) -> bool:
        st = self._gateway.state
        return st.hypervisor_synced_request != st.hypervisor_sync_request

    async def run(self) -> None:
        """Sync whenever one is owed or due, one at a time, until cancelled."""
        backoff = Backoff(base=2.0, cap=self._retry_max)
        while True:
            st = self._gateway.state
            if st.hypervisor_arn is None or st.deleted or (
                st.hypervisor_password is None and st.hypervisor_password_pending
            ):
                # Nothing to sync yet (or the password is on its way): wait for a poll.
                await self._wake.wait()
                self._wake.clear()
                continue
            if not self._sync_owed() and time.monotonic() < self._next_sync:
                await sleep_or_wake(self._wake, self._next_sync - time.monotonic())
                continue
            self._wake.clear()
            try:
                done = await self.sync_once()
            except OSError as exc:  # the state could not be written: retry as a failed report
                log.error("event=state_write_failed reason=%s", str(exc))
                done = False
            if done:
                backoff.reset()
                self._next_sync = time.monotonic() + self._period
            else:
                await sleep_or_wake(self._wake, backoff.next_delay())

    async def sync_once(self) -> bool:
        """Discover the associated hypervisor's VMs and report them; True once reported.

        The report names the syncRequest in force when the sync began: a request arriving
        meanwhile stays owed and is served by the next sync.
        """
        st = self._gateway.state
        arn, request = st.hypervisor_arn, st.hypervisor_sync_request
        if arn is None or st.hypervisor_host is None:
            return True
        log.info("event=hypervisor_sync_started hypervisor_arn=%s sync_request=%d host=%s",
                 arn, request, st.hypervisor_host)
        self.syncing = True
        try:
            outcome = await asyncio.to_thread(
                self._inventory, st.hypervisor_host, st.hypervisor_username,
                st.hypervisor_password,
            )
        finally:
            self.syncing = False
        try:
            kept = await self._link.report_inventory(
                arn, request, outcome.ok, outcome.code, outcome.message, outcome.vms
            )
        except Refused as exc:
            # e.g. 403 NotAssociated: the association changed under us; the poll tells how.
            log.warning("event=hypervisor_sync_refused hypervisor_arn=%s code=%s message=%s",
                        arn, exc.code, str(exc))
            kept = None
        except LinkError as exc:
            log.warning("event=hypervisor_sync_unreported hypervisor_arn=%s reason=%s",
                        arn, str(exc))
            return False
        count = kept if kept is not None else len(outcome.vms)
        log.info("event=hypervisor_sync_done hypervisor_arn=%s sync_request=%d ok=%s "
                 "code=%s vms=%d", arn, request, str(outcome.ok).lower(), outcome.code, count)
        if self._gateway.state.hypervisor_arn == arn:  # not disassociated meanwhile
            last = outcome.record(utctime.format_utc(), vms=count if outcome.ok else None,
                                  syncRequest=request)
            self._gateway.save(hypervisor_synced_request=request, hypervisor_last_sync=last)
        return True

    # -- tests ------------------------------------------------------------------------------

    async def _run_test(self, request: TestRequest) -> None:
        """One TestHypervisorConfiguration: connect, then post the result (retried briefly)."""
        outcome = await self._test(request.host, request.username, request.password,
                                   request.password_pending)
        log.info("event=hypervisor_test test_id=%s host=%s ok=%s code=%s", request.test_id,
                 request.host, str(outcome.ok).lower(), outcome.code)
        st = self._gateway.state
        if request.host == st.hypervisor_host and request.username == st.hypervisor_username:
            with contextlib.suppress(OSError):
                self._gateway.save(hypervisor_last_test=outcome.record(utctime.format_utc()))
        backoff = Backoff(base=1.0, cap=10.0)
        for attempt in range(REPORT_TRIES):
            try:
                await self._link.report_test(request.test_id, outcome.ok, outcome.code,
                                             outcome.message)
                return
            except Refused as exc:  # UnknownTest: expired, nobody waits for it any more
                log.warning("event=hypervisor_test_refused test_id=%s code=%s",
                            request.test_id, exc.code)
                return
            except LinkError as exc:
                log.warning("event=hypervisor_test_unreported test_id=%s attempt=%d reason=%s",
                            request.test_id, attempt + 1, str(exc))
                await asyncio.sleep(backoff.next_delay())

    async def _test(self, host: str, username: str | None,
                    password: Mapping[str, Any] | None, pending: bool) -> Outcome:
        """One login test (at most a few at once); a password still on its way is a clear
        failure rather than a login without it."""
        if password is None and pending:
            return Outcome(False, "HypervisorError",
                           "the gateway has not yet received the hypervisor password sealed "
                           "to it; try again after its next poll")
        async with self._test_slots:
            return await asyncio.to_thread(self._probe, host, username, password)

    async def test_now(self) -> dict[str, Any]:
        """`POST /v1/hypervisor/test`: test the associated hypervisor with its stored settings.

        LocalError 409 NotAssociated when there is none; otherwise the outcome, pass or fail.
        """
        st = self._gateway.state
        if st.hypervisor_arn is None or st.hypervisor_host is None:
            raise LocalError(409, "NotAssociated",
                             "this gateway is not associated with a hypervisor; associate one "
                             "with AssociateGatewayToServer")
        outcome = await self._test(st.hypervisor_host, st.hypervisor_username,
                                   st.hypervisor_password, st.hypervisor_password_pending)
        at = utctime.format_utc()
        log.info("event=hypervisor_test test_id=local hypervisor_arn=%s host=%s ok=%s code=%s",
                 st.hypervisor_arn, st.hypervisor_host, str(outcome.ok).lower(), outcome.code)
        if self._gateway.state.hypervisor_arn == st.hypervisor_arn:
            self._gateway.save(hypervisor_last_test=outcome.record(at))
        return {"hypervisorArn": st.hypervisor_arn, "host": st.hypervisor_host,
                **outcome.record(at)}

    async def close(self) -> None:
        """Stop waiting for tests in flight (their threads end at their connect timeout)."""
        for task in list(self._tests):
            task.cancel()
        await asyncio.gather(*self._tests, return_exceptions=True)

    # -- in worker threads ------------------------------------------------------------------

    def backup_connector(self, hypervisor_arn: str) -> BackupConnector:
        """A connector to the associated hypervisor for a backup or restore job (in a worker
        thread: the password is opened here, in memory). HypervisorError when the gateway
        is not associated with `hypervisor_arn`, its password has not arrived, or the
        connector cannot back up."""
        st = self._gateway.state
        if st.hypervisor_arn is None or st.hypervisor_host is None:
            raise HypervisorError(HYPERVISOR_ERROR, "this gateway is not associated with a "
                                  "hypervisor; associate it with AssociateGatewayToServer")
        if st.hypervisor_arn != hypervisor_arn:
            raise HypervisorError(HYPERVISOR_ERROR, f"the job's hypervisor {hypervisor_arn} "
                                  f"is not the one this gateway is associated with "
                                  f"({st.hypervisor_arn})")
        if st.hypervisor_password is None and st.hypervisor_password_pending:
            raise HypervisorError(HYPERVISOR_ERROR, "the gateway has not yet received the "
                                  "hypervisor password sealed to it")
        try:
            connector = self._connected(st.hypervisor_host, st.hypervisor_username,
                                        st.hypervisor_password)
        except sealed.SealError as exc:
            raise HypervisorError(HYPERVISOR_ERROR, f"the hypervisor password could not be "
                                  f"opened ({exc}); re-import it") from None
        if not callable(getattr(connector, "begin_backup", None)):
            raise HypervisorError(HYPERVISOR_ERROR, f"the {type(connector).__name__} cannot "
                                  "back up or restore VMs")
        return cast(BackupConnector, connector)

    def _connected(self, host: str, username: str | None,
                   box: Mapping[str, Any] | None) -> Connector:
        """A connector; the password is opened here, in memory, just before it is needed."""
        password = None if box is None else self._seal_key.unseal_text(box)
        return self._connect(Target(host, username, password), self._connect_timeout)

    def _probe(self, host: str, username: str | None,
               box: Mapping[str, Any] | None) -> Outcome:
        return self._guarded(host, username, box, lambda c: (c.test(), Outcome(True))[1])

    def _inventory(self, host: str, username: str | None,
                   box: Mapping[str, Any] | None) -> Outcome:
        def discover(connector: Connector) -> Outcome:
            return Outcome(True, vms=[vm_json(vm) for vm in connector.inventory()])

        return self._guarded(host, username, box, discover)

    def _guarded(self, host: str, username: str | None, box: Mapping[str, Any] | None,
                 work: Callable[[Connector], Outcome]) -> Outcome:
        """Run `work` on a connector; every failure becomes an Outcome with a code."""
        try:
            connector = self._connected(host, username, box)
        except sealed.SealError as exc:
            return Outcome(False, "HypervisorError",
                           f"the hypervisor password could not be opened ({exc}); re-import "
                           "it so the control plane seals it to this gateway's key")
        except HypervisorError as exc:
            return _failed(exc)
        except Exception as exc:  # a connector bug must not kill the agent
            log.exception("event=hypervisor_connector_error host=%s", host)
            return Outcome(False, "HypervisorError", f"{type(exc).__name__}: {exc}"[:MESSAGE_MAX])
        try:
            return work(connector)
        except HypervisorError as exc:
            return _failed(exc)
        except Exception as exc:
            log.exception("event=hypervisor_connector_error host=%s", host)
            return Outcome(False, "HypervisorError", f"{type(exc).__name__}: {exc}"[:MESSAGE_MAX])
        finally:
            with contextlib.suppress(Exception):
                connector.close()


def _failed(exc: HypervisorError) -> Outcome:
    code = getattr(exc, "code", None) or "HypervisorError"
    message = str(getattr(exc, "message", None) or exc or code)
    return Outcome(False, str(code), message[:MESSAGE_MAX])
