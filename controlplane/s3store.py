"""Vault storage in an S3-compatible bucket (issue 12): the chunkstore protocols over boto3.

Layout under the bucket's `prefix` (docs/backups.md, "In the vault", is the local one):

    <prefix><vault>/vault                 the vault's marker: `exists` is a HEAD of it
    <prefix><vault>/chunks/ab/<64 hex>    encrypted chunks (the local store's sharding)
    <prefix><vault>/points/<point>.json   manifests
    <prefix><vault>/meta/<name>           small objects the disaster-recovery path reads
    <prefix>.drop~/<vault>                a drop in progress ("~" is in no vault name)

Why each ChunkStore method is what it is here:

- put_if_absent is one PutObject with `If-None-Match: *`: the store, not the client, decides
  which of two writers wins (412 PreconditionFailed for the loser), so two control plane
  threads or processes cannot both store a name. Chunks (<= 4 MiB + overhead) always go up
  this way. An object above `multipart_threshold` (a huge manifest) goes up in parts, each
  part copied out of the caller's buffer only while it is sent (memory stays bounded by the
  parts in flight), and CompleteMultipartUpload carries `If-None-Match: *` too. AWS honours
  it there; Ceph Pacific ignores it, so on such a store a large put is check-then-put: a HEAD
  first answers "held", but two writers racing on one new large name may both return True
  (the later complete wins). Manifests are written by one commit per point at a time, so
  the vaults never race there.
- sync is a no-op and suspects finds nothing: an acknowledged PUT is durable and S3 never
  shows a torn object. What a crash can leave is an incomplete multipart upload (invisible
  but billed) and a half-done drop; `S3VaultStores.sweep` removes both at start-up.
- drop writes a tombstone, deletes the marker (the vault is gone for `exists` at once), then
  deletes the vault's objects 1000 at a time with DeleteObjects, then the tombstone. A
  crash in between leaves the tombstone, which sweep (or a later create of the same name)
  follows to finish the drop: nothing outside a tombstoned vault is ever bulk-deleted, even
  when the bucket or prefix holds other data.

Errors: every failure of the store (HTTP error, refused credentials, missing bucket,
unreachable endpoint, timeout, TLS) becomes StorageBackendError, an OSError whose strerror is
a message naming the endpoint and bucket and the cause and never a key, so vaults._storage
turns it into VaultError("StorageError", "... could not ...: <that message>"). A missing
object is KeyError (get) or None (size), as the protocol says.

The client is built from S3Settings alone: credentials come from the settings' file or the
AWS_* variables and are given to botocore explicitly, and the AWS config files, profiles,
proxy variables and instance metadata are never consulted, so what the control plane talks
to is exactly what its configuration says. Retries are botocore's (standard or adaptive
mode: exponential backoff with jitter on 5xx, SlowDown and other throttling codes, and
connection errors), over a bounded connection pool with connect and read timeouts.
"""

from __future__ import annotations

import configparser
import contextlib
import errno
import json
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import boto3.session
import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
    SSLError,
)

from controlplane.chunkstore import NAME_RE, VAULT_NAME_RE, check_vault_name

MIB = 1024 * 1024
DELETE_BATCH = 1000          # DeleteObjects' limit
MIN_PART_SIZE = 5 * MIB      # S3's minimum for every part but the last
MAX_PARTS = 10_000
TOMBSTONES = ".drop~/"
MARKER = "vault"
_LAYOUT = ("chunks/", "points/", "meta/")
_CREDENTIAL_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
    "InvalidClientTokenId", "AuthorizationHeaderMalformed", "InvalidSecurity",
})
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem"})


