"""The SOAP reads and task waits that vSphere backups, restores and datastore file
operations share: one object's properties, its inventory path and datacenter, and a task
awaited to its end.

Why a module of its own: vspherebackup.py, vsphererestore.py and vspheredatastore.py all
read properties and await tasks, and must do it the same way (RetrievePropertiesEx rather
than pyvmomi's property reads, which can crash the simulator; a property collector per
wait, so tasks awaited in several threads do not take each other's updates). Vsphere is
what they use of VsphereConnector (vsphere.py). Every call blocks.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from .model import HYPERVISOR_ERROR, HypervisorError

T = TypeVar("T")

TASK_LIMIT_S = 3600.0           # a snapshot removal consolidates: minutes on a busy datastore


class Vsphere(Protocol):
    """What backups and restores use of VsphereConnector (its session, TLS context and timeout)."""

    @property
    def endpoint(self) -> Any: ...
    @property
    def tls(self) -> ssl.SSLContext: ...
    @property
    def timeout(self) -> float: ...
    def content(self) -> Any: ...
    def step(self, what: str, call: Callable[[], T]) -> T: ...
    def scrub(self, text: str) -> str: ...
    def session_cookie(self) -> str: ...


# -- inventory -----------------------------------------------------------------------------


def props_of(api: Vsphere, obj: Any, paths: list[str], what: str) -> dict[str, Any]:
    """Properties of one object by RetrievePropertiesEx: an unset optional property is left
    out (missingSet) instead of read through pyvmomi, which can crash the simulator."""
    from pyVmomi import vmodl

    pc = vmodl.query.PropertyCollector
    content = api.content()
    spec = pc.FilterSpec(objectSet=[pc.ObjectSpec(obj=obj, skip=False)],
                         propSet=[pc.PropertySpec(type=type(obj), pathSet=paths)])
    result = api.step(what, lambda: content.propertyCollector.RetrievePropertiesEx(
        [spec], pc.RetrieveOptions()))
    if result is None or not result.objects:
        return {}
    return {p.name: p.val for p in result.objects[0].propSet}


def inventory_path(api: Vsphere, obj: Any) -> str:
    """/DC/vm/Folder/name: the path discovery reports, up to (not including) the root."""
    root = api.content().rootFolder
    names: list[str] = []
    current = obj
    for _ in range(100):
        if current is None or current._moId == root._moId:
            break
        props = props_of(api, current, ["name", "parent"], "reading the inventory")
        names.append(str(props.get("name", "")))
        current = props.get("parent")
    return "/" + "/".join(reversed(names))


def datacenter_of(api: Vsphere, obj: Any) -> tuple[Any, str]:
    """The datacenter above `obj` and its inventory path without the leading '/' (the
    `dcPath` of a datastore URL, folders included)."""
    from pyVmomi import vim

    current = obj
    for _ in range(100):
        if current is None:
            break
        if isinstance(current, vim.Datacenter):
            return current, inventory_path(api, current).lstrip("/")
        current = props_of(api, current, ["parent"], "reading the inventory").get("parent")
    raise HypervisorError(HYPERVISOR_ERROR, f"no datacenter above {obj._moId} on "
                          f"{api.endpoint.netloc}")


# -- tasks ---------------------------------------------------------------------------------


def wait_task(api: Vsphere, task: Any, what: str, limit: float = TASK_LIMIT_S) -> Any:
    """The task's result once it ends, awaited with WaitForUpdatesEx on a property collector
    of its own (so that tasks awaited in other threads do not take each other's updates);
    each wait returns within half the timeout, so no socket read outlives the timeout. Only
    info.state/error/result are watched (the whole TaskInfo of a FileManager task names a
    non-entity as its entity in the simulator, which pyvmomi cannot parse)."""
    from pyVmomi import vim, vmodl

    pc = vmodl.query.PropertyCollector
    content = api.content()
    collector = api.step(what, content.propertyCollector.CreatePropertyCollector)
    try:
        api.step(what, lambda: collector.CreateFilter(pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=task, skip=False)],
            propSet=[pc.PropertySpec(type=vim.Task, pathSet=[
                "info.state", "info.error", "info.result"])]), False))
        deadline = time.monotonic() + limit
        options = pc.WaitOptions(maxWaitSeconds=max(1, int(api.timeout / 2)))
        version = ""
        seen: dict[str, Any] = {}
        while seen.get("info.state") not in ("success", "error"):
            if time.monotonic() > deadline:
                raise HypervisorError(HYPERVISOR_ERROR, f"{what}: the task did not end "
                                      f"within {limit:g}s on {api.endpoint.netloc}")
            update = api.step(what, lambda v=version: collector.WaitForUpdatesEx(v, options))
            if update is None:
                continue
            version = update.version
            for filter_set in update.filterSet or []:
                for object_set in filter_set.objectSet or []:
                    for change in object_set.changeSet or []:
                        seen[change.name] = change.val
        if seen["info.state"] == "error":
            raise HypervisorError(HYPERVISOR_ERROR, f"{what} failed on {api.endpoint.netloc}:"
                                  f" {fault_text(api, seen.get('info.error'))}")
        return seen.get("info.result")
    finally:
        with contextlib.suppress(HypervisorError):
            api.step(what, collector.DestroyPropertyCollector)


def fault_text(api: Vsphere, fault: Any) -> str:
    text = str(getattr(fault, "msg", "") or "") or type(fault).__name__.rsplit(".", 1)[-1]
    return api.scrub(text)
