"""The state file: round trip, refusal of corrupt files, and atomicity under SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.state import State, StateError, StateStore


def test_missing_file_is_a_fresh_state(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.load() == State()
    assert not (tmp_path / "state.json").exists()


def test_round_trip_and_mode(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.load()
    saved = store.update(
        registered=True, activated=True,
        gateway_arn="arn:aws:backup-gateway:us-west-2:1:gateway/bgw-1",
        gateway_name="demo", region="us-west-2", config_version=7,
        schedule=[{"StartHourOfDay": 0}],
    )
    assert (tmp_path / "state.json").stat().st_mode & 0o777 == 0o600
    again = StateStore(tmp_path)
    assert again.load() == saved
    doc = json.loads((tmp_path / "state.json").read_text())
    assert doc["formatVersion"] == 1 and doc["gateway_name"] == "demo"


def test_unchanged_state_is_not_rewritten(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.load()
    store.update(config_version=1)
    before = (tmp_path / "state.json").stat().st_mtime_ns
    os.utime(tmp_path / "state.json", ns=(0, 0))
    store.update(config_version=1)
    assert (tmp_path / "state.json").stat().st_mtime_ns == 0 != before


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"activated": true}',  # no formatVersion
        b'{"formatVersion": 2}',
        b'{"formatVersion": 1, "activated": "yes"}',
        b'{"formatVersion": 1, "config_version": true}',
        b'{"formatVersion": 1, "gateway_arn": 5}',
        b'{"formatVersion": 1, "schedule": {}}',
    ],
)
def test_corrupt_file_raises_naming_it(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "state.json").write_bytes(content)
    with pytest.raises(StateError) as info:
        StateStore(tmp_path).load()
    message = str(info.value)
    assert str(tmp_path / "state.json") in message and "\n" not in message
    assert (tmp_path / "state.json").read_bytes() == content


def test_unreadable_file_raises(tmp_path: Path) -> None:
    (tmp_path / "state.json").mkdir()  # EISDIR even for root
    with pytest.raises(StateError, match="cannot read state file"):
        StateStore(tmp_path).load()


def test_unknown_fields_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"formatVersion": 1, "future": 1, "deleted": true}')
    assert StateStore(tmp_path).load().deleted is True


WRITER = """
import sys
from pathlib import Path
from appliance.state import StateStore
store = StateStore(Path(sys.argv[1]))
state = store.load()
n = state.config_version
print("started", flush=True)
while True:
    n += 1
    store.update(config_version=n, gateway_name="x" * (n % 5000))
"""


def test_sigkill_while_writing_leaves_old_or_new(tmp_path: Path) -> None:
    """A writer process replaces the state as fast as it can; kill it at random instants
    and check every time that the file loads and never goes backwards."""
    rng = random.Random(42)
    last = 0
    for _ in range(25):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline() == "started\n"
        time.sleep(rng.uniform(0, 0.05))  # the random instant IS the test, not a wait
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = StateStore(tmp_path).load()
        assert state.config_version >= last
        assert state.gateway_name == "x" * (state.config_version % 5000)
        last = state.config_version
    assert last > 25
    assert not list(tmp_path.glob(".state.json.*.tmp"))  # load() removes leftovers
