"""Telling systemd the daemon is ready (`Type=notify`), so the boot's other work can wait.

appliance.service is `Type=notify`: systemd counts the daemon started when it says `READY=1`,
after port 80 and the local API are bound, and the units ordered after it (systemd-resolved,
systemd-timesyncd, and through sysinit.target everything with default dependencies) start only
then. Under QEMU's TCG the boot is CPU-bound, and those units' starts used to share the two
vCPUs with the daemon's (docs/image.md, "Boot").

The protocol is one datagram on the AF_UNIX socket named by $NOTIFY_SOCKET (sd_notify(3));
outside systemd, or under a manager that does not set it, `notify` does nothing. A failure to
send is not the daemon's failure: systemd then times the start out and says so itself.
"""

from __future__ import annotations

import os
import socket


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send `state` ("READY=1", "STOPPING=1") to systemd; False when there is no one to tell."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":  # an abstract socket: a leading NUL instead of the "@"
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True
