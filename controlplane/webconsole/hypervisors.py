"""Hypervisors and their virtual machines: import, edit, test, sync, property mappings and
delete; the VM list with search, last backup date and tags.

As everywhere in the console, each action is the API's operation called in-process
(console.WebConsole.call), and its refusal is shown beside the field it names. A test is
run by a gateway (TestHypervisorConfiguration waits up to 25 s for it), so the test form
names the gateway that should connect.
"""

from __future__ import annotations

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
from controlplane.webconsole.gateways import gateway_url, region_of
from controlplane.webconsole.html import Markup, join, render

IMPORT_FIELDS = ["Name", "Host", "Username", "Password"]
MAPPING_FIELDS = ["VmwareCategory", "VmwareTagName", "AwsTagKey", "AwsTagValue", "IamRoleArn"]


def hypervisor_url(arn: str) -> str:
    return f"{PREFIX}/hypervisor?arn={quoted(arn)}"


def _optional(form: Any, names: list[str]) -> dict[str, str]:
    """The non-empty fields of `names` (an empty optional field is left out of the call)."""
    out = {}
    for name in names:
        value = form.get(name)
        if isinstance(value, str) and value != "":
            out[name] = value if name == "Password" else value.strip()
    return out


class Pages(PageSet):
    ROUTES = (
        ("GET", "/hypervisors", "list_page"),
        ("POST", "/hypervisors/import", "import_"),
        ("GET", "/hypervisor", "detail"),
        ("POST", "/hypervisor/update", "update"),
        ("POST", "/hypervisor/test", "test"),
        ("POST", "/hypervisor/sync", "sync"),
        ("POST", "/hypervisor/mappings/add", "mapping_add"),
        ("POST", "/hypervisor/mappings/remove", "mapping_remove"),
        ("POST", "/hypervisor/delete", "delete"),
        ("GET", "/vms", "vms"),
    )

    # -- list and import -----------------------------------------------------------------

    async def list_page(self, request: web.Request, session: Session,
                        errors: dict[str, str] | None = None,
                        values: dict[str, str] | None = None, status: int = 200
                        ) -> web.StreamResponse:
        listed = await self.console.call(session, "ListHypervisors", {"MaxResults": 1000})
        rows = join(
            render('<tr><td><a href="{}">{}</a></td><td>{}</td><td>{}</td>'
                   '<td class="arn">{}</td></tr>', hypervisor_url(h["HypervisorArn"]),
                   h["Name"], h["Host"], h.get("State", "-"), h["HypervisorArn"])
            for h in listed["Hypervisors"])
        table = (render(
            '<div class="table-wrap"><table id="hypervisors"><caption>Hypervisors in {}'
            '</caption><thead><tr><th scope="col">Name</th><th scope="col">Host</th>'
            '<th scope="col">State</th><th scope="col">ARN</th></tr></thead><tbody>{}'
            "</tbody></table></div>", session.region, rows)
            if listed["Hypervisors"] else
            Markup('<p class="empty">No hypervisors in this region yet.</p>'))
        errors, values = errors or {}, values or {}
        form = join([
            Markup('<form method="post" action="/console/hypervisors/import" class="card" '
                   'id="import-form"><h2>Import a hypervisor</h2>'),
            self.console.csrf_field(session), form_error(errors),
            field("Name", "Name", values.get("Name", ""), errors, required=True,
                  hint=model_hint("ImportHypervisorConfigurationInput", "Name")),
            field("Host", "Host (address or URI the gateway connects to)",
                  values.get("Host", ""), errors, required=True, autocomplete="off"),
            field("Username", "Username", values.get("Username", ""), errors,
                  autocomplete="off"),
            field("Password", "Password", "", errors, kind="password",
                  autocomplete="new-password"),
            Markup('<button type="submit">Import</button></form>'),
        ])
        return self.console.page(request, session, "Hypervisors", table + form, status=status)

    async def import_(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        body = _optional(form, IMPORT_FIELDS)
        try:
            out = await self.console.call(session, "ImportHypervisorConfiguration", body)
        except ApiError as err:
            return await self.list_page(request, session, place_error(err, IMPORT_FIELDS),
                                        {k: v for k, v in body.items() if k != "Password"},
                                        status=400)
        session.flash.append(f"Hypervisor {body.get('Name', '')} was imported.")
        raise web.HTTPSeeOther(hypervisor_url(out["HypervisorArn"]))

    # -- one hypervisor ------------------------------------------------------------------

    async def detail(self, request: web.Request, session: Session,
                     errors: dict[str, dict[str, str]] | None = None,
                     values: dict[str, str] | None = None, status: int = 200
                     ) -> web.StreamResponse:
        arn = request.query.get("arn", "") or (values or {}).get("arn", "")
        region = region_of(arn, session.region)
        try:
            hv = (await self.console.call(session, "GetHypervisor", {"HypervisorArn": arn},
                                          region=region))["Hypervisor"]
            maps = await self.console.call(session, "GetHypervisorPropertyMappings",
                                           {"HypervisorArn": arn}, region=region)
            gateways = (await self.console.call(session, "ListGateways", {"MaxResults": 1000},
                                                region=region))["Gateways"]
        except ApiError as err:
            return self.console.page(request, session, "Hypervisor", render(
                '<p class="error" role="alert">{}</p>', err.message), status=404,
                crumbs=[("Hypervisors", f"{PREFIX}/hypervisors")])
        errors, values = errors or {}, values or {}
        csrf = self.console.csrf_field(session)
        summary = render(
            '<dl class="details"><dt>Name</dt><dd id="hv-name">{}</dd><dt>Host</dt><dd>{}</dd>'
            '<dt>State</dt><dd id="hv-state">{}</dd><dt>ARN</dt><dd class="arn">{}</dd>'
            "<dt>Last metadata sync</dt><dd>{}</dd><dt>Sync status</dt><dd id=\"hv-sync\">{}"
            "</dd><dt>Virtual machines</dt><dd><a href=\"{}/vms?{}\">List them</a></dd></dl>",
            hv["Name"], hv["Host"], hv.get("State", "-"), arn,
            when(hv.get("LastSuccessfulMetadataSyncTime")),
            " ".join(x for x in (hv.get("LatestMetadataSyncStatus", "-"),
                                 hv.get("LatestMetadataSyncStatusMessage", "")) if x),
            PREFIX, urlencode({"hypervisor": arn}))
        e_update = errors.get("update", {})
        update = join([
            Markup('<form method="post" action="/console/hypervisor/update" class="card" '
                   'id="update-form"><h2>Edit</h2><p class="hint">Leave the password empty to '
                   "keep it.</p>"), csrf, hidden("arn", arn), form_error(e_update),
            field("Name", "Name", values.get("Name", hv["Name"]), e_update, required=True),
            field("Host", "Host", values.get("Host", hv["Host"]), e_update, required=True),
            field("Username", "Username", values.get("Username", ""), e_update,
                  autocomplete="off"),
            field("Password", "Password", "", e_update, kind="password",
                  autocomplete="new-password"),
            Markup('<button type="submit">Save</button></form>'),
        ])
        e_test = errors.get("test", {})
        options = join(render('<option value="{}"{}>{}</option>', g["GatewayArn"],
                              Markup(" selected") if g["GatewayArn"] == values.get(
                                  "GatewayArn") else "", g["GatewayDisplayName"])
                       for g in gateways)
        test = join([
            Markup('<form method="post" action="/console/hypervisor/test" class="card" '
                   'id="test-form"><h2>Test the connection</h2><p class="hint">The gateway '
                   "connects to the host with these credentials and reports back (up to 25 "
                   "s).</p>"), csrf, hidden("arn", arn), form_error(e_test),
            render('<div class="field"><label for="f-GatewayArn">Gateway</label>'
                   '<select id="f-GatewayArn" name="GatewayArn">{}</select>{}</div>', options,
                   render('<p class="error" id="f-GatewayArn-err">{}</p>', e_test["GatewayArn"])
                   if e_test.get("GatewayArn") else ""),
            field("Host", "Host", values.get("Host", hv["Host"]), e_test, required=True,
                  id_prefix="t"),
            field("Username", "Username", values.get("Username", ""), e_test,
                  autocomplete="off", id_prefix="t"),
            field("Password", "Password", "", e_test, kind="password",
                  autocomplete="off", id_prefix="t"),
            Markup('<button type="submit">Test</button></form>'),
        ]) if gateways else Markup('<section class="card"><h2>Test the connection</h2><p>'
                                   "A gateway runs the test: create one first.</p></section>")
        sync = render(
            '<form method="post" action="/console/hypervisor/sync" class="card">'
            "<h2>Virtual machines</h2>{}{}{}<button type=\"submit\">Sync metadata now</button>"
            "</form>", csrf, hidden("arn", arn), form_error(errors.get("sync", {})))
        mapping_rows = join(
            render('<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><form method="post" '
                   'action="/console/hypervisor/mappings/remove">{}{}{}<button type="submit" '
                   'class="secondary" aria-label="Remove mapping {}">Remove</button></form>'
                   "</td></tr>", m["VmwareCategory"], m["VmwareTagName"], m["AwsTagKey"],
                   m["AwsTagValue"], csrf, hidden("arn", arn), hidden("index", str(i)), i + 1)
            for i, m in enumerate(maps["VmwareToAwsTagMappings"]))
        e_map = errors.get("mappings", {})
        mappings = join([
            Markup('<section class="card" id="mappings"><h2>Property mappings (VMware tags to '
                   "AWS tags)</h2>"),
            render('<div class="table-wrap"><table><thead><tr><th scope="col">VMware category'
                   '</th><th scope="col">VMware tag</th><th scope="col">AWS tag key</th>'
                   '<th scope="col">AWS tag value</th><th scope="col"><span class="sr-only">'
                   "Action</span></th></tr></thead><tbody>{}</tbody></table></div>",
                   mapping_rows) if maps["VmwareToAwsTagMappings"] else
            Markup("<p>No mappings.</p>"),
            Markup('<form method="post" action="/console/hypervisor/mappings/add">'), csrf,
            hidden("arn", arn), form_error(e_map), Markup('<div class="row">'),
            *(field(n, label, values.get(n, ""), e_map, required=True) for n, label in (
                ("VmwareCategory", "VMware category"), ("VmwareTagName", "VMware tag name"),
                ("AwsTagKey", "AWS tag key"), ("AwsTagValue", "AWS tag value"))),
            Markup("</div>"),
            field("IamRoleArn", "IAM role ARN", values.get("IamRoleArn",
                                                           maps.get("IamRoleArn", "")),
                  e_map, required=True),
            Markup('<button type="submit">Add mapping</button></form></section>'),
        ])
        delete = render(
            '<form method="post" action="/console/hypervisor/delete" class="card danger">'
            "<h2>Delete hypervisor</h2>{}{}{}<p>Its virtual machines are forgotten too; refused "
            "while a gateway is connected to it.</p>"
            '<div class="field check"><input type="checkbox" id="f-hv-confirm" name="confirm" '
            'value="yes" required><label for="f-hv-confirm">Delete this hypervisor</label>'
            '</div><button type="submit" class="danger">Delete hypervisor</button></form>',
            csrf, hidden("arn", arn), form_error(errors.get("delete", {})))
        body = join([summary, update, test, sync, mappings, delete])
        return self.console.page(request, session, f"Hypervisor {hv['Name']}", body,
                                 status=status,
                                 crumbs=[("Hypervisors", f"{PREFIX}/hypervisors")])

    async def _change(self, request: web.Request, session: Session, op: str,
                      body: dict[str, Any], section: str, fields: list[str], done: str,
                      keep: dict[str, str] | None = None) -> web.StreamResponse:
        form = await request.post()
        arn = form_text(form, "arn")
        try:
            await self.console.call(session, op, body, region=region_of(arn, session.region))
        except ApiError as err:
            values = {"arn": arn, **(keep or {})}
            return await self.detail(request, session, {section: place_error(err, fields)},
                                     values, status=400)
        session.flash.append(done)
        raise web.HTTPSeeOther(hypervisor_url(arn))

    async def update(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        body = {"HypervisorArn": form_text(form, "arn"), **_optional(form, IMPORT_FIELDS)}
        keep = {k: v for k, v in body.items() if k in ("Name", "Host", "Username")}
        return await self._change(request, session, "UpdateHypervisor", body, "update",
                                  IMPORT_FIELDS, "The hypervisor was saved.", keep)

    async def test(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        body = {"GatewayArn": form_text(form, "GatewayArn"),
                **_optional(form, ["Host", "Username", "Password"])}
        keep = {k: v for k, v in body.items() if k != "Password"}
        return await self._change(request, session, "TestHypervisorConfiguration", body,
                                  "test", ["GatewayArn", "Host", "Username", "Password"],
                                  "The gateway connected to the hypervisor: the test passed.",
                                  keep)

    async def sync(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        return await self._change(request, session, "StartVirtualMachinesMetadataSync",
                                  {"HypervisorArn": form_text(form, "arn")}, "sync", [],
                                  "A metadata sync was requested from the gateways.")

    async def _mappings(self, session: Session, arn: str) -> dict[str, Any]:
        return await self.console.call(session, "GetHypervisorPropertyMappings",
                                       {"HypervisorArn": arn},
                                       region=region_of(arn, session.region))

    async def mapping_add(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        arn = form_text(form, "arn")
        new = {k: form_text(form, k) for k in MAPPING_FIELDS[:4]}
        try:
            current = (await self._mappings(session, arn))["VmwareToAwsTagMappings"]
        except ApiError as err:
            session.flash.append(err.message)
            raise web.HTTPSeeOther(f"{PREFIX}/hypervisors") from None
        body = {"HypervisorArn": arn, "VmwareToAwsTagMappings": [*current, new],
                "IamRoleArn": form_text(form, "IamRoleArn")}
        keep = {**new, "IamRoleArn": body["IamRoleArn"]}
        return await self._change(request, session, "PutHypervisorPropertyMappings", body,
                                  "mappings", MAPPING_FIELDS, "The mapping was added.", keep)

    async def mapping_remove(self, request: web.Request, session: Session
                             ) -> web.StreamResponse:
        form = await request.post()
        arn = form_text(form, "arn")
        index = form_text(form, "index")
        try:
            current = await self._mappings(session, arn)
        except ApiError as err:
            session.flash.append(err.message)
            raise web.HTTPSeeOther(f"{PREFIX}/hypervisors") from None
        items = list(current["VmwareToAwsTagMappings"])
        if index.isdigit() and int(index) < len(items):
            del items[int(index)]
        body = {"HypervisorArn": arn, "VmwareToAwsTagMappings": items,
                "IamRoleArn": current.get("IamRoleArn") or ""}
        return await self._change(request, session, "PutHypervisorPropertyMappings", body,
                                  "mappings", MAPPING_FIELDS, "The mapping was removed.")

    async def delete(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        arn = form_text(form, "arn")
        if form_text(form, "confirm") != "yes":
            return await self.detail(request, session, {"delete": {
                "": "Tick the confirmation to delete the hypervisor."}}, {"arn": arn},
                status=400)
        try:
            await self.console.call(session, "DeleteHypervisor", {"HypervisorArn": arn},
                                    region=region_of(arn, session.region))
        except ApiError as err:
            return await self.detail(request, session, {"delete": {"": err.message}},
                                     {"arn": arn}, status=400)
        session.flash.append(f"Hypervisor {arn} was deleted.")
        raise web.HTTPSeeOther(f"{PREFIX}/hypervisors")

    # -- virtual machines ----------------------------------------------------------------

    async def vms(self, request: web.Request, session: Session) -> web.StreamResponse:
        query = request.query.get("q", "").strip()
        hypervisor = request.query.get("hypervisor", "")
        body: dict[str, Any] = {"MaxResults": 1000}
        if hypervisor:
            body["HypervisorArn"] = hypervisor
        if request.query.get("next"):
            body["NextToken"] = request.query["next"]
        try:
            listed = await self.console.call(session, "ListVirtualMachines", body,
                                             region=region_of(hypervisor, session.region))
            hypervisors = (await self.console.call(session, "ListHypervisors",
                                                   {"MaxResults": 1000}))["Hypervisors"]
        except ApiError as err:
            return self.console.page(request, session, "Virtual machines", render(
                '<p class="error" role="alert">{}</p>', err.message), status=400)
        names = {h["HypervisorArn"].rsplit("/", 1)[-1]: h for h in hypervisors}
        needle = query.casefold()
        rows = []
        for vm in listed["VirtualMachines"]:
            if needle and needle not in f"{vm['Name']} {vm.get('Path', '')} " \
                                        f"{vm.get('HostName', '')}".casefold():
                continue
            tags = (await self.console.call(session, "ListTagsForResource",
                                            {"ResourceArn": vm["ResourceArn"]}))["Tags"]
            hv = names.get(vm["HypervisorId"])
            rows.append(render(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
                '<td class="arn">{}</td></tr>', vm["Name"], vm.get("Path", ""),
                render('<a href="{}">{}</a>', hypervisor_url(hv["HypervisorArn"]), hv["Name"])
                if hv else vm["HypervisorId"], when(vm.get("LastBackupDate")),
                ", ".join(f"{t['Key']}={t['Value']}" for t in tags) or "-",
                vm["ResourceArn"]))
        options = join(render('<option value="{}"{}>{}</option>', h["HypervisorArn"],
                              Markup(" selected") if h["HypervisorArn"] == hypervisor else "",
                              h["Name"]) for h in hypervisors)
        search = render(
            '<form method="get" action="/console/vms" class="card" role="search">'
            '<div class="row"><div class="field"><label for="f-q">Search (name, path, host)'
            '</label><input id="f-q" name="q" type="search" value="{}"></div>'
            '<div class="field"><label for="f-hypervisor">Hypervisor</label>'
            '<select id="f-hypervisor" name="hypervisor"><option value="">All</option>{}'
            '</select></div></div><button type="submit">Search</button></form>',
            query, options)
        table = (render(
            '<div class="table-wrap"><table id="vms"><caption>{} virtual machine{}</caption>'
            '<thead><tr><th scope="col">Name</th><th scope="col">Path</th>'
            '<th scope="col">Hypervisor</th><th scope="col">Last backup</th>'
            '<th scope="col">Tags</th><th scope="col">ARN</th></tr></thead><tbody>{}</tbody>'
            "</table></div>", len(rows), "" if len(rows) == 1 else "s", join(rows))
            if rows else Markup('<p class="empty">No virtual machines match.</p>'))
        more = Markup("")
        if listed.get("NextToken"):
            more = render('<p><a href="{}/vms?{}">Next page</a></p>', PREFIX, urlencode(
                {"next": listed["NextToken"], "q": query, "hypervisor": hypervisor}))
        return self.console.page(request, session, "Virtual machines", search + table + more)


__all__ = ["Pages", "gateway_url", "hypervisor_url"]
