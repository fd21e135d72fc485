"""The restricted command prompt (console menu 6) cannot be escaped.

A hostile tester got a root shell with `ip netns add x` + `ip netns e x /bin/sh` (iproute2 takes
any prefix of a word), commands from the terminal with `ip -ba -`, and root-only files with
`dig -f`, `ip -b FILE`, `ss -F FILE`. These tests hold the fix in three places: the grammar
refuses every shape that is not listed (unit tables), the real console in a pty answers such
lines with the usage and starts no shell, and a child really runs as nobody, with at most
CAP_NET_RAW, no new privileges and /dev/null as standard input (real setpriv, real kernel).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.system import restricted

CAP_NET_RAW = 1 << 13
NOBODY = 65534

# (line, the word the refusal must name or the problem it must state)
ESCAPES = [
    # namespaces and VRFs run programs: any spelling of them
    ("ip netns add x", "netns"),
    ("ip netns e x /bin/sh", "netns"),
    ("ip netns exec x sh", "netns"),
    ("ip netn exec x sh", "netn"),
    ("ip n e x sh", "not allowed after"),
    ("ip n exec x sh", "not allowed after"),
    ("ip vrf exec x sh", "vrf"),
    ("ip vr e x sh", "vr"),
    ("ip -n x link", "-n"),
    ("ip -netns x link", "-netns"),
    # batch mode reads commands from a file or the terminal
    ("ip -ba -", "-ba"),
    ("ip -b /etc/shadow", "-b"),
    ("ip -batch /etc/shadow", "-batch"),
    ("ip --batch /etc/shadow", "--batch"),
    ("ip -bat x", "-bat"),
    ("ip -force -b x", "-force"),
    ("ip -f inet addr", "-f"),
    ("ip -c addr", "-c"),
    # changes, not diagnostics
    ("ip addr add 1.2.3.4/24 dev eth0", "not allowed after"),
    ("ip a a 1.2.3.4/24 dev eth0", "not allowed after"),
    ("ip link set eth0 down", "not allowed after"),
    ("ip l s eth0 down", "not allowed after"),
    ("ip route add default via 10.0.0.1", "not allowed after"),
    ("ip route flush", "not allowed after"),
    ("ip r f", "not allowed after"),
    ("ip route get -b", "-b"),
    ("ip route get x", "ADDRESS"),
    ("ip neigh del 10.0.0.1 dev eth0", "not allowed after"),
    ("ip addr show dev -b", "-b"),
    ("ip addr show dev ../../x", "IFNAME"),
    ("ip route show lo", "not allowed after"),
    ("ip monitor file /etc/shadow", "file"),
    ("ip tunnel show", "tunnel"),
    ("ip xfrm state", "xfrm"),
    ("ip -s -s link", "twice"),
    ("ip -4 -6 addr", "-4 and -6"),
    ("ip", "OBJECT"),
    # dig: files, keys, unlisted + options, unlisted types
    ("dig -f /etc/shadow", "-f"),
    ("dig -k /etc/shadow", "-k"),
    ("dig -y hmac-sha256:k:c2VjcmV0 example.com", "-y"),
    ("dig +fi x", "+fi"),
    ("dig +sh example.com", "+sh"),
    ("dig -p 53 example.com", "-p"),
    ("dig example.com AXFR", "AXFR"),
    ("dig example.com A extra", "only one"),
    ("dig @-f example.com", "SERVER"),
    ("dig -x example.com", "-x"),
    ("dig", "NAME"),
    ("dig -4 -6 example.com", "-4 and -6"),
    # ping: flood, preload, pattern, unbounded numbers, option-like hosts
    ("ping -f 127.0.0.1", "-f"),
    ("ping -l 3 127.0.0.1", "-l"),
    ("ping -p ff 127.0.0.1", "-p"),
    ("ping -i 0.1 127.0.0.1", "INTERVAL"),
    ("ping -i 0 127.0.0.1", "INTERVAL"),
    ("ping -c 0 127.0.0.1", "COUNT"),
    ("ping -c 99999 127.0.0.1", "COUNT"),
    ("ping -c -1 127.0.0.1", "COUNT"),
    ("ping -c 0x10 127.0.0.1", "COUNT"),
    ("ping -c3 127.0.0.1", "-c3"),
    ("ping -s 70000 127.0.0.1", "SIZE"),
    ("ping -W 0 127.0.0.1", "TIMEOUT"),
    ("ping -c", "needs a value"),
    ("ping", "exactly one HOST"),
    ("ping 127.0.0.1 127.0.0.2", "exactly one HOST"),
    ("ping -- -f", "--"),
    ("ping bad_host!", "not a host name"),
    ("ping 300.1.1.1/24", "not a host name"),
    ("ping6 -4 ::1", "-4"),
    # traceroute: first TTL, gateways, interfaces, sources, out-of-range numbers
    ("traceroute -f 3 10.0.0.1", "-f"),
    ("traceroute -g 10.0.0.2 10.0.0.1", "-g"),
    ("traceroute -i eth0 10.0.0.1", "-i"),
    ("traceroute -s 10.0.0.9 10.0.0.1", "-s"),
    ("traceroute -m 300 10.0.0.1", "HOPS"),
    ("traceroute -p 0 10.0.0.1", "PORT"),
    ("traceroute 10.0.0.1 1400", "exactly one HOST"),
    # ss: kill, filter files, dumps, namespaces, processes, long options, filters
    ("ss -K", "-K"),
    ("ss -tK", "-tK"),
    ("ss -F /etc/shadow", "-F"),
    ("ss --filter /etc/shadow", "--filter"),
    ("ss -D /tmp/x", "-D"),
    ("ss -N x", "-N"),
    ("ss -p", "-p"),
    ("ss -A tcp", "-A"),
    ("ss state established", "state"),
    # host and nslookup: no options that would make them read commands or files
    ("nslookup", "NAME"),
    ("nslookup -", "options"),
    ("nslookup -query=mx example.com", "options"),
    ("nslookup example.com - ", "options"),
    ("host -l example.com", "-l"),
    ("host -t AXFR example.com", "AXFR"),
    ("host example.com 10.0.0.1 extra", "a NAME and optionally a SERVER"),
    # in-process commands take only their own arguments
    ("exit now", "no arguments"),
    ("h ip", "no arguments"),
    ("passwd root", "no arguments"),
    ("man", "one COMMAND"),
]


@pytest.mark.parametrize(("line", "problem"), ESCAPES, ids=[line for line, _ in ESCAPES])
def test_escape_attempts_are_refused_with_the_usage(line: str, problem: str) -> None:
    name = line.split()[0]
    with pytest.raises(restricted.CommandRefused) as refused:
        restricted.parse(line)
    message = str(refused.value)
    assert problem in message
    assert "Usage: " + restricted.COMMANDS[name].usage[0] in message


# (line, the argument list the child gets, the capabilities it gets)
ALLOWED = [
    ("ip a", ["address", "show"], ()),
    ("ip addr", ["address", "show"], ()),
    ("ip address show", ["address", "show"], ()),
    ("ip addr show lo", ["address", "show", "dev", "lo"], ()),
    ("ip -4 -s addr list dev eth0", ["-4", "-s", "address", "show", "dev", "eth0"], ()),
    ("ip -o link show lo", ["-o", "link", "show", "dev", "lo"], ()),
    ("ip -br l", ["-br", "link", "show"], ()),
    ("ip -6 r", ["-6", "route", "show"], ()),
    ("ip route show dev eth0", ["route", "show", "dev", "eth0"], ()),
    ("ip route get 10.1.2.3", ["route", "get", "10.1.2.3"], ()),
    ("ip -6 route get 2001:db8::1", ["-6", "route", "get", "2001:db8::1"], ()),
    ("ip n", ["neigh", "show"], ()),
    ("ip neighbour show dev ens192", ["neigh", "show", "dev", "ens192"], ()),
    ("ip monitor link", ["monitor", "link"], ()),
    ("ip monitor", ["monitor"], ()),
    ("ping 127.0.0.1", ["127.0.0.1"], ("net_raw",)),
    ("ping -c 1 '127.0.0.1'", ["-c", "1", "127.0.0.1"], ("net_raw",)),
    ("ping example.com -c 3 -i 0.2 -s 1472 -W 2 -4",
     ["-4", "-c", "3", "-i", "0.2", "-s", "1472", "-W", "2", "example.com"], ("net_raw",)),
    ("ping -6 fe80::1%eth0", ["-6", "fe80::1%eth0"], ("net_raw",)),
    ("ping6 -n -c 2 ::1", ["-n", "-c", "2", "::1"], ("net_raw",)),
    ("traceroute -n 10.0.0.1", ["-n", "10.0.0.1"], ()),
    ("traceroute -T -p 443 -m 20 gw.example.net",
     ["-T", "-p", "443", "-m", "20", "gw.example.net"], ("net_raw",)),
    ("dig example.com", ["example.com"], ()),
    ("dig @10.0.0.2 example.com mx +short",
     ["+short", "@10.0.0.2", "example.com", "MX"], ()),
    ("dig -x 192.0.2.1", ["-x", "192.0.2.1"], ()),
    ("dig _ldap._tcp.example.com. SRV", ["_ldap._tcp.example.com.", "SRV"], ()),
    ("dig . NS +trace", ["+trace", ".", "NS"], ()),
    ("host example.com", ["example.com"], ()),
    ("host -t AAAA example.com 10.0.0.2", ["-t", "AAAA", "example.com", "10.0.0.2"], ()),
    ("host 192.0.2.1", ["192.0.2.1"], ()),
    ("nslookup example.com 10.0.0.2", ["example.com", "10.0.0.2"], ()),
    ("ss", [], ()),
    ("ss -tuln", ["-tuln"], ()),
    ("ss -s", ["-s"], ()),
    ("ncport 127.0.0.1 443 2", ["127.0.0.1", "443", "2"], ()),
    ("man ip", ["ip"], ()),
]


@pytest.mark.parametrize(("line", "args", "caps"), ALLOWED, ids=[line for line, _, _ in ALLOWED])
def test_diagnostic_lines_are_allowed_and_rebuilt(
    line: str, args: list[str], caps: tuple[str, ...]
) -> None:
    cmd = restricted.parse(line)
    assert cmd is not None
    assert (cmd.name, cmd.args, cmd.caps) == (line.split()[0], args, caps)


def test_help_and_man_show_the_grammar() -> None:
    """`h` lists every allowed shape; `man CMD` adds the allowed words and bounds."""
    listed = restricted.help_text()
    for spec in restricted.COMMANDS.values():
        assert spec.usage[0] in listed
    assert all(len(line) <= 80 for line in listed.splitlines())  # an 80x24 serial console
    assert "OBJECT: a|addr|address, l|link, r|route, n|neigh" in restricted.man_text("ip")
    assert "INTERVAL 0.2-60 s" in restricted.man_text("ping")
    assert "+OPTION: +short" in restricted.man_text("dig")


# --- a child really runs unprivileged ---------------------------------------------------

PROBE = """#!/bin/sh
echo "probe-uid=$(id -u)"
grep -E '^(Uid|Gid|Groups|CapEff|CapPrm|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status \
    | sed 's/^/probe-/; s/:[[:space:]]*/=/; s/[[:space:]]\\+/ /g'
