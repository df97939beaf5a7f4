"""Small files written so that no reader, and no crash, ever leaves half of one."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

# Tells this process's temporary files from those of a process with the same pid in another
# container on the same volume (containers reuse each other's pids: pid 1, pid 7, ...).
_PROCESS_TOKEN = secrets.token_hex(8)


def temporary_name(path: Path) -> Path:
    """Where replace_atomically() writes `path` before the rename: this writer's alone. The
    token tells containers apart, the pid a forked child from its parent, the thread one
    thread from another."""
    writer = f"{_PROCESS_TOKEN}-{os.getpid()}-{threading.get_ident()}"
    return path.with_name(f"{path.name}.{writer}.tmp")


def replace_atomically(
    path: Path, text: str | bytes, fsync: Callable[[Path], None] | None = None
) -> None:
    """Write `text` (str or bytes) to `path` through a temporary file and one rename: readers
    see the old file or the new one. fsync, where given, makes the file durable before the
    rename and the rename durable after it."""
    temp = temporary_name(path)
    try:
        if isinstance(text, bytes):
            temp.write_bytes(text)
        else:
            temp.write_text(text)
        if fsync is not None:
            fsync(temp)
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if fsync is not None:
        fsync(path.parent)


def remove_untouched(folder: Path, pattern: str, older_than_s: float) -> int:
    """Remove the files of `folder` matching `pattern` that no write has touched for
    `older_than_s` seconds: what a writer killed mid-write (kill -9, the OOM killer) left, or
    what no reader uses any more. Returns how many were removed."""
    removed = 0
    with contextlib.suppress(OSError):  # no folder yet, or a read-only one: nothing to do
        for path in folder.glob(pattern):
            try:
                if time.time() - path.lstat().st_mtime > older_than_s:
                    path.unlink()
                    removed += 1
            # Removed by another process meanwhile, or another user's in a shared folder: the
            # rest still go.
            except (FileNotFoundError, PermissionError):
                continue
    return removed
