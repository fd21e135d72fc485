"""Backup and restore jobs, recovery points, and the restore form.

- Jobs (`/console/jobs`): start a backup (StartBackupJob), the backup and restore jobs with
  a progress bar each (ListBackupJobs, ListRestoreJobs), stop a job (StopBackupJob). The
  page is complete without JavaScript (reload it to see progress); console.js polls
  `/console/jobs/live` (JSON, same session) every 2 s while a job is active and moves the
  bars and states in place.
- Recovery points (`/console/recovery-points`): by vault (ListRecoveryPointsByBackupVault)
  or by VM (ListRecoveryPointsByResource).
- Restore (`/console/restore`): a form with one field per key of the point's restore
  metadata (GetRecoveryPointRestoreMetadata), filled with the source's values; submitting it
  calls StartRestoreJob with what the form holds, so every rule and message is the API's.
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
    place_error,
    quoted,
    when,
)
from controlplane.webconsole.html import Markup, join, render

ACTIVE = ("CREATED", "PENDING", "RUNNING", "ABORTING")
START_FIELDS = ["ResourceArn", "BackupVaultName", "IamRoleArn", "DeleteAfterDays"]
MAX_LISTED = 100


def _percent(job: dict[str, Any]) -> float:
    try:
        return max(0.0, min(100.0, float(job.get("PercentDone") or 0)))
    except ValueError:
        return 0.0


def job_row(job: dict[str, Any], kind: str, csrf: Markup, names: dict[str, str]) -> Markup:
    """One job: its id, VM, state, a progress bar and, while it can be, a Stop button."""
    job_id = job.get("BackupJobId") or job.get("RestoreJobId") or ""
    state = job.get("State") or job.get("Status") or ""
    pct = _percent(job)
    stop = Markup("")
    if kind == "backup" and state in ("CREATED", "PENDING", "RUNNING"):
        stop = render('<form method="post" action="/console/jobs/stop" class="inline-button">'
                      '{}{}<button type="submit" class="secondary" aria-label="Stop job {}">'
                      "Stop</button></form>", csrf, hidden("BackupJobId", job_id), job_id)
    resource = job.get("ResourceArn", "")
    return render(
        '<tr data-job-id="{}"><td class="arn">{}</td><td>{}</td><td class="state">{}</td>'
        '<td><progress class="progress" max="100" value="{}" aria-label="Progress of job {}">'
        '{}%</progress> <span class="pct">{}%</span></td><td class="msg">{}</td><td>{}</td>'
        "<td>{}</td></tr>",
        job_id, job_id, job.get("ResourceName") or names.get(resource, resource), state,
        f"{pct:.1f}", job_id, f"{pct:.1f}", f"{pct:.1f}", job.get("StatusMessage", ""),
        when(job.get("CreationDate")), stop)


class Pages(PageSet):
    ROUTES = (
        ("GET", "/jobs", "jobs"),
        ("GET", "/jobs/live", "live"),
        ("POST", "/jobs/start", "start"),
        ("POST", "/jobs/stop", "stop"),
        ("GET", "/recovery-points", "points"),
        ("GET", "/restore", "restore_page"),
        ("POST", "/restore", "restore"),
    )

    async def _vms_and_vaults(self, session: Session) -> tuple[list[dict[str, Any]],
                                                               list[dict[str, Any]]]:
        vms = (await self.console.call(session, "ListVirtualMachines",
                                       {"MaxResults": 1000}))["VirtualMachines"]
        vaults = (await self.console.call_backup(session, "ListBackupVaults",
                                                 {"MaxResults": 1000}))["BackupVaultList"]
        return vms, vaults

    async def jobs(self, request: web.Request, session: Session,
                   errors: dict[str, str] | None = None, values: dict[str, str] | None = None,
                   status: int = 200) -> web.StreamResponse:
        vms, vaults = await self._vms_and_vaults(session)
        names = {vm["ResourceArn"]: vm["Name"] for vm in vms}
        backups = (await self.console.call_backup(session, "ListBackupJobs",
                                                  {"MaxResults": MAX_LISTED}))["BackupJobs"]
        restores = (await self.console.call_backup(session, "ListRestoreJobs",
                                                   {"MaxResults": MAX_LISTED}))["RestoreJobs"]
        csrf = self.console.csrf_field(session)
        errors, values = errors or {}, values or {}

        def select(name: str, label: str, options: list[tuple[str, str]]) -> Markup:
            error = errors.get(name)
            return render(
                '<div class="field{}"><label for="f-{}">{}</label><select id="f-{}" name="{}"'
                "{}>{}</select>{}</div>", " has-error" if error else "", name, label, name,
                name, Markup(f' aria-describedby="f-{name}-err"') if error else "",
                join(render('<option value="{}"{}>{}</option>', v, Markup(" selected")
                            if v == values.get(name) else "", text) for v, text in options),
                render('<p class="error" id="f-{}-err">{}</p>', name, error) if error else "")

        if vms and vaults:
            start = join([
                Markup('<form method="post" action="/console/jobs/start" class="card" '
                       'id="start-form"><h2>Start a backup</h2>'), csrf, form_error(errors),
                select("ResourceArn", "Virtual machine",
                       [(v["ResourceArn"], v["Name"]) for v in vms]),
                select("BackupVaultName", "Backup vault",
                       [(v["BackupVaultName"], v["BackupVaultName"]) for v in vaults]),
                field("IamRoleArn", "IAM role ARN", values.get("IamRoleArn", ""), errors,
                      required=True),
                field("DeleteAfterDays", "Delete after (days, optional)",
                      values.get("DeleteAfterDays", ""), errors, inputmode="numeric"),
                Markup('<button type="submit">Start backup</button></form>'),
            ])
        else:
            start = Markup('<section class="card"><h2>Start a backup</h2><p>A backup needs a '
                           "virtual machine (import a hypervisor and sync it) and a backup "
                           "vault (aws backup create-backup-vault).</p></section>")
        head = Markup('<thead><tr><th scope="col">Job</th><th scope="col">VM</th>'
                      '<th scope="col">State</th><th scope="col">Progress</th>'
                      '<th scope="col">Message</th><th scope="col">Created</th>'
                      '<th scope="col"><span class="sr-only">Action</span></th></tr></thead>')

        def table(caption: str, tid: str, rows: list[Markup]) -> Markup:
            if not rows:
                return render('<p id="{}">No {}.</p>', tid, caption.lower())
            return render('<div class="table-wrap"><table id="{}"><caption>{}</caption>{}'
                          "<tbody>{}</tbody></table></div>", tid, caption, head, join(rows))

        active = any((j.get("State") or j.get("Status")) in ACTIVE for j in [*backups,
                                                                            *restores])
        live = render('<div id="live" data-live-url="/console/jobs/live" data-active="{}">'
                      "</div>", "yes" if active else "no")
        body = join([
            live,
            table("Backup jobs", "backup-jobs",
                  [job_row(j, "backup", csrf, names) for j in backups]),
            table("Restore jobs", "restore-jobs",
                  [job_row(j, "restore", csrf, names) for j in restores]),
            start,
        ])
        return self.console.page(request, session, "Jobs", body, status=status)

    async def live(self, request: web.Request, session: Session) -> web.StreamResponse:
        """The jobs' state and progress, for console.js to update the page in place."""
        backups = (await self.console.call_backup(session, "ListBackupJobs",
                                                  {"MaxResults": MAX_LISTED}))["BackupJobs"]
        restores = (await self.console.call_backup(session, "ListRestoreJobs",
                                                   {"MaxResults": MAX_LISTED}))["RestoreJobs"]
        jobs = [{"id": j.get("BackupJobId") or j.get("RestoreJobId"),
                 "state": j.get("State") or j.get("Status"), "percent": _percent(j),
                 "message": j.get("StatusMessage", "")} for j in [*backups, *restores]]
        return web.json_response({"jobs": jobs,
                                  "active": any(j["state"] in ACTIVE for j in jobs)})

    async def start(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        values = {k: form_text(form, k) for k in START_FIELDS}
        body: dict[str, Any] = {k: values[k] for k in START_FIELDS[:3]}
        if values["DeleteAfterDays"]:
            days = values["DeleteAfterDays"]
            body["Lifecycle"] = {"DeleteAfterDays": int(days) if days.isdigit() else days}
        try:
            out = await self.console.call_backup(session, "StartBackupJob", body)
        except ApiError as err:
            errors = place_error(err, [*START_FIELDS, "Lifecycle"])
            if "Lifecycle" in errors:
                errors = {"DeleteAfterDays": errors.pop("Lifecycle")}
            return await self.jobs(request, session, errors, values, status=400)
        session.flash.append(f"Backup job {out['BackupJobId']} was started.")
        raise web.HTTPSeeOther(f"{PREFIX}/jobs")

    async def stop(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        job_id = form_text(form, "BackupJobId")
        try:
            await self.console.call_backup(session, "StopBackupJob", {"BackupJobId": job_id})
            session.flash.append(f"Backup job {job_id} is being stopped.")
        except ApiError as err:
            session.flash.append(err.message)
        raise web.HTTPSeeOther(f"{PREFIX}/jobs")

    # -- recovery points and restore -------------------------------------------------------

    async def points(self, request: web.Request, session: Session) -> web.StreamResponse:
        vault = request.query.get("vault", "")
        vm = request.query.get("vm", "")
        vms, vaults = await self._vms_and_vaults(session)
        names = {v["ResourceArn"]: v["Name"] for v in vms}
        points: list[dict[str, Any]] = []
        error = Markup("")
        try:
            if vm:
                points = (await self.console.call_backup(
                    session, "ListRecoveryPointsByResource",
                    {"ResourceArn": vm, "MaxResults": MAX_LISTED}))["RecoveryPoints"]
            elif vault:
                points = (await self.console.call_backup(
                    session, "ListRecoveryPointsByBackupVault",
                    {"BackupVaultName": vault, "MaxResults": MAX_LISTED}))["RecoveryPoints"]
        except ApiError as err:
            error = render('<p class="error" role="alert">{}</p>', err.message)
        choose = render(
            '<form method="get" action="/console/recovery-points" class="card" role="search">'
            '<div class="row"><div class="field"><label for="f-vault">Backup vault</label>'
            '<select id="f-vault" name="vault"><option value="">-</option>{}</select></div>'
            '<div class="field"><label for="f-vm">or virtual machine</label>'
            '<select id="f-vm" name="vm"><option value="">-</option>{}</select></div></div>'
            '<button type="submit">Show recovery points</button></form>',
            join(render('<option value="{}"{}>{}</option>', v["BackupVaultName"],
                        Markup(" selected") if v["BackupVaultName"] == vault else "",
                        v["BackupVaultName"]) for v in vaults),
            join(render('<option value="{}"{}>{}</option>', v["ResourceArn"],
                        Markup(" selected") if v["ResourceArn"] == vm else "", v["Name"])
                 for v in vms))
        rows = []
        for point in points:
            arn = point["RecoveryPointArn"]
            vault_name = point.get("BackupVaultName", vault)
            restore = (render('<a href="{}/restore?{}">Restore…</a>', PREFIX,
                              urlencode({"arn": arn, "vault": vault_name}))
                       if point.get("Status") == "COMPLETED" else "")
            rows.append(render(
                '<tr><td class="arn">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>'
                "<td>{}</td><td>{}</td></tr>", arn,
                point.get("ResourceName") or names.get(point.get("ResourceArn", ""), ""),
                vault_name, point.get("Status", ""), when(point.get("CreationDate")),
                point.get("BackupSizeInBytes", point.get("BackupSizeBytes", "-")), restore))
        table = Markup("")
        if vault or vm:
            table = (render(
                '<div class="table-wrap"><table id="points"><caption>Recovery points</caption>'
                '<thead><tr><th scope="col">ARN</th><th scope="col">VM</th>'
                '<th scope="col">Vault</th><th scope="col">Status</th>'
                '<th scope="col">Created</th><th scope="col">Size (bytes)</th>'
                '<th scope="col"><span class="sr-only">Action</span></th></tr></thead>'
                "<tbody>{}</tbody></table></div>", join(rows)) if rows else
                Markup('<p id="points">No recovery points.</p>'))
        return self.console.page(request, session, "Recovery points", choose + error + table)

    async def restore_page(self, request: web.Request, session: Session,
                           errors: dict[str, str] | None = None,
                           values: dict[str, str] | None = None, status: int = 200
                           ) -> web.StreamResponse:
        arn = request.query.get("arn", "") or (values or {}).get("arn", "")
        vault = request.query.get("vault", "") or (values or {}).get("vault", "")
        try:
            meta = await self.console.call_backup(
                session, "GetRecoveryPointRestoreMetadata",
                {"BackupVaultName": vault, "RecoveryPointArn": arn})
        except ApiError as err:
            return self.console.page(request, session, "Restore", render(
                '<p class="error" role="alert">{}</p>', err.message), status=404)
        errors, values = errors or {}, values or {}
        metadata: dict[str, str] = meta.get("RestoreMetadata") or {}
        fields = [field(f"meta-{k}", k, values.get(f"meta-{k}", v), errors,
                        hint="The name of the new VM; it must not exist on the hypervisor."
                        if k == "vmName" else None)
                  for k, v in metadata.items()]
        body = join([
            render("<p>Restore recovery point <span class=\"arn\">{}</span> of vault {} as a "
                   "new virtual machine. The fields are the point's restore metadata, filled "
                   "with the source's values.</p>", arn, vault),
            Markup('<form method="post" action="/console/restore" class="card" '
                   'id="restore-form">'), self.console.csrf_field(session),
            hidden("arn", arn), hidden("vault", vault), form_error(errors), *fields,
            field("IamRoleArn", "IAM role ARN (optional)", values.get("IamRoleArn", ""), errors),
            Markup('<button type="submit">Start restore</button></form>'),
        ])
        return self.console.page(request, session, "Restore", body, status=status,
                                 crumbs=[("Recovery points", f"{PREFIX}/recovery-points?vault="
                                          f"{quoted(vault)}")])

    async def restore(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        values = {k: form_text(form, k) for k in form if k != "csrf"}
        metadata = {k[5:]: v for k, v in values.items() if k.startswith("meta-") and v}
        body: dict[str, Any] = {"RecoveryPointArn": values.get("arn", ""), "Metadata": metadata}
        if values.get("IamRoleArn"):
            body["IamRoleArn"] = values["IamRoleArn"]
        try:
            out = await self.console.call_backup(session, "StartRestoreJob", body)
        except ApiError as err:
            placed = place_error(err, [*metadata, "IamRoleArn"])
            errors = {(k if k in ("", "IamRoleArn") else f"meta-{k}"): v
                      for k, v in placed.items()}
            return await self.restore_page(request, session, errors, values, status=400)
        session.flash.append(f"Restore job {out['RestoreJobId']} was started.")
        raise web.HTTPSeeOther(f"{PREFIX}/jobs")
