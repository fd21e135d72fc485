"""`GET /` on the activation port: every row of gateway-behaviour.md section 1, good and bad.

One appliance and one control plane serve the whole module: each request issues a fresh key,
and nothing here activates the gateway.
"""

from __future__ import annotations

import re
import socket
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

pytestmark = pytest.mark.slow

KEY_RE = re.compile(r"^[A-Z0-9]{5}(-[A-Z0-9]{5}){4}$")


@pytest.fixture
def page(shared_appliance: Any) -> Any:
    return shared_appliance


def key_of(body: str) -> str:
    key = body.splitlines()[0]
    assert KEY_RE.match(key), body
    return key


@pytest.mark.parametrize(
    ("query", "region"),
    [
        ("activationRegion=us-west-2", "us-west-2"),
        ("activationRegion=eu-central-1", "eu-central-1"),
        ("activationRegion=cn-north-1", "cn-north-1"),
        ("activationRegion=us-gov-west-1", "us-gov-west-1"),
        ("", "us-east-1"),  # missing
        ("activationRegion=", "us-east-1"),  # empty
        ("activationRegion=us-wset-2", "us-east-1"),  # misspelled
        ("activationRegion=xx-nowhere-9", "us-east-1"),  # unknown
    ],
)
def test_redirect_carries_key_and_region(page: Any, query: str, region: str) -> None:
    status, headers, _ = page.get(f"/?{query}&gatewayType=BACKUP_VM")
    assert status == 302
    location = urlsplit(headers["location"])
    assert location.scheme == "https"
    params = parse_qs(location.query)
    assert KEY_RE.match(params["activationKey"][0])
    assert params["activationRegion"] == [region]
    assert "vpcEndpoint" not in params


def test_redirect_console_host_follows_partition(page: Any) -> None:
    _, headers, _ = page.get("/?activationRegion=cn-northwest-1")
    assert urlsplit(headers["location"]).hostname == "console.amazonaws.cn"
    _, headers, _ = page.get("/?activationRegion=us-gov-east-1")
    assert urlsplit(headers["location"]).hostname == "console.amazonaws-us-gov.com"
    _, headers, _ = page.get("/?activationRegion=ap-southeast-2")
    assert urlsplit(headers["location"]).hostname == "ap-southeast-2.console.aws.amazon.com"


def test_redirect_carries_vpc_endpoint(page: Any) -> None:
    vpce = "vpce-050f90485f28f2fd0-iep0e8vq.backup-gateway.us-west-2.vpce.amazonaws.com"
    status, headers, _ = page.get(f"/?activationRegion=us-west-2&vpcEndpoint={vpce}")
    assert status == 302
    params = parse_qs(urlsplit(headers["location"]).query)
    assert params["vpcEndpoint"] == [vpce]
    assert params["activationRegion"] == ["us-west-2"]


@pytest.mark.parametrize(
    "query",
    [
        "activationRegion=us-west-2&gatewayType=BACKUP_VM&endpointType=DUALSTACK&ipVersion=ipv4"
        "&no_redirect",
        "activationRegion=us-west-2&gatewayType=BACKUP_VM&endpointType=DUALSTACK&ipVersion=ipv6"
        "&no_redirect",
        "activationRegion=us-west-2&endpointType=STANDARD&no_redirect",
        "activationRegion=us-west-2&no_redirect=",  # flag with an (empty) value
        "activationRegion=us-west-2&no_redirect=true",
        "no_redirect&activationRegion=us-west-2&someUnknownParam=42",  # extra params ignored
        "no_redirect&gatewayType=&endpointType=",  # empty counts as absent
    ],
)
def test_no_redirect_returns_key_in_body(page: Any, query: str) -> None:
    status, headers, body = page.get(f"/?{query}")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain")
    assert body.endswith("\n")
    key_of(body)


def test_each_request_gets_a_fresh_key(page: Any) -> None:
    keys = {key_of(page.get("/?activationRegion=us-west-2&no_redirect")[2]) for _ in range(3)}
    assert len(keys) == 3


