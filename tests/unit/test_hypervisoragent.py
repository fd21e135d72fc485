"""The hypervisor agent in-process: association, syncs (owed, periodic, one at a time),
tests, the sealed password and the state it leaves, with a scripted connector and a link
whose two report calls are recorded. The real control plane, daemon and libvirtd are in
tests/integration/test_hypervisor_agent.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from appliance import sealkey
from appliance.gatewaystate import GatewayState
from appliance.hypervisoragent import HypervisorAgent
from appliance.hypervisors.model import DiscoveredVm, HypervisorError, Target
from appliance.identity import Identity
from appliance.link import HypervisorOrder, LinkClient, LinkError, PollAnswer, TestRequest
from appliance.localerror import LocalError
from appliance.shaping import ScheduledShaper
from appliance.state import State, StateStore
from gatewaycore import sealed

ARN = "arn:aws:backup-gateway:us-west-2:123456789012:hypervisor/hype-0123456789abcdef0"
PASSWORD = "s3cret-hv-pass"


class Recorder(LinkClient):
    """A LinkClient whose hypervisor reports are recorded instead of posted."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        super().__init__("http://127.0.0.1:9", Identity(Ed25519PrivateKey.generate()))
        self.tests: list[tuple[str, bool, str | None, str | None]] = []
        self.inventories: list[dict[str, Any]] = []
        self.fail_reports = 0

    async def report_test(self, test_id: str, ok: bool, error_code: str | None,
                          message: str | None) -> None:
        self.tests.append((test_id, ok, error_code, message))

    async def report_inventory(self, hypervisor_arn: str, sync_request: int, ok: bool,
                               error_code: str | None, message: str | None,
                               vms: list[dict[str, Any]]) -> int | None:
        if self.fail_reports:
            self.fail_reports -= 1
            raise LinkError("control plane unreachable (test)")
        self.inventories.append({"arn": hypervisor_arn, "syncRequest": sync_request, "ok": ok,
                                 "errorCode": error_code, "vms": vms})
        return len(vms)


class Hypervisor:
    """A scripted hypervisor: its VMs, its password, and how many connections are open."""

    def __init__(self) -> None:
        self.vms = [DiscoveredVm("uuid-1", "vm1", "host/vm1", "host", (("env", "prod"),))]
        self.delay = 0.0
        self.active = 0
        self.most_active = 0
        self.targets: list[Target] = []
        self._lock = threading.Lock()

    def connect(self, target: Target, timeout: float) -> Any:
        self.targets.append(target)
        hv = self

        class Conn:
            def _enter(self) -> None:
                with hv._lock:
                    hv.active += 1
                    hv.most_active = max(hv.most_active, hv.active)
                try:
                    time.sleep(hv.delay)
                    if target.password != PASSWORD:
                        raise HypervisorError("AuthenticationFailed",
                                              f"authentication failed for {target.username}")
                finally:
                    with hv._lock:
                        hv.active -= 1

            def test(self) -> None:
                self._enter()

            def inventory(self) -> list[DiscoveredVm]:
                self._enter()
                return list(hv.vms)

            def close(self) -> None:
                pass

        return Conn()


@pytest.fixture
def seal(tmp_path: Path) -> sealkey.SealKey:
    key, created = sealkey.load_or_create(tmp_path)
    assert created
    return key


def make_gateway(tmp_path: Path) -> GatewayState:
    store = StateStore(tmp_path)
    store.load()
    return GatewayState(store, ScheduledShaper())


def order(seal: sealkey.SealKey, sync_request: int = 1, password: str = PASSWORD,
          **kw: Any) -> HypervisorOrder:
    box = sealed.seal(sealed.decode_public(seal.public_b64), password.encode())
    return HypervisorOrder(ARN, "qemu+tcp://127.0.0.1/system", "admin", box, False,
                           sync_request, **kw)


