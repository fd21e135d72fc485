"""The web console's frame: routes under /console, the security headers, sign-in and
sign-out, the page layout, and the one way pages call the API's operations.

Pages are plain server-rendered HTML forms (they work without JavaScript); console.js only
adds live updates and conveniences. Every change is a POST carrying the session's CSRF token,
answered by a redirect (so a reload never repeats it) or, when the operation refused it, by
the same form again with the operation's own message beside the field it names.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import secrets
import socket
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from controlplane.apimodel import OPERATIONS, SHAPES
from controlplane.errors import ApiError
from controlplane.operations import BackupGatewayApi
from controlplane.sigv4 import Caller
from controlplane.validation import validate_input
from controlplane.webconsole import auth
from controlplane.webconsole.auth import Session
from controlplane.webconsole.html import Markup, attrs, esc, join, render
from gatewaycore import regions
from gatewaycore.utctime import format_utc

log = logging.getLogger("controlplane.console")

PREFIX = "/console"
SESSION_COOKIE = "cp_console"
PRE_COOKIE = "cp_console_pre"  # the sign-in form's CSRF token, before there is a session
MAX_FORM_BYTES = 64 * 1024
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".svg": "image/svg+xml"}
# No inline script or style anywhere: both come from /console/static only.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_SAFE_NEXT = re.compile(r"/console/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*")

Handler = Callable[[web.Request, auth.Session], Awaitable[web.StreamResponse]]


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a console path only (never another site)."""
    if target and _SAFE_NEXT.fullmatch(target) and "//" not in target:
        return target
    return f"{PREFIX}/gateways"


def place_error(err: ApiError, fields: list[str]) -> dict[str, str]:
    """{field: message} for the first of `fields` the operation's message names (members
    appear as `'Name'`, `Name:` or `Name[`), else {"": message} for the top of the form."""
    for name in fields:
        if re.search(rf"(?<![A-Za-z]){re.escape(name)}(?![A-Za-z])", err.message):
            return {name: err.message}
    return {"": err.message}


def field(name: str, label: str, value: Any = "", errors: dict[str, str] | None = None,
          kind: str = "text", hint: str | None = None, id_prefix: str = "", **extra: Any
          ) -> Markup:
    """A labelled input with its hint and error (tied to it by aria-describedby);
    `id_prefix` keeps ids unique when two forms of a page have a field of the same name."""
    fid = "f-" + (f"{id_prefix}-" if id_prefix else "") + re.sub(r"[^A-Za-z0-9_-]", "-", name)
    error = (errors or {}).get(name)
    described = " ".join(x for x in (f"{fid}-hint" if hint else "",
                                      f"{fid}-err" if error else "") if x)
    parts = [render('<div class="field{}">', " has-error" if error else ""),
             render('<label for="{}">{}</label>', fid, label)]
    parts.append(render("<input{}>", attrs(id=fid, name=name, type=kind,
                                          value=None if kind == "password" else value,
                                          aria_invalid="true" if error else None,
                                          aria_describedby=described or None, **extra)))
    if hint:
        parts.append(render('<p class="hint" id="{}-hint">{}</p>', fid, hint))
    if error:
        parts.append(render('<p class="error" id="{}-err">{}</p>', fid, error))
    parts.append(Markup("</div>"))
    return join(parts)


def model_hint(shape: str, member: str) -> str:
    """What the API model allows for a member, for the hint under its field: shown from the
    model, so it can never disagree with the check the operation makes."""
    spec = SHAPES[SHAPES[shape]["members"][member]]
    parts = []
    if "pattern" in spec:
        parts.append(f"characters matching {spec['pattern']}")
    if "min" in spec and "max" in spec:
        parts.append(f"{spec['min']} to {spec['max']} characters")
    return "Allowed: " + ", ".join(parts) + "." if parts else ""


