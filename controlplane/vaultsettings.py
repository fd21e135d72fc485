"""Where this control plane keeps its vaults' bytes: `serve --vault-store FILE` (TOML).

Why one file per control plane and not a setting per vault: the storage is infrastructure
the operator configures once, in one place (the API's CreateBackupVault has no member that
could carry it, and a user creating a vault should not choose the operator's bucket); and
vaults need no separate buckets to stay apart, since each vault's objects sit under a
random storage key of its own and are encrypted under a data key of its own.

No file: the local directory `STATE_DIR/vaults`, vault keys wrapped under a key derived
from secrets.key (as before). Otherwise exactly one table:

    [local]                       # the local directory, keys wrapped under a key file
    key_file = "/etc/controlplane/vault-master.key"   # optional

    [s3]                          # an S3-compatible bucket (AWS S3, Ceph RGW, ...)
    endpoint_url = "https://rgw.example.net:7480"     # http:// or https://, host, port
    region = "us-east-1"
    bucket = "backup-vaults"
    prefix = "cp1/"               # default "": the vaults' objects go under it
    addressing = "path"           # "path" (default) or "virtual" (bucket.host)
    credentials_file = "/etc/controlplane/s3.credentials"   # optional, AWS shared format;
                                  # else AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    verify_tls = true             # default true
    ca_bundle = "/etc/controlplane/rgw-ca.pem"        # optional
    key_file = "/etc/controlplane/vault-master.key"   # required

`key_file` is the vault master key (32 random bytes, made 0600 on the first start when it
does not exist): every vault's data key is wrapped under it (controlplane/vaultkeys.py).
Keep a copy off this machine: without it the bucket's data cannot be read. Relative paths
are relative to the settings file's directory.

Every mistake (an unknown key, a wrong type, a bad URL, a missing bucket) is a
VaultSettingsError naming the file, the key and what is accepted; the CLI prints it and
exits with status 2.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from controlplane.atrest import SecretsAtRest
from controlplane.chunkstore import LocalVaultStores, VaultStores
from controlplane.vaultkeys import KeyRing

if TYPE_CHECKING:
    from controlplane.s3store import S3Settings

LOCAL = "local"
S3 = "s3"
VAULTS_DIR = "vaults"
ADDRESSING = ("path", "virtual")
# S3's bucket naming rule (3-63 of a-z 0-9 . -, a letter or digit at each end).
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
REGION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
MAX_PREFIX = 512
_PREFIX_RE = re.compile(r"[A-Za-z0-9!_.*'()/-]*")
_S3_KEYS = {
    "endpoint_url": "a URL: http:// or https://, a host and an optional port",
    "region": "the bucket's region, e.g. \"us-east-1\"",
    "bucket": "a bucket name (3-63 of a-z 0-9 . -)",
    "prefix": "a key prefix (default \"\")",
    "addressing": "\"path\" or \"virtual\"",
    "credentials_file": "a file in the AWS shared-credentials format",
    "verify_tls": "true or false",
    "ca_bundle": "a PEM file of the CA certificates to trust",
    "key_file": "the vault master key file (made when missing)",
}
_LOCAL_KEYS = {"key_file": "the vault master key file (optional; made when missing)"}


class VaultSettingsError(ValueError):
    """The settings file is unusable; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class VaultStoreSettings:
    """The vault backend of this control plane: `kind` LOCAL or S3, the master `key_file`
    (None: local, keys wrapped under secrets.key), the S3 settings for S3, and `source`,
    the settings file (None: the default, no file)."""

    kind: str = LOCAL
    key_file: Path | None = None
    s3: S3Settings | None = None
    source: Path | None = None

    def describe(self) -> str:
        """For logs and reports: the backend, never a secret."""
        if self.s3 is not None:
            return (f"s3 endpoint={self.s3.endpoint_url} bucket={self.s3.bucket} "
                    f"prefix={self.s3.prefix!r}")
        return "local"

    def check(self) -> None:
        """At start-up: that the bucket exists and the credentials are accepted
        (s3store.StorageBackendError saying which); nothing to check for the local one."""
        if self.s3 is not None:
            self.s3.check()

    def stores(self, state_dir: Path) -> VaultStores:
        """The vaults' stores: STATE_DIR/vaults, or the bucket."""
        if self.s3 is None:
            return LocalVaultStores(state_dir / VAULTS_DIR)
        from controlplane.s3store import S3VaultStores
        return S3VaultStores(self.s3)

    def keyring(self, secrets: SecretsAtRest | None, *, create: bool) -> KeyRing:
        """The key-encryption key of the vaults: the key file (made when missing and
        `create`), else derived from `secrets` (VaultKeyError when there is none)."""
        if self.key_file is not None:
            return KeyRing.from_key_file(self.key_file, create=create)
        if secrets is None:
            from controlplane.vaultkeys import VaultKeyError
            raise VaultKeyError("no vault key: the state directory has no secrets.key and "
                                "the vault store settings name no key_file")
        return KeyRing.from_secrets(secrets)


