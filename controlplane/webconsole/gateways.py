"""The gateway pages: the list, creating one (the console method and a manual key), and a
gateway's page with rename, tags, its hypervisor and delete.

The console method, as the AWS Backup console does it: the operator gives the gateway's IPv4
address; the browser is sent to the gateway's port 80 (`GET /?activationRegion=R&
gatewayType=BACKUP_VM`); the gateway asks this control plane for a key and answers with a 302
to `CONSOLE_URL/backup/home?...&activationKey=KEY&activationRegion=R#/gateways/create`: the
AWS console's URL format on this console's address (the control plane tells the gateway that
address with the key, docs/webconsole.md). That landing page (`/console/backup/home`) is the
create form with the key filled in; CreateGateway runs when the operator submits it.
"""

from __future__ import annotations

import ipaddress
import re
import time
from typing import Any
from urllib.parse import urlencode

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
    model_hint,
    place_error,
    quoted,
    when,
)
from controlplane.webconsole.html import Markup, join, render
from gatewaycore import regions

ONLINE_SECONDS = 300  # seen within this long: "Online" (a polling gateway is seen each ~25 s)
DELETE_WARNING = ("You cannot reactivate a deleted gateway. If you want to connect to the "
                  "hypervisor again, create a new gateway (deploy a new appliance).")
_ARN_REGION = re.compile(r"arn:[^:]+:backup-gateway:([a-z0-9-]+):")


def region_of(arn: str, default: str) -> str:
    match = _ARN_REGION.match(arn)
    return match.group(1) if match else default


def gateway_url(arn: str) -> str:
    return f"{PREFIX}/gateway?arn={quoted(arn)}"


def status_of(last_seen: float | None, now: float) -> str:
    if last_seen is None:
        return "Never connected"
    return "Online" if now - last_seen <= ONLINE_SECONDS else "Offline"


def gateway_address(text: str) -> tuple[str, int]:
    """`A.B.C.D` or `A.B.C.D:PORT` (a port only for a forwarded port 80); ValueError with the
    message to show beside the field."""
    host, sep, port = text.strip().partition(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if ":" in text.strip("[] ") and text.count(":") > 1:
            raise ValueError(
                "the console method works for IPv4 gateways only; for an IPv6 gateway, get "
                "the key with curl (see below) and use \"Create with an activation key\""
            ) from None
        raise ValueError(f"'{text.strip()}' is not an IPv4 address (e.g. 192.0.2.10)") from None
    if ip.version != 4:
        raise ValueError("the console method works for IPv4 gateways only")
    if sep:
        if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"port '{port}' is not a number from 1 to 65535")
        return str(ip), int(port)
    return str(ip), 80