def form_error(errors: dict[str, str]) -> Markup:
    """The message no field claimed, at the top of its form."""
    if not errors.get(""):
        return Markup("")
    return render('<p class="error form-error" role="alert">{}</p>', errors[""])


def hidden(name: str, value: str) -> Markup:
    return render("<input{}>", attrs(type="hidden", name=name, value=value))


def when(epoch: float | None) -> Markup:
    """A UTC time in a <time> element (console.js adds the browser's local time)."""
    if epoch is None:
        return Markup("never")
    text = format_utc(epoch)
    return render('<time datetime="{}">{}</time>', text, text.replace("T", " ").replace("Z",
                                                                                       " UTC"))


class WebConsole:
    """The console of one control plane: its sessions, its pages, its static files."""

    def __init__(self, state_dir: Path, api: BackupGatewayApi, access_key_id: str,
                 backup_api: Any = None) -> None:
        self.password_file = state_dir / auth.PASSWORD_FILE
        self.state_dir = state_dir
        self.api = api
        self.backup_api = backup_api
        self.access_key_id = access_key_id
        self.sessions = auth.Sessions()
        self.throttle = auth.SignInThrottle()
        self.default_region = regions.default_region()
        self._static = {
            name: resources.files("controlplane.webconsole").joinpath("static", name)
            .read_bytes()
            for name in ("console.css", "console.js")
        }
        self.nav: list[tuple[str, str]] = [("Gateways", f"{PREFIX}/gateways"),
                                           ("Hypervisors", f"{PREFIX}/hypervisors"),
                                           ("Virtual machines", f"{PREFIX}/vms"),
                                           ("Jobs", f"{PREFIX}/jobs"),
                                           ("Recovery points", f"{PREFIX}/recovery-points")]
        self.page_modules: list[Any] = []

    # -- wiring ---------------------------------------------------------------------------

    def install(self, app: web.Application) -> None:
        """Add /console (a redirect) and the console's sub-application to `app`."""
        from controlplane.webconsole import gateways, hypervisors, jobs, schedule

        sub = web.Application(middlewares=[self._headers], client_max_size=MAX_FORM_BYTES)
        sub.router.add_get("/", self._home)
        sub.router.add_get("/signin", self._signin_page)
        sub.router.add_post("/signin", self._signin)
        sub.router.add_post("/signout", self.signed_in(self._signout))
        sub.router.add_post("/region", self.signed_in(self._region))
        sub.router.add_get("/static/{name}", self._static_file)
        for module in (gateways, schedule, hypervisors, jobs):
            pages = module.Pages(self)
            for method, path, name in pages.ROUTES:
                sub.router.add_route(method, path, self.signed_in(getattr(pages, name)))
        app.router.add_get(PREFIX, self._home)
        app.add_subapp(PREFIX, sub)

    def warn_if_no_password(self, state_dir_shown: str) -> bool:
        """Log how to set the password when none is set; whether one is set."""
        if auth.read_password_file(self.password_file) is not None:
            return True
        log.warning("event=console_no_password set_with=%s",
                    f"python -m controlplane console-password --state-dir {state_dir_shown}")
        return False

    def url_for_gateways(self, url: str, explicit: bool) -> Callable[[], str | None]:
        """What the control plane tells a gateway with each key: the console's URL, given
        with `serve --console-url` or derived from the listener; a derived one only once a
        console password is set (before that no one can use the console, and the gateway
        keeps sending browsers to the AWS console as it always has)."""
        if explicit:
            return lambda: url
        return lambda: url if auth.read_password_file(self.password_file) else None

    @web.middleware
    async def _headers(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:  # redirects and 404s: the same headers, re-raised
            self._secure(exc)
            raise
        except Exception:
            log.exception("event=console_error path=%s", request.path)
            response = self.bare_page("Something went wrong",
                                      Markup("<p>The control plane failed to answer this "
                                             "page; see its log.</p>"), status=500)
        return self._secure(response)

    @staticmethod
    def _secure(response: web.StreamResponse) -> web.StreamResponse:
        """No framing, no inline script or style, no caching of pages."""
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        if "Cache-Control" not in response.headers:
            response.headers["Cache-Control"] = "no-store"
        return response

    # -- sessions -------------------------------------------------------------------------

    def session_of(self, request: web.Request) -> auth.Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def signed_in(self, handler: Handler) -> Callable[[web.Request], Awaitable[Any]]:
        """Wrap a page: signed-in sessions only; a POST must carry the session's CSRF token."""

        async def run(request: web.Request) -> web.StreamResponse:
            session = self.session_of(request)
            if session is None:
                if request.method != "GET":
                    return self.bare_page("Signed out", Markup(
                        '<p>Your session has ended. <a href="/console/signin">Sign in</a> '
                        "again.</p>"), status=401)
                target = request.path_qs
                if request.headers.get("Sec-Fetch-Site") == "cross-site":
                    # The gateway's 302 (another site) brought the browser here, so the
                    # SameSite=Strict cookie was held back: load the page again from here,
                    # where it is sent, before asking anyone to sign in.
                    return self.bare_page("Continuing", render(
                        '<meta http-equiv="refresh" content="0; url={}">'
                        '<p><a href="{}">Continue</a></p>', target, target))
                raise web.HTTPSeeOther(f"{PREFIX}/signin?{urlencode({'next': target})}")
            if request.method == "POST":
                form = await request.post()
                if not auth.csrf_ok(session.csrf, _text(form.get("csrf"))):
                    log.warning("event=console_csrf_refused path=%s remote=%s", request.path,
                                request.remote)
                    return self.bare_page("Request refused", Markup(
                        "<p>This form did not carry this session's security token (CSRF "
                        "check failed): it came from another site or an old page. Reload "
                        "the page and try again.</p>"), status=403)
            return await handler(request, session)

        return run

    async def _signin_page(self, request: web.Request) -> web.StreamResponse:
        if self.session_of(request) is not None:
            raise web.HTTPSeeOther(safe_next(request.query.get("next")))
        return self._signin_form(request, {}, status=200)

    def _signin_form(self, request: web.Request, errors: dict[str, str], status: int,
                     nxt: str | None = None) -> web.Response:
        nxt = safe_next(nxt if nxt is not None else request.query.get("next"))
        if auth.read_password_file(self.password_file) is None:
            body = render(
                '<p class="error" role="alert">No console password is set yet, so no one '
                'can sign in. On the control plane\'s host, run:</p>'
                "<pre>python -m controlplane console-password --state-dir {}</pre>"
                "<p>then reload this page.</p>", str(self.state_dir))
            return self.bare_page("Sign in", body, status=503)
        pre = secrets.token_urlsafe(24)
        body = join([
            Markup('<form method="post" action="/console/signin" class="card narrow">'),
            hidden("csrf", pre), hidden("next", nxt), form_error(errors),
            field("password", "Password", errors=errors, kind="password",
                  autocomplete="current-password", required=True, autofocus=True),
            Markup('<button type="submit">Sign in</button></form>'),
        ])
        response = self.bare_page("Sign in", body, status=status)
        response.set_cookie(PRE_COOKIE, pre, path=PREFIX, httponly=True, samesite="Strict",
                            secure=request.secure, max_age=3600)
        return response

    async def _signin(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        nxt = _text(form.get("next"))
        pre = request.cookies.get(PRE_COOKIE, "")
        if not pre or not auth.csrf_ok(pre, _text(form.get("csrf"))):
            return self._signin_form(request, {"": "The sign-in form had expired or came from "
                                               "another site; try again."}, status=403, nxt=nxt)
        remote = request.remote
        wait = self.throttle.wait(remote)
        if wait is not None:
            minutes = max(1, round(wait / 60))
            log.warning("event=console_signin_refused remote=%s wait=%d", remote, wait)
            return self._signin_form(request, {"password": (
                f"Too many failed sign-ins from your address ({self.throttle.max_failures} "
                f"in {self.throttle.window / 60:g} minutes); try again in about {minutes} "
                f"minute{'s' if minutes != 1 else ''}.")}, status=429, nxt=nxt)
        stored = auth.read_password_file(self.password_file)
        password = _text(form.get("password"))
        ok = stored is not None and len(password) <= auth.MAX_PASSWORD_LENGTH and (
            await asyncio.to_thread(auth.verify_password, password, stored))
        if not ok:
            left = self.throttle.failed(remote)
            log.warning("event=console_signin_failed remote=%s tries_left=%d", remote, left)
            return self._signin_form(request, {"password": (
                "Wrong password." + (f" {left} more tr{'ies' if left != 1 else 'y'} before "
                                     "this address has to wait." if left else
                                     " This address now has to wait before trying again."))},
                status=401, nxt=nxt)
        self.throttle.succeeded(remote)
        self.sessions.drop(request.cookies.get(SESSION_COOKIE))
        session = self.sessions.create(self.default_region)
        log.info("event=console_signin remote=%s sessions=%d", remote, len(self.sessions))
        response = web.HTTPSeeOther(safe_next(nxt))
        response.set_cookie(SESSION_COOKIE, session.token, path=PREFIX, httponly=True,
                            samesite="Strict", secure=request.secure)
        response.del_cookie(PRE_COOKIE, path=PREFIX)
        raise response

    async def _signout(self, request: web.Request, session: auth.Session
                       ) -> web.StreamResponse:
        self.sessions.drop(session.token)
        log.info("event=console_signout remote=%s", request.remote)
        response = web.HTTPSeeOther(f"{PREFIX}/signin")
        response.del_cookie(SESSION_COOKIE, path=PREFIX)
        raise response

    async def _region(self, request: web.Request, session: auth.Session
                      ) -> web.StreamResponse:
        form = await request.post()
        code = _text(form.get("region"))
        if regions.get(code) is not None:
            session.region = code
        raise web.HTTPSeeOther(safe_next(_text(form.get("next"))))

    async def _home(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther(f"{PREFIX}/gateways")

    async def _static_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        data = self._static.get(name)
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type=STATIC_TYPES[Path(name).suffix].split(";")[0],
                            charset="utf-8", headers={"Cache-Control": "no-cache"})

    # -- calling the API ------------------------------------------------------------------

    async def call(self, session: auth.Session, op: str, body: dict[str, Any],
                   region: str | None = None) -> dict[str, Any]:
        """Run a backup-gateway operation as the API would: the model's validation, then the
        operation itself, as this control plane's own caller in the session's region."""
        validate_input(body, OPERATIONS[op][0])
        caller = Caller(self.access_key_id, region or session.region)
        result = self.api.operations[op](caller, body)
        if inspect.isawaitable(result):
            result = await result
        if not op.startswith(("Get", "List")):
            log.info("event=console_call op=%s region=%s", op, caller.region)
        return dict(result)

    async def call_backup(self, session: Session, op: str, body: dict[str, Any],
                          region: str | None = None) -> dict[str, Any]:
        """Run an AWS Backup operation as its wire would: the `backup` model's checks
        (restjson.check, which also turns timestamps into epoch seconds), then the
        operation, as this control plane's own caller."""
        from controlplane import backupmodel, restjson

        problems = restjson.Problems()
        params = restjson.check(body, backupmodel.OPERATIONS[op]["input"], "", problems)
        problems.raise_any()
        caller = Caller(self.access_key_id, region or session.region)
        result = self.backup_api.operations[op](caller, params)
        if inspect.isawaitable(result):
            result = await result
        if not op.startswith(("Describe", "List", "Get")):
            log.info("event=console_call op=%s region=%s", op, caller.region)
        return dict(result or {})

    # -- pages ----------------------------------------------------------------------------

    def bare_page(self, title: str, body: Markup, status: int = 200) -> web.Response:
        return self._respond(title, body, None, "", status)

    def page(self, request: web.Request, session: auth.Session, title: str, body: Markup,
             status: int = 200, crumbs: list[tuple[str, str]] | None = None) -> web.Response:
        flash = join(render('<p class="flash" role="status">{}</p>', m) for m in session.flash)
        session.flash.clear()
        trail = Markup("")
        if crumbs:
            trail = render('<nav aria-label="Breadcrumb" class="crumbs">{}</nav>', join(
                [render('<a href="{}">{}</a>', href, label) for label, href in crumbs],
                " / "))
        return self._respond(title, trail + flash + body, session, request.path_qs, status)

    def _respond(self, title: str, body: Markup, session: auth.Session | None, here: str,
                 status: int) -> web.Response:
        header = Markup("")
        if session is not None:
            links = join(
                render('<a href="{}"{}>{}</a>', href,
                       Markup(' aria-current="page"') if _in_section(here, href) else "",
                       label)
                for label, href in self.nav)
            options = join(
                render('<option value="{}"{}>{}</option>', code,
                       Markup(" selected") if code == session.region else "", code)
                for code in sorted(regions.all_regions()))
            header = render(
                '<nav aria-label="Main" class="main-nav">{}</nav>'
                '<form method="post" action="/console/region" class="region">'
                '{}{}<label for="region">Region</label>'
                '<select id="region" name="region">{}</select>'
                '<button type="submit" class="secondary">Switch</button></form>'
                '<form method="post" action="/console/signout" class="signout">{}'
                '<button type="submit" class="secondary">Sign out</button></form>',
                links, hidden("csrf", session.csrf), hidden("next", here), options,
                hidden("csrf", session.csrf))
        doc = render(
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            "<title>{title} · Backup gateway console</title>"
            '<link rel="stylesheet" href="/console/static/console.css">'
            '<script src="/console/static/console.js" defer></script></head>'
            '<body><a class="skip" href="#main">Skip to content</a>'
            '<header class="top"><span class="brand">Backup gateway console</span>{header}'
            '</header><main id="main"><h1>{title}</h1>{body}</main></body></html>',
            title=title, header=header, body=body)
        return web.Response(text=doc, status=status, content_type="text/html",
                            charset="utf-8")

    def csrf_field(self, session: auth.Session) -> Markup:
        return hidden("csrf", session.csrf)


def _in_section(here: str, href: str) -> bool:
    """Whether the page `here` belongs to the nav entry `href` (/console/gateways also
    covers /console/gateway?..., the pages of one gateway)."""
    one = href.removesuffix("s")
    return here.startswith((href, one + "?", one + "/"))


def _text(value: Any) -> str:
    """A form value as text ('' for a missing one or a file upload)."""
    return value if isinstance(value, str) else ""


def form_text(form: Any, name: str) -> str:
    return _text(form.get(name)).strip()


def quoted(value: str) -> str:
    return quote(value, safe="")


__all__ = ["PREFIX", "WebConsole", "esc", "field", "form_error", "form_text", "hidden",
           "place_error", "quoted", "when"]


def console_base(host: str, port: int, secure: bool) -> str:
    """The console's URL as the listener gives it, for gateways to send browsers to: a
    wildcard address is replaced by this host's name (`serve --console-url` overrides)."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if secure else 'http'}://{shown}:{port}{PREFIX}"


class PageSet:
    """A group of pages of one console, all for signed-in sessions only (a POST with the
    session's CSRF token): ROUTES lists (method, path under /console, handler method's
    name), which WebConsole.install registers through `signed_in`."""

    ROUTES: tuple[tuple[str, str, str], ...] = ()

    def __init__(self, console: WebConsole) -> None:
        self.console = console
