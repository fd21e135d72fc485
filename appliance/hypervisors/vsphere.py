"""The vSphere connector: a vCenter (or a single ESXi host) over its SOAP API with pyvmomi,
and vCenter's vAPI REST endpoint for tags.

TLS is verified, always: against the system CA store by default (an administrator adds the
vCenter's VMCA root certificate, from https://VCENTER/certs/download.zip, to the appliance's
trusted certificates), or against a PEM CA file given to the connector (the daemon's
`hypervisor_ca_file` setting, docs/hypervisors.md). A certificate that
does not verify is a CertificateError whose message carries the SHA-256 fingerprint the
server presented, so a person can compare it with the one vCenter shows. There is no
"ignore certificates" switch in the product code: the tests trust the simulator's CA file.

pyvmomi's SmartConnect negotiates the API version with an HTTP request that has no timeout,
so the SOAP stub is built directly (vim.version.version11, vSphere 6.5, which every later
vCenter still serves) with a socket timeout on every connection. Each network operation is
bounded by the timeout and the whole call by a deadline checked between operations. Written
against pyvmomi 6.7.1 (Debian bookworm's python3-pyvmomi) and what later releases keep.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import http.cookies
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from gatewaycore import restorekeys

from .model import (
    AUTHENTICATION_FAILED,
    CERTIFICATE_ERROR,
    HOST_UNREACHABLE,
    HYPERVISOR_ERROR,
    INVALID_HOST,
    DiscoveredVm,
    HypervisorError,
    Target,
    reach_error,
    scrub,
)
from .model import parse_host as parse_model_host

if TYPE_CHECKING:
    from .vspherebackup import VsphereBackupSession
    from .vsphererestore import VsphereRestoreSession

log = logging.getLogger(__name__)
T = TypeVar("T")

API_VERSION = "vim.version.version11"
DEFAULT_PORT = 443
REST_BODY_MAX = 16 * 1024 * 1024
PAGE = 1000


@dataclass(frozen=True)
class VsphereHost:
    host: str   # IPv6 without brackets
    port: int

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_host(text: str) -> VsphereHost:
    """A host name, IPv4 address, [IPv6] address (or a bare IPv6 address, which cannot carry
    a port) with an optional :port, by the rule the control plane imports with
    (gatewaycore.rules.hypervisor_host); HypervisorError(InvalidHost) otherwise."""
    where = parse_model_host(text)
    if where.kind != "vsphere":
        raise HypervisorError(INVALID_HOST, f"{text[:80]!r} is a libvirt URI, not a vSphere "
                              "host name or address")
    return VsphereHost(where.host, where.port or DEFAULT_PORT)


def ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """Verification on, host name checked; the system store unless a CA file is given."""
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class VsphereConnector:
    """One vCenter or ESXi host; the SOAP session is opened on first use and reused."""

    def __init__(self, target: Target, timeout: float = 20.0, *,
                 ca_file: str | None = None) -> None:
        self._where = parse_host(target.host)
        self._username = target.username or ""
        self._password = target.password or ""
        self._timeout = timeout
        try:
            self._ssl = ssl_context(ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise HypervisorError(CERTIFICATE_ERROR, f"cannot read the CA file {ca_file}: "
                                  f"{exc}") from None
        self._content: Any = None
        self._stub: Any = None
        self._deadline = 0.0

    # -- the Connector calls ------------------------------------------------------------

    def test(self) -> None:
        self._start()
        content = self._guarded(self._session)
        self._guarded(lambda: self._si().CurrentTime())
        log.info("event=vsphere_test_ok host=%s api=%s product=%s", self._where.netloc,
                 content.about.apiVersion, content.about.fullName)

    def inventory(self) -> list[DiscoveredVm]:
        self._start()
        content = self._guarded(self._session)
        vms = self._guarded(lambda: self._vms(content))
        if content.about.apiType == "VirtualCenter" and vms:
            tags = self._guarded(lambda: self._tags([moid for moid, _ in vms]))
        else:
            tags = {}  # a lone ESXi host has no tagging service
        found = [DiscoveredVm(uuid=vm.uuid, name=vm.name, path=vm.path, host_name=vm.host_name,
                              tags=tuple(sorted(tags.get(moid, ()))))
                 for moid, vm in vms]
        log.info("event=vsphere_inventory host=%s vms=%s", self._where.netloc, len(found))
        return sorted(found, key=lambda vm: (vm.path, vm.uuid))

    def close(self) -> None:
        content, self._content, self._stub = self._content, None, None
        if content is not None:
            try:
                content.sessionManager.Logout()
            except Exception as exc:  # the session may be gone already; nothing to do
                log.info("event=vsphere_logout_failed host=%s error=%s", self._where.netloc,
                         type(exc).__name__)

    # -- backups and restores (vspherebackup.py and vsphererestore.py hold the logic) --

    def begin_backup(self, vm_uuid: str, job_id: str,
                     base_checkpoint: str | None) -> VsphereBackupSession:
        from .vspherebackup import begin_backup

        return begin_backup(self, vm_uuid, job_id, base_checkpoint)

    def restore_options(self) -> tuple[str, ...]:
        return restorekeys.VSPHERE

    def begin_restore(self, vm_config: Mapping[str, Any], name: str,
                      options: Mapping[str, str],
                      disks: list[tuple[str, str, int]]) -> VsphereRestoreSession:
        from .vsphererestore import begin_restore

        return begin_restore(self, vm_config, name, options, disks)

    # What the vSphere backup and restore modules use of this connector: the one SOAP
    # session (and its cookie, which also opens the datastore's /folder URLs), the TLS
    # context and the timeout, so a backup verifies and bounds its HTTPS traffic exactly
    # as discovery does.

    @property
    def endpoint(self) -> VsphereHost:
        return self._where

    @property
    def tls(self) -> ssl.SSLContext:
        return self._ssl

    @property
    def timeout(self) -> float:
        return self._timeout

    def content(self) -> Any:
        """The logged-in ServiceContent (logging in again when the session ended)."""
        self._start()
        return self._guarded(self._session)

    def step(self, what: str, call: Callable[[], T]) -> T:
        """One SOAP call bounded by the timeout; a failure is a HypervisorError whose message
        starts with `what` (what the gateway was doing), never with the password in it."""
        self._start()
        try:
            return self._guarded(call)
        except HypervisorError as exc:
            raise HypervisorError(exc.code, f"{what}: {exc.message}") from None

    def scrub(self, text: str) -> str:
        return scrub(text, self._password)

    def session_cookie(self) -> str:
        """`vmware_soap_session=...` of the SOAP login, for the datastore file URLs (vCenter
        accepts the SOAP session there, as virt-v2v's vCenter input uses it)."""
        raw = str(getattr(self._stub, "cookie", "") or "")
        jar: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
        with contextlib.suppress(http.cookies.CookieError):
            jar.load(raw)
        morsel = jar.get("vmware_soap_session")
        if morsel is not None:
            return f"vmware_soap_session={morsel.coded_value}"
        return raw.split(";", 1)[0].strip()

    # -- session ------------------------------------------------------------------------

    def _start(self) -> None:
        self._deadline = time.monotonic() + self._timeout

    def _si(self) -> Any:
        from pyVmomi import vim

        return vim.ServiceInstance("ServiceInstance", self._stub)

    def _session(self) -> Any:
        """The logged-in ServiceContent, reusing a live session."""
        from pyVmomi import SoapStubAdapter, vim

        if self._content is not None:
            try:
                if self._content.sessionManager.currentSession is not None:
                    return self._content
            except vim.fault.NotAuthenticated:
                pass
            self._content = None
        stub = SoapStubAdapter(url=f"https://{self._where.netloc}/sdk", version=API_VERSION,
                               sslContext=self._ssl, connectionPoolTimeout=-1)
        stub.schemeArgs["timeout"] = self._timeout  # every HTTPS connection it opens
        self._stub = stub
        content = self._si().RetrieveContent()
        content.sessionManager.Login(self._username, self._password)
        self._content = content
        return content

    def _guarded(self, call: Any) -> Any:
        """Run one step, turning every library and network failure into HypervisorError."""
        from pyVmomi import vim, vmodl

        if time.monotonic() > self._deadline:
            raise HypervisorError(HOST_UNREACHABLE, f"{self._where.netloc} did not finish "
                                  f"within {self._timeout:g}s")
        where = self._where.netloc
        try:
            return call()
        except HypervisorError:
            raise
        except vim.fault.InvalidLogin:
            raise HypervisorError(AUTHENTICATION_FAILED, f"{where} refused the user name or "
                                  f"password for {self._username!r}") from None
        except ssl.SSLCertVerificationError as exc:
            raise self._certificate_error(exc) from None
        except ssl.SSLError as exc:
            raise HypervisorError(HYPERVISOR_ERROR, f"TLS with {where} failed ({exc.reason}): "
                                  "is this a vCenter or ESXi HTTPS port?") from None
        except OSError as exc:
            raise reach_error(exc, self._where.host, where, self._timeout,
                              "nothing listens on that port") from None
        except vmodl.MethodFault as exc:
            text = scrub(str(getattr(exc, "msg", "") or type(exc).__name__), self._password)
            raise HypervisorError(HYPERVISOR_ERROR, f"{where}: {text}") from None
        except (http.client.HTTPException, ValueError, KeyError) as exc:
            text = scrub(f"{type(exc).__name__}: {exc}", self._password)
            raise HypervisorError(HYPERVISOR_ERROR, f"{where} did not answer as vSphere does: "
                                  f"{text}") from None

    def _certificate_error(self, exc: ssl.SSLCertVerificationError) -> HypervisorError:
        fingerprint = self._fingerprint()
        return HypervisorError(CERTIFICATE_ERROR, (
            f"the certificate of {self._where.netloc} is not trusted "
            f"({exc.verify_message or exc.reason}); SHA-256 fingerprint {fingerprint}; add the "
            "vCenter's CA certificate (VMCA root, https://VCENTER/certs/download.zip) to the "
            "appliance's trusted certificates"))

    def _fingerprint(self) -> str:
        """The presented certificate's SHA-256, read with verification off for display."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            with socket.create_connection((self._where.host, self._where.port),
                                          timeout=self._timeout) as raw, \
                    context.wrap_socket(raw, server_hostname=self._where.host) as tls:
                der = tls.getpeercert(binary_form=True) or b""
        except OSError:
            return "unknown"
        digest = hashlib.sha256(der).hexdigest().upper()
        return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))

    # -- discovery ----------------------------------------------------------------------

    def _vms(self, content: Any) -> list[tuple[str, DiscoveredVm]]:
        """Every VM with its folder path, instance UUID and ESXi host, from one container
        view read with RetrievePropertiesEx (an unset optional property comes back in
        missingSet instead of a fault, and the results are paged)."""
        from pyVmomi import vim, vmodl

        pc = vmodl.query.PropertyCollector
        kinds = {vim.VirtualMachine: ["name", "parent", "parentVApp", "config.instanceUuid",
                                      "runtime.host"],
                 vim.Folder: ["name", "parent"], vim.Datacenter: ["name", "parent"],
                 vim.VirtualApp: ["name", "parentFolder"], vim.HostSystem: ["name"]}
        view = content.viewManager.CreateContainerView(content.rootFolder, list(kinds), True)
        try:
            spec = pc.FilterSpec(
                objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[pc.TraversalSpec(
                    name="view", path="view", skip=False, type=vim.view.ContainerView)])],
                propSet=[pc.PropertySpec(type=kind, pathSet=paths)
                         for kind, paths in kinds.items()])
            collector = content.propertyCollector
            objects: dict[str, tuple[str, dict[str, Any]]] = {}
            result = collector.RetrievePropertiesEx([spec], pc.RetrieveOptions(maxObjects=PAGE))
            while result is not None:
                for item in result.objects:
                    props = {p.name: p.val for p in item.propSet}
                    objects[item.obj._moId] = (item.obj._wsdlName, props)
                if not result.token:
                    break
                result = collector.ContinueRetrievePropertiesEx(result.token)
        finally:
            view.Destroy()
        vms = []
        for moid, (kind, props) in objects.items():
            if kind != "VirtualMachine":
                continue
            uuid = props.get("config.instanceUuid")
            if not uuid:
                log.info("event=vsphere_vm_skipped moid=%s reason=%s", moid, "no instanceUuid")
                continue
            host = props.get("runtime.host")
            host_name = objects.get(host._moId, ("", {}))[1].get("name", "") if host else ""
            vms.append((moid, DiscoveredVm(uuid=uuid, name=props["name"],
                                           path=_path(objects, props), host_name=host_name,
                                           tags=())))
        return vms

    # -- tags (vAPI REST) ---------------------------------------------------------------

    def _tags(self, moids: list[str]) -> dict[str, list[tuple[str, str]]]:
        """moid -> [(category name, tag name)], through /rest/com/vmware/cis (vCenter 6.5+;
        still served by 7 and 8). Its own session, with the same user and password."""
        rest = _Rest(self._where, self._ssl, self._timeout)
        try:
            status, body = rest.call("POST", "/rest/com/vmware/cis/session", auth=(
                self._username, self._password))
            if status == 401:
                raise HypervisorError(AUTHENTICATION_FAILED, f"{self._where.netloc} refused "
                                      "the user name or password on its REST (tagging) API")
            if status == 404:
                log.info("event=vsphere_no_tagging host=%s", self._where.netloc)
                return {}
            rest.session = _value(status, body, "session")
            base = "/rest/com/vmware/cis/tagging"
            attached: dict[str, list[str]] = {}
            for start in range(0, len(moids), PAGE):
                objects = [{"type": "VirtualMachine", "id": m} for m in moids[start:start + PAGE]]
                status, body = rest.call(
                    "POST", f"{base}/tag-association?~action=list-attached-tags-on-objects",
                    {"object_ids": objects})
                for entry in _value(status, body, "tag associations"):
                    attached[entry["object_id"]["id"]] = list(entry.get("tag_ids") or [])
            names: dict[str, tuple[str, str]] = {}
            categories: dict[str, str] = {}
            for tag_id in sorted({t for ids in attached.values() for t in ids}):
                tag = _value(*rest.call("GET", f"{base}/tag/id:{quote(tag_id, safe=':')}"), "tag")
                category_id = tag["category_id"]
                if category_id not in categories:
                    category = _value(*rest.call(
                        "GET", f"{base}/category/id:{quote(category_id, safe=':')}"), "category")
                    categories[category_id] = category["name"]
                names[tag_id] = (categories[category_id], tag["name"])
            return {moid: [names[t] for t in ids if t in names] for moid, ids in attached.items()}
        finally:
            rest.close()


def _path(objects: dict[str, tuple[str, dict[str, Any]]], props: dict[str, Any]) -> str:
    """/Datacenter/vm/Folder/name: the VM's inventory path, up to the root folder (which
    the container view does not list, so the walk stops there)."""
    names = [props["name"]]
    parent = props.get("parent") or props.get("parentVApp")
    seen = 0
    while parent is not None and parent._moId in objects and seen < 100:
        _, parent_props = objects[parent._moId]
        names.append(parent_props.get("name", ""))
        parent = parent_props.get("parent") or parent_props.get("parentFolder")
        seen += 1
    return "/" + "/".join(reversed(names))


def _value(status: int, body: Any, what: str) -> Any:
    if status != 200 or not isinstance(body, dict) or "value" not in body:
        raise HypervisorError(HYPERVISOR_ERROR, f"the vCenter REST API answered {status} to "
                              f"the {what} request")
    return body["value"]


class _Rest:
    """A minimal JSON client for the vAPI REST endpoint: one kept-alive HTTPS connection with
    the connector's TLS context and timeout (no proxy from the environment, no requests)."""

    def __init__(self, where: VsphereHost, context: ssl.SSLContext, timeout: float) -> None:
        self._conn = http.client.HTTPSConnection(where.host, where.port, timeout=timeout,
                                                 context=context)
        self.session: str | None = None

    def call(self, method: str, path: str, payload: Any = None,
             auth: tuple[str, str] | None = None) -> tuple[int, Any]:
        headers = {"Accept": "application/json"}
        body = None
        if payload is not None:
            body = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        if self.session:
            headers["vmware-api-session-id"] = self.session
        self._conn.request(method, path, body=body, headers=headers)
        response = self._conn.getresponse()
        data = response.read(REST_BODY_MAX + 1)
        if len(data) > REST_BODY_MAX:
            raise HypervisorError(HYPERVISOR_ERROR, "the vCenter REST answer is too large")
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = None
        return response.status, parsed

    def close(self) -> None:
        if self.session:
            with contextlib.suppress(OSError, http.client.HTTPException, HypervisorError):
                self.call("DELETE", "/rest/com/vmware/cis/session")
        self._conn.close()
