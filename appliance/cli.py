"""The `appliance` command: `serve` (the daemon), `status`, `upload`, `console`.

Operator-facing failures end in one line on stderr and a documented exit status
(2: bad settings, 1: the daemon cannot run with what is on disk), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

from appliance import config
from appliance.config import ConfigError
from appliance.localclient import ApiError, ApiUnavailable, LocalApi
from appliance.version import __version__
from gatewaycore import logfmt
from gatewaycore.schedule import format_rate

EXIT_RUNTIME = 1
EXIT_USAGE = 2


def _setup_logging() -> None:
    logfmt.setup(logging.INFO)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="Backup gateway appliance")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the appliance daemon")
    serve.add_argument(
        "--config", type=Path, default=None,
        help=f"TOML settings file (default {config.DEFAULT_CONFIG_FILE} if it exists)",
    )
    serve.add_argument(
        "--listen", action="extend", nargs="+", metavar="HOST:PORT",
        help="activation page addresses (default 0.0.0.0:80 [::]:80)",
    )
    serve.add_argument("--state-dir", default=None, help="default /var/lib/appliance")
    serve.add_argument("--control-plane", default=None, metavar="URL",
                       help=f"default {config.DEFAULT_CONTROL_PLANE_URL}")
    serve.add_argument("--local-api-socket", default=None,
                       help=f"default {config.DEFAULT_LOCAL_API_SOCKET}")
    serve.add_argument("--link-retry-max", type=float, default=None, metavar="SECONDS",
                       help="longest wait between control plane retries (default 30)")
    serve.add_argument("--hypervisor-ca-file", default=None, metavar="PEM",
                       help="CA certificates to verify a vCenter against instead of the "
                            "system store (e.g. the vCenter's VMCA root)")
    serve.add_argument("--update-result-file", default=None, metavar="FILE",
                       help="where the update installer writes its result (default "
                            "/var/lib/appliance-update/result.json)")

    status = sub.add_parser("status", help="show the daemon's status (from the local API)")
    status.add_argument("--socket", default=str(config.DEFAULT_LOCAL_API_SOCKET))
    status.add_argument("--json", action="store_true", help="print the raw JSON")

    upload = sub.add_parser(
        "upload", help="send a file to the control plane through the daemon's shaper",
        description="Stream FILE to the daemon's local API (PUT /v1/uploads/NAME); the daemon "
                    "forwards it, shaped by the bandwidth schedule, to the control plane.",
    )
    upload.add_argument("file", type=Path, metavar="FILE")
    upload.add_argument("--name", default=None,
                        help="name to store it under (default: FILE's base name; "
                             "1-200 characters of A-Z a-z 0-9 . _ -)")
    upload.add_argument("--replace", action="store_true",
                        help="replace an object already stored under NAME (otherwise refused)")
    upload.add_argument("--socket", default=str(config.DEFAULT_LOCAL_API_SOCKET))

    sub.add_parser("console", help="the local console (options: --socket, --password-file)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "console":
        # The console parses its own options (--socket, --password-file, ...).
        from appliance.console import app

        return int(app.main(argv[1:]) or 0)
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "upload":
        return upload_file(args.file, args.name or args.file.name, args.socket, args.replace)
    return status(args.socket, args.json)


def serve(args: argparse.Namespace) -> int:
    _setup_logging()
    log = logging.getLogger("appliance")
    try:
        settings = config.load(
            args.config,
            {
                "listen": args.listen,
                "state_dir": args.state_dir,
                "control_plane_url": args.control_plane,
                "local_api_socket": args.local_api_socket,
                "link_retry_max": args.link_retry_max,
                "hypervisor_ca_file": args.hypervisor_ca_file,
                "update_result_file": args.update_result_file,
            },
        )
    except ConfigError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return EXIT_USAGE

    from appliance.daemon import Daemon, StartupError
    from appliance.state import StateError

    async def run() -> None:
        # Built inside the event loop its parts (events, sessions, servers) belong to.
        await Daemon.create(settings).run()

    try:
        asyncio.run(run())
    except (StartupError, StateError) as exc:
        print(f"appliance: {exc}", file=sys.stderr)  # one line, no traceback
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        pass
    log.info("event=stopped")
    return 0


def _yes(flag: Any) -> str:
    return "yes" if flag else "no"


def format_status(doc: dict[str, Any]) -> str:
    cp = doc.get("controlPlane") or {}
    shaping = doc.get("shaping") or {}
    limit = shaping.get("limitBitsPerSec")
    rows = [
        ("Software version", doc.get("softwareVersion")),
        ("Identity key id", doc.get("keyId")),
        ("Activated", _yes(doc.get("activated"))),
        ("Deleted", _yes(doc.get("deleted"))),
        ("Gateway name", doc.get("gatewayName") or "-"),
        ("Gateway ARN", doc.get("gatewayArn") or "-"),
        ("Region", doc.get("region") or "-"),
        ("Control plane", cp.get("url")),
        ("  reachable", _yes(cp.get("reachable"))),
        ("  last contact", cp.get("lastContact") or "never"),
        ("  last error", cp.get("lastError") or "-"),
        ("Upload limit", f"{format_rate(limit)} ({limit} bit/s)" if limit else "none"),
        ("  next change", shaping.get("nextChange") or "-"),
        ("  uploading", format_rate(round(shaping.get("achievedBitsPerSec") or 0))),
    ]
    if doc.get("deletedGatewayArn"):
        rows.insert(4, ("Deleted gateway", doc["deletedGatewayArn"]))
    update = doc.get("softwareUpdate") or {}
    if update.get("requests"):
        rows.append(("Software update requested", update.get("lastRequestedAt")))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def status(path: str, raw: bool) -> int:
    try:
        doc = LocalApi(path).status()
    except (ApiUnavailable, ApiError) as exc:
        print(f"appliance: cannot read status from {path}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    print(json.dumps(doc, indent=2) if raw else format_status(doc))
    return 0


UPLOAD_PIECE = 256 * 1024


class _Sent:
    """Counts and hashes what the CLI sends, to check the answer end to end."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.size = 0


