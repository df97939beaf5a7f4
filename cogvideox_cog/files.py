"""Small files written so that no reader, and no crash, ever leaves half of one."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path


def replace_atomically(
    path: Path, text: str | bytes, fsync: Callable[[Path], None] | None = None
) -> None:
    """Write `text` (str or bytes) to `path` through a temporary file and one rename: readers
    see the old file or the new one. The temporary name is the writer's own (process and
    thread), so two writers never share one. fsync, where given, makes the file durable before
    the rename and the rename durable after it."""
    temp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
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
