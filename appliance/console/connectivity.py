"""Menu 3, Test network connectivity: the daemon's probes of the service plus NTP reachability."""

from __future__ import annotations

from appliance.console.activation import ask_region
from appliance.console.context import Context
from appliance.localclient import ApiError, ApiUnavailable


def run(ctx: Context) -> None:
    term = ctx.term
    term.clear()
    term.say("Test network connectivity")
    term.say("")
    status, _reason = ctx.status()
    region: str | None
    endpoint_type: str | None
    if status and status.get("activated"):
        region, endpoint_type = status.get("region"), None
        term.say(f"Gateway activated in {region}: testing its endpoints.")
    else:
        region = ask_region(ctx, "Region to test")
        choice = term.choose([("1", "Standard endpoint"), ("2", "Dual-stack endpoint")],
                             prompt="Select endpoint type: ")
        endpoint_type = "DUALSTACK" if choice == "2" else "STANDARD"
    term.say("")
    term.say("Testing, each probe has a timeout...")
    failures = 0
    try:
        results = ctx.api.connectivity_test(region, endpoint_type).get("results", [])
        for item in results:
            if item.get("probed") is False:  # e.g. an AWS endpoint replaced by our control plane
                term.say(f"[SKIPPED] {item.get('name')}: {item.get('detail') or ''}")
                continue
            passed = bool(item.get("passed"))
            failures += not passed
            detail = item.get("detail") or ""
            mark = "[PASSED]" if passed else "[FAILED]"
            line = f"{mark} {item.get('name')}: {item.get('target')}"
            term.say(line if passed else f"{line} - {detail}")
    except ApiError as exc:
        failures += 1
        term.say(f"[FAILED] service endpoints: {exc.message}"
                 + (f" (field {exc.field})" if exc.field else ""))
    except ApiUnavailable as exc:
        failures += 1
        term.say(f"[FAILED] service endpoints: {exc}")
    servers = ctx.time.servers()
    if not servers:
        term.say("[FAILED] NTP: no NTP servers configured (menu 5)")
        failures += 1
    for probe in (ctx.time.probe(s) for s in servers):
        if probe.ok:
            term.say(f"[PASSED] NTP {probe.server}: offset {probe.offset:+.3f} s")
        else:
            failures += 1
            term.say(f"[FAILED] NTP {probe.server}: {probe.error}")
    term.say("")
    term.say("All tests passed." if not failures else f"{failures} test(s) failed.")
    term.pause()
