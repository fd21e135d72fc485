"""What every AWS API call passes before its operation runs, whatever its wire protocol
(JSON 1.0 and RPC v2 CBOR in protocol.py, restJson1 in restjson.py): its SigV4 signature
for the service, then its access key's rate. One place, so the two APIs cannot drift.

Whether the signature is spent (sigv4.ReplayCache) is the caller's to decide afterwards,
once it knows the operation changes state: a throttled call must not use up its signature.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from controlplane import sigv4
from controlplane.errors import ApiError
from controlplane.throttle import Throttle


def signed_caller(request: web.Request, body: bytes, lookup_secret: Callable[[str], str | None],
                  service: str, now: float, throttle: Throttle
                  ) -> tuple[sigv4.Caller, str, str]:
    """The verified signer of `request` once its key's rate allows the call; with the raw
    path and query it signed. ApiError (the protocol's shape is the caller's) otherwise."""
    headers: dict[str, list[str]] = {}
    for name, value in request.headers.items():
        headers.setdefault(name.lower(), []).append(value)
    path, _, query = request.raw_path.partition("?")
    caller = sigv4.verify(request.method, path, query, headers, body, lookup_secret, service,
                          now)
    if not throttle.allow(caller.access_key_id):
        raise ApiError(
            "ThrottlingException",
            f"Rate exceeded: more than {throttle.rate:g} requests/s sustained for "
            f"access key {caller.access_key_id}; retry later",
            "RateExceeded",
        )
    return caller, path, query
