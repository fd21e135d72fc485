"""The vSphere simulator (build/vcsim/vcsim, built by tools/vcsim/build.sh) as a test process.

The test makes its own CA and a server certificate for 127.0.0.1, ::1 and localhost with the
`cryptography` package (the simulator's built-in certificate has a key too weak for a
default TLS client), so the connector is tested with verification on: trusted through the
CA file, refused without it.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / "build" / "vcsim" / "vcsim"
USERNAME = "backup-admin@vsphere.local"
PASSWORD = "Vc-S1m-secret"


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) PEM files in `directory`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test VMCA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@dataclass
class Vcsim:
    process: subprocess.Popen[str]
    port: int
    ca_file: Path
    started_s: float

    def rest(self, method: str, path: str, payload: object = None,
             session: str | None = None) -> object:
        """One vAPI REST call, as an administrator would make it to set up tags."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if session:
            headers["vmware-api-session-id"] = session
        else:
            token = b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        request = urllib.request.Request(
            f"https://127.0.0.1:{self.port}/rest{path}", method=method, headers=headers,
            data=None if payload is None else json.dumps(payload).encode())
        context = ssl.create_default_context(cafile=str(self.ca_file))
        # no proxy from the environment: loopback only
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=context))
        with opener.open(request, timeout=10) as response:
            body = response.read()
        return json.loads(body)["value"] if body else None

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start(port: int, directory: Path, timeout: float = 30.0) -> Vcsim:
    """Start the simulator (1 datacenter, 1 cluster of 3 hosts, 1 standalone host, 2 VMs per
    resource pool, in a folder) on 127.0.0.1:port; returns once it printed event=ready."""
    started = time.monotonic()
    ca, cert, key = make_certificates(directory)
    process = subprocess.Popen(
        [str(BINARY), "-l", f"127.0.0.1:{port}", "-username", USERNAME, "-password", PASSWORD,
         "-tlscert", str(cert), "-tlskey", str(key), "-folder", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until ready or exit
    if "event=ready" not in line:
        process.wait(timeout)
        raise RuntimeError(f"vcsim did not start (exit {process.returncode}): {line!r}")
    return Vcsim(process, port, ca, time.monotonic() - started)