echo "probe-stdin=$(readlink /proc/self/fd/0)"
"""


@pytest.fixture
def probe_dir() -> Iterator[Path]:
    """Programs named like allowed commands that report who they run as.

    Under /tmp with mode 0755, not under pytest's 0700 tmp_path: the child runs as nobody and
    must be able to reach the script.
    """
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="restricted-probe-") as name:
        folder = Path(name)
        folder.chmod(0o755)
        for program in ("ping", "ip"):
            script = folder / program
            script.write_text(PROBE)
            script.chmod(0o755)
        yield folder


@contextlib.contextmanager
def _stdin_is_a_pipe() -> Iterator[None]:
    """Make this process's fd 0 a pipe (CI may already give it /dev/null), so a child that
    inherited it would report `pipe:[...]` rather than pass by luck."""
    saved = os.dup(0)
    read_end, write_end = os.pipe()
    os.dup2(read_end, 0)
    try:
        yield
    finally:
        os.dup2(saved, 0)
        for fd in (saved, read_end, write_end):
            os.close(fd)


def _probe_report(output: str) -> dict[str, str]:
    found = re.findall(r"^probe-([A-Za-z]+)=(.*)$", output, flags=re.MULTILINE)
    return {key: value.strip() for key, value in found}


@pytest.mark.timeout(30)
@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs the console to be root")
@pytest.mark.parametrize(("line", "caps"), [("ping -c 1 127.0.0.1", CAP_NET_RAW),
                                            ("ip addr show", 0)])
def test_child_runs_as_nobody_with_only_its_capability(
    probe_dir: Path, capfd: pytest.CaptureFixture[str], line: str, caps: int
) -> None:
    cmd = restricted.parse(line)
    assert cmd is not None
    with _stdin_is_a_pipe():
        assert restricted.run_external(cmd, search_path=str(probe_dir)) is None
    report = _probe_report(capfd.readouterr().out)
    assert report["uid"] == str(NOBODY), report
    assert report["Uid"].split() == [str(NOBODY)] * 4  # real, effective, saved, fs: no way back
    assert report["Gid"].split() == [str(NOBODY)] * 4
    assert report["Groups"] == ""
    for capset in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(report[capset], 16) == caps, (capset, report)
    assert report["NoNewPrivs"] == "1"
    assert report["stdin"] == "/dev/null"


@pytest.mark.timeout(30)
@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs the console to be root")
def test_real_ip_works_unprivileged_and_cannot_read_root_files(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The real programs still do their job as nobody; a file-reading option, were one ever let
    through, would meet the kernel's refusal rather than /etc/shadow."""
    cmd = restricted.parse("ip -o link show lo")
    assert cmd is not None
    assert restricted.run_external(cmd) is None
    assert "lo:" in capfd.readouterr().out
    escaped = restricted.Command("ip", ["-batch", "/etc/shadow"])  # what parse() refuses
    assert restricted.run_external(escaped) is None
    out, err = capfd.readouterr()
    assert "root:" not in out + err
    assert re.search(r"Permission denied|Cannot open", err), err


