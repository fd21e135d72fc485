"""The daemon's durable state: what it has learned about its own activation.

One JSON file in the state directory, replaced atomically on every change
(appliance/atomicfile.py), so a kill at any instant leaves the old or the new state. A
file that exists but cannot be read or parsed is never silently replaced by a fresh state:
that would forget an activation (or a deletion, letting a deleted identity be reused), so
`load` raises `StateError` naming the file and the daemon stops.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gatewaycore.atomicfile import write_atomic

STATE_FILE = "state.json"
FORMAT_VERSION = 1


# The changes that forget an association (a disassociation, or the gateway deleted).
NO_HYPERVISOR: dict[str, Any] = {
    "hypervisor_arn": None, "hypervisor_host": None, "hypervisor_username": None,
    "hypervisor_password": None, "hypervisor_password_pending": False,
    "hypervisor_sync_request": 0, "hypervisor_synced_request": 0,
    "hypervisor_last_test": None, "hypervisor_last_sync": None,
}


class StateError(Exception):
    """The state file exists but cannot be used; the message names the file."""


@dataclass(frozen=True)
class State:
    registered: bool = False  # a key was requested: the control plane knows our identity
    activated: bool = False
    deleted: bool = False
    gateway_arn: str | None = None
    deleted_gateway_arn: str | None = None  # kept to name it when refusing a new key
    gateway_name: str | None = None
    region: str | None = None
    config_version: int = 0  # the control plane's configuration version applied
    software_update_request: int = 0
    software_update_requested_at: str | None = None
    schedule: list[dict[str, Any]] = field(default_factory=list)
    # Software updates (appliance/updateagent.py): the request last acted on, the offer and
    # the maintenance window of the last poll, the installer's last result (reported in
    # every poll) and a version that failed here (not tried again in a window).
    update_request_handled: int = 0
    update_offer: dict[str, Any] | None = None
    maintenance: dict[str, Any] | None = None
    update_result: dict[str, Any] | None = None
    update_failed_version: str | None = None
    # The associated hypervisor (appliance/hypervisoragent.py). The password stays the sealed
    # box received from the control plane: only the sealing key beside this file opens it.
    hypervisor_arn: str | None = None
    hypervisor_host: str | None = None
    hypervisor_username: str | None = None
    hypervisor_password: dict[str, Any] | None = None  # sealed box, never the clear text
    hypervisor_password_pending: bool = False
    hypervisor_sync_request: int = 0  # the newest syncRequest seen
    hypervisor_synced_request: int = 0  # the newest syncRequest reported (the rest is owed)
    # {"ok", "errorCode", "message", "at"} (+ "vms" for a sync): shown by the status view
    hypervisor_last_test: dict[str, Any] | None = None
    hypervisor_last_sync: dict[str, Any] | None = None

    def with_changes(self, **changes: Any) -> State:
        return replace(self, **changes)

    def to_json(self) -> bytes:
        doc = {"formatVersion": FORMAT_VERSION, **asdict(self)}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, doc: Any) -> State:
        """Parse and type-check a stored document; ValueError says which field is wrong."""
        if not isinstance(doc, dict):
            raise ValueError("top level is not a JSON object")
        if doc.get("formatVersion") != FORMAT_VERSION:
            raise ValueError(f"formatVersion is {doc.get('formatVersion')!r}, expected 1")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in doc:
                continue
            value = doc[f.name]
            expected: tuple[type, ...] = {
                "bool": (bool,),
                "int": (int,),
                "str | None": (str, type(None)),
                "list[dict[str, Any]]": (list,),
                "dict[str, Any] | None": (dict, type(None)),
            }[str(f.type)]
            if not isinstance(value, expected) or (
                int in expected and isinstance(value, bool)
            ):
                raise ValueError(f"field {f.name!r} has the wrong type")
            kwargs[f.name] = value
        return cls(**kwargs)


class StateStore:
    """Reads and atomically replaces the state file; keeps the last saved state in memory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_FILE
        self.state = State()

    def load(self) -> State:
        self._remove_stale_temp_files()
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            self.state = State()
            return self.state
        except OSError as exc:
            raise StateError(f"cannot read state file {self.path}: {exc.strerror}") from None
        try:
            self.state = State.from_json(json.loads(text))
        except (ValueError, UnicodeDecodeError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            raise StateError(
                f"state file {self.path} is corrupt ({reason}); "
                "move it away to start unactivated, or restore it"
            ) from None
        return self.state

    def save(self, state: State) -> State:
        """Persist `state` (no-op when unchanged) and make it the current state."""
        if state != self.state or not self.path.exists():
            write_atomic(self.path, state.to_json(), mode=0o600)
        self.state = state
        return state

    def update(self, **changes: Any) -> State:
        return self.save(self.state.with_changes(**changes))

    def _remove_stale_temp_files(self) -> None:
        """A kill between the temp write and the rename leaves `.state.json.PID.tmp`; drop it."""
        if not self.path.parent.is_dir():
            return
        for tmp in self.path.parent.glob(f".{STATE_FILE}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
