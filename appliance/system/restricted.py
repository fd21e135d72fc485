"""The restricted command prompt: a fixed set of diagnostics, never a shell.

Each command has a grammar that lists the argument shapes an operator needs to diagnose a
network, and nothing else: a line is allowed only when every word fits its command's grammar
(an allow-list of shapes, not a deny-list of words). That matters because the programs behind
the prompt are generous: iproute2 accepts any prefix of an object or option (`ip n e x sh` is
`ip netns exec x sh`, `ip -ba -` reads commands from the terminal), and `dig -f`, `ip -batch`,
`ss -F` read files. So only the full words and the abbreviations listed below are accepted,
hosts and names must match a host-name or address pattern (never a leading `-`), numbers are
bounded, and the child is given an argument list rebuilt from what was parsed, never the raw
words. A refused line is answered with the command's usage.

A line is split with shlex and run as an argument list (never `shell=True`), so `;`, `|`,
`$(...)` and backquotes have no meaning; they are refused with a message rather than passed on,
because a user who types them expects a shell and should be told there is none.

Children run with `/dev/null` as standard input (nothing can read commands from the terminal)
and keep the terminal for output and Ctrl-C. When the console runs as root (the appliance), a
child runs through util-linux `setpriv` as `nobody`/`nogroup`, with no supplementary groups,
`no_new_privs`, and only the capabilities its command needs (CAP_NET_RAW for ping and for
traceroute -T, none for the rest), so even a program bug cannot read the gateway's key or
`/etc/shadow`. When the console is not root (a developer's laptop), the child runs directly:
it already has no privileges to drop, and `no_new_privs` would stop ping from using the file
capability it relies on there. Children get a fixed PATH and `PAGER=cat`, so no pager with a
`!command` escape can start.
"""

from __future__ import annotations

import grp
import ipaddress
import logging
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHELL_CHARACTERS = set(";|&$`<>(){}\\\n")
CHILD_USER = "nobody"
CHILD_GROUP = "nogroup"
NET_RAW = "net_raw"


class CommandRefused(Exception):
    """The line is not allowed; the message says why and what is."""


class ArgumentError(ValueError):
    """One word does not fit the command's grammar; parse() adds the command's usage."""


@dataclass(frozen=True)
class Invocation:
    """What a grammar allows: the rebuilt argument list and the capabilities the child needs."""

    args: list[str]
    caps: tuple[str, ...] = ()


@dataclass
class Command:
    """An allowed line: `args` are rebuilt by the command's grammar, never the words typed, and
    `caps` are the only capabilities its child keeps (see setpriv_options)."""

    name: str
    args: list[str]
    caps: tuple[str, ...] = ()


@dataclass(frozen=True)
class Spec:
    """One command of the prompt: its usage lines, what it is for, and its grammar."""

    usage: tuple[str, ...]
    description: str
    check: Callable[[list[str]], Invocation]
    external: bool = False


# --- values -------------------------------------------------------------------------------

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")
_INTEGER = re.compile(r"[0-9]{1,9}")
_DECIMAL = re.compile(r"[0-9]{1,6}(?:\.[0-9]{1,3})?")


