"""What every screen needs: the terminal, the daemon's API and the OS adapters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.console.api import ApiError, ApiUnavailable, LocalApi
from appliance.console.auth import PasswordStore
from appliance.console.ui import Terminal
from appliance.system.networkd import NetworkdStore
from appliance.system.timesync import TimeSync


@dataclass
class Context:
    term: Terminal
    api: LocalApi
    passwords: PasswordStore
    network: NetworkdStore
    time: TimeSync

    def status(self) -> tuple[dict[str, Any] | None, str | None]:
        """The daemon's status, or None and the reason it could not be had."""
        try:
            return self.api.status(), None
        except (ApiUnavailable, ApiError) as exc:
            return None, str(exc)