def load(path: Path | None) -> VaultStoreSettings:
    """The settings in `path` (None: the default, the local directory)."""
    if path is None:
        return VaultStoreSettings()
    where = f"vault store settings {path}"
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VaultSettingsError(f"{where}: no such file") from None
    except OSError as exc:
        raise VaultSettingsError(f"{where}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise VaultSettingsError(f"{where}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise VaultSettingsError(f"{where}: not valid TOML ({exc})") from None
    return parse(doc, path)


def parse(doc: dict[str, Any], path: Path) -> VaultStoreSettings:
    where = f"vault store settings {path}"
    unknown = sorted(k for k in doc if k not in (LOCAL, S3))
    if unknown:
        raise VaultSettingsError(f"{where}: unknown key {unknown[0]!r}; accepted: a [local] "
                                 "or an [s3] table")
    tables = [k for k in (LOCAL, S3) if k in doc]
    if len(tables) > 1:
        raise VaultSettingsError(f"{where}: both [local] and [s3]: choose one backend")
    if not tables:
        return VaultStoreSettings(source=path)  # an empty file: the default
    kind = tables[0]
    table = doc[kind]
    if not isinstance(table, dict):
        raise VaultSettingsError(f"{where}: {kind} must be a table ([{kind}])")
    accepted = _S3_KEYS if kind == S3 else _LOCAL_KEYS
    for key in table:
        if key not in accepted:
            raise VaultSettingsError(f"{where}: unknown key [{kind}].{key}; accepted: "
                                     f"{', '.join(accepted)}")
    reader = _Reader(table, kind, where, path.parent)
    if kind == LOCAL:
        return VaultStoreSettings(LOCAL, reader.path("key_file", optional=True), None, path)
    key_file = reader.path("key_file", optional=False)
    s3 = _s3_settings(reader)
    return VaultStoreSettings(S3, key_file, s3, path)


def _s3_settings(r: _Reader) -> S3Settings:
    endpoint = r.text("endpoint_url")
    parts = urlsplit(endpoint)
    try:
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        port_ok = False
    if (parts.scheme not in ("http", "https") or not parts.hostname or not port_ok
            or parts.path not in ("", "/") or parts.query or parts.fragment
            or parts.username or parts.password):
        raise r.error("endpoint_url", f"got {endpoint!r}")
    region = r.text("region")
    if not REGION_RE.fullmatch(region):
        raise r.error("region", f"got {region!r}: letters, digits, - and _ (at most 64)")
    bucket = r.text("bucket")
    if not BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise r.error("bucket", f"got {bucket!r}")
    prefix = r.text("prefix", default="")
    if len(prefix) > MAX_PREFIX or not _PREFIX_RE.fullmatch(prefix) or prefix.startswith(
            "/") or "//" in prefix:
        raise r.error("prefix", f"got {prefix!r}: at most {MAX_PREFIX} of A-Z a-z 0-9 "
                      "! _ . * ' ( ) / -, not starting with / nor holding //")
    addressing = r.text("addressing", default="path")
    if addressing not in ADDRESSING:
        raise r.error("addressing", f"got {addressing!r}")
    verify_tls = r.table.get("verify_tls", True)
    if not isinstance(verify_tls, bool):
        raise r.error("verify_tls", f"got {verify_tls!r}")
    credentials_file = r.path("credentials_file", optional=True, must_exist=True)
    ca_bundle = r.path("ca_bundle", optional=True, must_exist=True)
    from controlplane.s3store import S3Settings
    try:
        return S3Settings(endpoint_url=endpoint.rstrip("/"), region=region, bucket=bucket,
                          prefix=prefix, addressing=addressing,  # type: ignore[arg-type]
                          credentials_file=credentials_file, verify_tls=verify_tls,
                          ca_bundle=ca_bundle)
    except ValueError as exc:  # a rule of s3store's this module did not check first
        raise VaultSettingsError(f"{r.where}: [s3]: {exc}") from None


@dataclass
class _Reader:
    """Typed reads of one table, each error naming [table].key and what is accepted."""

    table: dict[str, Any]
    kind: str
    where: str
    base: Path

    def error(self, key: str, detail: str) -> VaultSettingsError:
        accepted = (_S3_KEYS if self.kind == S3 else _LOCAL_KEYS)[key]
        return VaultSettingsError(f"{self.where}: [{self.kind}].{key} must be {accepted}; "
                                  f"{detail}")

    def text(self, key: str, default: str | None = None) -> str:
        value = self.table.get(key, default)
        if value is None:
            raise self.error(key, "it is missing")
        if not isinstance(value, str):
            raise self.error(key, f"got a {type(value).__name__}, not a string")
        if key != "prefix" and not value:
            raise self.error(key, "it is empty")
        return value

    def path(self, key: str, *, optional: bool, must_exist: bool = False) -> Path | None:
        if key not in self.table and optional:
            return None
        path = self.base / self.text(key)
        if must_exist and not path.is_file():
            raise self.error(key, f"{path} is not a readable file")
        return path