async def settle(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_seal_key_is_made_once_0600_and_reused(tmp_path: Path) -> None:
    first, created = sealkey.load_or_create(tmp_path)
    again, created_again = sealkey.load_or_create(tmp_path)
    assert created and not created_again
    assert first.public_b64 == again.public_b64
    assert (tmp_path / "seal.key").stat().st_mode & 0o777 == 0o600
    assert repr(first) == f"SealKey(public={first.public_b64})"
    (tmp_path / "seal.key").write_bytes(b"short")
    with pytest.raises(sealkey.SealKeyError, match=r"seal\.key"):
        sealkey.load_or_create(tmp_path)


def test_association_syncs_and_keeps_the_password_sealed(tmp_path: Path, seal) -> None:
    async def main() -> None:
        gateway, link, hv = make_gateway(tmp_path), Recorder(), Hypervisor()
        agent = HypervisorAgent(gateway, link, seal, hv.connect, period=3600)
        runner = asyncio.create_task(agent.run())
        agent.offer(order(seal), [])
        await settle(lambda: link.inventories)
        assert link.inventories[0]["syncRequest"] == 1
        assert link.inventories[0]["vms"] == [{"uuid": "uuid-1", "name": "vm1",
                                               "path": "host/vm1", "hostName": "host",
                                               "tags": [{"key": "env", "value": "prod"}]}]
        assert hv.targets[0].password == PASSWORD  # opened in memory for the connector
        st = gateway.state
        assert st.hypervisor_synced_request == 1 and st.hypervisor_last_sync["vms"] == 1
        # the same poll again: nothing owed, no new sync
        agent.offer(order(seal), [])
        await asyncio.sleep(0.2)
        assert len(link.inventories) == 1
        # a StartVirtualMachinesMetadataSync: syncRequest 2
        hv.vms.append(DiscoveredVm("uuid-2", "vm2", "host/vm2", "host", ()))
        agent.offer(order(seal, 2), [])
        await settle(lambda: len(link.inventories) == 2)
        assert [v["uuid"] for v in link.inventories[1]["vms"]] == ["uuid-1", "uuid-2"]
        runner.cancel()
        await agent.close()

    asyncio.run(main())
    text = (tmp_path / "state.json").read_text()
    assert PASSWORD not in text
    doc = json.loads(text)
    assert doc["hypervisor_password"]["alg"] == sealed.ALG
    assert doc["hypervisor_arn"] == ARN


def test_period_syncs_never_overlap_and_failed_reports_are_retried(tmp_path: Path,
                                                                  seal) -> None:
    async def main() -> None:
        gateway, link, hv = make_gateway(tmp_path), Recorder(), Hypervisor()
        hv.delay = 0.1
        link.fail_reports = 1
        agent = HypervisorAgent(gateway, link, seal, hv.connect, period=0.2, retry_max=0.2)
        runner = asyncio.create_task(agent.run())
        agent.offer(order(seal), [])
        for n in range(2, 6):  # sync requests arriving faster than syncs finish
            agent.offer(order(seal, n), [])
            await asyncio.sleep(0.03)
        await settle(lambda: len(link.inventories) >= 4
                     and gateway.state.hypervisor_synced_request == 5, timeout=10)
        runner.cancel()
        await agent.close()
        assert hv.most_active == 1  # one sync at a time

    asyncio.run(main())


def test_requested_tests_right_and_wrong_password_run_once(tmp_path: Path, seal) -> None:
    async def main() -> None:
        gateway, link, hv = make_gateway(tmp_path), Recorder(), Hypervisor()
        agent = HypervisorAgent(gateway, link, seal, hv.connect, period=3600)
        pub = sealed.decode_public(seal.public_b64)
        good = TestRequest("t-good", "qemu+tcp://h/system", "admin",
                           sealed.seal(pub, PASSWORD.encode()))
        bad = TestRequest("t-bad", "qemu+tcp://h/system", "admin", sealed.seal(pub, b"wrong"))
        other = TestRequest("t-other", "qemu+tcp://h/system", "admin",
                            sealed.seal(sealed.public_raw(X25519PrivateKey.generate()), b"x"))
        agent.offer(None, [good, bad, other])
        agent.offer(None, [good, bad, other])  # listed again until reported: run once
        await settle(lambda: len(link.tests) == 3)
        await asyncio.sleep(0.1)
        results = {t[0]: t[1:] for t in link.tests}
        assert len(link.tests) == 3
        assert results["t-good"] == (True, None, None)
        assert results["t-bad"][:2] == (False, "AuthenticationFailed")
        assert results["t-other"][:2] == (False, "HypervisorError")
        assert "re-import" in results["t-other"][2]
        assert all(PASSWORD not in str(t) for t in link.tests)

    asyncio.run(main())


def test_test_now_needs_an_association_and_records_the_outcome(tmp_path: Path, seal) -> None:
    async def main() -> None:
        gateway, link, hv = make_gateway(tmp_path), Recorder(), Hypervisor()
        agent = HypervisorAgent(gateway, link, seal, hv.connect, period=3600)
        with pytest.raises(LocalError) as info:
            await agent.test_now()
        assert (info.value.status, info.value.code) == (409, "NotAssociated")
        agent.offer(order(seal), [])
        result = await agent.test_now()
        assert result["ok"] is True and result["hypervisorArn"] == ARN
        assert gateway.state.hypervisor_last_test["ok"] is True
        agent.offer(order(seal, password="changed-outside"), [])
        result = await agent.test_now()
        assert (result["ok"], result["errorCode"]) == (False, "AuthenticationFailed")
        agent.offer(None, [])  # disassociated: everything about it is forgotten
        assert gateway.state.hypervisor_arn is None
        assert gateway.state.hypervisor_last_test is None

    asyncio.run(main())


def test_restart_syncs_what_is_owed_and_waits_out_the_period(tmp_path: Path, seal) -> None:
    gateway = make_gateway(tmp_path)
    box = order(seal).password
    gateway.save(hypervisor_arn=ARN, hypervisor_host="qemu+tcp://h/system",
                 hypervisor_username="admin", hypervisor_password=box,
                 hypervisor_sync_request=3, hypervisor_synced_request=2)

    async def main(expect_sync: bool) -> Recorder:
        link, hv = Recorder(), Hypervisor()
        agent = HypervisorAgent(make_gateway(tmp_path), link, seal, hv.connect, period=3600)
        runner = asyncio.create_task(agent.run())
        await asyncio.sleep(0.5)
        runner.cancel()
        assert bool(link.inventories) == expect_sync
        return link

    link = asyncio.run(main(True))  # stopped mid-sync before: request 3 still owed
    assert link.inventories[0]["syncRequest"] == 3
    asyncio.run(main(False))  # synced a moment ago: the next is a period away


def test_old_state_file_loads_without_hypervisor_fields(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps(
        {"formatVersion": 1, "registered": True, "activated": True, "gateway_arn": "a"}))
    st = StateStore(tmp_path).load()
    assert st.hypervisor_arn is None and st.hypervisor_last_sync is None
    assert st == State(registered=True, activated=True, gateway_arn="a")


def test_poll_answer_hypervisor_part() -> None:
    base = {"version": 3, "state": "activated"}
    assert PollAnswer.from_json(base).hypervisor is None
    box = {"alg": sealed.ALG, "epk": "a", "nonce": "b", "ct": "c"}
    answer = PollAnswer.from_json({
        **base,
        "hypervisor": {"hypervisorArn": ARN, "host": "h", "username": None,
                       "password": None, "passwordPending": True, "syncRequest": 2},
        "tests": [{"testId": "t1", "host": "h", "username": "u", "password": box}],
    })
    assert answer.hypervisor is not None and answer.hypervisor.password_pending
    assert answer.tests[0].password == box
    assert sealed.ALG not in repr(answer)  # the sealed box is kept out of reprs and logs
    for bad in ({"hypervisor": {"host": "h"}}, {"tests": {"testId": "x"}},
                {"hypervisor": {"hypervisorArn": ARN, "host": "h", "syncRequest": "1"}},
                {"tests": [{"testId": "t", "host": "h", "password": "clear"}]}):
        with pytest.raises(LinkError):
            PollAnswer.from_json({**base, **bad})
