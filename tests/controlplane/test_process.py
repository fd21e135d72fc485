"""`python -m controlplane` as a real process: first start, env, kill -9 and restart, SIGTERM."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import PYTHON, Proc, child_env, free_port
from tests.controlplane.cpharness import AWS, REGION, LinkClient, new_identity

pytestmark = pytest.mark.slow


def start(state_dir: Path, port: int, *extra: str) -> Proc:
    proc = Proc([PYTHON, "-m", "controlplane", "serve", "--listen", f"127.0.0.1:{port}",
                 "--state-dir", str(state_dir), *extra], env=child_env())
    proc.wait_for_line(r"event=ready listen=127\.0\.0\.1:\d+")
    return proc


def env_from_cli(state_dir: Path, home: Path) -> dict[str, str]:
    """What `eval "$(python -m controlplane env ...)"` gives a shell."""
    script = (f'eval "$({PYTHON} -m controlplane env --state-dir {state_dir})" && '
              'env | grep ^AWS_')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                         env=child_env(), cwd=Path(__file__).parents[2]).stdout
    env = dict(line.split("=", 1) for line in out.splitlines())
    return {**env, "PATH": os.environ["PATH"], "HOME": str(home),
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_MAX_ATTEMPTS": "1", "AWS_EC2_METADATA_DISABLED": "true"}


def aws(env: dict[str, str], port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AWS, "backup-gateway", *args, "--endpoint-url", f"http://127.0.0.1:{port}",
         "--region", REGION, "--output", "json"],
        env=env, capture_output=True, text=True, timeout=60,
    )


SCHEDULE = [{"StartHourOfDay": 0, "StartMinuteOfHour": 0, "EndHourOfDay": 23,
             "EndMinuteOfHour": 59, "DaysOfWeek": [1, 2, 3],
             "AverageUploadRateLimitInBitsPerSec": 1_000_000}]


def test_kill_9_and_restart_keep_state(tmp_path: Path) -> None:
    state = tmp_path / "state"
    port = free_port()
    proc = start(state, port)
    try:
        first = proc.output()
        assert "Generated API credentials" in first and str(state / "credentials") in first
        creds = state / "credentials"
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        env = env_from_cli(state, tmp_path)
        assert env["AWS_ACCESS_KEY_ID"] in creds.read_text()

        link = LinkClient("127.0.0.1", port, new_identity())
        key = link.key()
        done = aws(env, port, "create-gateway", "--activation-key", key,
                   "--gateway-display-name", "durable", "--gateway-type", "BACKUP_VM")
        assert done.returncode == 0, done.stderr
        arn = json.loads(done.stdout)["GatewayArn"]
        body = json.dumps({"after": 0, "wait": 0}).encode()
        assert link.send("POST", "/gateway/poll", body).status == 200
        captured = dict(link.last_headers)
        # An acknowledged schedule (its commit's fsync runs off the event loop, awaited
        # before the answer: controlplane/walsync.py) survives the kill too.
        done = aws(env, port, "put-bandwidth-rate-limit-schedule", "--gateway-arn", arn,
                   "--bandwidth-rate-limit-intervals", json.dumps(SCHEDULE))
        assert done.returncode == 0, done.stderr
    finally:
        proc.kill()  # SIGKILL: no chance to flush anything

    proc = start(state, port)
    try:
        assert "Generated API credentials" not in proc.output()
        done = aws(env, port, "get-gateway", "--gateway-arn", arn)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["Gateway"]["GatewayDisplayName"] == "durable"
        done = aws(env, port, "get-bandwidth-rate-limit-schedule", "--gateway-arn", arn)
        assert json.loads(done.stdout)["BandwidthRateLimitIntervals"] == SCHEDULE
        # The nonce seen before the kill is still refused.
        replay = link.send("POST", "/gateway/poll", body, headers=captured)
        assert replay.status == 401 and "replayed" in replay.body["message"]
        assert link.poll().body["gatewayArn"] == arn
        # Same account id after the restart: a new gateway's ARN has the same account.
        account = arn.split(":")[4]
        other = LinkClient("127.0.0.1", port, new_identity())
        done = aws(env, port, "create-gateway", "--activation-key", other.key(),
                   "--gateway-display-name", "second", "--gateway-type", "BACKUP_VM")
        assert json.loads(done.stdout)["GatewayArn"].split(":")[4] == account
    finally:
        proc.stop()
    assert proc.popen.returncode == 0
    assert re.search(r"event=stopped", proc.output())


def test_sigterm_during_a_long_poll_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    proc = start(tmp_path / "state", port, "--log-level", "DEBUG")
    link = LinkClient("127.0.0.1", port, new_identity())
    link.key()
    answers: list[int] = []
    poller = threading.Thread(target=lambda: answers.append(link.poll(wait=25).status))
    poller.start()
    proc.wait_for_line(rf"event=poll_wait key_id={link.identity.key_id}")
    proc.popen.terminate()
    assert proc.wait_exit(20) == 0
    poller.join(30)
    assert answers == [200]  # the waiting poll was answered, not cut off
    assert "event=stopped" in proc.output()


def test_refuses_a_credentials_file_others_can_read(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    creds = state / "credentials"
    creds.write_text("[default]\naws_access_key_id = AKIAX\naws_secret_access_key = s\n")
    creds.chmod(0o644)
    done = subprocess.run([PYTHON, "-m", "controlplane", "serve", "--listen",
                           f"127.0.0.1:{free_port()}", "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=30, env=child_env())
    assert done.returncode == 2
    assert "chmod 600" in done.stderr and "Traceback" not in done.stderr


def test_bad_listen_argument_is_a_clear_error() -> None:
    done = subprocess.run([PYTHON, "-m", "controlplane", "serve", "--listen", "nope"],
                          capture_output=True, text=True, timeout=30, env=child_env())
    assert done.returncode == 2 and "HOST:PORT" in done.stderr
