"""`python -m controlplane serve|env|rebuild-vaults|console-password|publish-update`: run
the control plane, print its credentials for eval, rebuild its vaults' rows from their
storage (vaultrebuild.py), set the web console's password (webconsole/auth.py), or publish
a software update bundle to its gateways (updates.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
import shlex
import signal
import ssl
import sys
from pathlib import Path

from controlplane import credentials, updates, vaultrebuild, vaultsettings
from controlplane.server import ControlPlane, tls_context
from controlplane.updates import UpdateShelf
from controlplane.webconsole import auth as webauth
from gatewaycore import logfmt, rules

log = logging.getLogger("controlplane")
DEFAULT_LISTEN = "127.0.0.1:8443"


def default_state_dir() -> Path:
    """/var/lib/controlplane for a system service (root), ./controlplane-state otherwise."""
    return Path("/var/lib/controlplane") if os.geteuid() == 0 else Path("controlplane-state")


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port); argparse shows the error."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise argparse.ArgumentTypeError(
            f"--listen must be HOST:PORT (e.g. 127.0.0.1:8443 or [::1]:8443), got {text!r}"
        )
    return host.strip("[]"), int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m controlplane",
        description="The reference backup-gateway control plane.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the API and the gateway link")
    serve.add_argument("--listen", type=parse_listen, default=parse_listen(DEFAULT_LISTEN),
                       metavar="HOST:PORT", help=f"address to listen on (default {DEFAULT_LISTEN})")
    serve.add_argument("--tls-cert", type=Path, default=None, metavar="FILE",
                       help="serve HTTPS with this PEM certificate (chain); needs --tls-key")
    serve.add_argument("--tls-key", type=Path, default=None, metavar="FILE",
                       help="the PEM private key of --tls-cert")
    env = sub.add_parser("env", help="print export lines of the API credentials, for eval")
    rebuild = sub.add_parser(
        "rebuild-vaults", help="with the control plane stopped: recreate the vaults and "
        "their recovery points in the database from the vault store alone")
    password = sub.add_parser(
        "console-password", help="set the web console's password (read from the terminal, "
        "or one line of standard input); the console then accepts it at once")
    publish = sub.add_parser(
        "publish-update", help="publish a software update bundle (make release); a running "
        "control plane offers it to older gateways at their next poll")
    publish.add_argument("bundle", type=Path, metavar="BUNDLE",
                         help="the .bundle file (build/backup-gateway-VERSION.bundle)")
    for p in (serve, env, rebuild, password, publish):
        p.add_argument("--state-dir", type=Path, default=None,
                       help="state directory (default /var/lib/controlplane as root, "
                       "./controlplane-state otherwise)")
    for p in (serve, env):
        p.add_argument("--credentials-file", type=Path, default=None,
                       help="API credentials file (default STATE_DIR/credentials)")
    for p in (serve, rebuild):
        p.add_argument("--vault-store", type=Path, default=None, metavar="FILE",
                       help="TOML settings of where the vaults' bytes live ([local] or [s3]; "
                       "default: the directory STATE_DIR/vaults)")
    rebuild.add_argument("--vault", default=None, metavar="NAME",
                         help="rebuild only the vault of this name (default: every vault)")
    serve.add_argument("--data-dir", type=Path, default=None,
                       help="where gateway uploads are stored (default STATE_DIR/data)")
    serve.add_argument("--console-url", default=None, metavar="URL",
                       help="the web console's address as browsers reach it (default "
                       "http(s)://LISTEN/console); gateways redirect there with a key")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    state_dir: Path = args.state_dir or default_state_dir()
    if args.command == "rebuild-vaults":
        return _rebuild(state_dir, args.vault_store, args.vault)
    if args.command == "console-password":
        return _console_password(state_dir)
    if args.command == "publish-update":
        return _publish(state_dir, args.bundle)
    creds_file: Path = args.credentials_file or state_dir / credentials.FILE_NAME
    if args.command == "env":
        return _env(state_dir, creds_file)
    try:
        vault_store = vaultsettings.load(args.vault_store)
    except vaultsettings.VaultSettingsError as exc:
        print(f"controlplane: {exc}", file=sys.stderr)
        return 2
    console_url = None
    if args.console_url is not None:
        try:  # the rule the gateway applies before it redirects a browser there
            console_url = rules.console_url(args.console_url, "--console-url")
        except rules.RuleError as exc:
            print(f"controlplane: {exc}", file=sys.stderr)
            return 2
    if (args.tls_cert is None) != (args.tls_key is None):
        print("controlplane: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    tls = None
    if args.tls_cert is not None:
        try:
            tls = tls_context(args.tls_cert, args.tls_key)
        except (ssl.SSLError, OSError) as exc:
            print(f"controlplane: cannot use TLS certificate {args.tls_cert} with key "
                  f"{args.tls_key}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    logfmt.setup(args.log_level, "%(asctime)s level=%(levelname)s %(message)s")
    try:
        # OSError covers the vault store: s3store.StorageBackendError (bucket missing,
        # credentials refused, endpoint unreachable) and vaultkeys.VaultKeyError.
        plane = ControlPlane(state_dir, creds_file, args.data_dir, vault_store=vault_store,
                             console_url=console_url)
    except (credentials.CredentialsError, OSError) as exc:
        print(f"controlplane: {exc}", file=sys.stderr)
        return 2
    if plane.credentials_created:
        print(
            f"Generated API credentials, kept in {plane.credentials_file} (mode 0600):\n"
            f"  AWS_ACCESS_KEY_ID={plane.access_key_id}\n"
            f"  AWS_SECRET_ACCESS_KEY={plane.secret_access_key}\n"
            f"Load them in a shell with: eval \"$(python -m controlplane env --state-dir "
            f"{shlex.quote(str(state_dir))})\"",
            flush=True,
        )
    try:
        asyncio.run(_serve(plane, *args.listen, tls))
    except OSError as exc:
        print(f"controlplane: cannot listen on {args.listen[0]}:{args.listen[1]}: "
              f"{exc.strerror}", file=sys.stderr)
        return 2
    return 0


async def _serve(plane: ControlPlane, host: str, port: int, tls: ssl.SSLContext | None
                 ) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        bound_host, bound_port = await plane.start(host, port, tls)
    except OSError:
        plane.store.close()
        raise
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    url = f"{'https' if tls else 'http'}://{shown}:{bound_port}"
    log.info("event=ready listen=%s:%d url=%s state_dir=%s vaults=%s", shown, bound_port, url,
             plane.state_dir, plane.vault_store.describe())
    print(f"event=ready listen={shown}:{bound_port} url={url}", flush=True)
    if not plane.console.warn_if_no_password(shlex.quote(str(plane.state_dir))):
        print("The web console has no password yet; set one with: python -m controlplane "
              f"console-password --state-dir {shlex.quote(str(plane.state_dir))}", flush=True)
    print(f"Web console: {url}/console/", flush=True)
    await stop.wait()
    log.info("event=stopping")
    with contextlib.suppress(Exception):
        await plane.stop()
    log.info("event=stopped")


def _rebuild(state_dir: Path, settings_file: Path | None, vault: str | None) -> int:
    """One line per vault; 0 when all was imported, 1 when some points were damaged or
    some vaults skipped, 2 when refused (nothing written) or the settings are unusable."""
    logfmt.setup("WARNING", "%(asctime)s level=%(levelname)s %(message)s")
    try:
        settings = vaultsettings.load(settings_file)
        reports = vaultrebuild.rebuild(state_dir, settings, vault)
    except (vaultsettings.VaultSettingsError, vaultrebuild.RebuildRefused, OSError) as exc:
        print(f"controlplane: rebuild-vaults: {exc}", file=sys.stderr)
        return 2
    for report in reports:
        for line in report.lines():
            print(line)
    if not reports:
        print(f"no vaults in the vault store ({settings.describe()})")
    trouble = any(r.damaged or r.vault == "skipped" for r in reports)
    return 1 if trouble else 0


def _publish(state_dir: Path, source: Path) -> int:
    """One line: what was published (or that it already was); 2 when refused."""
    try:
        published, new = UpdateShelf(state_dir / updates.FOLDER).publish(source)
    except (updates.PublishError, OSError) as exc:
        print(f"controlplane: publish-update: {exc}", file=sys.stderr)
        return 2
    release = published.release
    print(f"{'published' if new else 'already published'}: version {release.version}, "
          f"{release.size} bytes, sha256 {release.sha256}")
    return 0


def _console_password(state_dir: Path) -> int:
    """Ask twice on a terminal; else read one line of stdin (for scripts and tests)."""
    if sys.stdin.isatty():
        first = getpass.getpass("New console password: ")
        if getpass.getpass("Again: ") != first:
            print("controlplane: the passwords differ; nothing was changed", file=sys.stderr)
            return 1
    else:
        first = sys.stdin.readline().rstrip("\r\n")
    target = state_dir / webauth.PASSWORD_FILE
    try:
        webauth.write_password_file(target, first)
    except webauth.PasswordError as exc:
        print(f"controlplane: {exc}; nothing was changed", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"controlplane: cannot write {target}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"console password set ({target}, mode 0600); sign in at /console/ on the "
          "control plane's address")
    return 0


def _env(state_dir: Path, creds_file: Path) -> int:
    try:
        keys, created = credentials.ensure(creds_file)
    except (credentials.CredentialsError, OSError) as exc:
        print(f"controlplane: {exc}", file=sys.stderr)
        return 2
    if created:
        print(f"# generated new API credentials in {creds_file}", file=sys.stderr)
    key, secret = next(iter(keys.items()))
    print(f"export AWS_ACCESS_KEY_ID={shlex.quote(key)}")
    print(f"export AWS_SECRET_ACCESS_KEY={shlex.quote(secret)}")
    return 0
