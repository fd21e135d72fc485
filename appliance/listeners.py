"""The port-80 listeners: bind the configured addresses and serve the activation page on them.

An address that cannot exist on this host (no IPv6) is skipped with a warning; one that is
taken or refused is a StartupError naming it. At least one must be bound.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Sequence

from appliance.activation import ActivationServer
from appliance.config import ListenAddress
from appliance.startup import StartupError

log = logging.getLogger(__name__)


def bind(address: ListenAddress) -> socket.socket | None:
    """A listening socket; IPv6 ones are V6ONLY so `[::]:80` and `0.0.0.0:80` coexist.

    None when the address cannot exist here (no IPv6 on this host); StartupError otherwise.
    """
    family = socket.AF_INET6 if address.is_ipv6 else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        if exc.errno == errno.EAFNOSUPPORT:
            log.warning("event=listen_skipped address=%s reason=no_ipv6", address)
            return None
        raise
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address.is_ipv6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if address.is_ipv6 and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            log.warning("event=listen_skipped address=%s reason=%s", address, exc.strerror)
            return None
        raise StartupError(f"cannot listen on {address}: {exc.strerror}") from None
    return sock


class Listeners:
    """The activation page's servers, one per bound address."""

    def __init__(self, addresses: Sequence[ListenAddress], activation: ActivationServer) -> None:
        self._addresses = list(addresses)
        self._activation = activation
        self._servers: list[asyncio.AbstractServer] = []

    async def start(self) -> list[str]:
        """Bind and serve every address; the ones bound. StartupError if none could be."""
        bound = []
        for address in self._addresses:
            sock = bind(address)
            if sock is None:
                continue
            self._servers.append(await self._activation.serve(sock))
            bound.append(str(address))
        if not bound:
            raise StartupError("no listen address could be bound")
        return bound

    def close(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
