"""JSON from the network, parsed only after its size, encoding and nesting are checked.

`json.loads` recurses once per level of nesting: a body of 200,000 `[` raises RecursionError
deep inside the parser (a 500 and a traceback), and a smaller one can still exhaust the
stack of a worker thread. Every JSON body a peer sends us (the AWS API, the gateway link,
the local API) goes through `loads`, which refuses such a body with one clear message first.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 32  # the deepest shape any of our APIs accepts is 4 levels
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class JsonError(ValueError):
    """The body is not acceptable JSON; the message says why, in one line."""


def check_depth(body: bytes, max_depth: int = MAX_DEPTH) -> None:
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return  # cannot be nested deeper: skip the scan (the common case, at C speed)
    depth = 0
    for match in _TOKENS.finditer(body):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise JsonError(f"JSON nested deeper than {max_depth} levels")
        elif token in (b"]", b"}"):
            depth -= 1


def loads(body: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse `body` (UTF-8); JsonError for bad encoding, bad syntax or too deep nesting."""
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonError(f"body is not UTF-8 (byte {exc.start})") from None
    check_depth(raw, max_depth)
    try:
        return json.loads(text)
    except RecursionError:  # pragma: no cover - check_depth refuses these first
        raise JsonError(f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise JsonError(f"body is not valid JSON: {exc}") from None


def loads_object(body: bytes | str, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """`loads` for a body that must be a JSON object; an empty body is `{}`."""
    if not (body.strip() if isinstance(body, bytes | str) else body):
        return {}
    value = loads(body, max_depth)
    if not isinstance(value, dict):
        raise JsonError("body must be a JSON object")
    return value
