"""Listening: IPv4 and IPv6 sockets side by side; the IPv6 one is V6ONLY."""

from __future__ import annotations

import http.client
import socket
from typing import Any

import pytest

from appliance.config import ListenAddress
from appliance.listeners import bind

pytestmark = pytest.mark.slow


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")


@needs_ipv6
def test_ipv6_socket_is_v6only() -> None:
    sock = bind(ListenAddress("::1", 0))
    assert sock is not None
    try:
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        sock.close()


@needs_ipv6
def test_activation_page_over_ipv4_and_ipv6(control_plane: Any, make_appliance: Any) -> None:
    app = make_appliance(control_plane.url, start=False)
    app.extra_args = ["--listen", f"[::1]:{app.port}"]  # added to the fixture's 127.0.0.1
    app.start()
    line = app.proc.wait_for_line("event=ready")
    assert f"127.0.0.1:{app.port}" in line and f"[::1]:{app.port}" in line
    for host in ("127.0.0.1", "::1"):
        conn = http.client.HTTPConnection(host, app.port, timeout=30)
        try:
            conn.request("GET", "/?activationRegion=us-west-2&no_redirect")
            resp = conn.getresponse()
            assert resp.status == 200
            assert len(resp.read().decode().strip()) == 29
        finally:
            conn.close()
    app.proc.wait_for_line(r"remote=::1 method=GET path=/ status=200")


def test_port_in_use_is_one_line(control_plane: Any, make_appliance: Any) -> None:
    import subprocess

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        app = make_appliance(control_plane.url, start=False)
        app.port = busy.getsockname()[1]
        done = subprocess.run(app.argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert f"cannot listen on 127.0.0.1:{app.port}" in last
    assert "Traceback" not in done.stderr
