"""The link's replay log (controlplane/noncelog.py): what it keeps, for how long, and what a
restart reads back."""

from __future__ import annotations

import secrets
from pathlib import Path

from controlplane.noncelog import SEGMENT, WINDOW, NonceLog

KEY = "a" * 32
T0 = 1_800_000_000.0  # a minute's start


def test_a_nonce_is_refused_for_the_whole_window_then_forgotten(tmp_path: Path) -> None:
    log = NonceLog(tmp_path, now=T0)
    seen = T0 + SEGMENT - 1  # the last second of its minute: the latest to expire
    assert log.record(KEY, "b" * 32, seen)
    assert not log.record(KEY, "b" * 32, seen + 1)
    assert log.record("c" * 32, "b" * 32, seen)  # another gateway's same nonce
    assert log.purge(seen + WINDOW) == 0
    assert not log.record(KEY, "b" * 32, seen + WINDOW)  # the window's last second
    assert log.purge(seen + WINDOW + 2) == 2
    assert len(log) == 0 and not list(tmp_path.iterdir())
    log.close()


def test_odd_lengths_and_prefixes_do_not_collide(tmp_path: Path) -> None:
    log = NonceLog(tmp_path, now=T0)
    assert log.record(KEY, "0123456789abcdef0", T0)  # 17 hex digits
    assert log.record(KEY, "0123456789abcdef00", T0)  # the same bytes once padded
    assert log.record(KEY, "0123456789abcdef", T0)
    assert not log.record(KEY, "0123456789abcdef0", T0)
    log.close()


def test_a_restart_reads_back_the_live_minutes_and_drops_the_rest(tmp_path: Path) -> None:
    log = NonceLog(tmp_path, now=T0)
    old, new = secrets.token_hex(16), secrets.token_hex(16)
    assert log.record(KEY, old, T0)
    assert log.record(KEY, new, T0 + WINDOW)
    log.close()
    # A line a crash cut in the middle of its write is skipped, not an error.
    (tmp_path / f"{int(T0 + WINDOW) // SEGMENT * SEGMENT}.log").open("a").write("ab 12")
    (tmp_path / "stray.txt").write_text("not ours")
    again = NonceLog(tmp_path, now=T0 + WINDOW + SEGMENT + 1)
    assert len(again) == 1
    assert not again.record(KEY, new, T0 + WINDOW + SEGMENT + 1)
    assert again.record(KEY, old, T0 + WINDOW + SEGMENT + 1)  # its minute was dropped
    assert not (tmp_path / f"{int(T0)}.log").exists()
    assert (tmp_path / "stray.txt").exists()
    again.close()
