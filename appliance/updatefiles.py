"""The two files between the daemon and the root installer (docs/updates.md).

The daemon runs unprivileged and cannot write the code folder; the installer
(`appliance.updateinstall`, root, started by `appliance-update.path`) cannot be asked
anything but "install this". So they share two files and nothing else:

- the request: STATE_DIR/updates/request.bundle, written by the daemon (atomically) once
  the bundle is downloaded and the jobs have let go; its appearance starts the installer,
  which takes it away;
- the result: /var/lib/appliance-update/result.json, written by the installer (root's
  folder, readable by all): `{"outcome", "version", "from", "message", "at"}`, read by the
  daemon at start and while it waits, reported to the control plane in every poll.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gatewaycore import atomicfile, utctime

REQUEST = Path("updates") / "request.bundle"   # under the daemon's state directory
DEFAULT_RESULT = Path("/var/lib/appliance-update/result.json")
OUTCOMES = ("installed", "rolled_back", "refused", "failed")
RESULT_FIELDS = ("outcome", "version", "from", "message", "at")


def read_result(path: Path) -> dict[str, str] | None:
    """The installer's last result, None when there is none or it cannot be read."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("outcome") not in OUTCOMES or not all(
        isinstance(doc.get(k), str) for k in RESULT_FIELDS
    ):
        return None
    return {k: doc[k] for k in RESULT_FIELDS}


def write_result(path: Path, outcome: str, version: str, previous: str, message: str
                 ) -> dict[str, str]:
    doc = {"outcome": outcome, "version": version, "from": previous,
           "message": message[:1000], "at": utctime.format_utc()}
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    atomicfile.write_atomic(path, (json.dumps(doc, indent=1) + "\n").encode(), mode=0o644)
    return doc


def as_report(result: dict[str, Any]) -> dict[str, str]:
    """What the poll's `updateStatus` carries (docs/link-protocol.md)."""
    return {k: result[k] for k in ("outcome", "version", "message", "at")}
