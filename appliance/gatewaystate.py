"""The gateway's state, and the schedule that state puts in force on the shaper.

The one writer of the state file: a key request and a poll answer both change the state
through `save`, which writes atomically (StateStore) before the change is visible anywhere
else. The schedule is applied to the shaper here too, so the schedule on disk and the one in
force are changed by one rule in one place (an invalid schedule keeps the old one in both).
"""

from __future__ import annotations

import logging
from typing import Any

from appliance.shaping import ScheduledShaper
from appliance.state import NO_HYPERVISOR, State, StateStore
from gatewaycore.schedule import Schedule, ScheduleError

log = logging.getLogger(__name__)


class GatewayState:
    """What the gateway knows of itself, kept in one StateStore, and its shaper's schedule.

    Built from a store that is already loaded: the stored schedule is in force on the shaper
    from construction, so no part ever sees a state whose schedule was not applied.
    """

    def __init__(self, store: StateStore, shaper: ScheduledShaper) -> None:
        self._store = store
        self._shaper = shaper
        self.apply_schedule(store.state.schedule, at_start=True)

    @property
    def state(self) -> State:
        return self._store.state

    def save(self, **changes: Any) -> State:
        """Write the changed state (atomically; OSError on a full disk) and make it current."""
        return self._store.update(**changes)

    def apply_schedule(self, intervals: list[dict[str, Any]], at_start: bool = False) -> bool:
        """Hand the schedule to the shaper; False (and the old schedule kept) if it is invalid."""
        try:
            schedule = Schedule.from_api(intervals)
        except ScheduleError as exc:
            log.error("event=schedule_rejected reason=%s", str(exc))
            return False
        self._shaper.set_schedule(schedule)
        if not at_start:
            log.info("event=schedule_applied intervals=%d", len(schedule.intervals))
        return True

    def forget(self, arn: str | None) -> None:
        """The gateway was deleted: forget its activation, schedule and hypervisor, for good.

        Shared by the key issuer (the control plane refused a key: GatewayDeleted) and the
        link loop (a poll said `deleted`), so both leave the same state behind.
        """
        if self.state.deleted:
            return
        self.save(
            deleted=True, activated=False, deleted_gateway_arn=arn or self.state.gateway_arn,
            gateway_arn=None, gateway_name=None, region=None, schedule=[], **NO_HYPERVISOR,
        )
        self.apply_schedule([])
        log.info("event=gateway_deleted gateway_arn=%s", arn)

    def resync_clock(self, source: str) -> None:
        """Re-read the wall clock after it was stepped, so the interval in force is right now.

        The shaper's boundary timer runs on the monotonic clock: without this, a step of the
        wall clock (the console's NTP sync, a VM resumed) leaves the old interval in force
        until the timer next re-reads the wall clock (up to a minute later).
        """
        self._shaper.resync()
        log.info("event=clock_resync source=%s limit=%s", source,
                 self._shaper.limit_bps or "none")
