"""The daemon under failure: control plane down, kills during state writes, bad files."""

from __future__ import annotations

import configparser
import random
import subprocess
import sys
from typing import Any

import boto3
import pytest

pytestmark = pytest.mark.slow


def client(cp: Any) -> Any:
    creds = configparser.ConfigParser()
    creds.read(cp.state_dir / "credentials")
    section = creds[creds.sections()[0]]
    return boto3.client(
        "backup-gateway", endpoint_url=cp.url, region_name="us-west-2",
        aws_access_key_id=section["aws_access_key_id"],
        aws_secret_access_key=section["aws_secret_access_key"],
    )


def get_key(app: Any) -> str:
    status, _, body = app.get("/?activationRegion=us-west-2&no_redirect")
    assert status == 200, body
    return body.splitlines()[0]


def test_control_plane_down_504_then_recovery(
    control_plane: Any, appliance: Any, wait_until: Any
) -> None:
    cp, app = control_plane, appliance
    key = get_key(app)  # registered: the daemon now polls
    wait_until(lambda: app.status()["controlPlane"]["lastContact"], what="first contact")

    cp.stop()
    status, headers, body = app.get("/?activationRegion=us-west-2&no_redirect")
    assert status == 504
    assert headers["content-type"].startswith("text/plain")
    assert body.count("\n") == 1 and cp.url in body
    code, err = app.api("POST", "/v1/activation-key", {})
    assert code == 504 and err["error"] == "ControlPlaneUnreachable"
    doc = wait_until(lambda: (s := app.status())["controlPlane"]["reachable"] is False and s,
                     what="link marked unreachable")
    assert doc["controlPlane"]["lastError"]
    # Still serving while the link backs off.
    assert app.get("/?gatewayType=NOPE")[0] == 400
    app.proc.wait_for_line(r"event=link_retry")

    cp.start()
    # The poll loop reconnects by itself, and catches up with what happened meanwhile.
    wait_until(lambda: app.status()["controlPlane"]["reachable"], what="link restored")
    arn = client(cp).create_gateway(
        ActivationKey=key, GatewayDisplayName="after-outage", GatewayType="BACKUP_VM"
    )["GatewayArn"]
    wait_until(lambda: app.status()["gatewayArn"] == arn, what="activation after the outage")


def test_activation_while_daemon_down_is_caught_up(
    control_plane: Any, appliance: Any, wait_until: Any
) -> None:
    key = get_key(appliance)
    appliance.stop()
    arn = client(control_plane).create_gateway(
        ActivationKey=key, GatewayDisplayName="while-down", GatewayType="BACKUP_VM"
    )["GatewayArn"]
    appliance.start()
    doc = wait_until(lambda: (s := appliance.status())["activated"] and s, what="catch-up")
    assert (doc["gatewayArn"], doc["gatewayName"]) == (arn, "while-down")


def test_sigkill_during_state_writes_restarts_consistent(
    control_plane: Any, appliance: Any, wait_until: Any
) -> None:
    """Rename again and again; SIGKILL the daemon as it logs each change (it writes the state
    file right then); every restart must load a state that is the old or the new one."""
    cp, app = control_plane, appliance
    api = client(cp)
    arn = api.create_gateway(
        ActivationKey=get_key(app), GatewayDisplayName="n0", GatewayType="BACKUP_VM"
    )["GatewayArn"]
    wait_until(lambda: app.status()["gatewayArn"] == arn, what="activation")
    names = ["n0"]
    rng = random.Random(1234)
    loaded_index = 0
    for i in range(1, 13):
        mark = len(app.proc.lines)
        name = f"n{i}"
        names.append(name)
        api.update_gateway_information(GatewayArn=arn, GatewayDisplayName=name)
        logged = None
        if rng.random() < 0.5:  # kill right as it logs the change, i.e. while it writes it
            logged = app.proc.wait_for_line(rf"event=renamed .*new={name}", start=mark)
        killed_pid = app.proc.popen.pid
        app.proc.kill()
        app.start()  # waits for event=ready: the state file loaded
        doc = app.status()
        assert doc["activated"] is True and doc["gatewayArn"] == arn
        assert doc["gatewayName"] in names
        index = names.index(doc["gatewayName"])
        # Never older than what was loaded before; when killed as it logged a change, the
        # state on disk is exactly the old or the new one of that change.
        assert index >= loaded_index
        if logged is not None:
            old_name = logged.split(" old=", 1)[1].split()[0]
            assert doc["gatewayName"] in (old_name, name)
        loaded_index = index
        # The killed daemon's temp file is gone (the new daemon may be writing its own now).
        assert not (app.state_dir / f".state.json.{killed_pid}.tmp").exists()
    wait_until(lambda: app.status()["gatewayName"] == names[-1], what="last rename")


