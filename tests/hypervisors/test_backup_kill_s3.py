"""test_backup_kill.py's test with the vaults in a bucket of the session's one-node Ceph
RGW (`serve --vault-store`): a file of its own so that the two run on different workers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ControlPlane, free_port
from tests.hypervisors.test_backup_kill import (  # noqa: F401 (collected here too)
    test_gateway_and_control_plane_killed_mid_backup,
)
from tests.objectstore.conftest import (  # noqa: F401 (fixtures)
    admin,
    bucket,
    credentials_file,
    rgw,
)
from tools import cephrgw

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def plane_on(request: pytest.FixtureRequest, tmp_path: Path
             ) -> Iterator[tuple[Any, Callable[[], set[str]]]]:
    """A control plane process whose vaults are in a fresh bucket, and a function listing
    the recovery-point manifests in the bucket."""
    ceph, name = request.getfixturevalue("rgw"), request.getfixturevalue("bucket")
    s3 = request.getfixturevalue("admin")
    keys = request.getfixturevalue("credentials_file")
    settings = tmp_path / "vault-store.toml"
    settings.write_text(cephrgw.vault_store_toml(ceph.endpoint, name, keys,
                                                 key_file="master.key"))
    cp = ControlPlane(tmp_path / "controlplane", free_port(),
                      extra_args=["--vault-store", str(settings)])

    def manifests() -> set[str]:
        listed = s3.list_objects_v2(Bucket=name).get("Contents", [])
        return {o["Key"].rsplit("/", 1)[1] for o in listed if "/points/" in o["Key"]}
    cp.start()
    try:
        yield cp, manifests
    finally:
        cp.stop()
