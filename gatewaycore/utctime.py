"""The one time format both sides write and read: ISO 8601 in UTC to the second, `Z` suffix
(`2026-11-26T14:05:00Z`), as the AWS APIs print timestamps in JSON 1.0 string fields."""

from __future__ import annotations

import time
from datetime import UTC, datetime

FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def format_utc(when: float | datetime | None = None) -> str:
    """`when` (epoch seconds, an aware datetime, or now) in FORMAT."""
    if when is None:
        when = time.time()
    if isinstance(when, datetime):
        moment = when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    else:
        moment = datetime.fromtimestamp(when, UTC)
    return moment.strftime(FORMAT)


def parse_utc(text: str) -> datetime:
    """FORMAT back to an aware datetime; ValueError for anything else."""
    return datetime.strptime(text, FORMAT).replace(tzinfo=UTC)
