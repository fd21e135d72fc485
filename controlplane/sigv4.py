"""AWS Signature Version 4 verification for the JSON API, written from the published algorithm.

The server recomputes the signature the client must have made: canonical request -> string
to sign -> HMAC chain from the secret key over date, region, service and "aws4_request".
The region is whatever the credential scope names (the API is regional: the gateways a call
sees are those of that region). Failures raise ApiError with the `__type` names AWS uses, so
the AWS CLI prints them as it would against AWS.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, unquote

from controlplane.errors import ApiError

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW_SECONDS = 15 * 60
REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-\d{1,2}")
_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+)\s*,\s*"
    r"SignedHeaders=(?P<headers>[^,\s]+)\s*,\s*Signature=(?P<sig>[0-9a-f]{64})\s*"
)


@dataclass(frozen=True)
class Caller:
    """Who signed a request, and for which region."""

    access_key_id: str
    region: str


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    k = _hmac(("AWS4" + secret).encode("utf-8"), date)
    k = _hmac(k, region)
    k = _hmac(k, service)
    return _hmac(k, "aws4_request")


def _encode(text: str) -> str:
    return quote(text, safe="-_.~")


def canonical_query(raw_query: str) -> str:
    pairs = []
    for part in raw_query.split("&") if raw_query else []:
        key, _, value = part.partition("=")
        pairs.append((_encode(unquote(key)), _encode(unquote(value))))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def canonical_uri(raw_path: str) -> str:
    """The path as botocore signs it for non-S3 services: normalised, then encoded again."""
    segments: list[str] = []
    for seg in raw_path.split("/"):
        if seg == "..":
            if segments:
                segments.pop()
        elif seg not in ("", "."):
            segments.append(seg)
    path = "/" + "/".join(segments)
    if raw_path.endswith("/") and path != "/":
        path += "/"
    return quote(path, safe="/~")


def canonical_request(
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Mapping[str, Sequence[str]],
    signed: Sequence[str],
    payload_hash: str,
) -> str:
    lines = []
    for name in signed:
        values = headers.get(name, [])
        lines.append(f"{name}:{','.join(' '.join(v.split()) for v in values)}\n")
    return "\n".join(
        [
            method.upper(),
            canonical_uri(raw_path),
            canonical_query(raw_query),
            "".join(lines),
            ";".join(signed),
            payload_hash,
        ]
    )


def verify(
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Mapping[str, Sequence[str]],
    body: bytes,
    lookup_secret: Callable[[str], str | None],
    service: str,
    now: float,
) -> Caller:
    """Check a signed request; `headers` maps lower-case names to every value received."""
    auth = headers.get("authorization")
    if not auth:
        raise ApiError("MissingAuthenticationTokenException", "Missing Authentication Token")
    m = _AUTH_RE.fullmatch(auth[0])
    if not m:
        raise ApiError(
            "IncompleteSignatureException",
            f"Authorization header must be '{ALGORITHM} Credential=KEY/DATE/REGION/SERVICE/"
            "aws4_request, SignedHeaders=..., Signature=<64 hex digits>'",
        )
    scope = m.group("cred").split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise ApiError(
            "IncompleteSignatureException",
            "Credential must be KEY/YYYYMMDD/REGION/SERVICE/aws4_request",
        )
    access_key, date, region, scope_service, _ = scope
    secret = lookup_secret(access_key)
    if secret is None:
        raise ApiError(
            "UnrecognizedClientException",
            f"The security token included in the request is invalid: access key "
            f"'{access_key}' is not in this control plane's credentials file.",
        )
    if scope_service != service:
        raise ApiError(
            "InvalidSignatureException",
            f"Credential should be scoped to correct service: '{service}'.",
        )
    if not REGION_RE.fullmatch(region):
        raise ApiError(
            "InvalidSignatureException",
            f"Credential should be scoped to a valid region, not '{region}'.",
        )
    amz_date = (headers.get("x-amz-date") or [""])[0]
    try:
        signed_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise ApiError(
            "IncompleteSignatureException",
            "X-Amz-Date header must be present as YYYYMMDD'T'HHMMSS'Z'",
        ) from None
    if amz_date[:8] != date:
        raise ApiError(
            "InvalidSignatureException",
            f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
            f"from HTTP: '{date}' != '{amz_date[:8]}'",
        )
    skew = signed_at.timestamp() - now
    if abs(skew) > MAX_SKEW_SECONDS:
        server = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
        raise ApiError(
            "InvalidSignatureException",
            f"Signature expired: {amz_date} is more than 15 minutes from the server time "
            f"{server}; check the client's clock",
        )
    signed = m.group("headers").split(";")
    if "host" not in signed:
        raise ApiError("InvalidSignatureException", "The Host header must be signed")
    if signed != sorted(signed) or any(n != n.lower() for n in signed):
        raise ApiError(
            "InvalidSignatureException", "SignedHeaders must be lower case and sorted"
        )
    payload_hash = hashlib.sha256(body).hexdigest()
    declared = (headers.get("x-amz-content-sha256") or [None])[0]
    if declared is not None and declared != payload_hash:
        raise ApiError(
            "InvalidSignatureException", "x-amz-content-sha256 does not match the body"
        )
    creq = canonical_request(method, raw_path, raw_query, headers, signed, payload_hash)
    string_to_sign = "\n".join(
        [
            ALGORITHM,
            amz_date,
            f"{date}/{region}/{service}/aws4_request",
            hashlib.sha256(creq.encode("utf-8")).hexdigest(),
        ]
    )
    expected = hmac.new(
        signing_key(secret, date, region, service), string_to_sign.encode("utf-8"),
        hashlib.sha256,
    ).hexdigest()
    if not hmac.compare_digest(expected, m.group("sig")):
        raise ApiError(
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method.",
        )
    return Caller(access_key, region)
