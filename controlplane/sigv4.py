"""AWS Signature Version 4 verification for the JSON API, written from the published algorithm.

The server recomputes the signature the client must have made: canonical request -> string
to sign -> HMAC chain from the secret key over date, region, service and "aws4_request".
The region is whatever the credential scope names (the API is regional: the gateways a call
sees are those of that region). Failures raise ApiError with the `__type` names AWS uses, so
the AWS CLI prints them as it would against AWS.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote, unquote

from controlplane.errors import ApiError
from gatewaycore import rules

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW_SECONDS = 15 * 60
# ~200 bytes an entry, so 40 MB at most; the throttle (50/s a key) keeps it far from full.
REPLAY_CACHE_ENTRIES = 200_000
# Headers whose value decides what a request does: a signature that leaves one out could be
# replayed with another value (a captured GetGateway rewritten to DeleteGateway). botocore
# signs all of these for the JSON protocols. (name, always): always required, or only when
# the request carries that header.
REQUIRED_SIGNED: tuple[tuple[str, bool], ...] = (
    ("host", True),
    ("x-amz-date", True),
    ("x-amz-target", False),
    ("content-type", False),
)
_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+)\s*,\s*"
    r"SignedHeaders=(?P<headers>[^,\s]+)\s*,\s*Signature=(?P<sig>[0-9a-f]{64})\s*"
)


@dataclass(frozen=True)
class Caller:
    """Who signed a request, and for which region; the signature and its date, for the
    replay cache (not part of the caller's identity)."""

    access_key_id: str
    region: str
    signature: str = field(default="", compare=False, repr=False)
    signed_at: float = field(default=0.0, compare=False, repr=False)


class ReplayCache:
    """The signatures accepted within the skew window, so each is accepted once.

    A signature is only valid for MAX_SKEW_SECONDS either side of its X-Amz-Date, so an entry
    can be forgotten once its date is that far in the past: the skew check refuses it then.
    Memory is bounded: when full, the entry with the oldest date goes and `low_water` rises to
    that date, so anything dated at or before it is refused as a possible replay (the cache
    can no longer tell). Evicting by date keeps that mark as low as possible.
    """

    def __init__(self, max_entries: int = REPLAY_CACHE_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self.low_water = float("-inf")
        self._seen: set[bytes] = set()
        self._by_date: list[tuple[float, bytes]] = []  # heap, oldest date first

    def __len__(self) -> int:
        return len(self._seen)

    def remember(self, signature: str, signed_at: float, now: float) -> None:
        """Record a valid signature; ApiError if it was used before or may have been."""
        self._expire(now)
        key = bytes.fromhex(signature)
        if key in self._seen:
            raise ApiError(
                "InvalidSignatureException",
                "Signature already used: this exact signed request was accepted before and "
                "is refused as a replay; sign every request anew",
            )
        if signed_at <= self.low_water:
            mark = datetime.fromtimestamp(self.low_water, UTC).strftime("%Y%m%dT%H%M%SZ")
            raise ApiError(
                "InvalidSignatureException",
                f"Signature refused as a possible replay: the server's replay cache is full "
                f"and only accepts requests dated after {mark}; sign again with the current "
                "time",
            )
        if len(self._seen) >= self.max_entries:
            date, oldest = heapq.heappop(self._by_date)
            self._seen.discard(oldest)
            self.low_water = max(self.low_water, date)
        self._seen.add(key)
        heapq.heappush(self._by_date, (signed_at, key))

    def _expire(self, now: float) -> None:
        horizon = now - MAX_SKEW_SECONDS
        while self._by_date and self._by_date[0][0] < horizon:
            _, key = heapq.heappop(self._by_date)
            self._seen.discard(key)


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
    """Check a signed request; `headers` maps lower-case names to every value received.

    Whether the signature was used before is the caller's to ask (ReplayCache.remember),
    once it knows the call will be served: a throttled call must not use up its signature.
    """
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
    try:
        rules.region_code(region)
    except rules.RuleError:
        raise ApiError(
            "InvalidSignatureException",
            f"Credential should be scoped to a valid region, not '{region}'.",
        ) from None
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
    if signed != sorted(signed) or any(n != n.lower() for n in signed):
        raise ApiError(
            "InvalidSignatureException", "SignedHeaders must be lower case and sorted"
        )
    _require_signed(signed, headers)
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
    return Caller(access_key, region, m.group("sig"), signed_at.timestamp())


def _require_signed(signed: Sequence[str], headers: Mapping[str, Sequence[str]]) -> None:
    """Refuse a signature that leaves out a header deciding what the request does."""
    for name, always in REQUIRED_SIGNED:
        if name not in signed and (always or name in headers):
            raise ApiError(
                "InvalidSignatureException",
                f"'{name}' must be a 'SignedHeader' in the AWS Authorization "
                f"(SignedHeaders={';'.join(signed)})",
            )
