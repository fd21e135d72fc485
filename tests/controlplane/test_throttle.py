"""ThrottlingException through boto3, from an in-process server with a tiny rate limit."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from controlplane.server import ControlPlane
from controlplane.throttle import Throttle


def test_bucket_refills() -> None:
    now = [0.0]
    bucket = Throttle(rate=1.0, burst=2.0, clock=lambda: now[0])
    assert [bucket.allow("k") for _ in range(3)] == [True, True, False]
    assert bucket.allow("other")
    now[0] += 1.0
    assert bucket.allow("k") and not bucket.allow("k")


def test_throttled_call_gets_429(tmp_path: Path) -> None:
    plane = ControlPlane(tmp_path / "state", throttle=Throttle(rate=1e-6, burst=2.0))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        host, port = asyncio.run_coroutine_threadsafe(plane.start("127.0.0.1", 0), loop).result(10)
        client = boto3.client(
            "backup-gateway", region_name="us-west-2", endpoint_url=f"http://{host}:{port}",
            aws_access_key_id=plane.access_key_id,
            aws_secret_access_key=plane.secret_access_key,
            config=Config(retries={"max_attempts": 1, "mode": "standard"}),
        )
        assert client.list_gateways()["Gateways"] == []
        assert client.list_gateways()["Gateways"] == []
        with pytest.raises(ClientError) as err:
            client.list_gateways()
        assert err.value.response["Error"]["Code"] == "ThrottlingException"
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    finally:
        asyncio.run_coroutine_threadsafe(plane.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
