"""A real S3-compatible object store for the tests: a one-node Ceph cluster with a RADOS
Gateway (tools/cephrgw.py), started once per session (about 1.5 s) and stopped by its PIDs
at the end; each test gets a bucket of its own, emptied and removed after it.

The store is reached with the S3 user's keys through an AWS shared-credentials file (the
way a deployment configures it), so the tests never depend on the machine's AWS_* variables.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.s3store import S3Settings
from tools import cephrgw

REGION = cephrgw.S3_REGION  # RGW takes any; the one vault_store_toml writes


@pytest.fixture(scope="session")
def rgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cephrgw.Rgw]:
    if missing := cephrgw.missing_programs():
        pytest.fail(f"missing {', '.join(missing)}: run tools/install-deps.sh")
    gateway = cephrgw.start(tmp_path_factory.mktemp("ceph"))
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="session")
def admin(rgw: cephrgw.Rgw) -> Any:
    """A plain boto3 client of the S3 user: to make buckets and look behind the stores."""
    return rgw.client()


@pytest.fixture
def bucket(admin: Any) -> Iterator[str]:
    """A fresh, empty bucket; emptied (objects and unfinished uploads) and removed after."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    admin.create_bucket(Bucket=name)
    yield name
    with contextlib.suppress(admin.exceptions.NoSuchBucket):
        uploads = admin.list_multipart_uploads(Bucket=name).get("Uploads", [])
        for upload in uploads:
            admin.abort_multipart_upload(Bucket=name, Key=upload["Key"],
                                         UploadId=upload["UploadId"])
        for page in admin.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                admin.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        admin.delete_bucket(Bucket=name)


def write_credentials(path: Path, access_key: str, secret_key: str) -> Path:
    path.write_text(f"[default]\naws_access_key_id = {access_key}\n"
                    f"aws_secret_access_key = {secret_key}\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def credentials_file(rgw: cephrgw.Rgw, tmp_path: Path) -> Path:
    return write_credentials(tmp_path / "credentials", rgw.access_key, rgw.secret_key)


@pytest.fixture
def settings(rgw: cephrgw.Rgw, bucket: str, credentials_file: Path) -> S3Settings:
    return S3Settings(endpoint_url=rgw.endpoint, region=REGION, bucket=bucket,
                      prefix="cp1/vaults", credentials_file=credentials_file)
