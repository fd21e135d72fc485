"""Menu 7, View bandwidth schedule; and the header's one-line bandwidth state.

The schedule is set from the service (PutBandwidthRateLimitSchedule), never here: the console
only shows what the daemon enforces, from /v1/schedule and /v1/shaping, so what the operator
reads is what the shaper does. All times are UTC, as the schedule's are.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from appliance.console.context import Context
from appliance.console.ui import fit
from appliance.localclient import ApiError, ApiUnavailable
from gatewaycore.schedule import Schedule, ScheduleError, format_rate

TITLE = "Bandwidth schedule (times in UTC)"
# Lines left for the week preview on a 24-line screen, after the summary and the prompt.
PREVIEW_PAGE = 11


def parse_iso(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return None


def when(text: Any) -> str | None:
    """'Mon 18:00 UTC' for an ISO instant (the schedule repeats weekly: the day is enough)."""
    t = parse_iso(text)
    return f"{t:%a %H:%M} UTC" if t is not None else None


def achieved(shaping: dict[str, Any]) -> float:
    value = shaping.get("achievedBitsPerSec")
    return float(value) if isinstance(value, int | float) else 0.0


def header_line(shaping: dict[str, Any] | None) -> str:
    """'Bandwidth: 100.0 Mbit/s until Mon 18:00 UTC (uploading 12.3 Mbit/s)'."""
    if not isinstance(shaping, dict):
        return "Bandwidth: unknown"
    line = f"Bandwidth: {format_rate(shaping.get('limitBitsPerSec'))}"
    until = when(shaping.get("nextChange"))
    if until:
        line += f" until {until}"
    rate = achieved(shaping)
    if rate > 0:
        line += f" (uploading {format_rate(int(rate))})"
    return line


def _in(delta_seconds: float) -> str:
    minutes = max(0, int(delta_seconds // 60))
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    if days:
        return f"in {days} d {hours} h"
    return f"in {hours} h {mins} min" if hours else f"in {mins} min"


def _next_rate(schedule: dict[str, Any], at: datetime) -> str:
    try:
        return format_rate(Schedule.from_api(schedule.get("intervals") or []).rate_at(at))
    except ScheduleError:
        return "?"


def summary(schedule: dict[str, Any], shaping: dict[str, Any], now: datetime) -> list[str]:
    interval = shaping.get("inForce")
    if interval:
        try:
            in_force = Schedule.from_api([interval]).intervals[0].describe()
        except ScheduleError:
            in_force = "?"
    else:
        in_force = "none (no interval covers this time: no limit)"
    lines = [
        f"Now:             {now:%a %Y-%m-%d %H:%M} UTC",
        f"In force:        {in_force}",
        f"Current limit:   {format_rate(shaping.get('limitBitsPerSec'))}",
    ]
    nxt = parse_iso(shaping.get("nextChange"))
    if nxt is None:
        lines.append("Next change:     none (the same limit all week)")
    else:
        lines.append(f"Next change:     {nxt:%a %H:%M} UTC ({_in((nxt - now).total_seconds())})"
                     f" to {_next_rate(schedule, nxt)}")
    rate = achieved(shaping)
    lines.append(f"Uploading now:   {format_rate(int(rate)) if rate > 0 else 'idle'}")
    count = len(schedule.get("intervals") or [])
    lines.append(f"Intervals:       {count} (set with PutBandwidthRateLimitSchedule)"
                 if count else "Intervals:       none: uploads are not limited")
    return lines


def run(ctx: Context) -> None:
    term = ctx.term
    try:
        schedule = ctx.api.schedule()
        shaping = ctx.api.shaping()
    except (ApiUnavailable, ApiError) as exc:
        term.clear()
        term.say(TITLE)
        term.say("")
        term.error(str(exc))
        term.pause()
        return
    head = [TITLE, "", *summary(schedule, shaping, datetime.now(UTC)), "", "Week preview:"]
    preview = [str(line) for line in schedule.get("preview") or []] or ["Every day   no limit"]
    pages = [preview[i:i + PREVIEW_PAGE] for i in range(0, len(preview), PREVIEW_PAGE)]
    for number, page in enumerate(pages, 1):
        term.clear()
        for line in head:
            term.say(fit(line))
        for line in page:
            term.say(fit(f"  {line}"))
        if number < len(pages):
            term.say(f"  ... ({len(preview) - number * PREVIEW_PAGE} more lines)")
            term.ask("Press Return for more")
        else:
            term.pause()
