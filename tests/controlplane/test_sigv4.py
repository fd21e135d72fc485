"""The SigV4 verifier against requests signed by botocore's own signer (no network)."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from controlplane import sigv4
from controlplane.errors import ApiError

KEY, SECRET = "AKIATESTTESTTESTTEST", "secret/with+chars"


def signed(body: bytes = b"{}", region: str = "us-west-2", service: str = "backup-gateway",
           secret: str = SECRET, url: str = "http://127.0.0.1:8443/") -> AWSRequest:
    req = AWSRequest(method="POST", url=url, data=body, headers={
        "Content-Type": "application/x-amz-json-1.0",
        "X-Amz-Target": "BackupOnPremises_v20210101.ListGateways",
    })
    SigV4Auth(Credentials(KEY, secret), service, region).add_auth(req)
    return req


def check(req: AWSRequest, body: bytes | None = None, now: float | None = None) -> sigv4.Caller:
    parts = urlsplit(req.url)
    headers: dict[str, list[str]] = {}
    for name, value in req.headers.items():
        headers.setdefault(name.lower(), []).append(value)
    headers.setdefault("host", [parts.netloc])
    return sigv4.verify("POST", parts.path or "/", parts.query, headers,
                        req.body if body is None else body,
                        {KEY: SECRET}.get, "backup-gateway", time.time() if now is None else now)


def code_of(req: AWSRequest, **kw: object) -> str:
    with pytest.raises(ApiError) as err:
        check(req, **kw)  # type: ignore[arg-type]
    return err.value.code


def test_accepts_botocore_signatures_and_reads_the_region() -> None:
    assert check(signed(region="eu-central-1")) == sigv4.Caller(KEY, "eu-central-1")
    assert check(signed(url="http://127.0.0.1:8443/?b=2&a=1%20x")).region == "us-west-2"


def test_refusals() -> None:
    assert code_of(signed(secret="other")) == "InvalidSignatureException"
    assert code_of(signed(), body=b'{"MaxResults": 1}') == "InvalidSignatureException"
    assert code_of(signed(service="s3")) == "InvalidSignatureException"
    assert code_of(signed(region="nowhere")) == "InvalidSignatureException"
    assert code_of(signed(), now=time.time() + 16 * 60) == "InvalidSignatureException"
    req = signed()
    req.headers.replace_header("Authorization", req.headers["Authorization"].replace(
        KEY, "AKIAUNKNOWN"))
    assert code_of(req) == "UnrecognizedClientException"
    del req.headers["Authorization"]
    assert code_of(req) == "MissingAuthenticationTokenException"
    req = signed()
    req.headers.replace_header("Authorization", "AWS4-HMAC-SHA256 garbage")
    assert code_of(req) == "IncompleteSignatureException"


def test_signing_key_matches_the_published_example() -> None:
    # The worked example of the AWS General Reference (secret, 20150830, us-east-1, iam).
    key = sigv4.signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20150830", "us-east-1",
                            "iam")
    assert key.hex() == "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"
