"""The console's entry point: login, the forced first password change, the main menu.

Runs as root on the appliance from a getty drop-in on tty1 and ttyS0; it never exits to a
shell: `x` logs out back to the login prompt, Ctrl-C / Ctrl-D go back one level, and an
unexpected error is logged and reported in one line before the menu is shown again.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from appliance.console import (
    activation,
    bandwidth,
    connectivity,
    hypervisor,
    network,
    resourcecheck,
    shell,
    timemenu,
)
from appliance.console.auth import USERNAME, PasswordFileError, PasswordStore, Throttle
from appliance.console.context import Context
from appliance.console.ui import Back, Terminal
from appliance.localclient import DEFAULT_SOCKET, LocalApi
from appliance.system import netinfo, resources
from appliance.system.networkd import DEFAULT_DIR, NetworkdStore
from appliance.system.timesync import DEFAULT_DROPIN, TimeSync
from appliance.version import __version__
from gatewaycore.logfmt import EscapingFilter

log = logging.getLogger("appliance.console")

TITLE = "Backup Gateway Appliance - Configuration"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="appliance console", description=__doc__)
    p.add_argument("--socket", default=DEFAULT_SOCKET, help="the daemon's local API socket")
    p.add_argument("--password-file", default="/etc/appliance/console-password")
    p.add_argument("--networkd-dir", default=DEFAULT_DIR,
                   help="where the .network files are written")
    p.add_argument("--hostname-file", default="/etc/hostname")
    p.add_argument("--timesyncd-conf", default=DEFAULT_DROPIN,
                   help="the systemd-timesyncd drop-in holding the NTP servers")
    p.add_argument("--ntp-port", type=int, default=123, help="UDP port of the NTP probes")
    p.add_argument("--ntp-timeout", type=float, default=3.0, help="seconds per NTP probe")
    p.add_argument("--no-apply", action="store_true",
                   help="write configuration files but do not run networkctl, hostname, "
                        "systemctl or step the clock (for development and tests)")
    p.add_argument("--log-file", help="log here instead of stderr/syslog")
    return p.parse_args(argv)


def _setup_logging(log_file: str | None) -> None:
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
    elif not sys.stderr.isatty():
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        # stderr is the console's own screen: send log lines to the journal instead.
        handler = logging.handlers.SysLogHandler(address="/dev/log")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("appliance-console %(levelname)s %(message)s"))
    handler.addFilter(EscapingFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def jobs_header_line(jobs: Any) -> str:
    """'Jobs: 2 running, 1 waiting' (backups and restores; the daemon runs at most 4)."""
    if not isinstance(jobs, dict):
        return "Jobs: unknown"
    running, waiting = jobs.get("running"), jobs.get("waiting")
    if not isinstance(running, int) or not isinstance(waiting, int):
        return "Jobs: unknown"
    if running == waiting == 0:
        return "Jobs: none running"
    return f"Jobs: {running} running, {waiting} waiting"


def update_lines(update: Any) -> list[str]:
    """The header's software update lines (each under 80 columns): an update available
    and when it installs, an install under way, the last update's outcome when it was not
    a success."""
    if not isinstance(update, dict):
        return []
    lines = []
    available = update.get("available")
    window, due = update.get("maintenanceWindow"), update.get("nextWindow")
    if update.get("phase"):
        lines.append(f"Software update: {update['phase']}")
    elif isinstance(available, dict):
        lines.append(f"Software update {available.get('version')} available")
        lines.append(f"  installs {due} (window: {window})" if due else
                     "  installs on UpdateGatewaySoftwareNow (no maintenance window)")
    elif window:
        lines.append(f"Maintenance window: {window}")
    last = update.get("lastResult")
    if isinstance(last, dict) and last.get("outcome") != "installed":
        outcome = str(last.get("outcome", "")).replace("_", " ")
        lines.append(f"Last update {last.get('version')} {outcome} at {last.get('at')}:")
        lines.append(f"  {last.get('message')}")
    return lines


def header_lines(ctx: Context) -> list[str]:
    status, reason = ctx.status()
    version = (status or {}).get("softwareVersion") or __version__
    lines = [TITLE, f"Software version {version}"]
    if status is not None:
        lines += update_lines(status.get("softwareUpdate"))
    if status is None:
        lines.append(f"Gateway daemon: not reachable ({reason})")
    elif status.get("deleted"):
        lines.append(f"Gateway deleted: {status.get('gatewayArn')}")
    elif status.get("activated"):
        lines.append(f"Activated: {status.get('gatewayName')} in {status.get('region')}")
        lines.append(f"  {status.get('gatewayArn')}")
    else:
        lines.append("Not activated")
    if status is not None:
        lines.append(bandwidth.header_line(status.get("shaping")))
        if status.get("activated"):
            lines.append(hypervisor.header_line(status.get("hypervisor")))
            lines.append(jobs_header_line(status.get("jobs")))
    adapters = netinfo.list_adapters()
    for adapter in adapters:
        lines.append(f"{adapter.name}: {', '.join(adapter.addresses) or 'no address'}")
    if not adapters:
        lines.append("No network adapters")
    lines.append("")
    return lines


def main_menu(ctx: Context) -> None:
    """Until the user logs out with x."""
    while True:
        errors = resources.error_count(resources.check())
        options = [
            ("0", "Get activation key"),
            ("1", "Configure HTTP proxy"),
            ("2", "Network configuration"),
            ("3", "Test network connectivity"),
            ("4", f"View system resource check ({errors} Errors)"),
            ("5", "System time management"),
            ("6", "Command prompt"),
            ("7", "View bandwidth schedule"),
            ("8", "Test hypervisor connection"),
        ]
        ctx.term.clear()
        try:
            choice = ctx.term.choose(options, header=lambda: header_lines(ctx),
                                     footer=["", 'Press "x" to exit session'],
                                     hidden=("x",))
        except Back:
            continue  # Ctrl-C / Ctrl-D at the top: stay; `x` is the way out
        if choice == "x":
            return
        try:
            _dispatch(ctx, choice)
        except Back:
            continue
        except Exception as exc:  # a bug must not end the session or show a traceback
            log.exception("event=console_error screen=%s", choice)
            ctx.term.say(f"Internal error ({type(exc).__name__}: {exc}); back to the menu.")
            with contextlib.suppress(Back):
                ctx.term.pause()


def _dispatch(ctx: Context, choice: str) -> None:
    if choice == "0":
        activation.run(ctx)
    elif choice == "1":
        ctx.term.clear()
        ctx.term.say("HTTP proxy configuration")
        ctx.term.say("")
        ctx.term.say("The Backup gateway does not support an HTTP or SOCKS proxy: it connects")
        ctx.term.say("directly to its service endpoints (outbound TCP 443).")
        ctx.term.pause()
    elif choice == "2":
        network.run(ctx)
    elif choice == "3":
        connectivity.run(ctx)
    elif choice == "4":
        resourcecheck.run(ctx)
    elif choice == "5":
        timemenu.run(ctx)
    elif choice == "6":
        shell.run(ctx)
    elif choice == "7":
        bandwidth.run(ctx)
    elif choice == "8":
        hypervisor.run(ctx)


def banner_lines() -> list[str]:
    """What the screen and the serial port show before anyone logs in, as a hardware (or AWS)
    appliance's console does: the version, the adapters' addresses and where to get an
    activation key, so a user who deployed the OVA reads the address off the VM's console.
    The consoles start once the daemon serves (their getty drop-ins), so this is its ready
    banner; Ctrl-L at the login prompt draws it again with the addresses of that moment."""
    lines = [TITLE, f"Software version {__version__}", "", "Network adapters:"]
    adapters = netinfo.list_adapters()
    for adapter in adapters:
        lines.append(f"  {adapter.name}: {', '.join(adapter.addresses) or 'no address'}")
    if not adapters:
        lines.append("  none")
    ipv4 = next((str(a.ip) for ad in adapters for a in ad.ipv4), None)
    if ipv4:
        lines.append(f"Activation key: http://{ipv4}/?activationRegion=REGION"
                     "&gatewayType=BACKUP_VM&no_redirect")
    lines += ["Log in to change the network, the time and the other settings.", ""]
    return lines


def login(ctx: Context, throttle: Throttle) -> bool:
    """One login attempt; True when the user is in (with a non-default password)."""
    term = ctx.term
    term.clear()
    for line in banner_lines():
        term.say(line)
    try:
        user = term.ask("login: ").strip()
        password = term.ask("Password: ", password=True)
    except Back:
        return False
    try:
        ok = ctx.passwords.verify(user, password)
        default = ctx.passwords.is_default()
    except PasswordFileError as exc:
        term.error(str(exc))
        term.pause()
        return False
    if not ok:
        delay = throttle.failed()
        log.warning("event=console_login_failed user=%s failures=%d", user[:32],
                    throttle.failures)
        term.say("Login incorrect.")
        if delay:
            term.say(f"Wait {delay:g} s before the next attempt.")
            _sleep_uninterrupted(delay)
        return False
    throttle.succeeded()
    log.info("event=console_login user=%s", USERNAME)
    if default:
        term.clear()
        try:
            return shell.change_password(ctx, forced=True)
        except Back:
            term.say("The password must be changed before the console can be used.")
            return False
    return True


def _sleep_uninterrupted(seconds: float) -> None:
    """The throttle must not be skipped by pressing Ctrl-C."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            time.sleep(left)
        except KeyboardInterrupt:
            continue


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging(args.log_file)
    # A serial line may not answer cursor-position requests; never wait for one.
    os.environ.setdefault("PROMPT_TOOLKIT_NO_CPR", "1")
    # Ctrl-\ and Ctrl-Z must not kill or stop the console (no core, no job control).
    for sig in (signal.SIGQUIT, signal.SIGTSTP):
        signal.signal(sig, signal.SIG_IGN)
    ctx = Context(
        term=Terminal(),
        api=LocalApi(args.socket),
        passwords=PasswordStore(Path(args.password_file)),
        network=NetworkdStore(args.networkd_dir, apply=not args.no_apply,
                              hostname_file=args.hostname_file),
        time=TimeSync(args.timesyncd_conf, port=args.ntp_port, timeout=args.ntp_timeout,
                      apply=not args.no_apply),
    )
    throttle = Throttle()
    log.info("event=console_started version=%s socket=%s", __version__, args.socket)
    while True:
        try:
            if login(ctx, throttle):
                main_menu(ctx)
                log.info("event=console_logout user=%s", USERNAME)
        except KeyboardInterrupt:
            continue  # Ctrl-C between prompts: back to the login prompt
        except Exception:
            log.exception("event=console_error screen=login")
            continue


if __name__ == "__main__":
    sys.exit(main(None))
