"""One log event, one line: every value that reaches a log line is escaped here.

Log calls write `key=%s` pairs; a value that came from a request (a path, a header, a user
name, an exception message quoting either) could otherwise carry a line feed and write a
line of the attacker's choosing, or a space and `key=value` that reads as a field of ours.
The filter rewrites a record's arguments before formatting, so the rule lives in one place
and covers every logger, aiohttp's included, without each call site remembering it.

Quoting follows logfmt: a plain value stays bare; one with a space, `"`, `=` or `\\` is put
in double quotes with `"` and `\\` escaped; control and other non-printable characters
become `\\n`, `\\r`, `\\t` or `\\xNN` / `\\uNNNN`, so the line can be parsed back.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "\\": "\\\\"}
MAX_VALUE_CHARS = 512  # a 100 KB header must not become a 100 KB log line


def escape(value: str) -> str:
    """`value` as one logfmt token (quoted when it must be, always one line)."""
    if len(value) > MAX_VALUE_CHARS:
        value = value[:MAX_VALUE_CHARS] + "..."
    plain = value != "" and all(c.isprintable() and c not in ' "=\\' for c in value)
    if plain:
        return value
    out = []
    for c in value:
        if c in _SHORT:
            out.append(_SHORT[c])
        elif c == " " or c.isprintable():
            out.append(c)
        elif ord(c) <= 0xFF:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
    return '"' + "".join(out) + '"'


def _arg(value: Any) -> Any:
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, bytes | bytearray):
        return escape(bytes(value).decode("utf-8", "backslashreplace"))
    if isinstance(value, BaseException):
        return escape(str(value))
    return value  # numbers, None, bools: their str() is already one safe token


class EscapingFilter(logging.Filter):
    """Escapes every argument of a record (and a message that has none: aiohttp's own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            if isinstance(record.args, dict):
                record.args = {k: _arg(v) for k, v in record.args.items()}
            else:
                record.args = tuple(_arg(a) for a in record.args)
        elif isinstance(record.msg, str) and not record.msg.isprintable():
            record.msg = "".join(
                c if c.isprintable() else escape(c)[1:-1] for c in record.msg
            )
        return True


def setup(level: int | str = logging.INFO, fmt: str = "%(asctime)s %(levelname)s %(name)s "
          "%(message)s", stream: Any = None) -> logging.Handler:
    """Log to stderr (or `stream`), one escaped line per event; returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(EscapingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return handler
