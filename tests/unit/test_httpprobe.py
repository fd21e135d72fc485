"""The boot probe (tools/image/httpprobe.py) against a real socket that behaves like QEMU's
user network before the guest has its address: every connection accepted at once, then held
with no answer. Once the "guest" is up, new connections are answered, and the held ones
still open are delivered late, as QEMU retries them."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tools.image.httpprobe import first_answer, first_key

pytestmark = pytest.mark.timeout(60)


class HeldUntilUp:
    """Connections made before `up` is set are held silently (QEMU's slirp with no guest
    address) and answered once it is set, if still open; later ones at once. Answers come
    `delay` seconds after: a key for GET /key (a new one each time), 404 for GET /serving,
    200 "KEY" for anything else."""

    def __init__(self, delay: float = 0.0) -> None:
        self.up = threading.Event()
        self.delay = delay
        self.open = 0
        self.most_open = 0
        self.minted = 0
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, self.up.is_set()), daemon=True
                             ).start()

    def _serve(self, conn: socket.socket, up: bool) -> None:
        with self._lock:
            self.open += 1
            self.most_open = max(self.most_open, self.open)
        try:
            request = conn.recv(4096)
            # Held until the guest is up, then delivered (QEMU retries the connection), unless
            # the client gave up on it first (QEMU then drops it).
            while not up and not self.up.wait(0.02):
                readable, _, _ = select.select([conn], [], [], 0)
                if readable and conn.recv(1) == b"":
                    return
            time.sleep(self.delay)  # the guest's own work on the request
            status, body = b"200 OK", b"KEY"
            if request.startswith(b"GET /key "):  # mints a new one each time
                with self._lock:
                    self.minted += 1
                    body = b"KEY%d" % self.minted
            elif request.startswith(b"GET /serving "):
                status, body = b"404 Not Found", b"not found"
            conn.sendall(b"HTTP/1.1 %s\r\nContent-Length: %d\r\nConnection: close"
                         b"\r\n\r\n%s" % (status, len(body), body))
        except OSError:
            pass
        finally:
            conn.close()
            with self._lock:
                self.open -= 1


@pytest.fixture
def held() -> Iterator[HeldUntilUp]:
    server = HeldUntilUp()
    yield server
    server.sock.close()


def accept_key(status: int, body: str) -> str | None:
    return body if status == 200 and body == "KEY" else None


def test_answer_seen_within_an_interval_not_a_timeout(held: HeldUntilUp) -> None:
    # The guest comes up 1.5 s in: a one-at-a-time probe with a 5 s timeout saw it at 5 s.
    threading.Timer(1.5, held.up.set).start()
    t0 = time.monotonic()
    at, key = first_answer(held.port, "/", accept_key, t0 + 30, interval=0.2, pending=4,
                           hold=0.5)
    assert key == "KEY"
    assert 1.5 <= at - t0 < 1.5 + 0.2 + 0.5  # one interval, and slack for a busy machine
    # the held ones are abandoned, not piled up (about 8 would be by now); one more may be
    # seen open here while the server is still closing the abandoned one
    assert held.most_open <= 4 + 1


def test_a_slow_answer_is_waited_for(held: HeldUntilUp) -> None:
    # Slower than `hold` and than the interval times the pending cap: the GET that got
    # through is heard once `hold` has doubled (after 3 s here), not abandoned for ever.
    held.delay = 1.5
    held.up.set()
    t0 = time.monotonic()
    at, key = first_answer(held.port, "/", accept_key, t0 + 30, interval=0.2, pending=3,
                           hold=1.0, double_every=3.0)
    assert key == "KEY"
    assert 3.0 <= at - t0 < 3.0 + 1.5 + 1.0


def test_deadline_and_a_dead_guest() -> None:
    server = HeldUntilUp()  # never up
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            first_answer(server.port, "/", accept_key, t0 + 1.0)
        assert time.monotonic() - t0 < 2.0

        def dead() -> None:
            raise RuntimeError("QEMU exited 1")
        with pytest.raises(RuntimeError, match="QEMU exited"):
            first_answer(server.port, "/", accept_key, time.monotonic() + 30, alive=dead)
    finally:
        server.sock.close()


def test_a_key_is_asked_for_once_port_80_serves(held: HeldUntilUp) -> None:
    # Held key requests would each mint a key once the guest is up, and the one returned could
    # be forgotten behind them: only the side-effect-free probe overlaps.
    threading.Timer(1.0, held.up.set).start()
    t0 = time.monotonic()
    at, key = first_key(held.port, "/key", lambda status, body: body if status == 200 else None,
                        t0 + 30)
    assert key == "KEY1" and held.minted == 1
    assert 1.0 <= at - t0 < 1.0 + 0.2 + 0.5
