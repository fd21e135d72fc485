"""The restricted command prompt: a fixed set of diagnostics, never a shell.

A line is split with shlex and run as an argument list (never `shell=True`), so `;`, `|`,
`$(...)` and backquotes have no meaning; they are refused with a message rather than passed on,
because a user who types them expects a shell and should be told there is none. Children get a
fixed PATH and `PAGER=cat`, so no pager with a `!command` escape can start.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHELL_CHARACTERS = set(";|&$`<>(){}\\\n")

# name -> (usage, description). External programs are the ones with `external=True` below.
COMMANDS: dict[str, tuple[str, str]] = {
    "ip": ("ip [OPTIONS] OBJECT COMMAND", "show addresses, links, routes and neighbours"),
    "ping": ("ping [-c COUNT] [-6] HOST", "send ICMP echo requests"),
    "dig": ("dig [@SERVER] NAME [TYPE]", "query DNS"),
    "ncport": ("ncport HOST PORT [TIMEOUT]", "test that a TCP port accepts connections"),
    "traceroute": ("traceroute [-T] [-p PORT] HOST", "show the route packets take to HOST"),
    "passwd": ("passwd", "change the console password of admin"),
    "h": ("h", "list the available commands"),
    "man": ("man COMMAND", "show help for one command"),
    "exit": ("exit", "return to the main menu"),
}
EXTERNAL = ("ip", "ping", "dig", "traceroute")
# `ip netns exec` and `ip vrf exec` run arbitrary programs; `-batch`/`-b` read commands from a
# file: none of them belongs to a diagnostics prompt.
_IP_FORBIDDEN = {"exec", "-batch", "-b", "-force"}


class CommandRefused(Exception):
    """The line is not allowed; the message says why and what is."""


@dataclass
class Command:
    name: str
    args: list[str]


def parse(line: str) -> Command | None:
    """Split a line into an allowed command, None for an empty line, or raise CommandRefused."""
    bad = sorted({c for c in line if c in SHELL_CHARACTERS})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise CommandRefused(
            f"This is not a shell: {shown} is not supported. Type h for the commands available."
        )
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise CommandRefused(f"Cannot read the line: {exc}.") from None
    if not words:
        return None
    name, args = words[0], words[1:]
    if name not in COMMANDS:
        raise CommandRefused(
            f"Unknown command '{name}'. Available: {', '.join(COMMANDS)} (h for help)."
        )
    if name == "ip" and any(a in _IP_FORBIDDEN for a in args):
        raise CommandRefused("ip: 'exec', '-batch' and '-force' are not available here.")
    return Command(name, args)


def help_text() -> str:
    width = max(len(usage) for usage, _ in COMMANDS.values())
    return "\n".join(f"  {usage:<{width}}  {desc}" for usage, desc in COMMANDS.values())


def man_text(name: str) -> str:
    if name not in COMMANDS:
        return f"No help for '{name}'. Available: {', '.join(COMMANDS)}."
    usage, desc = COMMANDS[name]
    return f"{name}: {desc}\nUsage: {usage}"


def child_env() -> dict[str, str]:
    return {
        "PATH": SAFE_PATH,
        "LANG": "C.UTF-8",
        "TERM": os.environ.get("TERM", "vt100"),
        "PAGER": "cat",
        "MANPAGER": "cat",
        "LESSSECURE": "1",
    }


def run_external(cmd: Command) -> str | None:
    """Run an allowed program on the terminal; returns a message when it could not start.

    Ctrl-C reaches the child (same foreground process group) and stops it; the console itself
    ignores the interrupt and waits for the child, so it never dies with the child.
    """
    exe = shutil.which(cmd.name, path=SAFE_PATH)
    if exe is None:
        return f"{cmd.name} is not installed on this appliance."
    log.info("event=restricted_command command=%s argc=%d", cmd.name, len(cmd.args))
    proc = subprocess.Popen([exe, *cmd.args], env=child_env(), close_fds=True)
    while True:
        try:
            proc.wait()
            break
        except KeyboardInterrupt:
            continue
    return None


def ncport(args: list[str]) -> str:
    """`ncport HOST PORT [TIMEOUT]`: can a TCP connection be opened?"""
    if len(args) not in (2, 3):
        return "Usage: " + COMMANDS["ncport"][0]
    host, port_text = args[0], args[1]
    try:
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError
    except ValueError:
        return f"ncport: PORT must be a number from 1 to 65535, not '{port_text}'."
    timeout = 5.0
    if len(args) == 3:
        try:
            timeout = float(args[2])
            if not 0 < timeout <= 60:
                raise ValueError
        except ValueError:
            return f"ncport: TIMEOUT must be seconds from 0 to 60, not '{args[2]}'."
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            peer = sock.getpeername()[0]
    except TimeoutError:
        return f"Connection to {host} port {port} failed: no answer within {timeout:g} s."
    except OSError as exc:
        return f"Connection to {host} port {port} failed: {exc.strerror or exc}."
    elapsed = (time.monotonic() - started) * 1000
    return f"Connection to {host} ({peer}) port {port} [tcp] succeeded in {elapsed:.0f} ms."