def run_serve(app: Any, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*app.argv, *extra], capture_output=True, text=True, timeout=60, check=False
    )


def test_corrupt_state_file_stops_with_one_line(control_plane: Any, make_appliance: Any) -> None:
    app = make_appliance(control_plane.url)
    app.stop()
    state = app.state_dir / "state.json"
    for garbage in (b'{"formatVersion": 1, "activated": tr', b"\x00\xff", b"[]",
                    b'{"formatVersion": 1, "activated": "yes"}'):
        state.write_bytes(garbage)
        done = run_serve(app)
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert str(state) in lines[0] and "Traceback" not in done.stderr
        assert state.read_bytes() == garbage  # never replaced by a fresh state


def test_corrupt_identity_stops_with_one_line(control_plane: Any, make_appliance: Any) -> None:
    app = make_appliance(control_plane.url)
    app.stop()
    (app.state_dir / "identity.pem").write_text("not a key\n")
    done = run_serve(app)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert str(app.state_dir / "identity.pem") in done.stderr


def test_identity_reused_across_restarts(control_plane: Any, appliance: Any) -> None:
    key_id = appliance.status()["keyId"]
    pem = (appliance.state_dir / "identity.pem").read_bytes()
    assert (appliance.state_dir / "identity.pem").stat().st_mode & 0o777 == 0o600
    appliance.stop()
    appliance.start()
    assert appliance.status()["keyId"] == key_id
    assert (appliance.state_dir / "identity.pem").read_bytes() == pem
    assert appliance.socket_path.stat().st_mode & 0o777 == 0o660


@pytest.mark.parametrize(
    ("toml", "flags", "needle"),
    [
        ('colour = "blue"\n', [], "colour"),
        ('listen = ["nonsense"]\n', [], "listen"),
        ('control_plane_url = "ftp://x"\n', [], "control_plane_url"),
        ("listen = [\n", [], "TOML"),
        ("", ["--listen", "127.0.0.1:99999"], "listen"),
        ("", ["--control-plane", "not a url"], "control_plane_url"),
    ],
)
def test_bad_settings_exit_2_with_one_line(
    tmp_path: Any, toml: str, flags: list[str], needle: str
) -> None:
    conf = tmp_path / "appliance.toml"
    conf.write_text(toml)
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "serve", "--config", str(conf),
         "--state-dir", str(tmp_path / "s"), *flags],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "s").exists()


def test_settings_file_values_used_and_flags_override(
    control_plane: Any, make_appliance: Any, tmp_path: Any
) -> None:
    app = make_appliance(control_plane.url, start=False)
    conf = tmp_path / "appliance.toml"
    conf.write_text(
        f'listen = ["127.0.0.1:{app.port}"]\n'
        f'state_dir = "{app.state_dir}"\n'
        'control_plane_url = "http://127.0.0.1:1"\n'
        f'local_api_socket = "{app.socket_path}"\n'
    )
    # Only the file, plus one flag that must win over the file's control_plane_url.
    app.config_file = conf
    app.extra_args = ["--control-plane", control_plane.url]
    app.start()
    line = app.proc.wait_for_line(r"event=ready")
    assert f"listen=127.0.0.1:{app.port}" in line
    assert f"control_plane={control_plane.url}" in line
    assert app.status()["controlPlane"]["url"] == control_plane.url
    assert app.get("/?no_redirect")[0] == 200
    assert (app.state_dir / "identity.pem").exists()
