"""Input validation driven by the model table in apimodel.py.

Clients only check `min` constraints, so this is where max lengths, patterns, ranges, enums
and required members are enforced. Messages follow the AWS wording ("Value 'x' at 'Member'
failed to satisfy constraint: ...") and always name the member, so the CLI user sees which
argument to fix.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from functools import cache
from typing import Any

from controlplane.apimodel import SHAPES
from controlplane.errors import validation

# Shapes whose contents another module validates (the schedule model gives better messages).
DELEGATED = {"BandwidthRateLimitInterval"}
# JSON may spell an unpaired surrogate (a \ud800 escape); no UTF-8 store or reply holds it.
_SURROGATE = re.compile("[\ud800-\udfff]")


@cache
def _unicode_class(category: str) -> str:
    """The code point ranges of a Unicode general category, for `\\p{X}` (Python re lacks it)."""
    ranges: list[str] = []
    start = prev = -2
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp)).startswith(category):
            if cp != prev + 1:
                if start >= 0:
                    ranges.append(_range(start, prev))
                start = cp
            prev = cp
    if start >= 0:
        ranges.append(_range(start, prev))
    return "".join(ranges)


def _range(lo: int, hi: int) -> str:
    return f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}"


@cache
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a model pattern for Python; the model's patterns must match the whole value."""
    translated = re.sub(r"\\p\{(\w)\}", lambda m: _unicode_class(m.group(1)), pattern)
    return re.compile(translated, re.DOTALL if pattern == ".+" else 0)


def _show(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check(value: Any, shape_name: str, path: str, problems: list[str]) -> None:
    """Append a message for each constraint `value` breaks; `path` names the member."""
    shape = SHAPES[shape_name]
    kind = shape["type"]
    # A sensitive member (a password) is never echoed back, not even when it is wrong.
    shown = "" if shape.get("sensitive") else f" '{_show(value)}'"
    fail = f"Value{shown} at '{path}' failed to satisfy constraint: Member must"
    if kind == "string":
        if not isinstance(value, str):
            problems.append(f"Value at '{path}' must be a string")
            return
        if _SURROGATE.search(value):
            problems.append(f"Value at '{path}' must be valid Unicode (no unpaired surrogates)")
            return
        if "enum" in shape and value not in shape["enum"]:
            problems.append(f"{fail} satisfy enum value set: [{', '.join(shape['enum'])}]")
        if "min" in shape and len(value) < shape["min"]:
            problems.append(f"{fail} have length greater than or equal to {shape['min']}")
        if "max" in shape and len(value) > shape["max"]:
            problems.append(f"{fail} have length less than or equal to {shape['max']}")
        if "pattern" in shape and not compile_pattern(shape["pattern"]).fullmatch(value):
            problems.append(f"{fail} satisfy regular expression pattern: {shape['pattern']}")
    elif kind in ("integer", "long"):
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"Value at '{path}' must be an integer")
            return
        if "min" in shape and value < shape["min"]:
            problems.append(f"{fail} have value greater than or equal to {shape['min']}")
        if "max" in shape and value > shape["max"]:
            problems.append(f"{fail} have value less than or equal to {shape['max']}")
    elif kind == "list":
        if not isinstance(value, list):
            problems.append(f"Value at '{path}' must be a list")
            return
        if "min" in shape and len(value) < shape["min"]:
            problems.append(f"Value at '{path}' must have at least {shape['min']} items")
        if "max" in shape and len(value) > shape["max"]:
            problems.append(f"Value at '{path}' must have at most {shape['max']} items")
        if shape["member"] in DELEGATED:
            return
        for i, item in enumerate(value):
            check(item, shape["member"], f"{path}[{i}]", problems)
    elif kind == "structure":
        if not isinstance(value, dict):
            problems.append(f"Value at '{path}' must be an object")
            return
        members: dict[str, str] = shape.get("members", {})
        for name in shape.get("required", []):
            if value.get(name) is None:
                problems.append(f"Value null at '{_join(path, name)}' failed to satisfy "
                                "constraint: Member must not be null")
        for name, item in value.items():
            if name in members and item is not None:
                check(item, members[name], _join(path, name), problems)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def validate_input(body: dict[str, Any], shape_name: str) -> None:
    """Raise a ValidationException listing every broken constraint of an operation's input."""
    problems: list[str] = []
    check(body, shape_name, "", problems)
    if problems:
        count = len(problems)
        noun = "error" if count == 1 else "errors"
        raise validation(f"{count} validation {noun} detected: " + "; ".join(problems))