# --- the real console in a pty ------------------------------------------------------------


@pytest.fixture
def no_netns_left() -> Iterator[str]:
    """A namespace name no test leaves behind, even when the grammar regresses and lets
    `ip netns add` through (the console runs as root here)."""
    name = f"esc{os.getpid()}"
    yield name
    ip = shutil.which("ip", path=restricted.SAFE_PATH)
    if ip and name in subprocess.run([ip, "netns", "list"], capture_output=True,
                                     text=True, check=False).stdout:
        subprocess.run([ip, "netns", "delete", name], check=False)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_console_refuses_escapes_and_starts_no_shell(
    shared_appliance, console_factory, no_netns_left: str
) -> None:
    """Each escape is answered with the usage; `id` afterwards proves the prompt is still the
    restricted one (a shell, or `ip -batch` reading the terminal, would run or eat it)."""
    con = console_factory(shared_appliance.socket_path)
    con.login()
    con.send("6")
    con.seen("Appliance#")
    escapes = [
        (f"ip netns add {no_netns_left}", "Usage: ip [OPTIONS] OBJECT"),
        (f"ip netns e {no_netns_left} /bin/sh", "Usage: ip [OPTIONS] OBJECT"),
        ("ip -ba -", "Usage: ip [OPTIONS] OBJECT"),
        ("dig -f /etc/shadow", "Usage: dig [-4|-6] [@SERVER]"),
    ]
    for line, usage in escapes:
        con.send(line)
        con.seen(usage, timeout=10)
        con.answer("Appliance#", "id")
        con.seen("Unknown command 'id'", timeout=10)
        con.seen("Appliance#", timeout=10)
    con.send("h")
    con.seen("ping [-4|-6] [-n] [-c COUNT]", timeout=10)
    con.answer("Appliance#", "man dig")
    con.seen("+OPTION: +short", timeout=10)
    con.answer("Appliance#", "ip addr show")
    con.seen("lo: <LOOPBACK", timeout=10)
    con.answer("Appliance#", "exit")
    con.seen("Enter command:", timeout=10)
    transcript = con.transcript.read_text()
    assert "uid=" not in transcript
    assert "root:" not in transcript
    assert not re.search(r"^\s*(sh-[0-9.]+|#)\s*$", transcript, flags=re.MULTILINE)
