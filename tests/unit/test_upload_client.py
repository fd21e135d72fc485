"""The upload client against a real aiohttp sink on loopback that checks the link signature.

The sink implements `PUT /gateway/data/{name}` as docs/link-protocol.md describes it (signature,
streamed body hashed on receipt, declared hash compared, 201 with size and sha256), plus
switches to answer badly, so the client's error paths are exercised over a real socket.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.identity import Identity
from appliance.shaping import ScheduledShaper
from appliance.upload import UploadError, file_sha256, upload
from gatewaycore import linkproto
from gatewaycore.schedule import Schedule


class Sink:
    def __init__(self, identity: Identity):
        self.identity = identity
        self.stored: dict[str, bytes] = {}
        self.transfer_encodings: list[str] = []
        self.nonces: set[str] = set()
        self.mode = "ok"

    async def put(self, request: web.Request) -> web.Response:
        try:
            nonce, declared = linkproto.verify(
                request.headers, request.method, request.path_qs, self.identity.public_raw
            )
        except linkproto.LinkAuthError as exc:
            return web.json_response({"error": "InvalidSignature", "message": str(exc)}, status=401)
        if nonce in self.nonces:
            return web.json_response({"error": "InvalidSignature", "message": "replay"}, status=401)
        self.nonces.add(nonce)
        self.transfer_encodings.append(request.headers.get("Transfer-Encoding", ""))
        h = hashlib.sha256()
        body = bytearray()
        async for chunk in request.content.iter_any():
            h.update(chunk)
            body += chunk
        if self.mode == "not-activated":
            return web.json_response({"error": "NotActivated", "message": "no"}, status=403)
        if self.mode == "html":
            return web.Response(text="<html>oops</html>", status=502)
        if declared != linkproto.UNSIGNED_PAYLOAD and declared != h.hexdigest():
            return web.json_response(
                {"error": "ChecksumMismatch", "message": "body differs"}, status=400
            )
        name = request.match_info["name"]
        self.stored[name] = bytes(body)
        digest = h.hexdigest() if self.mode != "lie" else "0" * 64
        return web.json_response(
            {"name": name, "size": len(body), "sha256": digest}, status=201
        )


@pytest.fixture
def identity() -> Identity:
    return Identity(Ed25519PrivateKey.generate())


@pytest.fixture
async def sink(identity):
    s = Sink(identity)
    app = web.Application()
    app.router.add_put("/gateway/data/{name}", s.put)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    s.url = f"http://127.0.0.1:{port}"
    yield s
    await runner.cleanup()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


class RecordingShaper(ScheduledShaper):
    """The real shaper, remembering each acquire so the piece sizes can be checked."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.acquired: list[int] = []

    async def acquire(self, nbytes: int) -> None:
        self.acquired.append(nbytes)
        await super().acquire(nbytes)


async def test_unlimited_upload_streams_signed_chunked_body(sink, session, identity):
    data = bytes(range(256)) * 4000  # 1,024,000 bytes, several pieces
    shaper = RecordingShaper(Schedule.empty())
    result = await upload(session, sink.url, identity, "vm-1.disk", data, shaper)
    assert sink.stored["vm-1.disk"] == data
    assert result.size == len(data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert sink.transfer_encodings == ["chunked"]
    assert sum(shaper.acquired) == len(data) and len(shaper.acquired) > 1


async def test_shaped_upload_acquires_pieces_sized_for_the_rate(sink, session, identity):
    item = {
        "AverageUploadRateLimitInBitsPerSec": 80_000_000,  # 10 MB/s: 100 KB pieces
        "StartHourOfDay": 0,
        "StartMinuteOfHour": 0,
        "EndHourOfDay": 23,
        "EndMinuteOfHour": 59,
        "DaysOfWeek": [0, 1, 2, 3, 4, 5, 6],
    }
    shaper = RecordingShaper(Schedule.from_api([item]))
    shaper.start()
    data = b"x" * 250_000
    result = await upload(session, sink.url, identity, "piece-test", data, shaper)
    shaper.close()
    assert result.size == len(data)
    assert sink.stored["piece-test"] == data
    assert shaper.acquired == [100_000, 100_000, 50_000]
    assert shaper.meter.bits_per_sec() > 0


async def test_file_with_declared_sha256(sink, session, identity, tmp_path: Path):
    path = tmp_path / "blob"
    path.write_bytes(b"backup " * 100_000)
    digest = file_sha256(path)
    result = await upload(
        session, sink.url, identity, "blob", path, ScheduledShaper(), content_sha256=digest
    )
    assert result.sha256 == digest
    assert sink.stored["blob"] == path.read_bytes()


async def test_async_iterable_source_without_shaper(sink, session, identity):
    async def parts():
        for i in range(10):
            yield bytes([i]) * 1000

    result = await upload(session, sink.url, identity, "gen", parts())
    assert result.size == 10_000
    assert sink.stored["gen"] == b"".join(bytes([i]) * 1000 for i in range(10))


async def test_wrong_declared_hash_is_refused_and_nothing_kept(sink, session, identity):
    with pytest.raises(UploadError) as info:
        await upload(session, sink.url, identity, "bad", b"abc", content_sha256="0" * 64)
    assert info.value.code == "ChecksumMismatch" and info.value.status == 400
    assert "bad" not in sink.stored


async def test_server_errors_are_named(sink, session, identity):
    sink.mode = "not-activated"
    with pytest.raises(UploadError) as info:
        await upload(session, sink.url, identity, "x", b"abc")
    assert info.value.code == "NotActivated" and info.value.status == 403
    sink.mode = "html"
    with pytest.raises(UploadError) as info:
        await upload(session, sink.url, identity, "x", b"abc")
    assert info.value.code == "BadResponse" and info.value.status == 502


async def test_server_hash_that_differs_from_what_was_sent_is_caught(sink, session, identity):
    sink.mode = "lie"
    with pytest.raises(UploadError) as info:
        await upload(session, sink.url, identity, "x", b"abc")
    assert info.value.code == "ChecksumMismatch"


async def test_signature_by_another_key_is_refused(sink, session):
    stranger = Identity(Ed25519PrivateKey.generate())
    with pytest.raises(UploadError) as info:
        await upload(session, sink.url, stranger, "x", b"abc")
    assert info.value.code == "InvalidSignature" and info.value.status == 401


@pytest.mark.parametrize("name", ["", "a/b", "x" * 201, "sp ace", "../etc", ".", ".."])
async def test_bad_names_are_refused_before_any_request(sink, session, identity, name):
    with pytest.raises(UploadError) as info:
        await upload(session, sink.url, identity, name, b"abc")
    assert info.value.code == "ValidationError" and "name" in str(info.value)
    assert sink.nonces == set()


async def test_unreachable_server_is_a_connection_error(session, identity):
    # a port that was just free: bind, read it, close
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UploadError) as info:
        await upload(session, f"http://127.0.0.1:{port}", identity, "x", b"abc")
    assert info.value.code == "ConnectionError"


async def test_source_that_fails_midway_is_a_source_error_and_nothing_kept(
    sink, session, identity
):
    async def parts():
        yield b"a" * 100_000
        raise ConnectionResetError("local client went away")

    with pytest.raises(UploadError) as info:
        await upload(session, sink.url, identity, "cut", parts())
    assert info.value.code == "SourceError" and "local client went away" in str(info.value)
    assert "cut" not in sink.stored
