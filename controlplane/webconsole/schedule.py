"""A gateway's bandwidth rate-limit schedule: the week view, the limit now and the next
change, and adding, editing and removing intervals.

Each change sends the whole edited list with PutBandwidthRateLimitSchedule, so every rule
(20 intervals, inclusive end minute, no overlap, 51,200 bit/s to 8,000,000 Mbit/s) is the
API's own (gatewaycore.schedule) and its message is shown as the API words it: beside the
field it names when it is about the interval being edited, above the form otherwise. A value
that is not a number is passed on as typed, so the API's message says so too.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from controlplane.errors import ApiError
from controlplane.webconsole.auth import Session
from controlplane.webconsole.console import (
    PREFIX,
    PageSet,
    field,
    form_error,
    form_text,
    hidden,
    place_error,
    quoted,
)
from controlplane.webconsole.gateways import gateway_url, region_of
from controlplane.webconsole.html import Markup, join, render
from gatewaycore import schedule as sched
from gatewaycore.schedule import DAY_NAMES, Schedule, ScheduleError, format_rate

FIELDS = [sched.F_DAYS, sched.F_START_HOUR, sched.F_START_MINUTE, sched.F_END_HOUR,
          sched.F_END_MINUTE, sched.F_RATE]
FULL_DAYS = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")


def schedule_url(arn: str, **extra: str) -> str:
    more = "".join(f"&{k}={quoted(v)}" for k, v in extra.items())
    return f"{PREFIX}/gateway/schedule?arn={quoted(arn)}{more}"


def _number(text: str) -> int | str:
    """An integer when the text is one (commas and spaces allowed), else the text itself."""
    cleaned = text.replace(",", "").replace(" ", "").replace("_", "")
    return int(cleaned) if cleaned.isascii() and cleaned.isdigit() else text


def interval_from_form(form: Any) -> dict[str, Any]:
    """The API's interval from the form's fields (named as the API's members)."""
    days: list[Any] = [_number(d) for d in form.getall(sched.F_DAYS, [])
                       if isinstance(d, str)]
    out: dict[str, Any] = {}
    rate = form_text(form, sched.F_RATE)
    if rate:
        out[sched.F_RATE] = _number(rate)
    for name in (sched.F_START_HOUR, sched.F_START_MINUTE, sched.F_END_HOUR,
                 sched.F_END_MINUTE):
        out[name] = _number(form_text(form, name))
    out[sched.F_DAYS] = days
    return out


def short_rate(rate_bps: int | None) -> str:
    """A rate small enough for a cell of the week ("100M" for 100 Mbit/s); the cell's title
    and the interval list give it in full."""
    if rate_bps is None:
        return "none"
    for unit, scale in (("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if rate_bps >= scale:
            return f"{rate_bps / scale:.3g}{unit}"
    return str(rate_bps)


def week_table(schedule: Schedule) -> Markup:
    """7 days x 24 hours (UTC); an hour holding any limited minute shows its limit."""
    head = join(render('<th scope="col"><span class="hh">{}</span></th>', f"{h:02d}")
                for h in range(24))
    rows = []
    for day in range(7):
        cells = []
        for hour in range(24):
            start = hour * 60
            found = [iv for iv in schedule.intervals
                     if day in iv.days and iv.start_of_day <= start + 59
                     and iv.end_of_day >= start]
            if found:
                label = "; ".join(f"{iv.describe()}" for iv in found)
                short = short_rate(found[0].rate_bps)
                cells.append(render('<td class="lim" title="{}"><span class="sr-only">{} '
                                    "{}:00: </span>{}</td>", label, FULL_DAYS[day], f"{hour:02d}",
                                    short))
            else:
                cells.append(Markup('<td class="free"></td>'))
        rows.append(render('<tr><th scope="row">{}</th>{}</tr>', DAY_NAMES[day], join(cells)))
    return render(
        '<div class="table-wrap"><table class="week" id="week"><caption>The week in UTC '
        '<span class="local-offset" data-local-offset></span></caption><thead><tr>'
        '<th scope="col">Day</th>{}</tr></thead><tbody>{}</tbody></table></div>', head,
        join(rows))


class Pages(PageSet):
    """The schedule page of a gateway."""

    ROUTES = (
        ("GET", "/gateway/schedule", "page"),
        ("POST", "/gateway/schedule/save", "save"),
        ("POST", "/gateway/schedule/remove", "remove"),
    )

    async def _load(self, session: Session, arn: str) -> tuple[str, list[dict[str, Any]]]:
        region = region_of(arn, session.region)
        gw = (await self.console.call(session, "GetGateway", {"GatewayArn": arn},
                                      region=region))["Gateway"]
        out = await self.console.call(session, "GetBandwidthRateLimitSchedule",
                                      {"GatewayArn": arn}, region=region)
        return str(gw["GatewayDisplayName"]), list(out.get("BandwidthRateLimitIntervals") or [])

    async def page(self, request: web.Request, session: Session,
                   errors: dict[str, str] | None = None, values: dict[str, Any] | None = None,
                   edit: str | None = None, arn: str | None = None, status: int = 200
                   ) -> web.StreamResponse:
        arn = arn or request.query.get("arn", "")
        edit = edit if edit is not None else request.query.get("edit", "")
        try:
            name, items = await self._load(session, arn)
        except ApiError as err:
            return self.console.page(request, session, "Bandwidth schedule", render(
                '<p class="error" role="alert">{}</p>', err.message), status=404)
        schedule = Schedule.from_api(items)
        now = datetime.now(UTC)
        nxt = schedule.next_change(now)
        after = (format_rate(schedule.rate_at(nxt)) if nxt else "")
        status_line = render(
            '<dl class="details" id="now"><dt>Limit now</dt><dd id="limit-now">{}</dd>'
            "<dt>Next change</dt><dd id=\"next-change\">{}</dd></dl>",
            format_rate(schedule.rate_at(now)),
            render('<time datetime="{}">{}</time> to {}', sched.iso_utc(nxt),
                   nxt.strftime("%a %H:%M UTC"), after) if nxt else "none (the limit "
                   "never changes)")
        csrf = self.console.csrf_field(session)
        rows = []
        for i, iv in enumerate(schedule.intervals):
            rows.append(render(
                '<tr><td>{}</td><td data-utc-days="{}" data-utc-start="{}" data-utc-end="{}">'
                "{}-{} UTC</td><td>{}</td>"
                '<td><a href="{}">Edit<span class="sr-only"> interval {}</span></a> '
                '<form method="post" action="/console/gateway/schedule/remove" '
                'class="inline-button">{}{}{}<button type="submit" class="secondary" '
                'aria-label="Remove interval {}">Remove</button></form></td></tr>',
                ", ".join(DAY_NAMES[d] for d in sorted(iv.days)),
                ",".join(str(d) for d in sorted(iv.days)), iv.start_of_day, iv.end_of_day,
                f"{iv.start_hour:02d}:{iv.start_minute:02d}",
                f"{iv.end_hour:02d}:{iv.end_minute:02d}", format_rate(iv.rate_bps),
                schedule_url(arn, edit=str(i)), i + 1, csrf, hidden("arn", arn),
                hidden("index", str(i)), i + 1))
        listing = (render(
            '<div class="table-wrap"><table id="intervals"><caption>Intervals</caption><thead>'
            '<tr><th scope="col">Days</th><th scope="col">Time (end minute included)</th>'
            '<th scope="col">Limit</th><th scope="col">Actions</th></tr></thead><tbody>{}'
            "</tbody></table></div>", join(rows)) if rows else
            Markup('<p id="intervals">No intervals: the gateway uploads without a limit.</p>'))
        body = join([status_line, week_table(schedule), listing,
                     self._form(session, arn, schedule, errors or {}, values, edit)])
        return self.console.page(request, session, f"Bandwidth schedule of {name}", body,
                                 status=status,
                                 crumbs=[("Gateways", f"{PREFIX}/gateways"),
                                         (name, gateway_url(arn))])

    def _form(self, session: Session, arn: str, schedule: Schedule, errors: dict[str, str],
              values: dict[str, Any] | None, edit: str) -> Markup:
        index = int(edit) if edit.isdigit() and int(edit) < len(schedule.intervals) else None
        if values is None:
            if index is not None:
                values = schedule.intervals[index].to_api()
            else:
                values = {sched.F_DAYS: [], sched.F_START_HOUR: "", sched.F_START_MINUTE: 0,
                          sched.F_END_HOUR: "", sched.F_END_MINUTE: 59}
        chosen = {str(d) for d in values.get(sched.F_DAYS, [])}
        day_error = errors.get(sched.F_DAYS)
        boxes = join(
            render('<label class="day"><input type="checkbox" name="{}" value="{}"{}> {}'
                   "</label>", sched.F_DAYS, d, Markup(" checked") if str(d) in chosen else "",
                   DAY_NAMES[d])
            for d in range(7))
        days = render(
            '<fieldset class="field{}" id="f-{}"{}><legend>Days (UTC)</legend>{}{}</fieldset>',
            " has-error" if day_error else "", sched.F_DAYS,
            Markup(' aria-describedby="f-DaysOfWeek-err"') if day_error else "", boxes,
            render('<p class="error" id="f-DaysOfWeek-err">{}</p>', day_error)
            if day_error else "")

        def num(name: str, label: str, hint: str | None = None) -> Markup:
            return field(name, label, values.get(name, ""), errors, inputmode="numeric",
                         hint=hint)

        title = f"Edit interval {index + 1}" if index is not None else "Add an interval"
        return join([
            render('<form method="post" action="/console/gateway/schedule/save" class="card" '
                   'id="interval-form"><h2>{}</h2>', title),
            self.console.csrf_field(session), hidden("arn", arn),
            hidden("index", "" if index is None else str(index)), form_error(errors), days,
            Markup('<div class="row">'),
            num(sched.F_START_HOUR, "Start hour (0-23)"),
            num(sched.F_START_MINUTE, "Start minute (0-59)"),
            num(sched.F_END_HOUR, "End hour (0-23)"),
            num(sched.F_END_MINUTE, "End minute (0-59, included)"),
            Markup("</div>"),
            field(sched.F_RATE, "Upload limit (bit/s)", values.get(sched.F_RATE, ""), errors,
                  inputmode="numeric",
                  hint="51,200 to 8,000,000,000,000 bit/s (8,000,000 Mbit/s); e.g. 100000000 "
                       "for 100 Mbit/s. Empty: no limit in this interval."),
            render('<button type="submit">{}</button>',
                   "Save interval" if index is not None else "Add interval"),
            render(' <a href="{}">Cancel</a>', schedule_url(arn)) if index is not None else "",
            Markup("</form>"),
        ])

    async def _put(self, session: Session, arn: str, items: list[dict[str, Any]]) -> None:
        await self.console.call(session, "PutBandwidthRateLimitSchedule",
                                {"GatewayArn": arn, "BandwidthRateLimitIntervals": items},
                                region=region_of(arn, session.region))

    async def save(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        arn = form_text(form, "arn")
        index_text = form_text(form, "index")
        interval = interval_from_form(form)
        try:
            _, items = await self._load(session, arn)
        except ApiError as err:
            session.flash.append(err.message)
            raise web.HTTPSeeOther(f"{PREFIX}/gateways") from None
        if index_text.isdigit() and int(index_text) < len(items):
            index = int(index_text)
            items[index] = interval
        else:
            index = len(items)
            items.append(interval)
        try:
            await self._put(session, arn, items)
        except ApiError as err:
            errors = self._errors(err, index)
            values = {k: form_text(form, k) for k in FIELDS if k != sched.F_DAYS}
            values[sched.F_DAYS] = form.getall(sched.F_DAYS, [])
            return await self.page(request, session, errors=errors, values=values,
                                   edit=index_text, arn=arn, status=400)
        session.flash.append("The schedule was saved." if index_text else
                             "The interval was added.")
        raise web.HTTPSeeOther(schedule_url(arn))

    @staticmethod
    def _errors(err: ApiError, index: int) -> dict[str, str]:
        """Beside a field when the message is about this interval's field, else on top."""
        placed = place_error(err, FIELDS)
        named = f"{sched.LIST_NAME}[{index}]"
        if "" not in placed and named not in err.message and sched.LIST_NAME in err.message:
            return {"": err.message}
        return placed

    async def remove(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        arn = form_text(form, "arn")
        index_text = form_text(form, "index")
        try:
            _, items = await self._load(session, arn)
            if index_text.isdigit() and int(index_text) < len(items):
                del items[int(index_text)]
                await self._put(session, arn, items)
                session.flash.append(f"Interval {int(index_text) + 1} was removed.")
        except (ApiError, ScheduleError) as err:
            session.flash.append(str(getattr(err, "message", err)))
        raise web.HTTPSeeOther(schedule_url(arn))
