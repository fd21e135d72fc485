"""The local API's error answer as an exception: the same fields on both ends of the socket.

The daemon raises it (an upload refused) and writes its JSON from the fields; the client
(console, CLI) raises it again from that JSON. One class, so the two ends cannot drift.
"""

from __future__ import annotations

from typing import Any


class LocalError(Exception):
    """`status`, `code`, `message`, `field` (the input it is about) and, for a 409
    AlreadyExists, `existing` ({name, size, sha256, storedAt} of the stored object)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 existing: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.existing = existing
