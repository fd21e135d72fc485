"""Time synchronisation: NTP servers in a systemd-timesyncd drop-in, offsets measured with ntplib.

The bandwidth schedule runs on UTC, so a clock that is minutes off shifts every limit; the
console measures the offset against the configured servers itself (ntplib, with a timeout)
rather than trusting timesyncd's status, which says nothing when the servers are unreachable.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import ntplib

from appliance.system.networkd import writable_refusal
from gatewaycore import rules
from gatewaycore.atomicfile import write_atomic

log = logging.getLogger(__name__)

DEFAULT_DROPIN = "/etc/systemd/timesyncd.conf.d/appliance.conf"
DRIFT_WARNING_SECONDS = 300.0  # Storage Gateway flags a clock off by 5 minutes or more


class TimeConfigError(Exception):
    """A time configuration change was refused or failed; the message is for the user."""


@dataclass
class Probe:
    """One NTP server's answer (or why there was none)."""

    server: str
    offset: float | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.offset is not None


def parse_server(text: str) -> str:
    """An NTP server: a hostname or an IP address."""
    text = text.strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    try:
        return rules.server_name(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a hostname or an IP address") from None


class TimeSync:
    """The NTP servers the appliance uses and the clock's measured offset."""

    def __init__(
        self,
        dropin: str | os.PathLike[str] = DEFAULT_DROPIN,
        port: int = 123,
        timeout: float = 3.0,
        apply: bool = True,
    ) -> None:
        self.dropin = Path(dropin)
        self.port = port
        self.timeout = timeout
        self.apply = apply

    def servers(self) -> list[str]:
        """The servers from our drop-in (empty when none are configured there)."""
        try:
            text = self.dropin.read_text()
        except OSError:
            return []
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and key.strip() == "NTP":
                return value.split()
        return []

    def probe(self, server: str) -> Probe:
        try:
            answer = ntplib.NTPClient().request(
                server, version=3, port=self.port, timeout=self.timeout
            )
        except ntplib.NTPException as exc:
            return Probe(server, None, f"no answer within {self.timeout:g} s ({exc})")
        except OSError as exc:  # DNS failure, unreachable network
            return Probe(server, None, exc.strerror or str(exc))
        log.info("event=ntp_probe server=%s offset=%.3f", server, answer.offset)
        return Probe(server, answer.offset)

    def probe_all(self) -> list[Probe]:
        return [self.probe(server) for server in self.servers()]

    def refusal(self) -> str | None:
        if self.apply and os.geteuid() != 0:
            return f"Changing time settings needs root (this console runs as uid {os.geteuid()})."
        return writable_refusal(self.dropin.parent)

    def save_servers(self, servers: list[str]) -> list[str]:
        reason = self.refusal()
        if reason:
            raise TimeConfigError(reason)
        text = (
            "# Written by the appliance console (System time management).\n"
            "[Time]\n"
            f"NTP={' '.join(servers)}\n"
        )
        try:
            self.dropin.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.dropin, text.encode(), mode=0o644)
        except OSError as exc:
            raise TimeConfigError(f"cannot write {self.dropin}: {exc.strerror}") from None
        log.info("event=ntp_servers_set servers=%s", ",".join(servers))
        return [f"Saved {self.dropin}", *self._restart_timesyncd()]

    def synchronise(self) -> list[str]:
        """Step the clock to the first server that answers, then let timesyncd take over."""
        probes = self.probe_all()
        if not probes:
            return ["No NTP servers are configured: edit the NTP configuration first."]
        good = next((p for p in probes if p.ok), None)
        if good is None:
            return [f"No NTP server answered: {probes[0].server}: {probes[0].error}"]
        assert good.offset is not None
        if not self.apply:
            return [f"Offset to {good.server} is {good.offset:+.3f} s; clock not stepped "
                    "(--no-apply)."]
        if os.geteuid() != 0:
            return [f"Offset to {good.server} is {good.offset:+.3f} s; stepping the clock "
                    "needs root."]
        try:
            time.clock_settime(time.CLOCK_REALTIME, time.time() + good.offset)
        except OSError as exc:
            return [f"Cannot set the clock: {exc.strerror}"]
        log.info("event=clock_stepped server=%s offset=%.3f", good.server, good.offset)
        return [f"Clock stepped by {good.offset:+.3f} s from {good.server}.",
                *self._restart_timesyncd()]

    def _restart_timesyncd(self) -> list[str]:
        if not self.apply:
            return ["Not applied now (--no-apply)."]
        systemctl = shutil.which("systemctl", path="/usr/sbin:/usr/bin:/sbin:/bin")
        if systemctl is None:
            return ["systemctl is not installed: the change takes effect at the next boot."]
        done = subprocess.run(
            [systemctl, "try-restart", "systemd-timesyncd.service"],
            capture_output=True, text=True, timeout=30,
        )
        if done.returncode != 0:
            return [f"Restarting systemd-timesyncd failed: {done.stderr.strip()}"]
        return ["systemd-timesyncd restarted."]
