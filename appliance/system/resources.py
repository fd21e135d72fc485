"""The system resource check: vCPUs, memory and root disk against the documented minimums.

The minimums are data (MINIMUMS), not code, so a different gateway family's figures are a
one-line change. Below the minimum is a [WARNING]; below half of it a [FAIL] (the gateway
will not keep up with even one backup job).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

GIB = 1024**3


@dataclass(frozen=True)
class Minimum:
    key: str
    label: str
    minimum: float
    unit: str
    # What the OS reports is less than what the VM was given (kernel reservations, filesystem
    # overhead): an 8 GiB VM shows about 7.7 GiB of MemTotal. Accept this fraction of it.
    slack: float = 1.0


# AWS Backup gateway's documented minimums.
MINIMUMS: tuple[Minimum, ...] = (
    Minimum("vcpus", "vCPUs", 4, ""),
    Minimum("memory", "Memory", 8, "GiB", slack=0.9),
    Minimum("disk", "Root disk", 80, "GiB", slack=0.9),
)


@dataclass
class CheckResult:
    label: str
    actual: float
    minimum: float
    unit: str
    level: str  # "OK", "WARNING" or "FAIL"

    def line(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return (f"{self.label}: {self.actual:g}{unit} (minimum {self.minimum:g}{unit})"
                f" [{self.level}]")


def measure(root: str = "/") -> dict[str, float]:
    return {
        "vcpus": float(os.cpu_count() or 1),
        "memory": round(psutil.virtual_memory().total / GIB, 1),
        "disk": round(psutil.disk_usage(root).total / GIB, 1),
    }


def check(actual: dict[str, float] | None = None,
          minimums: tuple[Minimum, ...] = MINIMUMS) -> list[CheckResult]:
    values = actual if actual is not None else measure()
    results = []
    for m in minimums:
        value = values[m.key]
        if value >= m.minimum * m.slack:
            level = "OK"
        elif value >= m.minimum / 2:
            level = "WARNING"
        else:
            level = "FAIL"
        results.append(CheckResult(m.label, value, m.minimum, m.unit, level))
    return results


def error_count(results: list[CheckResult]) -> int:
    return sum(1 for r in results if r.level != "OK")
