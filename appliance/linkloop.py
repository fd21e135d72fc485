"""The link loop: long-poll the control plane and fold each answer into the gateway's state.

Each poll is also the heartbeat. It runs while the gateway is registered (a key was asked
for) or activated, backs off (capped, jittered) on errors, stops for good once the gateway is
deleted, and pauses when the control plane forgot a registration that never activated.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from appliance.gatewaystate import GatewayState
from appliance.link import (
    POLL_WAIT,
    Backoff,
    HypervisorOrder,
    JobOrder,
    LinkClient,
    LinkError,
    PollAnswer,
    Refused,
    TestRequest,
    sleep_or_wake,
)
from appliance.version import __version__
from gatewaycore import utctime

log = logging.getLogger(__name__)


def _lapsed(exc: LinkError) -> bool:
    """The control plane no longer knows this (never activated) identity."""
    return isinstance(exc, Refused) and exc.code == "UnknownGateway"


HypervisorSink = Callable[[HypervisorOrder | None, Sequence[TestRequest]], None]
JobSink = Callable[[Sequence[JobOrder]], None]
UpdateSink = Callable[[PollAnswer], None]


class LinkLoop:
    """Polls through `link`; every change it learns goes through `gateway` (the one writer)."""

    def __init__(
        self,
        link: LinkClient,
        gateway: GatewayState,
        retry_max: float,
        hypervisors: HypervisorSink | None = None,
        jobs: JobSink | None = None,
        updates: UpdateSink | None = None,
        update_status: Callable[[], dict[str, str] | None] = lambda: None,
    ) -> None:
        """`hypervisors` is handed each answer's hypervisor part (the hypervisor agent),
        `jobs` each activated answer's job list (the job runner; an empty list once the
        gateway is deleted, so its jobs stop), `updates` each answer (the update agent:
        the offer, the window), and every poll tells `update_status()`."""
        self._link = link
        self._gateway = gateway
        self._retry_max = retry_max
        self._hypervisors = hypervisors
        self._jobs = jobs
        self._updates = updates
        self._update_status = update_status
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Poll now: start after a first key request, or cut a backoff short."""
        self._wake.set()

    async def run(self) -> None:
        """Long-poll while registered or activated; back off (capped, jittered) on errors."""
        backoff = Backoff(cap=self._retry_max)
        # The first poll, and the first after an error, returns at once: the link's status
        # (reachable, last contact) is then known without waiting out a long-poll.
        quick = True
        while True:
            st = self._gateway.state
            if st.deleted:
                return
            if not (st.registered or st.activated):
                await self._wake.wait()
                self._wake.clear()
                continue
            try:
                answer = await self._link.poll(
                    after=st.config_version, wait=0 if quick else POLL_WAIT,
                    update_status=self._update_status(),
                )
            except LinkError as exc:
                if _lapsed(exc) and not st.activated:
                    # The control plane forgets identities that never activate (a day after
                    # their last key expired): stop polling until a key is asked for again.
                    log.info("event=registration_lapsed")
                    self._gateway.save(registered=False)
                    continue
                quick = True
                delay = backoff.next_delay()
                log.warning("event=link_retry delay=%.1f reason=%s", delay, str(exc))
                await sleep_or_wake(self._wake, delay)
                continue
            if backoff.attempt:
                log.info("event=link_restored")
            backoff.reset()
            quick = False
            self._wake.clear()
            try:
                self.apply_poll(answer)
                if self._hypervisors is not None and answer.state != "deleted":
                    self._hypervisors(answer.hypervisor, answer.tests)
                self._offer_jobs(answer)
                if self._updates is not None:
                    self._updates(answer)
            except OSError as exc:  # e.g. a full disk: keep the old state, retry the poll
                delay = backoff.next_delay()
                log.error("event=state_write_failed delay=%.1f reason=%s", delay, str(exc))
                await sleep_or_wake(self._wake, delay)

    def _offer_jobs(self, answer: PollAnswer) -> None:
        """The answer's jobs to the runner: only once activated (a pending gateway's list is
        ignored), none once deleted."""
        if answer.jobs_dropped:
            log.warning("event=jobs_dropped count=%d reason=no_usable_job_id",
                        answer.jobs_dropped)
        if self._jobs is None:
            return
        if answer.state == "activated":
            self._jobs(answer.jobs)
        elif answer.state == "deleted":
            self._jobs(())

    def apply_poll(self, answer: PollAnswer) -> None:
        """Fold one poll answer into the state, written once, atomically."""
        gateway = self._gateway
        st = gateway.state
        if answer.state == "deleted":
            gateway.forget(answer.gateway_arn)
            gateway.save(config_version=answer.version)
            return
        changes: dict[str, Any] = {"config_version": answer.version}
        if answer.state == "activated":
            if not st.activated:
                log.info(
                    "event=activated gateway_arn=%s name=%s region=%s",
                    answer.gateway_arn, answer.gateway_name, answer.region,
                )
            elif answer.gateway_name != st.gateway_name:
                log.info(
                    "event=renamed gateway_arn=%s old=%s new=%s",
                    answer.gateway_arn, st.gateway_name, answer.gateway_name,
                )
            changes.update(
                activated=True, registered=True, gateway_arn=answer.gateway_arn,
                gateway_name=answer.gateway_name, region=answer.region,
            )
        if answer.intervals != st.schedule and gateway.apply_schedule(answer.intervals):
            changes["schedule"] = answer.intervals
        if answer.software_update_request > st.software_update_request:
            log.info(
                "event=software_update_requested request=%d version=%s",
                answer.software_update_request, __version__,
            )
            changes.update(
                software_update_request=answer.software_update_request,
                software_update_requested_at=utctime.format_utc(),
            )
        gateway.save(**changes)
