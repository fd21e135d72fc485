"""Menu 8, Test hypervisor connection; and the header's one-line hypervisor state.

The hypervisor is chosen and its credentials set from the service (ImportHypervisorConfiguration,
AssociateGatewayToServer), never here: the console shows what the daemon holds (never the
password) and asks the daemon to test it, so the operator checks the very connection the
gateway's syncs use, from the gateway's own network.
"""

from __future__ import annotations

from typing import Any

from appliance.console.bandwidth import parse_iso
from appliance.console.context import Context
from appliance.console.ui import fit
from appliance.localclient import ApiError, ApiUnavailable

TITLE = "Test hypervisor connection"


def _at(text: Any) -> str:
    t = parse_iso(text)
    return f"{t:%Y-%m-%d %H:%M} UTC" if t is not None else "unknown time"


def _verdict(what: str, outcome: Any) -> str | None:
    """'sync OK' / 'test FAILED (AuthenticationFailed)', or None if never done (short: the
    line must hold a libvirt URI too within 79 columns)."""
    if not isinstance(outcome, dict):
        return None
    if outcome.get("ok"):
        return f"{what} OK"
    return f"{what} FAILED ({outcome.get('errorCode') or 'error'})"


def header_line(hypervisor: Any) -> str:
    """'Hypervisor: 10.0.0.5 - sync OK (12 VMs), test OK'."""
    if not isinstance(hypervisor, dict):
        return "Hypervisor: none associated"
    parts = [v for v in (_verdict("sync", hypervisor.get("lastSync")),
                         _verdict("test", hypervisor.get("lastTest"))) if v]
    if parts and parts[0].startswith("sync OK") and isinstance(
            hypervisor.get("vmCount"), int):
        parts[0] += f" ({hypervisor['vmCount']} VMs)"
    if hypervisor.get("syncing"):
        parts.insert(0, "syncing")
    if hypervisor.get("passwordPending"):
        parts.insert(0, "password pending")
    return fit(f"Hypervisor: {hypervisor.get('host')} - {', '.join(parts) or 'not yet synced'}")


def _describe(ctx: Context, hypervisor: dict[str, Any]) -> None:
    term = ctx.term
    term.say(fit(f"Hypervisor:  {hypervisor.get('hypervisorArn')}"))
    term.say(fit(f"Host:        {hypervisor.get('host')}"))
    term.say(fit(f"Username:    {hypervisor.get('username') or '(none)'}"))
    last = hypervisor.get("lastSync")
    if isinstance(last, dict):
        count = hypervisor.get("vmCount")
        found = f", {count} VMs" if isinstance(count, int) else ""
        state = "passed" if last.get("ok") else f"FAILED ({last.get('errorCode')})"
        term.say(fit(f"Last sync:   {state} at {_at(last.get('at'))}{found}"))
    else:
        term.say("Last sync:   not yet")


def run(ctx: Context) -> None:
    term = ctx.term
    term.clear()
    term.say(TITLE)
    term.say("")
    status, reason = ctx.status()
    if status is None:
        term.say(f"[FAILED] The gateway daemon is not reachable ({reason}).")
        term.pause()
        return
    hypervisor = status.get("hypervisor")
    if not isinstance(hypervisor, dict):
        term.say("No hypervisor is associated with this gateway.")
        term.say("Associate one from the service (AssociateGatewayToServer), then test it here.")
        term.pause()
        return
    _describe(ctx, hypervisor)
    term.say("")
    term.say(f"Testing {hypervisor.get('host')} (up to 20 s per step)...")
    try:
        result = ctx.api.test_hypervisor()
    except ApiError as exc:
        term.say(fit(f"[FAILED] {exc.code}: {exc.message}"))
    except ApiUnavailable as exc:
        term.say(fit(f"[FAILED] {exc}"))
    else:
        if result.get("ok"):
            term.say(fit(f"[PASSED] Connected to {result.get('host')} and logged in."))
        else:
            term.say(fit(f"[FAILED] {result.get('errorCode')}: {result.get('message')}"))
    term.pause()
