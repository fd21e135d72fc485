"""What every screen needs: the terminal, the daemon's API and the OS adapters."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from appliance.console.auth import PasswordStore
from appliance.console.ui import Back, Terminal
from appliance.localclient import ApiError, ApiUnavailable, LocalApi
from appliance.system.networkd import NetworkConfigError, NetworkdStore
from appliance.system.timesync import TimeConfigError, TimeSync


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

    def clock_stepped(self) -> str:
        """Tell the daemon the clock was stepped; one line saying whether it heard.

        The bandwidth schedule is in UTC: the daemon re-reads the clock at once, rather than
        at its watcher's next check (within 5 s) or its shaper's next timer.
        """
        try:
            self.api.clock_stepped()
        except (ApiUnavailable, ApiError) as exc:
            return (f"[WARNING] The daemon was not told of the new time ({exc}); it notices "
                    "a step of the clock by itself within a few seconds.")
        return "The daemon re-read the clock: the bandwidth schedule follows the system time."

    def submenu(
        self,
        title: str,
        options: list[tuple[str, str]],
        actions: dict[str, Callable[[Context], None]],
    ) -> None:
        """Run a menu until Ctrl-C/Ctrl-D; a screen's Back returns here, the menu's own leaves."""
        while True:
            self.term.clear()
            try:
                choice = self.term.choose(
                    options, title=title, footer=["", "Press Ctrl-C to go back"]
                )
            except Back:
                return
            try:
                actions[choice](self)
            except Back:
                continue

    def apply(self, question: str, change: Callable[[], Iterable[str]]) -> None:
        """Ask `question [y/n]`; only on yes make the change, showing its lines or its failure."""
        term = self.term
        if not term.confirm(question):
            term.say("Nothing was changed.")
        else:
            try:
                for line in change():
                    term.say(line)
            except (NetworkConfigError, TimeConfigError) as exc:
                term.say(f"[FAILED] {exc}")
        term.pause()