class StorageBackendError(OSError):
    """A failure of the object store, its message naming the backend and the cause.

    An OSError (strerror = the message) so that every caller that already handles storage
    failures of the local directory (vaults._storage) handles these the same way."""

    def __init__(self, message: str, code: int = errno.EIO) -> None:
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class S3Settings:
    """Where the vaults live and how to reach it.

    `prefix`: the keys' common beginning ("" or ending in "/"; a missing "/" is added), so one
    bucket can hold other data or several control planes. `credentials_file`: an AWS shared
    credentials file whose [default] profile has aws_access_key_id, aws_secret_access_key
    (and optionally aws_session_token); None: the AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    (and AWS_SESSION_TOKEN) environment variables. `ca_bundle`: a PEM file of CAs to trust
    instead of the system's (a private store's own CA); ignored when `verify_tls` is false.
    """

    endpoint_url: str
    region: str
    bucket: str
    prefix: str = ""
    addressing: Literal["path", "virtual"] = "path"
    credentials_file: Path | None = None
    verify_tls: bool = True
    ca_bundle: Path | None = None
    retry_mode: Literal["standard", "adaptive"] = "standard"
    max_attempts: int = 5             # the first try included
    max_pool_connections: int = 16    # >= the threads that put at once, or they queue
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    multipart_threshold: int = 64 * MIB
    multipart_part_size: int = 16 * MIB
    multipart_concurrency: int = 4

    def __post_init__(self) -> None:
        parts = urlsplit(self.endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"S3 endpoint {self.public_endpoint!r} is not an http(s) URL")
        if self.addressing not in ("path", "virtual"):
            raise ValueError(f"S3 addressing {self.addressing!r} is neither path nor virtual")
        if not self.bucket:
            raise ValueError("S3 bucket name is empty")
        prefix = self.prefix.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        if "//" in prefix:
            raise ValueError(f"S3 prefix {self.prefix!r} has an empty path segment")
        object.__setattr__(self, "prefix", prefix)
        if self.multipart_part_size < MIN_PART_SIZE:
            raise ValueError(f"multipart_part_size must be at least {MIN_PART_SIZE} bytes")
        if self.max_attempts < 1 or self.max_pool_connections < 1:
            raise ValueError("max_attempts and max_pool_connections must be at least 1")

    @property
    def public_endpoint(self) -> str:
        """The endpoint URL as messages show it: without any user:password@ part."""
        parts = urlsplit(self.endpoint_url)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")

    def credentials(self) -> tuple[str, str, str | None]:
        """(access key id, secret key, session token or None) from the file or environment;
        StorageBackendError (naming where it looked, never a value) when incomplete."""
        if self.credentials_file is not None:
            parser = configparser.RawConfigParser()
            try:
                with open(self.credentials_file, encoding="utf-8") as f:
                    parser.read_file(f)
            except OSError as exc:
                raise StorageBackendError(
                    f"S3 credentials file {self.credentials_file} unreadable: "
                    f"{exc.strerror or exc}", exc.errno or errno.EIO) from None
            except configparser.Error:
                raise StorageBackendError(f"S3 credentials file {self.credentials_file} is "
                                          "not in the AWS shared-credentials format") from None
            section = parser["default"] if parser.has_section("default") else {}
            key, secret = section.get("aws_access_key_id"), section.get("aws_secret_access_key")
            token = section.get("aws_session_token") or None
            where = f"the [default] profile of {self.credentials_file}"
        else:
            key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get(
                "AWS_SECRET_ACCESS_KEY")
            token = os.environ.get("AWS_SESSION_TOKEN") or None
            where = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (no credentials file set)"
        if not key or not secret:
            raise StorageBackendError(f"S3 credentials for {self.public_endpoint} missing: "
                                      f"looked in {where}", errno.EACCES)
        return key.strip(), secret.strip(), token.strip() if token else None

    def client(self) -> Any:
        """A boto3 S3 client configured by these settings only (thread-safe: share it)."""
        key, secret, token = self.credentials()
        # session_vars: no profile, no config or credentials file, whatever AWS_PROFILE,
        # AWS_CONFIG_FILE or ~/.aws say; explicit keys mean no credential chain (and so no
        # instance-metadata lookup); proxies={} means no HTTP(S)_PROXY.
        core = botocore.session.Session(session_vars={
            "profile": (None, None, None, None),
            "config_file": (None, None, os.devnull, None),
            "credentials_file": (None, None, os.devnull, None),
        })
        options: dict[str, Any] = {}
        if "request_checksum_calculation" in Config.OPTION_DEFAULTS:   # botocore >= 1.36
            # Checksums only where the API requires one (DeleteObjects): many S3-compatible
            # stores refuse or ignore the CRC headers boto3 adds by default since 1.36. Over
            # http the signed payload hash already covers the body; over https, TLS does;
            # and a chunk is authenticated by its AES-GCM tag when read.
            options = {"request_checksum_calculation": "when_required",
                       "response_checksum_validation": "when_required"}
        config = Config(
            region_name=self.region,
            signature_version="s3v4",
            s3={"addressing_style": self.addressing},
            retries={"mode": self.retry_mode, "total_max_attempts": self.max_attempts},
            max_pool_connections=self.max_pool_connections,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            proxies={},
            tcp_keepalive=True,
            user_agent_extra="backup-gateway-controlplane",
            **options,
        )
        verify: bool | str = False
        if self.verify_tls:
            verify = str(self.ca_bundle) if self.ca_bundle is not None else True
        return boto3.session.Session(botocore_session=core).client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region, verify=verify,
            aws_access_key_id=key, aws_secret_access_key=secret, aws_session_token=token,
            config=config)

    def check(self, client: Any | None = None) -> None:
        """At start-up: HEAD the bucket, so that a wrong endpoint, bucket or key is said at
        once and clearly (StorageBackendError) rather than at the first backup."""
        S3Bucket(self, client).check()


