"""The libvirt connector: a KVM/QEMU host reached by a libvirt URI.

It uses libvirt's own Python bindings (Debian's python3-libvirt in the VM), so every
transport and authentication method libvirt has works the same as with virsh. The user name
and password go through `openAuth`'s credential callback (SASL over qemu+tcp or qemu+tls);
qemu+ssh runs the ssh program and so can only use keys or an agent, not the password.

The URI comes from the control plane, so it is checked first against an allow-list: qemu
schemes only (no qemu+ext, which runs a local command), the /system or /session path, and no
query parameters (libvirt's `?command=`, `?keyfile=`, `?socket=`, `?pkipath=`... name local
programs and files). libvirt's connect has no timeout, so for the network transports a plain
TCP connect with the timeout comes first (it tells a refused port, an unknown name and a
silent host apart), and every libvirt call runs in a worker thread the caller waits for at
most `timeout` seconds; a call that overruns is abandoned and its connection closed when it
ends.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from gatewaycore import rules

from . import libvirtbindings
from .model import (
    AUTHENTICATION_FAILED,
    CERTIFICATE_ERROR,
    HOST_UNREACHABLE,
    HYPERVISOR_ERROR,
    INVALID_HOST,
    BackupSession,
    DiscoveredVm,
    HypervisorError,
    RestoreSession,
    Target,
    parse_host,
    reach_error,
    scrub,
)

log = logging.getLogger(__name__)

# The domain <metadata> element that carries a VM's tags (the namespace is ours: libvirt
# keeps one element per namespace and returns it with the namespace stripped).
TAGS_NAMESPACE = "https://backup-gateway.invalid/tags/1"
TAGS_PREFIX = "bg"
TAG_KEY_MAX = 128    # AWS tag limits: the tags become the VM's tags in AWS Backup
TAG_VALUE_MAX = 256
METADATA_MAX = 65536

DEFAULT_PORTS = {"qemu+tcp": 16509, "qemu+tls": 16514, "qemu+ssh": 22}

T = TypeVar("T")


@dataclass(frozen=True)
class LibvirtUri:
    """A checked libvirt URI; `host` is empty for a local one, IPv6 without brackets."""

    uri: str
    scheme: str
    host: str
    port: int | None

    @property
    def display_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host


def parse_uri(text: str) -> LibvirtUri:
    """`text` as a libvirt URI we accept (gatewaycore.rules.hypervisor_host: the rule the
    control plane imports with), or HypervisorError(InvalidHost) saying why not."""
    where = parse_host(text)
    if where.kind != "libvirt":
        raise HypervisorError(INVALID_HOST, f"{text[:80]!r} is not a libvirt URI; accepted: "
                              f"{', '.join(s + '://' for s in rules.LIBVIRT_SCHEMES)}")
    return LibvirtUri(where.text, where.scheme, where.host, where.port)


def tags_metadata_xml(tags: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> str:
    """The <metadata> child that carries `tags`, for virDomainSetMetadata or a domain XML."""
    from xml.sax.saxutils import quoteattr

    items = "".join(f"<{TAGS_PREFIX}:tag key={quoteattr(k)} value={quoteattr(v)}/>"
                    for k, v in tags)
    p = TAGS_PREFIX
    return f"<{p}:tags xmlns:{p}='{TAGS_NAMESPACE}'>{items}</{p}:tags>"


def parse_tags(xml_text: str, domain: str = "") -> tuple[tuple[str, str], ...]:
    """The (key, value) pairs of a tags metadata element; a malformed document or tag is
    skipped with a log line (a user edits this XML by hand with virsh), never an error."""
    if len(xml_text) > METADATA_MAX:
        log.warning("event=libvirt_tags_skipped domain=%s reason=%s", domain, "too large")
        return ()
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        log.warning("event=libvirt_tags_skipped domain=%s reason=%s", domain, exc)
        return ()
    tags: dict[str, str] = {}
    for element in root:
        if element.tag.rpartition("}")[2] != "tag":
            continue
        key, value = element.get("key"), element.get("value", "")
        if not key or len(key) > TAG_KEY_MAX or len(value) > TAG_VALUE_MAX:
            log.warning("event=libvirt_tag_skipped domain=%s key=%s", domain, (key or "")[:40])
            continue
        tags.setdefault(key, value)
    return tuple(tags.items())


class LibvirtConnector:
    """A libvirt hypervisor; one connection, opened on first use and reused."""

    def __init__(self, target: Target, timeout: float = 20.0) -> None:
        self._target = target
        self._uri = parse_uri(target.host)
        self._username = target.username
        self._password = target.password
        self._timeout = timeout
        self._conn: Any = None
        self._lock = threading.Lock()

    # -- the Connector calls ------------------------------------------------------------

    def test(self) -> None:
        # one round trip over the authenticated connection
        self._bounded("test", lambda conn: conn.getLibVersion())
        log.info("event=libvirt_test_ok uri=%s", self._uri.uri)

    def inventory(self) -> list[DiscoveredVm]:
        vms = self._bounded("inventory", self._inventory)
        log.info("event=libvirt_inventory uri=%s vms=%s", self._uri.uri, len(vms))
        return vms

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # -- the BackupConnector calls (the data path lives in libvirtbackup.py) -------------

    def begin_backup(self, vm_uuid: str, job_id: str,
                     base_checkpoint: str | None) -> BackupSession:
        from . import libvirtbackup
        return libvirtbackup.begin_backup(self.session(), vm_uuid, job_id, base_checkpoint)

    def restore_options(self) -> tuple[str, ...]:
        from gatewaycore import restorekeys
        return restorekeys.LIBVIRT

    def begin_restore(self, vm_config: Mapping[str, Any], name: str,
                      options: Mapping[str, str],
                      disks: list[tuple[str, str, int]]) -> RestoreSession:
        from . import libvirtbackup
        return libvirtbackup.begin_restore(self.session(), vm_config, name, options, disks)

    # -- what a backup or restore session uses ------------------------------------------

    def session(self) -> LibvirtConnector:
        """A connector of its own for one backup or restore: the session's libvirt streams,
        its paused-for-backup domain (auto-destroyed with the connection) and its long calls
        must not die when a discovery call times out and drops the shared connection."""
        return LibvirtConnector(self._target, self._timeout)

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def uri(self) -> LibvirtUri:
        return self._uri

    @property
    def nbd_address(self) -> str:
        """Where the hypervisor's NBD backup server listens for the gateway: the host of
        the URI (the address the gateway already reaches it on), 127.0.0.1 for a local URI."""
        return self._uri.host or "127.0.0.1"

    def call(self, what: str, work: Callable[[Any], T], timeout: float | None = None) -> T:
        """`work(conn)` bounded like every call of this connector, libvirt errors turned into
        scrubbed HypervisorErrors; `timeout` for the calls that move data (an upload's
        conversion), else the connector's."""
        return self._bounded(what, work, timeout)

    def discovered(self, conn: Any, dom: Any) -> DiscoveredVm:
        """`dom` as inventory() reports it (a restore returns the VM it made this way)."""
        host_name = self._uri.host or conn.getHostname()
        prefix = self._uri.display_host or host_name
        name = dom.name()
        return DiscoveredVm(uuid=dom.UUIDString(), name=name, path=f"{prefix}/{name}",
                            host_name=host_name, tags=self._tags(libvirtbindings.load(), dom, name))

    # -- connection ---------------------------------------------------------------------

    def _drop(self, conn: Any) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None
        with contextlib.suppress(Exception):
            conn.close()

    def _connection(self) -> Any:
        libvirt = libvirtbindings.load()
        with self._lock:
            conn = self._conn
        if conn is not None:
            try:
                if conn.isAlive():
                    return conn
            except libvirt.libvirtError:
                pass
            self.close()
        self._reachable()
        asked: list[str] = []

        def credentials(creds: list[list[Any]], _data: Any) -> int:
            for cred in creds:
                if cred[0] == libvirt.VIR_CRED_AUTHNAME and self._username:
                    cred[4] = self._username
                elif cred[0] == libvirt.VIR_CRED_PASSPHRASE and self._password is not None:
                    cred[4] = self._password
                else:
                    asked.append("user name" if cred[0] == libvirt.VIR_CRED_AUTHNAME
                                 else "password")
                    return -1
            return 0

        auth = [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], credentials, None]
        try:
            conn = libvirt.openAuth(self._uri.uri, auth, 0)
        except libvirt.libvirtError as exc:
            if asked:
                raise HypervisorError(AUTHENTICATION_FAILED, f"the hypervisor asks for a "
                                      f"{asked[0]} and none was given") from None
            raise self._error(libvirt, exc) from None
        with self._lock:
            self._conn = conn
        return conn

    def _reachable(self) -> None:
        """A TCP connect with the timeout before libvirt's own (which has none)."""
        uri = self._uri
        if uri.scheme in rules.LIBVIRT_LOCAL_SCHEMES:
            return
        port = uri.port or DEFAULT_PORTS[uri.scheme]
        where = f"{uri.display_host}:{port}"
        try:
            with socket.create_connection((uri.host, port), timeout=self._timeout):
                pass
        except OSError as exc:
            raise reach_error(exc, uri.host, where, self._timeout, "is libvirtd listening "
                              "there (listen_tcp/listen_tls)?") from None

    def _bounded(self, what: str, work: Callable[[Any], T],
                 timeout: float | None = None) -> T:
        """Connect if needed and run `work(conn)` in a worker thread; wait at most the
        timeout. An overrunning worker is abandoned: its connection is dropped from the
        connector at once and closed by the worker when libvirt returns."""
        result: dict[str, Any] = {}
        done = threading.Event()
        abandoned = threading.Event()

        def run() -> None:
            conn = None
            try:
                conn = self._connection()
                result["value"] = work(conn)
            except BaseException as exc:  # handed to the caller below
                result["error"] = exc
            finally:
                done.set()
                if abandoned.is_set() and conn is not None:
                    self._drop(conn)

        limit = self._timeout if timeout is None else timeout
        threading.Thread(target=run, name=f"libvirt-{what}", daemon=True).start()
        if not done.wait(limit):
            abandoned.set()
            with self._lock:
                self._conn = None
            log.warning("event=libvirt_timeout uri=%s call=%s seconds=%s", self._uri.uri, what,
                        limit)
            raise HypervisorError(HOST_UNREACHABLE, f"the hypervisor at {self._uri.uri} did not "
                                  f"answer within {limit:g}s")
        if "error" in result:
            error = result["error"]
            libvirt = libvirtbindings.load()
            if isinstance(error, libvirt.libvirtError):
                raise self._error(libvirt, error) from None
            raise error
        return result["value"]

    # -- discovery ----------------------------------------------------------------------

    def _inventory(self, conn: Any) -> list[DiscoveredVm]:
        libvirt = libvirtbindings.load()
        host_name = self._uri.host or conn.getHostname()
        prefix = self._uri.display_host or host_name
        vms = []
        for dom in conn.listAllDomains(0):
            try:
                name, uuid = dom.name(), dom.UUIDString()
                tags = self._tags(libvirt, dom, name)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # undefined while we listed
                raise
            vms.append(DiscoveredVm(uuid=uuid, name=name, path=f"{prefix}/{name}",
                                    host_name=host_name, tags=tags))
        return sorted(vms, key=lambda vm: (vm.name, vm.uuid))

    @staticmethod
    def _tags(libvirt: Any, dom: Any, name: str) -> tuple[tuple[str, str], ...]:
        try:
            xml_text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, TAGS_NAMESPACE, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return ()
            raise
        return parse_tags(xml_text, name)

    # -- errors -------------------------------------------------------------------------

    def _error(self, libvirt: Any, exc: Any) -> HypervisorError:
        code = exc.get_error_code()
        text = scrub(exc.get_error_message() or str(exc), self._password)
        log.info("event=libvirt_error uri=%s code=%s domain=%s message=%s", self._uri.uri, code,
                 exc.get_error_domain(), text)
        if code in (libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_AUTH_CANCELLED):
            return HypervisorError(AUTHENTICATION_FAILED, f"the hypervisor at {self._uri.uri} "
                                   f"refused the user name or password ({text})")
        if "certificate" in text.lower() or " CA " in text:
            return HypervisorError(CERTIFICATE_ERROR, f"TLS with {self._uri.uri} failed: {text}")
        if code in (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_NO_CONNECT,
                    libvirt.VIR_ERR_RPC) and exc.get_error_domain() in (
                        libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE):
            return HypervisorError(HOST_UNREACHABLE, f"cannot reach {self._uri.uri}: {text}")
        if code == libvirt.VIR_ERR_NO_CONNECT:
            return HypervisorError(HOST_UNREACHABLE, f"no hypervisor at {self._uri.uri}: {text}")
        return HypervisorError(HYPERVISOR_ERROR, f"{self._uri.uri}: {text}")
