"""Crash-safe file writes.

Every piece of state the appliance or the control plane keeps in a file goes through
`write_atomic` (or, for a file made once such as a key, `create_exclusive`): the bytes go to
a temporary file in the same directory, are fsynced, and the temporary file is renamed over
the target, then the directory is fsynced. A kill or a power cut at any instant leaves either
the old file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically; the file is created with `mode`."""
    target = Path(path)
    directory = target.parent
    tmp = directory / f".{target.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow what the caller asked for
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, target)
    fsync_dir(directory)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or a creation in `directory` durable."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def create_exclusive(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> bool:
    """Create `path` holding `data` unless it exists; True when this call created it.

    A complete, fsynced temporary file is hard-linked into place: two processes creating the
    same file at once agree on one content (the loser's is dropped, and it reads the
    winner's), and a crash never leaves a short file. For files made once and never
    replaced: keys, generated credentials.
    """
    target = Path(path)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.new"
    write_atomic(tmp, data, mode)
    try:
        os.link(tmp, target)
        created = True
    except FileExistsError:
        created = False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(target.parent)
    return created
