"""The vault store settings (`serve --vault-store FILE`): what a file means, and every
mistake refused by the real CLI with exit status 2, one line naming the key and what is
accepted, and no traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.vaultsettings import LOCAL, S3, VaultSettingsError, load

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vault-store.toml"
    path.write_text(text)
    return path


def serve(tmp_path: Path, settings: Path, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    """`python -m controlplane serve` that must stop before listening."""
    return subprocess.run(
        [sys.executable, "-m", "controlplane", "serve", "--state-dir", str(tmp_path / "state"),
         "--listen", "127.0.0.1:0", "--vault-store", str(settings)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, **(env or {})})


S3_OK = """
[s3]
endpoint_url = "http://127.0.0.1:7480"
region = "default"
bucket = "vaults"
key_file = "master.key"
"""


def test_no_file_and_an_empty_file_mean_the_local_directory(tmp_path: Path) -> None:
    assert load(None).kind == LOCAL and load(None).key_file is None
    empty = load(write(tmp_path, "# nothing\n"))
    assert empty.kind == LOCAL and empty.key_file is None and empty.s3 is None


def test_local_with_a_key_file_relative_to_the_settings(tmp_path: Path) -> None:
    settings = load(write(tmp_path, '[local]\nkey_file = "keys/master.key"\n'))
    assert settings.kind == LOCAL and settings.key_file == tmp_path / "keys" / "master.key"
    assert settings.stores(tmp_path / "state").exists("vault-1") is False


def test_s3_with_defaults_and_every_key(tmp_path: Path) -> None:
    plain = load(write(tmp_path, S3_OK))
    assert plain.kind == S3 and plain.s3 is not None
    assert (plain.s3.endpoint_url, plain.s3.region, plain.s3.bucket) == (
        "http://127.0.0.1:7480", "default", "vaults")
    assert (plain.s3.prefix, plain.s3.addressing, plain.s3.verify_tls) == ("", "path", True)
    assert plain.s3.credentials_file is None and plain.s3.ca_bundle is None
    assert plain.key_file == tmp_path / "master.key"
    (tmp_path / "creds").write_text("[default]\naws_access_key_id = a\n")
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    full = load(write(tmp_path, S3_OK.replace("[s3]", """[s3]
prefix = "cp1"
addressing = "virtual"
credentials_file = "creds"
verify_tls = false
ca_bundle = "ca.pem"
""")))
    assert full.s3 is not None
    assert (full.s3.prefix, full.s3.addressing, full.s3.verify_tls) == ("cp1/", "virtual", False)
    assert full.s3.credentials_file == tmp_path / "creds"
    assert full.s3.ca_bundle == tmp_path / "ca.pem"
    assert "bucket=vaults" in full.describe() and "creds" not in full.describe()


@pytest.mark.parametrize(("text", "says"), [
    ('[s3]\nendpoint_url = "http://h"\n[local]\n', "both [local] and [s3]"),
    ("colour = 1\n", "unknown key 'colour'; accepted: a [local] or an [s3] table"),
    ('s3 = "bucket"\n', "s3 must be a table"),
    (S3_OK + 'secret_key = "x"\n', "unknown key [s3].secret_key; accepted: endpoint_url,"),
    ('[local]\ndirectory = "/x"\n', "unknown key [local].directory; accepted: key_file"),
    (S3_OK.replace('bucket = "vaults"\n', ""), "[s3].bucket must be a bucket name"),
    (S3_OK.replace('"vaults"', '"Vaults_1"'), "[s3].bucket must be a bucket name"),
    (S3_OK.replace('key_file = "master.key"\n', ""), "[s3].key_file must be the vault"),
    (S3_OK.replace('"http://127.0.0.1:7480"', '"ftp://host"'), "[s3].endpoint_url must be a URL"),
    (S3_OK.replace('"http://127.0.0.1:7480"', '"http://h:99999"'), "[s3].endpoint_url"),
    (S3_OK.replace('"http://127.0.0.1:7480"', '"http://h/path?x"'), "[s3].endpoint_url"),
    (S3_OK.replace('"http://127.0.0.1:7480"', "7480"), "[s3].endpoint_url must be a URL"),
    (S3_OK + "verify_tls = \"yes\"\n", "[s3].verify_tls must be true or false; got 'yes'"),
    (S3_OK + 'addressing = "dns"\n', "[s3].addressing must be \"path\" or \"virtual\""),
    (S3_OK + 'prefix = "/abs"\n', "[s3].prefix must be a key prefix"),
    (S3_OK + 'ca_bundle = "nowhere.pem"\n', "[s3].ca_bundle must be a PEM file"),
    (S3_OK + 'credentials_file = "nowhere"\n', "[s3].credentials_file must be a file"),
    ("[s3\n", "not valid TOML"),
])
def test_mistakes_are_refused_by_the_cli_naming_the_key(tmp_path: Path, text: str,
                                                         says: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(VaultSettingsError) as err:
        load(path)
    assert says in str(err.value) and str(path) in str(err.value)
    done = serve(tmp_path, path)
    assert done.returncode == 2
    assert says in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was made


def test_a_missing_settings_file_is_refused(tmp_path: Path) -> None:
    done = serve(tmp_path, tmp_path / "absent.toml")
    assert done.returncode == 2 and "absent.toml: no such file" in done.stderr


def test_an_unusable_bucket_stops_the_start_with_its_reason(tmp_path: Path) -> None:
    """S3Settings.check() runs at start-up: an endpoint nobody listens on, and missing
    credentials, stop the start with one line saying so."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    path = write(tmp_path, S3_OK.replace("7480", str(port)))
    env = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "not-logged-secret"}
    done = serve(tmp_path, path, env)
    assert done.returncode == 2, done.stderr
    assert f"S3 endpoint http://127.0.0.1:{port} unreachable" in done.stderr
    assert "Traceback" not in done.stderr and "not-logged-secret" not in done.stderr
    assert not (tmp_path / "master.key").exists()  # no key made for a store never reached
    bare = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    done = subprocess.run(
        [sys.executable, "-m", "controlplane", "serve", "--state-dir", str(tmp_path / "s2"),
         "--listen", "127.0.0.1:0", "--vault-store", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False, env=bare)
    assert done.returncode == 2 and "S3 credentials for" in done.stderr
    assert "missing" in done.stderr
