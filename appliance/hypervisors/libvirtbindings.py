"""libvirt's Python bindings, loaded on first use and made quiet.

One place for both the connector (discovery, tests) and the backup and restore sessions,
so neither imports the other: the daemon starts on a machine without the bindings, and a
missing package is one clear HypervisorError rather than an ImportError traceback.
"""

from __future__ import annotations

from typing import Any

from .model import HYPERVISOR_ERROR, HypervisorError

_quiet_done = False


def load() -> Any:
    """The `libvirt` module; HypervisorError when the bindings are not installed."""
    try:
        import libvirt
    except ImportError:
        raise HypervisorError(HYPERVISOR_ERROR, "the libvirt Python bindings are not "
                              "installed (Debian: python3-libvirt)") from None
    _quiet(libvirt)
    return libvirt


def _quiet(libvirt: Any) -> None:
    """libvirt prints every error to stderr by default; ours are raised and logged instead."""
    global _quiet_done
    if not _quiet_done:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _quiet_done = True
