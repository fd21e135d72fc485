"""The browser of the browser tests (browserkit.py), one per test module; imported only
when a test asks for it, so the plain HTTP tests need neither selenium nor Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from tests.webconsole import browserkit

    if not browserkit.HAVE_BROWSER:  # a missing browser fails: a skip would pass unseen
        pytest.fail("Debian's chromium and chromium-driver are missing: run "
                    "tools/install-deps.sh")
    with browserkit.chromium() as driver:
        yield driver
