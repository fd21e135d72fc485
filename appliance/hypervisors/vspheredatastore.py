"""The datastore's HTTPS file URL: reads and writes of the flat files behind a VM's disks,
for vSphere backups (vspherebackup.py) and restores (vsphererestore.py) without VDDK.

Why this path: VDDK (NBD/NBDSSL on port 902, HotAdd) is a closed library the appliance does
not ship; the datastore file URL (`https://HOST/folder/PATH?dcPath=DC&dsName=DS`, opened by
the SOAP session's cookie and read with HTTP Range requests) is what virt-v2v's vCenter
input reads VMware disks with, and every vCenter and ESXi serves it.

Here: datastore paths ("[ds] dir/x.vmdk") and the names of a flat disk's two files;
DatastoreFile, the URL of one file; DatastoreHttp, Range reads and Content-Length PUTs (a
generator body is streamed as it yields); and delete_directory, which removes a datastore
directory through the FileManager. Every call blocks; DatastoreHttp may be used from
several threads at once (DiskReader.read is): each thread keeps one HTTPS connection of
its own.
"""

from __future__ import annotations

import http.client
import re
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from .model import CERTIFICATE_ERROR, HYPERVISOR_ERROR, HypervisorError, reach_error
from .vspheresoap import Vsphere, wait_task

ERROR_BODY_MAX = 4096
DS_PATH_RE = re.compile(r"\[([^\]]+)\] ?(.*)")


# -- datastore paths -----------------------------------------------------------------------


def split_ds_path(text: str) -> tuple[str, str]:
    """"[datastore] dir/file.vmdk" -> ("datastore", "dir/file.vmdk")."""
    match = DS_PATH_RE.fullmatch(text or "")
    if not match:
        raise HypervisorError(HYPERVISOR_ERROR, f"{text!r} is not a datastore path")
    return match.group(1), match.group(2)


def flat_name(descriptor: str) -> str:
    """The data file of a flat disk: "x.vmdk" holds the descriptor, "x-flat.vmdk" the bytes."""
    if not descriptor.endswith(".vmdk"):
        raise HypervisorError(HYPERVISOR_ERROR, f"{descriptor!r} is not a .vmdk file")
    return descriptor[:-len(".vmdk")] + "-flat.vmdk"


def ds_path(datastore: str, path: str) -> str:
    """("datastore", "dir/file.vmdk") -> "[datastore] dir/file.vmdk"."""
    return f"[{datastore}] {path}"


def descriptor_name(flat: str) -> str:
    """The descriptor beside a flat disk's data file: "x-flat.vmdk" -> "x.vmdk"."""
    return flat[:-len("-flat.vmdk")] + ".vmdk"


# -- the datastore's HTTPS file URL ----------------------------------------------------------


@dataclass(frozen=True)
class DatastoreFile:
    datastore: str
    path: str       # inside the datastore, "dir/file-flat.vmdk"
    dc_path: str    # the datacenter's inventory path, "Folder/DC"

    @property
    def url(self) -> str:
        return (f"/folder/{quote(self.path, safe='/')}?dcPath={quote(self.dc_path, safe='/')}"
                f"&dsName={quote(self.datastore, safe='')}")

    def __str__(self) -> str:
        return ds_path(self.datastore, self.path)