class Pages(PageSet):
    """The gateway pages of one console."""

    ROUTES = (
        ("GET", "/gateways", "list_page"),
        ("GET", "/gateways/create", "create_page"),
        ("GET", "/gateways/connect", "connect"),
        ("POST", "/gateways/create", "create"),
        ("GET", "/backup/home", "landing"),
        ("GET", "/gateway", "detail"),
        ("POST", "/gateway/rename", "rename"),
        ("GET", "/gateway/delete", "delete_page"),
        ("POST", "/gateway/delete", "delete"),
        ("POST", "/gateway/tags/add", "tag_add"),
        ("POST", "/gateway/tags/remove", "tag_remove"),
        ("POST", "/gateway/hypervisor", "connect_hypervisor"),
        ("POST", "/gateway/hypervisor/disconnect", "disconnect"),
    )

    # -- list ----------------------------------------------------------------------------

    async def list_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        body: dict[str, Any] = {"MaxResults": 100}
        token = request.query.get("next")
        if token:
            body["NextToken"] = token
        try:
            listed = await self.console.call(session, "ListGateways", body)
        except ApiError as err:
            return self.console.page(request, session, "Gateways", render(
                '<p class="error" role="alert">{}</p>', err.message), status=400)
        now = time.time()
        rows = []
        for summary in listed["Gateways"]:
            arn = summary["GatewayArn"]
            details = (await self.console.call(session, "GetGateway",
                                               {"GatewayArn": arn}))["Gateway"]
            last_seen = details.get("LastSeenTime")
            rows.append(render(
                '<tr><td><a href="{}">{}</a></td><td class="arn">{}</td><td>{}</td>'
                "<td>{}</td><td>{}</td><td>{}</td></tr>",
                gateway_url(arn), details["GatewayDisplayName"], arn,
                details.get("HypervisorId") or "none", when(last_seen),
                details.get("SoftwareVersion") or "-", status_of(last_seen, now)))
        table = Markup('<p class="empty">No gateways in this region yet.</p>')
        if rows:
            table = render(
                '<div class="table-wrap"><table><caption>Gateways in {}</caption><thead><tr>'
                '<th scope="col">Name</th><th scope="col">ARN</th>'
                '<th scope="col">Hypervisor</th><th scope="col">Last seen</th>'
                '<th scope="col">Software version</th><th scope="col">Status</th>'
                "</tr></thead><tbody>{}</tbody></table></div>", session.region, join(rows))
        more = Markup("")
        if listed.get("NextToken"):
            more = render('<p><a href="{}/gateways?{}">Next page</a></p>', PREFIX,
                          urlencode({"next": listed["NextToken"]}))
        actions = Markup('<p class="actions"><a class="button" href="/console/gateways/create">'
                         "Create gateway</a></p>")
        return self.console.page(request, session, "Gateways", actions + table + more)

    # -- create --------------------------------------------------------------------------

    def _create_body(self, session: Session, ip: str = "", ip_errors: dict[str, str] | None
                     = None, key: str = "", name: str = "", region: str = "",
                     errors: dict[str, str] | None = None, landed: bool = False) -> Markup:
        region = region or session.region
        manual = join([
            render('<form method="post" action="/console/gateways/create" class="card" '
                   'id="create-form"><h2>{}</h2>',
                   "Finish creating the gateway" if landed else "Create with an activation key"),
            Markup("" if landed else
                   "<p>The seed's manual method (and the way for IPv6 gateways): get a key "
                   "from the gateway yourself, e.g. <code>curl \"http://[IPV6]/?"
                   "activationRegion=REGION&amp;gatewayType=BACKUP_VM&amp;endpointType="
                   "DUALSTACK&amp;ipVersion=ipv6&amp;no_redirect\"</code>, and paste it here. "
                   "A key is valid for 30 minutes and used once.</p>"),
            self.console.csrf_field(session), hidden("region", region), form_error(errors or {}),
            field("ActivationKey", "Activation key", key, errors, required=True,
                  autocomplete="off", spellcheck="false"),
            field("GatewayDisplayName", "Gateway name", name, errors, required=True,
                  autofocus=landed,
                  hint=model_hint("CreateGatewayInput", "GatewayDisplayName")),
            render("<p>Region: <strong>{}</strong></p>", region),
            Markup('<button type="submit">Create gateway</button></form>'),
        ])
        if landed:
            return manual
        console_method = join([
            Markup('<form method="get" action="/console/gateways/connect" class="card">'
                   "<h2>Connect to the gateway (console method, IPv4)</h2>"
                   "<p>Your browser goes to the gateway's port 80 and comes back here with "
                   "its activation key; this browser must be able to reach the gateway.</p>"),
            form_error(ip_errors or {}),
            field("ip", "Gateway IP address", ip, ip_errors, required=True,
                  inputmode="decimal", autocomplete="off",
                  hint="The IPv4 address of the appliance (its local console shows it). "
                       "Add :PORT only if its port 80 is forwarded from another port."),
            render("<p>Region: <strong>{}</strong> (switch it at the top of the page)</p>",
                   session.region),
            Markup('<button type="submit">Connect to gateway</button></form>'),
        ])
        return console_method + manual

    async def create_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        return self.console.page(request, session, "Create gateway", self._create_body(session),
                                 crumbs=[("Gateways", f"{PREFIX}/gateways")])

    async def connect(self, request: web.Request, session: Session) -> web.StreamResponse:
        """Send the browser to the gateway's port 80 (a page with a refresh and a link, as a
        form's redirect to another origin would be refused by `form-action 'self'`)."""
        text = request.query.get("ip", "")
        try:
            host, port = gateway_address(text)
        except ValueError as exc:
            return self.console.page(
                request, session, "Create gateway",
                self._create_body(session, ip=text, ip_errors={"ip": str(exc)}), status=400,
                crumbs=[("Gateways", f"{PREFIX}/gateways")])
        query = urlencode({"activationRegion": session.region, "gatewayType": "BACKUP_VM"})
        target = f"http://{host}{'' if port == 80 else f':{port}'}/?{query}"
        body = render(
            '<meta http-equiv="refresh" content="0; url={}">'
            "<p>Getting the activation key from the gateway at {}…</p>"
            '<p>If nothing happens, <a href="{}" id="go">continue to the gateway</a>. If the '
            "gateway cannot be reached from this browser, use the manual method.</p>",
            target, host, target)
        return self.console.page(request, session, "Connecting to the gateway", body)

    async def landing(self, request: web.Request, session: Session) -> web.StreamResponse:
        """Where the gateway's 302 lands (the AWS console's path and query on this console)."""
        key = request.query.get("activationKey", "")
        region = request.query.get("activationRegion") or request.query.get("region") or ""
        if regions.get(region) is None:
            region = session.region
        body = Markup("")
        if key:
            body = Markup('<p class="flash" role="status">The gateway answered with its '
                          "activation key. Name the gateway and create it.</p>")
        body += self._create_body(session, key=key, region=region, landed=bool(key))
        return self.console.page(request, session, "Create gateway", body,
                                 crumbs=[("Gateways", f"{PREFIX}/gateways")])

    async def create(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        key = form_text(form, "ActivationKey")
        name = form_text(form, "GatewayDisplayName")
        region = form_text(form, "region")
        if regions.get(region) is None:
            region = session.region
        try:
            out = await self.console.call(
                session, "CreateGateway",
                {"ActivationKey": key, "GatewayDisplayName": name, "GatewayType": "BACKUP_VM"},
                region=region)
        except ApiError as err:
            errors = place_error(err, ["ActivationKey", "GatewayDisplayName"])
            if "activation key" in err.message.lower() and "" in errors:
                errors = {"ActivationKey": err.message}
            return self.console.page(
                request, session, "Create gateway",
                self._create_body(session, key=key, name=name, region=region, errors=errors,
                                  landed=True), status=400,
                crumbs=[("Gateways", f"{PREFIX}/gateways")])
        session.region = region
        session.flash.append(f"Gateway {name} was created.")
        raise web.HTTPSeeOther(gateway_url(out["GatewayArn"]))

    # -- one gateway ---------------------------------------------------------------------

    async def _gateway(self, session: Session, arn: str) -> dict[str, Any]:
        out = await self.console.call(session, "GetGateway", {"GatewayArn": arn},
                                      region=region_of(arn, session.region))
        return dict(out["Gateway"])

    async def detail(self, request: web.Request, session: Session,
                     errors: dict[str, dict[str, str]] | None = None,
                     values: dict[str, str] | None = None, status: int = 200
                     ) -> web.StreamResponse:
        """The gateway's page; `errors` by section (rename, hypervisor, tags) and field."""
        arn = request.query.get("arn", "") or (values or {}).get("arn", "")
        region = region_of(arn, session.region)
        try:
            gw = await self._gateway(session, arn)
            tags = (await self.console.call(session, "ListTagsForResource",
                                            {"ResourceArn": arn}, region=region))["Tags"]
            hypervisors = (await self.console.call(session, "ListHypervisors",
                                                   {"MaxResults": 1000}, region=region)
                           )["Hypervisors"]
        except ApiError as err:
            return self.console.page(request, session, "Gateway", render(
                '<p class="error" role="alert">{}</p>', err.message), status=404,
                crumbs=[("Gateways", f"{PREFIX}/gateways")])
        errors = errors or {}
        values = values or {}
        csrf = self.console.csrf_field(session)
        last_seen = gw.get("LastSeenTime")
        summary = render(
            '<dl class="details"><dt>Name</dt><dd id="gw-name">{}</dd><dt>ARN</dt>'
            '<dd class="arn">{}</dd><dt>Status</dt><dd>{}</dd><dt>Last seen</dt><dd>{}</dd>'
            "<dt>Software version</dt><dd>{}</dd><dt>Software update</dt><dd>{}</dd>"
            "<dt>Bandwidth schedule</dt>"
            '<dd><a href="{}/gateway/schedule?arn={}">View and edit the schedule</a></dd></dl>',
            gw["GatewayDisplayName"], arn, status_of(last_seen, time.time()), when(last_seen),
            gw.get("SoftwareVersion") or "-",
            # docs/updates.md: the next window, or the publication when there is none
            render("a newer version installs from {}", when(gw["NextUpdateAvailabilityTime"]))
            if gw.get("NextUpdateAvailabilityTime") else "up to date",
            PREFIX, quoted(arn))
        rename = join([
            Markup('<form method="post" action="/console/gateway/rename" class="card" '
                   'id="rename-form"><h2>Edit name</h2>'), csrf, hidden("arn", arn),
            form_error(errors.get("rename", {})),
            field("GatewayDisplayName", "Gateway name",
                  values.get("GatewayDisplayName", gw["GatewayDisplayName"]),
                  errors.get("rename"), required=True,
                  hint=model_hint("UpdateGatewayInformationInput", "GatewayDisplayName")),
            Markup('<button type="submit">Save name</button></form>'),
        ])
        current = gw.get("HypervisorId")
        options = join(
            render('<option value="{}">{} ({})</option>', h["HypervisorArn"],
                   h.get("Name") or h["HypervisorArn"], h.get("Host", ""))
            for h in hypervisors)
        hv_errors = errors.get("hypervisor", {})
        if current:
            hv_name = next((h.get("Name") for h in hypervisors
                            if h["HypervisorArn"].endswith("/" + current)), current)
            connected = render(
                "<p>Connected to <strong>{}</strong>.</p>"
                '<form method="post" action="/console/gateway/hypervisor/disconnect">{}{}'
                '<button type="submit" class="secondary">Disconnect</button></form>',
                hv_name, csrf, hidden("arn", arn))
        elif hypervisors:
            connected = join([
                Markup('<form method="post" action="/console/gateway/hypervisor">'),
                csrf, hidden("arn", arn), form_error(hv_errors),
                render('<div class="field{}"><label for="f-ServerArn">Hypervisor</label>'
                       '<select id="f-ServerArn" name="ServerArn">{}</select>{}</div>',
                       " has-error" if hv_errors.get("ServerArn") else "", options,
                       render('<p class="error">{}</p>', hv_errors["ServerArn"])
                       if hv_errors.get("ServerArn") else ""),
                Markup('<button type="submit">Connect</button></form>'),
            ])
        else:
            connected = Markup("<p>No hypervisor is connected, and none is imported in this "
                               "region yet.</p>")
        hypervisor = render(
            '<section class="card" id="hypervisor"><h2>Connected hypervisor</h2>{}'
            '<p class="hint">Each gateway connects to a single hypervisor; several gateways '
            "may connect to the same one for more bandwidth.</p></section>", connected)
        tag_rows = join(
            render('<tr><td>{}</td><td>{}</td><td><form method="post" '
                   'action="/console/gateway/tags/remove">{}{}{}<button type="submit" '
                   'class="secondary" aria-label="Remove tag {}">Remove</button></form></td>'
                   "</tr>", t["Key"], t["Value"], csrf, hidden("arn", arn),
                   hidden("Key", t["Key"]), t["Key"])
            for t in tags)
        tag_errors = errors.get("tags", {})
        tag_table = (render('<div class="table-wrap"><table id="tags"><thead><tr>'
                            '<th scope="col">Key</th><th scope="col">Value</th>'
                            '<th scope="col"><span class="sr-only">Action</span></th></tr>'
                            "</thead><tbody>{}</tbody></table></div>", tag_rows)
                     if tags else Markup("<p>No tags.</p>"))
        tags_section = join([
            Markup('<section class="card" id="tags-section"><h2>Tags</h2>'), tag_table,
            Markup('<form method="post" action="/console/gateway/tags/add" class="inline">'),
            csrf, hidden("arn", arn), form_error(tag_errors),
            field("Key", "Tag key", values.get("Key", ""), tag_errors, required=True),
            field("Value", "Tag value", values.get("Value", ""), tag_errors),
            Markup('<button type="submit">Add tag</button></form></section>'),
        ])
        delete = render(
            '<section class="card danger"><h2>Delete gateway</h2><p>{}</p>'
            '<p><a class="button danger" href="{}/gateway/delete?arn={}">Delete…</a></p>'
            "</section>", DELETE_WARNING, PREFIX, quoted(arn))
        body = join([summary, rename, hypervisor, tags_section, delete])
        return self.console.page(request, session, f"Gateway {gw['GatewayDisplayName']}",
                                 body, status=status,
                                 crumbs=[("Gateways", f"{PREFIX}/gateways")])

    async def _change(self, request: web.Request, session: Session, op: str,
                      body: dict[str, Any], section: str, fields: list[str], done: str
                      ) -> web.StreamResponse:
        """Run one change of the gateway page; back to the page with a message, or with the
        operation's error beside the field it names."""
        form = await request.post()
        arn = form_text(form, "arn")
        try:
            await self.console.call(session, op, body, region=region_of(arn, session.region))
        except ApiError as err:
            values = {k: form_text(form, k) for k in form if k != "csrf"}
            return await self.detail(request, session, errors={section: place_error(err, fields)},
                                     values=values, status=400)
        session.flash.append(done)
        raise web.HTTPSeeOther(gateway_url(arn))

    async def rename(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        name = form_text(form, "GatewayDisplayName")
        return await self._change(
            request, session, "UpdateGatewayInformation",
            {"GatewayArn": form_text(form, "arn"), "GatewayDisplayName": name}, "rename",
            ["GatewayDisplayName"], f"The gateway is now named {name}.")

    async def tag_add(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        key, value = form_text(form, "Key"), _raw(form, "Value")
        return await self._change(
            request, session, "TagResource",
            {"ResourceARN": form_text(form, "arn"), "Tags": [{"Key": key, "Value": value}]},
            "tags", ["Key", "Value", "Tags"], f"Tag {key} was set.")

    async def tag_remove(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        key = _raw(form, "Key")
        return await self._change(
            request, session, "UntagResource",
            {"ResourceARN": form_text(form, "arn"), "TagKeys": [key]}, "tags",
            ["TagKeys"], f"Tag {key} was removed.")

    async def connect_hypervisor(self, request: web.Request, session: Session
                                 ) -> web.StreamResponse:
        form = await request.post()
        return await self._change(
            request, session, "AssociateGatewayToServer",
            {"GatewayArn": form_text(form, "arn"), "ServerArn": form_text(form, "ServerArn")},
            "hypervisor", ["ServerArn"], "The gateway was connected to the hypervisor.")

    async def disconnect(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        return await self._change(
            request, session, "DisassociateGatewayFromServer",
            {"GatewayArn": form_text(form, "arn")}, "hypervisor", [],
            "The gateway was disconnected from its hypervisor.")

    async def delete_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        arn = request.query.get("arn", "")
        try:
            gw = await self._gateway(session, arn)
        except ApiError as err:
            return self.console.page(request, session, "Delete gateway", render(
                '<p class="error" role="alert">{}</p>', err.message), status=404)
        body = render(
            '<form method="post" action="/console/gateway/delete" class="card danger">{}{}'
            "<p>Delete gateway <strong>{}</strong> (<span class=\"arn\">{}</span>)?</p>"
            '<p class="warning" role="alert">{}</p>'
            '<div class="field check"><input type="checkbox" id="f-confirm" name="confirm" '
            'value="yes" required><label for="f-confirm">I understand that this gateway can '
            "never be reactivated</label></div>"
            '<button type="submit" class="danger">Delete gateway</button> '
            '<a href="{}">Cancel</a></form>',
            self.console.csrf_field(session), hidden("arn", arn), gw["GatewayDisplayName"], arn,
            DELETE_WARNING, gateway_url(arn))
        return self.console.page(request, session, "Delete gateway", body,
                                 crumbs=[("Gateways", f"{PREFIX}/gateways"),
                                         (gw["GatewayDisplayName"], gateway_url(arn))])

    async def delete(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        arn = form_text(form, "arn")
        if form_text(form, "confirm") != "yes":
            session.flash.append("Tick the confirmation to delete the gateway.")
            raise web.HTTPSeeOther(f"{PREFIX}/gateway/delete?arn={quoted(arn)}")
        try:
            await self.console.call(session, "DeleteGateway", {"GatewayArn": arn},
                                    region=region_of(arn, session.region))
        except ApiError as err:
            session.flash.append(err.message)
            raise web.HTTPSeeOther(f"{PREFIX}/gateway/delete?arn={quoted(arn)}") from None
        session.flash.append(f"Gateway {arn} was deleted.")
        raise web.HTTPSeeOther(f"{PREFIX}/gateways")


def _raw(form: Any, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""
