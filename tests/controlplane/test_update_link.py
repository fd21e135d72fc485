"""The link's side of software updates (docs/updates.md, docs/link-protocol.md): the poll's
offer follows the version the gateway runs, the signed download serves the published
bundle, GetGateway shows NextUpdateAvailabilityTime at the maintenance window, and a
gateway's report is kept, while a malformed one never costs the poll."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from controlplane import updates
from gatewaycore import bundle
from tests.controlplane.cpharness import Server

pytestmark = pytest.mark.slow
KEY, _ = bundle.new_key()


def publish(server: Server, tmp_path: Path, version: str) -> bundle.Release:
    source = tmp_path / f"{version}.bundle"
    source.write_bytes(bundle.build([("appliance/version.py", b'__version__ = "x"\n')],
                                    version, KEY, "t"))
    published, new = server.plane.updates.publish(source)
    assert new
    return published.release


def test_offer_download_window_and_report(server: Server, tmp_path: Path) -> None:
    link = server.link()
    arn = server.ok("create-gateway", "--activation-key", link.key(),
                    "--gateway-display-name", "gw", "--gateway-type", "BACKUP_VM")["GatewayArn"]
    assert link.poll().body["update"] is None
    release = publish(server, tmp_path, "0.2.0")
    offer = link.poll(version="0.1.0").body["update"]
    assert (offer["version"], offer["sha256"], offer["size"]) == (
        "0.2.0", release.sha256, release.size)
    assert link.poll(version="0.2.0").body["update"] is None  # not above what it runs
    assert link.poll(version="0.3.0").body["update"] is None

    got = link.send("GET", "/gateway/update/0.2.0", b"")
    assert got.status == 200 and got.raw == (tmp_path / "0.2.0.bundle").read_bytes()
    assert link.send("GET", "/gateway/update/0.9.0", b"").body["error"] == "UnknownUpdate"
    assert link.send("GET", "/gateway/update/..%2Fx", b"").status == 404
    stranger = server.link()  # unregistered: the signature names an unknown key
    assert stranger.send("GET", "/gateway/update/0.2.0", b"").status == 401

    # The window decides when it shows as available: its next start (a Sunday, 03:30).
    link.poll(version="0.1.0")
    server.ok("put-maintenance-start-time", "--gateway-arn", arn, "--hour-of-day", "3",
              "--minute-of-hour", "30", "--day-of-week", "0")
    assert link.poll().body["maintenance"] == {"HourOfDay": 3, "MinuteOfHour": 30,
                                               "DayOfWeek": 0}
    shown = server.ok("get-gateway", "--gateway-arn", arn)["Gateway"]
    at = shown["NextUpdateAvailabilityTime"]  # epoch seconds or ISO 8601, by client
    when = (datetime.fromtimestamp(at, UTC) if isinstance(at, int | float)
            else datetime.fromisoformat(at).astimezone(UTC))
    assert (when.weekday(), when.hour, when.minute) == (6, 3, 30)

    report = {"outcome": "rolled_back", "version": "0.2.0", "message": "no start",
              "at": "2026-11-27T03:00:00Z"}
    assert link.post("/gateway/poll", {"after": 0, "wait": 0, "softwareVersion": "0.1.0",
                                       "updateStatus": report}).status == 200
    assert server.plane.link_ops.update_reports[link.identity.key_id] == report
    for bad in ({**report, "outcome": "exploded"}, {**report, "at": "yesterday"}, "x"):
        answer = link.post("/gateway/poll", {"after": 0, "wait": 0, "updateStatus": bad})
        assert answer.status == 200, answer.body  # the poll is answered all the same
    assert server.plane.link_ops.update_reports[link.identity.key_id] == report


def test_publishing_refuses_a_changed_bundle_under_a_published_version(
        server: Server, tmp_path: Path) -> None:
    publish(server, tmp_path, "0.2.0")
    other = tmp_path / "other.bundle"
    other.write_bytes(bundle.build([("appliance/version.py", b"__version__ = \"y\"\n"),
                                    ("appliance/extra.py", b"")],
                                   "0.2.0", KEY, "t"))
    with pytest.raises(updates.PublishError, match="published already with other contents"):
        server.plane.updates.publish(other)
    (tmp_path / "junk.bundle").write_bytes(b"junk")
    with pytest.raises(updates.PublishError, match="not a readable tar"):
        server.plane.updates.publish(tmp_path / "junk.bundle")


def test_a_window_is_weekly_or_monthly_not_both(server: Server) -> None:
    """PutMaintenanceStartTime applies the window's one rule (gatewaycore/maintenance.py)."""
    link = server.link()
    arn = server.ok("create-gateway", "--activation-key", link.key(),
                    "--gateway-display-name", "gw", "--gateway-type", "BACKUP_VM")["GatewayArn"]
    res = server.aws("put-maintenance-start-time", "--gateway-arn", arn, "--hour-of-day", "3",
                     "--minute-of-hour", "0", "--day-of-week", "1", "--day-of-month", "2")
    assert "ValidationException" in res.err
    assert "DayOfWeek, DayOfMonth: give one of them (weekly or monthly), not both" in res.err
    assert "MaintenanceStartTime" not in server.ok("get-gateway", "--gateway-arn", arn)[
        "Gateway"]