async def _file_pieces(f: Any, sent: _Sent) -> Any:
    while chunk := f.read(UPLOAD_PIECE):
        sent.hash.update(chunk)
        sent.size += len(chunk)
        yield chunk


async def _put_file(f: Any, name: str, sock: str, sent: _Sent,
                    replace: bool = False) -> tuple[int, Any]:
    import aiohttp

    # Expect: 100-continue: a refusal (bad name, not activated) arrives before any byte of
    # the body is sent. No total timeout: a shaped upload may take hours.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=sock), timeout=timeout
    ) as session, session.put(
        f"http://localhost/v1/uploads/{quote(name, safe='')}"
        + ("?replace=true" if replace else ""),
        data=_file_pieces(f, sent), expect100=True,
        headers={"Content-Type": "application/octet-stream"},
    ) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, {"error": f"HTTP{resp.status}", "message": text[:200]}


def _refusal_line(name: str, code: int, doc: dict[str, Any]) -> str:
    """One line for a refused upload; for AlreadyExists it names what is stored."""
    existing = doc.get("existing")
    if doc.get("error") == "AlreadyExists" and isinstance(existing, dict):
        return (f"appliance: upload of {name} refused: {code} AlreadyExists: "
                f"{existing.get('name')} is already stored ({existing.get('size')} bytes, "
                f"sha256 {existing.get('sha256')}, stored {existing.get('storedAt')}); "
                "use --replace to replace it")
    return f"appliance: upload of {name} refused: {code} {doc.get('error')}: {doc.get('message')}"


def upload_file(path: Path, name: str, sock: str, replace: bool = False) -> int:
    """Stream one file to the local API's PUT /v1/uploads/{name}; one line of result."""
    import aiohttp

    try:
        f = path.open("rb")
    except OSError as exc:
        print(f"appliance: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    sent = _Sent()
    try:
        with f:
            code, doc = asyncio.run(_put_file(f, name, sock, sent, replace))
    except (aiohttp.ClientError, OSError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        print(f"appliance: upload of {name} failed: cannot talk to the daemon at {sock}: "
              f"{reason}", file=sys.stderr)
        return EXIT_RUNTIME
    if not isinstance(doc, dict):
        doc = {}
    if code != 201:
        print(_refusal_line(name, code, doc), file=sys.stderr)
        return EXIT_RUNTIME
    digest = sent.hash.hexdigest()
    if doc.get("sha256") != digest or doc.get("size") != sent.size:
        print(f"appliance: upload of {name}: the control plane stored {doc.get('size')} bytes "
              f"sha256 {doc.get('sha256')}, sent {sent.size} bytes sha256 {digest}",
              file=sys.stderr)
        return EXIT_RUNTIME
    seconds = float(doc.get("seconds") or 0.0)
    rate = f", {sent.size * 8 / seconds / 1e6:.1f} Mbit/s" if seconds > 0 else ""
    print(f"uploaded {doc['name']}: {doc['size']} bytes sha256 {doc['sha256']} "
          f"in {seconds:.1f} s{rate}")
    return 0
