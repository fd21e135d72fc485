"""The private libvirtd of the connector tests: tools/libvirtd.py, re-exported under the names
the tests import (`libvirtd.start`, `Libvirtd`, `SASL_USER`, ...), so the README's demo
hypervisor, the VM test and these tests start the same daemon the same way."""

from __future__ import annotations

from tools.libvirtd import (
    BOUND_DIRS,
    REQUIRED_PROGRAMS,
    SASL_PASSWORD,
    SASL_USER,
    TAGS_NS,
    Libvirtd,
    missing_programs,
    start,
)

__all__ = ["BOUND_DIRS", "REQUIRED_PROGRAMS", "SASL_PASSWORD", "SASL_USER", "TAGS_NS",
           "Libvirtd", "missing_programs", "start"]