class S3Bucket:
    """One bucket through one client: the S3 calls the stores make, each failure turned into
    StorageBackendError naming the endpoint and the bucket."""

    def __init__(self, settings: S3Settings, client: Any | None = None) -> None:
        self.settings = settings
        self.name = settings.bucket
        self.client = client if client is not None else settings.client()
        self._where = f"bucket '{self.name}' at {settings.public_endpoint}"
        # botocore before 1.35 (Debian 12 ships 1.29) has no IfNoneMatch parameter: then the
        # header is added by a hook, for the calls made while this thread's flag is set.
        self._header_hook = threading.local()
        self._native = {op: _model_has(self.client, op, "IfNoneMatch")
                        for op in ("PutObject", "CompleteMultipartUpload")}
        for op, native in self._native.items():
            if not native:
                self.client.meta.events.register(f"before-sign.s3.{op}",
                                                 self._add_if_none_match)

    def _add_if_none_match(self, request: Any, **_: Any) -> None:
        if getattr(self._header_hook, "on", False):
            request.headers["If-None-Match"] = "*"

    @contextlib.contextmanager
    def _if_none_match(self, op: str, wanted: bool) -> Iterator[dict[str, str]]:
        """The extra call parameters that make `op` conditional when `wanted`: IfNoneMatch,
        or none and the hook's flag set for the call (retries included: same thread)."""
        if not wanted:
            yield {}
        elif self._native[op]:
            yield {"IfNoneMatch": "*"}
        else:
            self._header_hook.on = True
            try:
                yield {}
            finally:
                self._header_hook.on = False

    # -- errors ---------------------------------------------------------------------------

    def error(self, exc: BaseException, doing: str) -> StorageBackendError:
        """The StorageBackendError for a botocore or socket failure while `doing`."""
        endpoint = self.settings.public_endpoint
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            meta = exc.response.get("ResponseMetadata", {})
            code = str(err.get("Code") or "")
            status = int(meta.get("HTTPStatusCode") or 0)
            retried = int(meta.get("RetryAttempts") or 0)
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and doing == "HEAD"):
                return StorageBackendError(f"S3 {self._where} does not exist", errno.ENOENT)
            region = meta.get("HTTPHeaders", {}).get("x-amz-bucket-region")
            if status in (301, 400) and region and region != self.settings.region:
                return StorageBackendError(f"S3 {self._where} is in region {region}, not "
                                           f"{self.settings.region}")
            if code in _CREDENTIAL_CODES:
                return StorageBackendError(f"S3 credentials refused by {endpoint}: {code}",
                                           errno.EACCES)
            if code in _DENIED_CODES or status == 403:
                return StorageBackendError(f"S3 access denied to {self._where} ({doing}): "
                                           f"{code or 'HTTP 403'}", errno.EACCES)
            detail = str(err.get("Message") or "")[:200]
            after = f" after {retried + 1} attempts" if retried else ""
            return StorageBackendError(
                f"S3 {doing} failed in {self._where}: {code or 'HTTP error'} (HTTP {status})"
                f"{after}{': ' + detail if detail and detail != 'None' else ''}")
        if isinstance(exc, ConnectTimeoutError):
            return StorageBackendError(f"S3 endpoint {endpoint} unreachable: connect timed "
                                       f"out after {self.settings.connect_timeout:g}s",
                                       errno.ETIMEDOUT)
        if isinstance(exc, ReadTimeoutError):
            return StorageBackendError(f"S3 endpoint {endpoint} did not answer {doing} within "
                                       f"{self.settings.read_timeout:g}s", errno.ETIMEDOUT)
        if isinstance(exc, SSLError):
            return StorageBackendError(f"S3 endpoint {endpoint}: TLS failed: {_cause(exc)}",
                                       errno.EPROTO)
        if isinstance(exc, EndpointConnectionError):
            return StorageBackendError(f"S3 endpoint {endpoint} unreachable: {_cause(exc)}",
                                       _errno(exc) or errno.EHOSTUNREACH)
        return StorageBackendError(f"S3 {doing} failed in {self._where}: "
                                   f"{type(exc).__name__}: {_cause(exc)}")

    @contextlib.contextmanager
    def _calling(self, doing: str) -> Iterator[None]:
        try:
            yield
        except StorageBackendError:
            raise
        except (ClientError, BotoCoreError, OSError) as exc:
            raise self.error(exc, doing) from exc

    # -- objects --------------------------------------------------------------------------

    def check(self) -> None:
        """HEAD the bucket (a 403 explained as `_refused` does)."""
        try:
            with self._calling("HEAD"):
                self.client.head_bucket(Bucket=self.name)
        except StorageBackendError as exc:
            raise self._refused(exc, "HEAD") from exc.__cause__

    def _refused(self, exc: StorageBackendError, doing: str) -> StorageBackendError:
        """`exc`, or for a HEAD's 403 (no body to say why) the error of a one-key listing,
        whose body tells refused credentials from a denied bucket."""
        cause = exc.__cause__
        if not (isinstance(cause, ClientError)
                and cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 403):
            return exc
        try:
            with self._calling("ListObjectsV2"):
                self.client.list_objects_v2(Bucket=self.name, MaxKeys=1)
        except StorageBackendError as listed:
            return listed
        return StorageBackendError(f"S3 access denied to {self._where} ({doing}): HTTP 403",
                                   errno.EACCES)

    def put(self, key: str, data: bytes | bytearray | memoryview, *, if_absent: bool) -> bool:
        """Store `data` at `key`; with `if_absent`, only if no object is there (False then).
        Above the multipart threshold the object goes up in parts."""
        if not isinstance(data, bytes | bytearray):
            data = memoryview(data).cast("B")
        size = len(data)
        if size > self.settings.multipart_threshold:
            return self._put_multipart(key, memoryview(data), if_absent=if_absent)
        body = data if isinstance(data, bytes | bytearray) else data.tobytes()
        try:
            with self._calling("PutObject"), self._if_none_match("PutObject", if_absent) as extra:
                self.client.put_object(Bucket=self.name, Key=key, Body=body, **extra)
        except StorageBackendError as exc:
            if if_absent and _precondition_failed(exc.__cause__):
                return False
            raise
        return True

    def _put_multipart(self, key: str, view: memoryview, *, if_absent: bool) -> bool:
        if if_absent and self.head(key) is not None:
            return False
        part_size = max(self.settings.multipart_part_size, -(-view.nbytes // MAX_PARTS))
        ranges = [(n + 1, off, min(off + part_size, view.nbytes))
                  for n, off in enumerate(range(0, view.nbytes, part_size))]
        with self._calling("CreateMultipartUpload"):
            upload_id = self.client.create_multipart_upload(Bucket=self.name, Key=key)["UploadId"]

        def send(part: tuple[int, int, int]) -> dict[str, Any]:
            number, start, end = part
            # One part's copy exists only while it is sent: memory is bounded by the
            # concurrency, not by the object.
            with self._calling("UploadPart"):
                done = self.client.upload_part(Bucket=self.name, Key=key, UploadId=upload_id,
                                               PartNumber=number, Body=view[start:end].tobytes())
            return {"PartNumber": number, "ETag": done["ETag"]}

        try:
            workers = max(1, min(self.settings.multipart_concurrency, len(ranges)))
            with ThreadPoolExecutor(workers, thread_name_prefix="s3-part") as pool:
                parts = list(pool.map(send, ranges))
            with self._calling("CompleteMultipartUpload"), self._if_none_match(
                    "CompleteMultipartUpload", if_absent) as extra:
                self.client.complete_multipart_upload(
                    Bucket=self.name, Key=key, UploadId=upload_id,
                    MultipartUpload={"Parts": parts}, **extra)
        except BaseException as exc:
            with contextlib.suppress(ClientError, BotoCoreError, OSError):
                self.client.abort_multipart_upload(Bucket=self.name, Key=key,
                                                   UploadId=upload_id)
            if (if_absent and isinstance(exc, StorageBackendError)
                    and _precondition_failed(exc.__cause__)):
                return False
            raise
        return True

    def get(self, key: str) -> bytes:
        """The object's bytes; KeyError when there is none."""
        try:
            with self._calling("GetObject"):
                response = self.client.get_object(Bucket=self.name, Key=key)
                with contextlib.closing(response["Body"]) as body:
                    return bytes(body.read())
        except StorageBackendError as exc:
            if _error_code(exc.__cause__) in ("NoSuchKey", "404"):
                raise KeyError(key) from None
            raise

    def head(self, key: str) -> int | None:
        """The object's size, None when there is none."""
        try:
            with self._calling("HeadObject"):
                return int(self.client.head_object(Bucket=self.name, Key=key)["ContentLength"])
        except StorageBackendError as exc:
            if _error_code(exc.__cause__) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._refused(exc, "HeadObject") from exc.__cause__

    def delete(self, key: str) -> None:
        with self._calling("DeleteObject"):
            self.client.delete_object(Bucket=self.name, Key=key)

    def _pages(self, prefix: str, **extra: str) -> Iterator[dict[str, Any]]:
        """The ListObjectsV2 pages under `prefix`, each call under the backend's errors."""
        pages = iter(self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=prefix, **extra))
        while True:
            with self._calling("ListObjectsV2"):
                page = next(pages, None)
            if page is None:
                return
            yield page

    def sizes_under(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object under `prefix`, page by page."""
        for page in self._pages(prefix):
            yield from ((o["Key"], int(o["Size"])) for o in page.get("Contents", ()))

    def keys(self, prefix: str, *, delimiter: str | None = None) -> Iterator[str]:
        """Every key under `prefix` (ListObjectsV2, page by page); with `delimiter`, the
        common prefixes instead (one level of "directories")."""
        for page in self._pages(prefix, **({"Delimiter": delimiter} if delimiter else {})):
            if delimiter:
                yield from (p["Prefix"] for p in page.get("CommonPrefixes", ()))
            else:
                yield from (o["Key"] for o in page.get("Contents", ()))

    def delete_all(self, prefix: str) -> int:
        """Delete every object under `prefix`, DELETE_BATCH keys per DeleteObjects, while
        listing (a listing continues after the last key it gave, so deleting what it already
        gave does not disturb it); returns how many."""
        deleted = 0
        batch: list[str] = []
        for key in self.keys(prefix):
            batch.append(key)
            if len(batch) == DELETE_BATCH:
                deleted += self._delete_batch(batch)
                batch = []
        if batch:
            deleted += self._delete_batch(batch)
        return deleted

    def _delete_batch(self, batch: list[str]) -> int:
        with self._calling("DeleteObjects"):
            done = self.client.delete_objects(Bucket=self.name, Delete={
                "Objects": [{"Key": k} for k in batch], "Quiet": True})
        if errors := done.get("Errors"):
            raise StorageBackendError(
                f"S3 DeleteObjects failed in {self._where} for {len(errors)} of "
                f"{len(batch)} objects: {errors[0].get('Code')}")
        return len(batch)

    def abort_uploads(self, prefix: str, *, only: tuple[str, ...] | None = None) -> int:
        """Abort the incomplete multipart uploads under `prefix` (those whose key's part
        after `prefix` begins with one of `only`'s segments when given); returns how many."""
        aborted = 0
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.name, Prefix=prefix)
        iterator = iter(pages)
        while True:
            with self._calling("ListMultipartUploads"):
                page = next(iterator, None)
            if page is None:
                return aborted
            for upload in page.get("Uploads", ()):
                key = upload["Key"]
                if only is not None and not _in_layout(key[len(prefix):], only):
                    continue
                with self._calling("AbortMultipartUpload"):
                    self.client.abort_multipart_upload(Bucket=self.name, Key=key,
                                                       UploadId=upload["UploadId"])
                aborted += 1


def _model_has(client: Any, operation: str, member: str) -> bool:
    """Whether this botocore's S3 model has parameter `member` for `operation`."""
    shape = client.meta.service_model.operation_model(operation).input_shape
    return member in shape.members


def _in_layout(rest: str, layout: tuple[str, ...]) -> bool:
    """Whether `rest` is "<vault>/<one of layout>...": a key this module wrote."""
    vault, _, tail = rest.partition("/")
    return bool(VAULT_NAME_RE.fullmatch(vault)) and tail.startswith(layout)


def _error_code(exc: BaseException | None) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code") or "")
    return ""


def _precondition_failed(exc: BaseException | None) -> bool:
    if not isinstance(exc, ClientError):
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 412 or _error_code(exc) == "PreconditionFailed"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, the error botocore wrapped in it, and their causes and contexts."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        kwargs = getattr(current, "kwargs", None)
        inner = kwargs.get("error") if isinstance(kwargs, dict) else None
        todo += [inner if isinstance(inner, BaseException) else None,
                 current.__cause__, current.__context__]
        todo += [a for a in getattr(current, "args", ()) if isinstance(a, BaseException)]


def _errno(exc: BaseException) -> int | None:
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno:
            return e.errno
    return None


def _cause(exc: BaseException) -> str:
    """A short reason: "connection refused", "name not resolved", ... or the error's text."""
    code = _errno(exc)
    words = {errno.ECONNREFUSED: "connection refused", errno.ECONNRESET: "connection reset",
             errno.EHOSTUNREACH: "host unreachable", errno.ENETUNREACH: "network unreachable",
             errno.ETIMEDOUT: "timed out"}
    if code in words:
        return words[code]
    for e in _chain(exc):
        if type(e).__name__ == "gaierror" or "Name or service not known" in str(e):
            return "name not resolved"
    text = str(exc)
    return text[:300]


class S3ChunkStore:
    """The ChunkStore of one vault's chunks, points or meta objects: `<base><name>`, or
    `<base><name[:2]>/<name>` when `shard` (the local store's layout)."""

    def __init__(self, bucket: S3Bucket, base: str, *, shard: bool) -> None:
        self.bucket = bucket
        self.base = base
        self.shard = shard

    def key(self, name: str) -> str:
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not an object name")
        return f"{self.base}{name[:2]}/{name}" if self.shard else f"{self.base}{name}"

    def put_if_absent(self, name: str, data: bytes | bytearray | memoryview) -> bool:
        return self.bucket.put(self.key(name), data, if_absent=True)

    def get(self, name: str) -> bytes:
        return self.bucket.get(self.key(name))

    def has(self, name: str) -> bool:
        return self.size(name) is not None

    def size(self, name: str) -> int | None:
        return self.bucket.head(self.key(name))

    def sizes(self, names: Iterable[str]) -> dict[str, int | None]:
        """HEADs on the client's connection pool at once: a commit of N chunks costs about
        N / max_pool_connections round trips, not N."""
        wanted = list(dict.fromkeys(names))
        if len(wanted) < 2:
            found = {name: self.size(name) for name in wanted}
        else:
            workers = min(self.bucket.settings.max_pool_connections, len(wanted))
            with ThreadPoolExecutor(workers, thread_name_prefix="s3-head") as pool:
                found = dict(zip(wanted, pool.map(self.size, wanted), strict=True))
        if None in found.values():
            # A HEAD's 404 is the same for a missing object and a missing bucket: a gone
            # bucket must be a storage error, not "send those chunks again".
            self.bucket.check()
        return found

    def delete(self, name: str) -> None:
        self.bucket.delete(self.key(name))

    def _name_of(self, key: str) -> str | None:
        """The object name of one of this store's keys (None: another key under the base)."""
        name = key.rsplit("/", 1)[-1]
        return name if NAME_RE.fullmatch(name) and key == self.key(name) else None

    def names(self) -> Iterator[str]:
        for key in self.bucket.keys(self.base):
            if (name := self._name_of(key)) is not None:
                yield name

    def listing(self, limit: int) -> dict[str, int] | None:
        """One ListObjectsV2 per 1,000 objects: a vault of N chunks is known in N / 1000
        round trips instead of a HEAD per chunk looked up."""
        found: dict[str, int] = {}
        for key, size in self.bucket.sizes_under(self.base):
            if (name := self._name_of(key)) is None:
                continue
            if len(found) >= limit:
                return None
            found[name] = size
        return found

    def sync(self) -> None:
        """Nothing to do: S3 acknowledges a PUT once it is durable."""

    def suspects(self) -> Iterator[str]:
        """None: S3 never shows a torn object (S3VaultStores.sweep aborts partial uploads)."""
        return iter(())


@dataclass
class S3VaultStores:
    """The VaultStores of every vault in one bucket, under `settings.prefix`."""

    settings: S3Settings
    client: Any | None = None
    bucket: S3Bucket = field(init=False)

    def __post_init__(self) -> None:
        self.bucket = S3Bucket(self.settings, self.client)

    def check(self) -> None:
        """HEAD the bucket (see S3Settings.check)."""
        self.bucket.check()

    def _base(self, vault: str) -> str:
        return f"{self.settings.prefix}{check_vault_name(vault)}/"

    def _tombstone(self, vault: str) -> str:
        return f"{self.settings.prefix}{TOMBSTONES}{check_vault_name(vault)}"

    def exists(self, vault: str) -> bool:
        """A HEAD of the marker. A HEAD's 404 has no body, so it cannot tell a missing vault
        from a missing bucket: on 404 the bucket is checked too (an error path, so rare)."""
        if self.bucket.head(self._base(vault) + MARKER) is not None:
            return True
        self.bucket.check()
        return False

    def create(self, vault: str) -> None:
        """Idempotent: the marker is one PUT. A drop of the same name left unfinished is
        finished first, or a later sweep would delete the new vault's objects."""
        if self.bucket.head(self._tombstone(vault)) is not None:
            self._finish_drop(vault)
        marker = json.dumps({"vault": vault, "layout": 1}).encode()
        self.bucket.put(self._base(vault) + MARKER, marker, if_absent=False)

    def drop(self, vault: str) -> None:
        """Tombstone, marker, objects (batches of 1000), tombstone (the module's docstring)."""
        if not self.exists(vault):
            if self.bucket.head(self._tombstone(vault)) is not None:
                self._finish_drop(vault)
            return
        self.bucket.put(self._tombstone(vault), b"", if_absent=False)
        self.bucket.delete(self._base(vault) + MARKER)
        self._finish_drop(vault)

    def _finish_drop(self, vault: str) -> None:
        base = self._base(vault)
        self.bucket.abort_uploads(base)
        self.bucket.delete_all(base)
        self.bucket.delete(self._tombstone(vault))

    def sweep(self) -> None:
        """At start-up: finish the drops a crash interrupted, and abort the multipart uploads
        a crash left (only under the vaults' own layout: the bucket may hold other data)."""
        for key in list(self.bucket.keys(self.settings.prefix + TOMBSTONES)):
            vault = key.rsplit("/", 1)[-1]
            if VAULT_NAME_RE.fullmatch(vault) and vault != "..":
                self._finish_drop(vault)
        self.bucket.abort_uploads(self.settings.prefix, only=_LAYOUT)

    def vaults(self) -> Iterator[str]:
        prefix = self.settings.prefix
        for common in self.bucket.keys(prefix, delimiter="/"):
            name = common[len(prefix):].rstrip("/")
            if VAULT_NAME_RE.fullmatch(name) and name != "..":
                yield name

    def chunks(self, vault: str) -> S3ChunkStore:
        return S3ChunkStore(self.bucket, self._base(vault) + "chunks/", shard=True)

    def points(self, vault: str) -> S3ChunkStore:
        return S3ChunkStore(self.bucket, self._base(vault) + "points/", shard=False)

    def meta(self, vault: str) -> S3ChunkStore:
        return S3ChunkStore(self.bucket, self._base(vault) + "meta/", shard=False)