def _address(text: str) -> str | None:
    """`text` as an IPv4 or IPv6 literal (an IPv6 scope must be an interface name), or None."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    scope = getattr(addr, "scope_id", None)
    if scope is not None and not _IFNAME.fullmatch(scope):
        return None
    return str(addr)


def _host(text: str, what: str = "HOST") -> str:
    """A host name or an IP address; never anything an option parser could take for an option."""
    addr = _address(text)
    if addr is not None:
        return addr
    if len(text) <= 253 and _DNS_NAME.fullmatch(text):
        return text
    raise ArgumentError(f"{what} '{text}' is not a host name or an IP address.")


def _dns_name(text: str) -> str:
    """A name to look up: a DNS name, the root `.`, or an address (reverse lookup)."""
    return "." if text == "." else _host(text, "NAME")


def _ifname(text: str) -> str:
    if not _IFNAME.fullmatch(text):
        raise ArgumentError(f"IFNAME '{text}' is not an interface name.")
    return text


def _integer(what: str, low: int, high: int) -> Callable[[str], str]:
    """A converter for a whole number from `low` to `high` (no sign, no hex, no exponent)."""

    def convert(text: str) -> str:
        if not _INTEGER.fullmatch(text) or not low <= int(text) <= high:
            raise ArgumentError(f"{what} must be a whole number {low} to {high}, not '{text}'.")
        return str(int(text))

    return convert


def _decimal(what: str, low: float, high: float) -> Callable[[str], str]:
    """A converter for a decimal number from `low` to `high` (at most 3 decimals)."""

    def convert(text: str) -> str:
        if not _DECIMAL.fullmatch(text) or not low <= float(text) <= high:
            raise ArgumentError(f"{what} must be a number from {low:g} to {high:g}, not '{text}'.")
        return f"{float(text):g}"

    return convert


# --- shared option scanning ---------------------------------------------------------------


def _scan(
    words: list[str], flags: tuple[str, ...], valued: dict[str, Callable[[str], str]]
) -> tuple[list[str], list[str]]:
    """Split `words` into canonical options and positional words.

    Only the exact option words in `flags` and `valued` are accepted (no prefixes, no joined
    values); any other word starting with `-` is refused. Options come back in the order of
    the grammar, so the child's argument list is the grammar's, not the user's.
    """
    seen: set[str] = set()
    values: dict[str, str] = {}
    positional: list[str] = []
    stream: Iterator[str] = iter(words)
    for word in stream:
        if word in seen or word in values:
            raise ArgumentError(f"option '{word}' is given twice.")
        if word in flags:
            seen.add(word)
        elif word in valued:
            value = next(stream, None)
            if value is None:
                raise ArgumentError(f"option '{word}' needs a value.")
            values[word] = valued[word](value)
        elif word.startswith("-"):
            raise ArgumentError(f"option '{word}' is not allowed here.")
        else:
            positional.append(word)
    if {"-4", "-6"} <= seen:
        raise ArgumentError("choose one of -4 and -6.")
    options = [flag for flag in flags if flag in seen]
    for option in valued:
        if option in values:
            options += [option, values[option]]
    return options, positional


def _one_host(positional: list[str]) -> str:
    if len(positional) != 1:
        raise ArgumentError("give exactly one HOST, after the options.")
    return _host(positional[0])


# --- ip -----------------------------------------------------------------------------------

# Full words and the only abbreviations accepted; every other prefix iproute2 would take
# (`netns`, `n` + `e`, `vrf`, `-b`, `-ba`, `-force`...) is refused.
IP_OBJECTS = {
    "a": "address", "addr": "address", "address": "address",
    "l": "link", "link": "link",
    "r": "route", "route": "route",
    "n": "neigh", "neigh": "neigh", "neighbor": "neigh", "neighbour": "neigh",
}
IP_VERBS = {"show": "show", "list": "show"}
IP_FLAGS = ("-4", "-6", "-s", "-d", "-o", "-br")
IP_USAGE = (
    "ip [OPTIONS] OBJECT [show|list] [dev IFNAME]",
    "ip [OPTIONS] address|link [show|list] IFNAME",
    "ip [OPTIONS] route get ADDRESS",
    "ip [OPTIONS] monitor [OBJECT...]",
    "  OPTIONS: -4 or -6, -s, -d, -o, -br",
    "  OBJECT: a|addr|address, l|link, r|route, n|neigh|neighbor|neighbour",
)


def _ip_object(word: str) -> str:
    obj = IP_OBJECTS.get(word)
    if obj is None:
        raise ArgumentError(f"'{word}' is not an allowed OBJECT.")
    return obj


def _ip_show(obj: str, rest: list[str]) -> list[str]:
    """`[show|list] [dev IFNAME]`, or a bare IFNAME for address and link."""
    if rest and rest[0] in IP_VERBS:
        rest = rest[1:]
    if not rest:
        return ["show"]
    if len(rest) == 2 and rest[0] == "dev":
        return ["show", "dev", _ifname(rest[1])]
    if len(rest) == 1 and obj in ("address", "link"):
        return ["show", "dev", _ifname(rest[0])]
    raise ArgumentError(f"'{' '.join(rest)}' is not allowed after '{obj}'.")


def _check_ip(words: list[str]) -> Invocation:
    options, positional = _scan(words, IP_FLAGS, {})
    if not positional:
        raise ArgumentError("an OBJECT is needed.")
    head, rest = positional[0], positional[1:]
    if head == "monitor":
        return Invocation([*options, "monitor", *(_ip_object(word) for word in rest)])
    obj = _ip_object(head)
    if obj == "route" and rest[:1] == ["get"]:
        address = _address(rest[1]) if len(rest) == 2 else None
        if address is None:
            raise ArgumentError("'route get' takes one IP ADDRESS.")
        return Invocation([*options, "route", "get", address])
    return Invocation([*options, obj, *_ip_show(obj, rest)])


# --- ping, traceroute ---------------------------------------------------------------------

PING_VALUED = {
    "-c": _integer("COUNT", 1, 1000),
    "-i": _decimal("INTERVAL", 0.2, 60),
    "-s": _integer("SIZE", 0, 65507),
    "-W": _integer("TIMEOUT", 1, 60),
}
PING_USAGE = (
    "ping [-4|-6] [-n] [-c COUNT] [-i INTERVAL] [-s SIZE] [-W TIMEOUT] HOST",
    "  COUNT 1-1000, INTERVAL 0.2-60 s, SIZE 0-65507 bytes, TIMEOUT 1-60 s",
)
PING6_USAGE = ("ping6 [-n] [-c COUNT] [-i INTERVAL] [-s SIZE] [-W TIMEOUT] HOST", PING_USAGE[1])


def _check_ping(words: list[str]) -> Invocation:
    options, positional = _scan(words, ("-4", "-6", "-n"), PING_VALUED)
    return Invocation([*options, _one_host(positional)], caps=(NET_RAW,))


def _check_ping6(words: list[str]) -> Invocation:
    options, positional = _scan(words, ("-n",), PING_VALUED)
    return Invocation([*options, _one_host(positional)], caps=(NET_RAW,))


TRACEROUTE_USAGE = (
    "traceroute [-4|-6] [-n] [-T] [-p PORT] [-m HOPS] HOST",
    "  -T: TCP SYN probes; PORT 1-65535, HOPS 1-64",
)


def _check_traceroute(words: list[str]) -> Invocation:
    valued = {"-p": _integer("PORT", 1, 65535), "-m": _integer("HOPS", 1, 64)}
    options, positional = _scan(words, ("-4", "-6", "-n", "-T"), valued)
    caps = (NET_RAW,) if "-T" in options else ()  # TCP probes need a raw socket
    return Invocation([*options, _one_host(positional)], caps=caps)


# --- DNS: dig, host, nslookup -------------------------------------------------------------

DNS_TYPES = ("A", "AAAA", "ANY", "CAA", "CNAME", "DNSKEY", "DS", "MX", "NS", "PTR", "SOA",
             "SRV", "TXT")
DIG_PLUS = ("+short", "+tcp", "+trace", "+dnssec")
DIG_USAGE = (
    "dig [-4|-6] [@SERVER] [+OPTION...] NAME [TYPE]",
    "dig [-4|-6] [@SERVER] [+OPTION...] -x ADDRESS",
    "  +OPTION: " + " ".join(DIG_PLUS),
    "  TYPE: " + " ".join(DNS_TYPES),
)


def _dns_type(text: str) -> str:
    if text.upper() not in DNS_TYPES:
        raise ArgumentError(f"TYPE '{text}' is not one of {' '.join(DNS_TYPES)}.")
    return text.upper()


def _check_dig(words: list[str]) -> Invocation:
    flags: list[str] = []
    server: list[str] = []
    query: list[str] = []
    stream = iter(words)
    for word in stream:
        if word in flags or (server and word.startswith("@")):
            raise ArgumentError(f"'{word}' is given twice.")
        if query and word == "-x":
            raise ArgumentError("give either a NAME or -x ADDRESS, once.")
        if word in ("-4", "-6", *DIG_PLUS):
            flags.append(word)
        elif word.startswith("@"):
            server = ["@" + _host(word[1:], "SERVER")]
        elif word == "-x":
            address = _address(next(stream, ""))
            if address is None:
                raise ArgumentError("-x takes one IP ADDRESS.")
            query = ["-x", address]
        elif word[:1] in ("-", "+", "@"):
            raise ArgumentError(f"'{word}' is not allowed here.")
        elif not query:
            query = [_dns_name(word)]
        elif len(query) == 1:
            query.append(_dns_type(word))
        else:
            raise ArgumentError(f"'{word}': only one NAME and one TYPE.")
    if not query:
        raise ArgumentError("a NAME to look up is needed.")
    if {"-4", "-6"} <= set(flags):
        raise ArgumentError("choose one of -4 and -6.")
    return Invocation([*flags, *server, *query])


HOST_USAGE = ("host [-4|-6] [-t TYPE] NAME [SERVER]", DIG_USAGE[3])


def _check_host(words: list[str]) -> Invocation:
    options, positional = _scan(words, ("-4", "-6"), {"-t": _dns_type})
    return Invocation([*options, *_name_and_server(positional)])


def _name_and_server(positional: list[str]) -> list[str]:
    if len(positional) not in (1, 2):
        raise ArgumentError("give a NAME and optionally a SERVER.")
    server = [_host(positional[1], "SERVER")] if len(positional) == 2 else []
    return [_dns_name(positional[0]), *server]


def _check_nslookup(words: list[str]) -> Invocation:
    if any(word.startswith("-") for word in words):
        raise ArgumentError("nslookup takes no options here (it would read commands).")
    return Invocation(_name_and_server(words))


# --- ss -----------------------------------------------------------------------------------

# None of these takes a value or reads a file; -K (kill), -F/-D (files), -N (namespace),
# -f/-A (values) and -p are not here. -p is left out because the child runs as nobody and
# would show no process anyway.
SS_LETTERS = "tuwxlanr46seimoH"
SS_USAGE = (f"ss [-{SS_LETTERS}]",
            "  t tcp, u udp, w raw, x unix, l listening, a all, n numeric, s summary")


def _check_ss(words: list[str]) -> Invocation:
    for word in words:
        if len(word) < 2 or word[0] != "-" or any(c not in SS_LETTERS for c in word[1:]):
            raise ArgumentError(f"'{word}' is not allowed here.")
    return Invocation(list(words))


# --- in-process commands ------------------------------------------------------------------


def _no_arguments(words: list[str]) -> Invocation:
    if words:
        raise ArgumentError("takes no arguments.")
    return Invocation([])


def _one_word(words: list[str]) -> Invocation:
    if len(words) != 1:
        raise ArgumentError("takes one COMMAND.")
    return Invocation(list(words))


def _as_typed(words: list[str]) -> Invocation:
    """ncport runs in this process and checks its own arguments (see ncport())."""
    return Invocation(list(words))


COMMANDS: dict[str, Spec] = {
    "ip": Spec(IP_USAGE, "show addresses, links, routes and neighbours", _check_ip, True),
    "ping": Spec(PING_USAGE, "send ICMP echo requests", _check_ping, True),
    "ping6": Spec(PING6_USAGE, "send ICMPv6 echo requests", _check_ping6, True),
    "traceroute": Spec(TRACEROUTE_USAGE, "show the route packets take to HOST",
                       _check_traceroute, True),
    "dig": Spec(DIG_USAGE, "query DNS", _check_dig, True),
    "host": Spec(HOST_USAGE, "look a name or an address up in DNS", _check_host, True),
    "nslookup": Spec(("nslookup NAME [SERVER]",), "look a name or an address up in DNS",
                     _check_nslookup, True),
    "ss": Spec(SS_USAGE, "list sockets", _check_ss, True),
    "ncport": Spec(("ncport HOST PORT [TIMEOUT]",), "test that a TCP port accepts connections",
                   _as_typed),
    "passwd": Spec(("passwd",), "change the console password of admin", _no_arguments),
    "h": Spec(("h",), "list the available commands", _no_arguments),
    "man": Spec(("man COMMAND",), "show help for one command", _one_word),
    "exit": Spec(("exit",), "return to the main menu", _no_arguments),
}
EXTERNAL = tuple(name for name, spec in COMMANDS.items() if spec.external)


def usage(name: str) -> str:
    return "Usage: " + "\n       ".join(COMMANDS[name].usage)


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
    spec = COMMANDS.get(name)
    if spec is None:
        raise CommandRefused(
            f"Unknown command '{name}'. Available: {', '.join(COMMANDS)} (h for help)."
        )
    try:
        allowed = spec.check(args)
    except ArgumentError as exc:
        raise CommandRefused(
            f"{name}: {exc} Other forms are not available here.\n{usage(name)}"
        ) from None
    return Command(name, allowed.args, allowed.caps)


def help_text() -> str:
    """Every allowed shape, one per line, so the list fits an 80x24 serial console; the notes
    on values and what each command is for are in `man COMMAND`."""
    lines = [
        f"  {shape}"
        for spec in COMMANDS.values()
        for shape in spec.usage
        if not shape.startswith(" ")
    ]
    return "\n".join([*lines, "Type man COMMAND for what it does and the values allowed."])


def man_text(name: str) -> str:
    if name not in COMMANDS:
        return f"No help for '{name}'. Available: {', '.join(COMMANDS)}."
    return f"{name}: {COMMANDS[name].description}\n{usage(name)}"


def child_env() -> dict[str, str]:
    return {
        "PATH": SAFE_PATH,
        "LANG": "C.UTF-8",
        "TERM": os.environ.get("TERM", "vt100"),
        "PAGER": "cat",
        "MANPAGER": "cat",
        "LESSSECURE": "1",
    }


class ChildSetupError(Exception):
    """The child cannot be started without privileges; it is not started at all."""


def setpriv_options(caps: tuple[str, ...]) -> list[str]:
    """setpriv's options: nobody/nogroup, no groups, only `caps`, no new privileges.

    The same set goes to the inheritable, ambient and bounding sets: ambient is what carries a
    capability across execve into a program without file capabilities; the bounding set makes
    sure no file capability or setuid bit can add anything else.
    """
    try:
        uid = pwd.getpwnam(CHILD_USER).pw_uid
        gid = grp.getgrnam(CHILD_GROUP).gr_gid
    except KeyError as exc:
        raise ChildSetupError(f"the unprivileged account is missing ({exc.args[0]})") from None
    caps_set = ",".join(["-all", *(f"+{cap}" for cap in caps)])
    return [
        f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
        f"--inh-caps={caps_set}", f"--ambient-caps={caps_set}", f"--bounding-set={caps_set}",
        "--no-new-privs",
    ]


def child_argv(exe: str, cmd: Command) -> list[str]:
    """The argument list that starts `exe`: through setpriv as root, directly otherwise."""
    if os.geteuid() != 0:
        return [exe, *cmd.args]  # already unprivileged: nothing to drop
    setpriv = shutil.which("setpriv", path=SAFE_PATH)
    if setpriv is None:
        raise ChildSetupError("setpriv (util-linux) is not installed")
    return [setpriv, *setpriv_options(cmd.caps), "--", exe, *cmd.args]


def run_external(cmd: Command, search_path: str = SAFE_PATH) -> str | None:
    """Run an allowed program on the terminal; returns a message when it could not start.

    Standard input is /dev/null, so no program can read commands from the terminal; output
    and Ctrl-C stay on the terminal. Ctrl-C reaches the child (same foreground process group)
    and stops it; the console itself ignores the interrupt and waits for the child, so it
    never dies with the child. `search_path` is where the program is looked up (the tests
    point it at a directory of their own).
    """
    exe = shutil.which(cmd.name, path=search_path)
    if exe is None:
        return f"{cmd.name} is not installed on this appliance."
    try:
        argv = child_argv(exe, cmd)
    except ChildSetupError as exc:
        log.warning("event=restricted_command_not_started command=%s reason=%s", cmd.name, exc)
        return f"{cmd.name} cannot be run: {exc}."
    log.info("event=restricted_command command=%s argc=%d caps=%s",
             cmd.name, len(cmd.args), ",".join(cmd.caps) or "none")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=child_env(), cwd="/",
                            close_fds=True)
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
        return usage("ncport")
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
