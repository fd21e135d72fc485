"""The browser of the browser tests (browserkit.py), one per test module; imported only
when a test asks for it, so the plain HTTP tests need neither selenium nor Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    browserkit = pytest.importorskip("tests.webconsole.browserkit")
    if not browserkit.HAVE_BROWSER:
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    with browserkit.chromium() as driver:
        yield driver
