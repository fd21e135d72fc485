"""HTML for the console, built from Python with one escaping rule.

Every value that goes into a page passes through `esc` (or `render`, which calls it for each
argument) unless it is already `Markup`, i.e. HTML this package built from escaped parts. So
user text (a gateway name, a tag, an error message that quotes input) can never become markup,
and there is no template language to learn or to get wrong.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any


class Markup(str):
    """A string that is already safe HTML (built here from escaped parts)."""

    __slots__ = ()

    def __add__(self, other: Any) -> Markup:
        return Markup(str.__add__(self, esc(other)))

    def __radd__(self, other: Any) -> Markup:
        return Markup(str.__add__(esc(other), self))


def esc(value: Any) -> Markup:
    """`value` as HTML text: `& < > " '` escaped; Markup passes through unchanged."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def render(template: str, *args: Any, **kwargs: Any) -> Markup:
    """`template.format(...)` with every argument escaped. `template` must be a literal of
    this package, never user text."""
    return Markup(template.format(*(esc(a) for a in args),
                                  **{k: esc(v) for k, v in kwargs.items()}))


def join(parts: Iterable[Any], sep: str = "") -> Markup:
    """Concatenate escaped parts."""
    return Markup(sep.join(esc(p) for p in parts))


def attrs(**values: Any) -> Markup:
    """` name="value"` pairs; True gives a bare attribute, False/None leave it out;
    a trailing underscore is dropped (`for_`, `class_`), other underscores become dashes."""
    out = []
    for name, value in values.items():
        name = name.rstrip("_").replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(f" {name}")
        else:
            out.append(f' {name}="{esc(value)}"')
    return Markup("".join(out))
