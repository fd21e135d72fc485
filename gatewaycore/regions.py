"""AWS region codes and the backup-gateway endpoint names of each, read from data/regions.json.

The list lives in a data file rather than in code so that a new AWS region is one JSON entry,
reviewed on its own. Lookups never raise for an unknown code at the activation page: the
behaviour reference says a missing or unknown `activationRegion` means us-east-1, so callers
get the fallback and a flag saying it happened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class Region:
    code: str
    name: str
    partition: str
    console_url: str
    endpoints: dict[str, dict[str, str]]

    def endpoint_hosts(self, endpoint_type: str) -> dict[str, str]:
        """Endpoint role -> host name for one of gatewaycore.rules.ENDPOINT_TYPES."""
        return dict(self.endpoints[endpoint_type])


@lru_cache(maxsize=1)
def _data() -> dict[str, Any]:
    text = resources.files("gatewaycore").joinpath("data/regions.json").read_text("utf-8")
    return json.loads(text)


@lru_cache(maxsize=1)
def all_regions() -> dict[str, Region]:
    data = _data()
    out: dict[str, Region] = {}
    for code, entry in data["regions"].items():
        partition = data["partitions"][entry["partition"]]
        out[code] = Region(
            code=code,
            name=entry["name"],
            partition=entry["partition"],
            console_url=partition["consoleUrl"].format(region=code),
            endpoints=entry["endpoints"],
        )
    return out


def default_region() -> str:
    return str(_data()["default"])


def get(code: str) -> Region | None:
    return all_regions().get(code)


def resolve(code: str | None) -> tuple[Region, bool]:
    """The region for `code`, or the default region and True when `code` is missing/unknown."""
    region = all_regions().get(code or "")
    if region is None:
        return all_regions()[default_region()], True
    return region, False


def all_endpoint_hosts() -> set[str]:
    """Every AWS endpoint host name we know, to tell whether a URL points at AWS itself."""
    return {
        host
        for region in all_regions().values()
        for kind in region.endpoints.values()
        for host in kind.values()
    }
