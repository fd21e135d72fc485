"""Fixtures of the control plane tests live in cpharness.py (importable by name)."""

from tests.controlplane.cpharness import server

__all__ = ["server"]
