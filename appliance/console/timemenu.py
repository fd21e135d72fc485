"""Menu 5, System time management: UTC time, offsets to the NTP servers, sync, edit servers.

The bandwidth schedule is in UTC: a clock off by 5 minutes or more is flagged.
"""

from __future__ import annotations

from datetime import UTC, datetime

from appliance.console.context import Context
from appliance.system.timesync import DRIFT_WARNING_SECONDS, parse_server

MENU = [
    ("1", "View and synchronize system time"),
    ("2", "Edit NTP configuration"),
    ("3", "View NTP configuration"),
]


def run(ctx: Context) -> None:
    actions = {"1": view_time, "2": edit_servers, "3": view_servers}
    ctx.submenu("System time management", MENU, actions)


def view_time(ctx: Context) -> None:
    term = ctx.term
    term.clear()
    term.say(f"System time (UTC): {datetime.now(UTC):%Y-%m-%d %H:%M:%S}")
    servers = ctx.time.servers()
    if not servers:
        term.say("No NTP servers configured: use option 2.")
        term.pause()
        return
    worst = 0.0
    for probe in (ctx.time.probe(s) for s in servers):
        if probe.ok:
            assert probe.offset is not None
            worst = max(worst, abs(probe.offset))
            term.say(f"NTP {probe.server}: offset {probe.offset:+.3f} s")
        else:
            term.say(f"NTP {probe.server}: not reachable ({probe.error})")
    if worst >= DRIFT_WARNING_SECONDS:
        term.say(f"[WARNING] The clock is off by {worst:.0f} s (5 minutes or more): the "
                 "bandwidth schedule runs on UTC and will apply at the wrong times.")
    if term.confirm("Synchronize the time now"):
        for line in ctx.time.synchronise():
            term.say(line)
        # Whether or not the clock moved: a resync that finds nothing changed costs nothing.
        term.say(ctx.clock_stepped())
    term.pause()


def view_servers(ctx: Context) -> None:
    term = ctx.term
    term.clear()
    servers = ctx.time.servers()
    term.say(f"NTP configuration ({ctx.time.dropin}):")
    term.say(f"  Preferred: {servers[0] if servers else 'not set'}")
    term.say(f"  Secondary: {servers[1] if len(servers) > 1 else 'not set'}")
    term.pause()


def edit_servers(ctx: Context) -> None:
    term = ctx.term
    term.clear()
    reason = ctx.time.refusal()
    if reason:
        term.say(reason)
        term.pause()
        return
    preferred = term.ask_valid("Preferred NTP server: ", parse_server)
    assert preferred is not None
    secondary = term.ask_valid("Secondary NTP server (Return for none): ", parse_server,
                               allow_empty=True)
    servers = [preferred] + ([secondary] if secondary else [])
    term.say("NTP servers: " + ", ".join(servers))
    ctx.apply("Apply config", lambda: ctx.time.save_servers(servers))