@pytest.mark.parametrize(
    ("query", "param", "accepted"),
    [
        ("gatewayType=STORED", "gatewayType", "BACKUP_VM"),
        ("gatewayType=backup_vm", "gatewayType", "BACKUP_VM"),
        ("gatewayType=SYNC", "gatewayType", "BACKUP_VM"),
        ("endpointType=FIPS", "endpointType", "DUALSTACK"),
        ("endpointType=dualstack", "endpointType", "DUALSTACK"),
        ("endpointType=DUALSTACK&ipVersion=ipv5", "ipVersion", "ipv6"),
        ("endpointType=DUALSTACK&ipVersion=IPv4", "ipVersion", "ipv4"),
        ("ipVersion=ipv6", "ipVersion", "DUALSTACK"),
        ("endpointType=STANDARD&ipVersion=ipv6", "ipVersion", "DUALSTACK"),
        ("vpcEndpoint=not%20a%20dns%20name", "vpcEndpoint", "DNS name"),
        ("vpcEndpoint=-bad-.example.com", "vpcEndpoint", "DNS name"),
        ("vpcEndpoint=single-label", "vpcEndpoint", "DNS name"),
        ("vpcEndpoint=" + "a" * 64 + ".example.com", "vpcEndpoint", "DNS name"),
    ],
)
def test_bad_values_are_400_naming_param_and_accepted(
    page: Any, query: str, param: str, accepted: str
) -> None:
    status, headers, body = page.get(f"/?activationRegion=us-west-2&{query}&no_redirect")
    assert status == 400
    assert headers["content-type"].startswith("text/plain")
    assert param in body and accepted in body
    assert "Traceback" not in body


@pytest.mark.parametrize("path", ["/activate", "/favicon.ico", "//", "/index.html?no_redirect"])
def test_other_paths_are_404(page: Any, path: str) -> None:
    status, _, _ = page.get(path)
    assert status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
def test_other_methods_are_405(page: Any, method: str) -> None:
    status, headers, _ = page.get("/?no_redirect", method=method)
    assert status == 405
    assert headers["allow"] == "GET"


def raw_request(port: int, data: bytes, timeout: float = 30) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_oversized_header_is_431(page: Any) -> None:
    req = b"GET /?no_redirect HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    assert status_of(raw_request(page.port, req)) == 431


def test_too_many_headers_is_431(page: Any) -> None:
    headers = b"".join(b"X-H%d: 1\r\n" % i for i in range(200))
    req = b"GET /?no_redirect HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    assert status_of(raw_request(page.port, req)) == 431


def test_oversized_body_is_413(page: Any) -> None:
    req = b"GET /?no_redirect HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    assert status_of(raw_request(page.port, req)) == 413


def test_chunked_body_is_refused(page: Any) -> None:
    req = b"GET /?no_redirect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert status_of(raw_request(page.port, req)) == 400


def test_garbage_request_line_is_400(page: Any) -> None:
    assert status_of(raw_request(page.port, b"HELLO\r\n\r\n")) == 400
    assert status_of(raw_request(page.port, b"GET / HTTP/2.0\r\n\r\n")) == 505


def test_small_body_is_read_and_ignored(page: Any) -> None:
    req = b"GET /?no_redirect HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    response = raw_request(page.port, req)
    assert status_of(response) == 200
    assert KEY_RE.match(response.split(b"\r\n\r\n", 1)[1].decode().strip())


def test_slow_clients_do_not_stall_others(page: Any) -> None:
    """Slowloris: many connections trickling a request head never finish it; meanwhile
    normal requests are answered, and the server ends the slow connections itself."""
    slow = []
    for i in range(60):
        sock = socket.create_connection(("127.0.0.1", page.port), timeout=30)
        if i % 3:  # a third of them send nothing at all (idle connections)
            sock.sendall(b"GET /?no_redirect HTTP/1.1\r\nHost: x\r\n")
        slow.append(sock)
    try:
        for sock in slow[1::3]:
            sock.sendall(b"X-Trickle: 1\r\n")
        status, _, body = page.get("/?activationRegion=us-west-2&no_redirect")
        assert status == 200
        key_of(body)
        # The server gives up on each slow connection (408 then close) within its deadline.
        deadline = time.monotonic() + 30
        for sock in slow:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            data = b""
            with_eof = False
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    with_eof = True
                    break
                data += chunk
            assert with_eof
            assert data.startswith(b"HTTP/1.1 408 ")
    finally:
        for sock in slow:
            sock.close()