class DatastoreHttp:
    """HTTPS to the datastore file URLs with the connector's TLS context and timeout: one
    kept-alive connection per thread (several threads read a backup at once), all closed by
    close(). No proxy from the environment, no credentials beyond the session cookie."""

    def __init__(self, api: Vsphere) -> None:
        self._api = api
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[http.client.HTTPSConnection] = []
        self._closed = False

    def _connection(self) -> http.client.HTTPSConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            where = self._api.endpoint
            conn = http.client.HTTPSConnection(where.host, where.port,
                                               timeout=self._api.timeout, context=self._api.tls)
            with self._lock:
                if self._closed:
                    raise HypervisorError(HYPERVISOR_ERROR, "the datastore session has ended")
                self._open.append(conn)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()
            with self._lock:
                if conn in self._open:
                    self._open.remove(conn)

    def read(self, file: DatastoreFile, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` of `file`, by one Range request (206 or an error)."""
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        status, reason, body = self._exchange("GET", file, headers, None, length)
        if status == 206 and len(body) == length:
            return body
        if status == 206:
            why = ": the file is shorter than the disk" if len(body) < length else ""
            raise HypervisorError(HYPERVISOR_ERROR, f"GET {file} on {self._api.endpoint.netloc}"
                                  f" returned {len(body)} bytes at {offset} instead of "
                                  f"{length}{why}")
        hint = " (the server ignored the Range header)" if status == 200 else ""
        raise self._status_error("GET", file, status, reason, hint)

    def put(self, file: DatastoreFile, size: int, body: bytes | Iterator[bytes]) -> None:
        """Create or replace `file` with `size` bytes (a Content-Length body, which every
        vCenter and ESXi accepts; a generator is sent as it yields)."""
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        status, reason, _ = self._exchange("PUT", file, headers, body, 0)
        if status not in (200, 201, 204):
            raise self._status_error("PUT", file, status, reason, "")

    def _exchange(self, method: str, file: DatastoreFile, headers: dict[str, str],
                  body: bytes | Iterator[bytes] | None, want: int) -> tuple[int, str, bytes]:
        """One request; a kept-alive connection the server closed is retried once on a new
        one, and a 401/403 once after the SOAP session was checked (and made again)."""
        where = self._api.endpoint.netloc
        for attempt in range(3):
            fresh = getattr(self._local, "conn", None) is None
            conn = self._connection()
            try:
                conn.request(method, file.url, body=body,
                             headers={**headers, "Cookie": self._api.session_cookie()})
                response = conn.getresponse()
                status, reason = response.status, response.reason
                if status in (200, 206) and method == "GET":
                    data = response.read(want + 1)
                else:
                    data = response.read(ERROR_BODY_MAX)
                if response.length or not response.isclosed():
                    self._drop()  # unread bytes left: this connection cannot be reused
            except ssl.SSLCertVerificationError as exc:
                self._drop()
                raise HypervisorError(CERTIFICATE_ERROR, f"the certificate of {where} is "
                                      f"not trusted ({exc.verify_message})") from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                if fresh or (body is not None and not isinstance(body, bytes)) or attempt:
                    if isinstance(exc, OSError):
                        error = reach_error(exc, self._api.endpoint.host, where,
                                            self._api.timeout, "nothing listens there")
                        raise HypervisorError(error.code, f"{method} {file}: "
                                              f"{error.message}") from None
                    raise HypervisorError(HYPERVISOR_ERROR, f"{method} {file} on {where}: "
                                          f"{type(exc).__name__}") from None
                continue
            except BaseException:
                self._drop()  # e.g. an upload's body generator stopped by an abort
                raise
            if status in (401, 403) and attempt < 2 and body is None:
                self._api.content()  # the session is checked, and made again if it ended
                continue
            return status, reason, data
        raise HypervisorError(HYPERVISOR_ERROR, f"{method} {file} on {where} kept failing")

    def _status_error(self, method: str, file: DatastoreFile, status: int, reason: str,
                      hint: str) -> HypervisorError:
        meaning = {401: ": the session was refused", 403: ": permission denied",
                   404: ": no such file", 507: ": the datastore is full"}.get(status, "")
        return HypervisorError(HYPERVISOR_ERROR, f"{method} {file} on "
                               f"{self._api.endpoint.netloc} answered {status} {reason}"
                               f"{meaning}{hint}")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._open = self._open, []
        for conn in conns:
            conn.close()


# -- directories ---------------------------------------------------------------------------


def delete_directory(api: Vsphere, path: str, datacenter: Any) -> None:
    """Delete the datastore directory `path` ("[ds] dir") and the files in it; a directory
    already gone (FileNotFound, CannotDeleteFile) counts as deleted."""
    from pyVmomi import vim

    content = api.content()
    what = f"deleting {path}"

    def start() -> Any:
        try:
            return content.fileManager.DeleteDatastoreFile_Task(name=path,
                                                                datacenter=datacenter)
        except vim.fault.FileNotFound:
            return None

    task = api.step(what, start)
    if task is None:
        return
    try:
        wait_task(api, task, what, limit=900.0)
    except HypervisorError as exc:
        if "FileNotFound" not in exc.message and "CannotDeleteFile" not in exc.message:
            raise
