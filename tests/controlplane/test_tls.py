"""`python -m controlplane serve --tls-cert --tls-key`: HTTPS on the same listener.

A self-signed certificate is made in the test; boto3, the AWS CLI and the appliance's own
link client are pointed at it as their CA, and must refuse the server without it.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import HTTPClientError, SSLError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controlplane.server import ControlPlane, tls_context
from tests.conftest import PYTHON, Proc, child_env, free_port
from tests.controlplane.cpharness import AWS, REGION
from tests.controlplane.test_hostile_api import closed_by_server

pytestmark = pytest.mark.timeout(120)


def make_certificate(where: Path) -> tuple[Path, Path]:
    """A self-signed CA-capable certificate for 127.0.0.1 and localhost (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "controlplane test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = where / "cert.pem", where / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert_file, key_file


def credentials_of(state: Path) -> tuple[str, str]:
    pairs = dict(line.split(" = ", 1) for line in
                 (state / "credentials").read_text().splitlines() if " = " in line)
    return pairs["aws_access_key_id"], pairs["aws_secret_access_key"]


def api(url: str, state: Path, verify: str | bool) -> object:
    key, secret = credentials_of(state)
    return boto3.client(
        "backup-gateway", region_name=REGION, endpoint_url=url, aws_access_key_id=key,
        aws_secret_access_key=secret, verify=verify,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5,
                      read_timeout=10),
    )


@pytest.fixture
def tls_process(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """A real control plane serving HTTPS: (url, state dir, CA file)."""
    cert, key = make_certificate(tmp_path)
    port = free_port()
    state = tmp_path / "state"
    proc = Proc([PYTHON, "-m", "controlplane", "serve", "--listen", f"127.0.0.1:{port}",
                 "--state-dir", str(state), "--tls-cert", str(cert), "--tls-key", str(key)],
                env=child_env())
    try:
        line = proc.wait_for_line(r"event=ready")
        assert f"url=https://127.0.0.1:{port}" in line
        yield f"https://127.0.0.1:{port}", state, cert
    finally:
        proc.stop()
    assert "Traceback" not in proc.output()


@pytest.mark.slow
def test_boto3_and_the_cli_over_https(tls_process: tuple[str, Path, Path],
                                      tmp_path: Path) -> None:
    url, state, ca = tls_process
    assert api(url, state, str(ca)).list_gateways()["Gateways"] == []  # type: ignore[attr-defined]
    with pytest.raises(SSLError):  # the system's CAs do not know this certificate
        api(url, state, True).list_gateways()  # type: ignore[attr-defined]
    with pytest.raises(HTTPClientError):  # plain HTTP to the TLS port: no answer
        api(url.replace("https", "http"), state, True).list_gateways()  # type: ignore[attr-defined]
    key, secret = credentials_of(state)
    done = subprocess.run(
        [AWS, "backup-gateway", "list-gateways", "--endpoint-url", url, "--region", REGION,
         "--ca-bundle", str(ca), "--output", "json"],
        env={**child_env(), "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
             "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
             "HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr


_LINK_SCRIPT = """
import asyncio, sys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from appliance.identity import Identity
from appliance.link import LinkClient, Unreachable

async def main():
    link = LinkClient(sys.argv[1], Identity(Ed25519PrivateKey.generate()))
    try:
        issued = await link.request_activation_key("us-west-2", "STANDARD", None, None)
        print("key", issued.key)
    except Unreachable as exc:
        print("unreachable", exc)
    finally:
        await link.close()

asyncio.run(main())
"""


@pytest.mark.slow
def test_the_appliance_link_verifies_the_certificate(
    tls_process: tuple[str, Path, Path]
) -> None:
    """The appliance's aiohttp session verifies against the system's CAs, which OpenSSL
    takes from SSL_CERT_FILE when set (docs/controlplane.md: a private CA)."""
    url, _, ca = tls_process

    def link(**env: str) -> str:
        return subprocess.run([PYTHON, "-c", _LINK_SCRIPT, url], env=child_env(**env),
                              capture_output=True, text=True, timeout=60).stdout

    assert link(SSL_CERT_FILE=str(ca)).startswith("key ")
    refused = link()
    assert refused.startswith("unreachable") and "certificate verify failed" in refused


def test_a_bad_certificate_is_one_line_and_exit_2(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    base = [PYTHON, "-m", "controlplane", "serve", "--listen", f"127.0.0.1:{free_port()}",
            "--state-dir", str(tmp_path / "state")]
    for extra, expect in (
        (["--tls-cert", str(cert)], "go together"),
        (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(key)],
         "No such file"),
        (["--tls-cert", str(key), "--tls-key", str(cert)], "cannot use TLS certificate"),
    ):
        done = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=30,
                              env=child_env())
        assert done.returncode == 2, done.stderr
        assert expect in done.stderr and "Traceback" not in done.stderr


def test_a_stalled_handshake_is_closed_at_the_head_deadline(tmp_path: Path) -> None:
    """TLS starts only after admission, so the guard's deadline covers the handshake."""
    cert, key = make_certificate(tmp_path)
    plane = ControlPlane(tmp_path / "state")
    plane.guard.head_deadline = 0.5
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        host, port = asyncio.run_coroutine_threadsafe(
            plane.start("127.0.0.1", 0, tls_context(cert, key)), loop).result(10)
        with socket.create_connection((host, port), timeout=10) as stalled:
            started = time.monotonic()
            assert closed_by_server(stalled)
            assert time.monotonic() - started < 5
        ctx = ssl.create_default_context(cafile=str(cert))
        with socket.create_connection((host, port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"POST /gateway/poll HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                        b"Content-Type: application/json\r\n\r\n{}")
            answer = tls.recv(65536)
        assert answer.startswith(b"HTTP/1.1 401")  # unsigned: the link's own refusal
        assert plane.guard.pending == 0
    finally:
        asyncio.run_coroutine_threadsafe(plane.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
