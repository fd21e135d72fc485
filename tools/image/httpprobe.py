"""Waiting for a booting guest's first answer on a forwarded port, to the fifth of a second.

Why not one GET at a time with a timeout: until the guest has its address, QEMU's user
network accepts the host's connection at once and then holds it, with no answer and no reset
(the guest cannot be reached, so nothing refuses). A probe that waits for its answer waits out
its whole timeout, and the next one starts only then: with the 5 s timeout the boot
benchmark had, every boot came out at "the first 5 s step after the answer was possible"
(20.5 s and 25.4 s, boot after boot), up to 5 s late. A short timeout instead would give up on
a slow but real answer, again and again.

So a new GET starts every `interval` while the earlier ones still wait. At most `pending`
wait at once; when that many do, the oldest is abandoned once it has waited `hold` seconds
(its socket shut, so QEMU drops the connection it held), and `hold` doubles every
`double_every` seconds without an answer, so a guest whose real answers are slower than `hold`
(a very busy host) is still heard. Once the guest is up, a GET started after that is answered
(or refused, and the next follows 50 ms later), so the first accepted answer comes about one
`interval` at most after it was possible. The answers' arrival instants are returned, not the
instants their requests were sent.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import queue
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

Answer = tuple[int, str]  # HTTP status, body
RETRY_AFTER_REFUSAL = 0.05
# A target the appliance's port 80 answers (404) without doing anything: it is serving.
SERVING_PROBE = "/serving"
# The key request the boot benchmark and the VM tests make, and what its answer holds.
KEY_QUERY = "/?activationRegion=us-west-2&gatewayType=BACKUP_VM&no_redirect"
KEY_RE = re.compile(r"^[A-Z0-9]{5}(-[A-Z0-9]{5}){4}$")


def _shut(conn: http.client.HTTPConnection) -> None:
    """Wake the thread waiting on `conn` (close() alone does not end a blocked recv)."""
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def get(port: int, target: str, timeout: float) -> Answer | None:
    """One GET on a guest's forwarded port (127.0.0.1:`port`), redirects not followed;
    (status, body), or None while nothing answers (refused, cut or timed out)."""
    return _get(http.client.HTTPConnection("127.0.0.1", port, timeout=timeout), target)


def _get(conn: http.client.HTTPConnection, target: str) -> Answer | None:
    """One GET on `conn`, closed after; None when it is refused, cut or timed out."""
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def first_answer(port: int, target: str, accept: Callable[[int, str], T | None],
                 deadline: float, alive: Callable[[], None] = lambda: None,
                 interval: float = 0.2, pending: int = 10, hold: float = 2.0,
                 double_every: float = 30.0, timeout: float = 60.0) -> tuple[float, T]:
    """GET `target` on 127.0.0.1:`port` until `accept(status, body)` returns a value; then
    (the time.monotonic() at which that answer arrived, the value).

    `alive` is called between answers and may raise (QEMU has exited); TimeoutError once
    time.monotonic() passes `deadline`.
    """
    results: queue.Queue[tuple[http.client.HTTPConnection, float, Answer | None]] = queue.Queue()
    waiting: collections.deque[tuple[http.client.HTTPConnection, float]] = collections.deque()

    def ask(conn: http.client.HTTPConnection) -> None:
        answer = _get(conn, target)
        results.put((conn, time.monotonic(), answer))

    first = next_start = time.monotonic()
    try:
        while True:
            alive()
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"no accepted answer on port {port} before the deadline")
            if now >= next_start:
                held_long = hold * 2 ** ((now - first) // double_every)
                if len(waiting) >= pending and now - waiting[0][1] >= held_long:
                    _shut(waiting.popleft()[0])
                if len(waiting) < pending:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
                    waiting.append((conn, now))
                    threading.Thread(target=ask, args=(conn,), daemon=True).start()
                next_start = now + interval
            try:
                done, at, answer = results.get(
                    timeout=max(0.0, min(next_start, deadline) - now))
            except queue.Empty:
                continue
            if answer is not None:
                value = accept(*answer)
                if value is not None:
                    return at, value
            for entry in waiting:
                if entry[0] is done:
                    waiting.remove(entry)
                    break
            if not waiting:
                # refused or answered, nothing held: the guest is up, ask again soon
                next_start = min(next_start, time.monotonic() + RETRY_AFTER_REFUSAL)
    finally:
        for conn, _ in waiting:
            _shut(conn)


def key_answer(status: int, body: str) -> str | None:
    """The activation key in the answer to KEY_QUERY, or None."""
    first = body.splitlines()[0].strip() if status == 200 and body else ""
    return first if KEY_RE.match(first) else None


def first_key(port: int, target: str, parse: Callable[[int, str], T | None], deadline: float,
              alive: Callable[[], None] = lambda: None) -> tuple[float, T]:
    """The appliance's first activation key: (the time.monotonic() it arrived, `parse`'s value).

    Overlapping GETs of SERVING_PROBE until port 80 answers, then `target` (the key request)
    one at a time until `parse(status, body)` returns a value: an answer without one (the
    control plane not reached yet: 504) is asked again 50 ms later.
    """
    first_answer(port, SERVING_PROBE, lambda status, _body: status, deadline, alive)
    while True:
        alive()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no activation key on port {port} before the deadline")
        answer = get(port, target, remaining)
        at = time.monotonic()
        value = parse(*answer) if answer is not None else None
        if value is not None:
            return at, value
        time.sleep(RETRY_AFTER_REFUSAL)
