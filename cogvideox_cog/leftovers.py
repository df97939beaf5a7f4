"""Working folders that a killed process cannot leave behind for good.

Each folder is claimed by an flock on a lock file inside it, held for as long as the folder is
in use. The kernel drops the lock when its holder exits or dies (kill -9, the OOM killer, a
`docker restart`), so a folder whose lock can be taken belongs to nobody and is removed by the
next process that looks. flock rather than a pid in the name: containers sharing a volume or a
TMPDIR reuse each other's pids.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# Every folder of ours in TMPDIR (outputs, fetched inputs, warm-up inputs) starts with it, so
# setup's one remove_dead() finds them all.
TEMP_PREFIX = "cogvideox-"
LOCK_NAME = ".cogvideox-owner.lock"
_held: dict[Path, int] = {}  # claimed folder -> the descriptor holding its lock


def claim(parent: Path, prefix: str) -> Path:
    """A new folder under `parent`, held by this process until release()."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            fd = _lock(folder)
        except BaseException:
            # A cancel (Cog raises it in the prediction's thread) before the lock was held:
            # a folder without a lock file would be left alone by every remove_dead().
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if fd is not None:
            _held[folder] = fd
            return folder


def _lock(folder: Path) -> int | None:
    """The descriptor holding `folder`'s lock; None if remove_dead() removed it first."""
    lock = folder / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:  # removed by remove_dead() before its lock existed
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.path.samestat(os.fstat(fd), os.stat(lock)):
            return fd
    except FileNotFoundError:  # remove_dead() took the lock first and removed the folder
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def release(folder: Path) -> None:
    """Remove a claimed folder, then let go of it."""
    shutil.rmtree(folder, ignore_errors=True)
    fd = _held.pop(folder, None)
    if fd is not None:
        os.close(fd)


def remove_dead(parent: Path, prefix: str) -> int:
    """Remove the folders under `parent` named `prefix`* whose holder is gone; bytes freed.

    A folder without a lock file is left alone: another program's, or one being claimed.
    A `parent` that cannot be listed (a TMPDIR of mode 1733, which still lets folders be made
    in it) is left alone too: a cleanup is no reason to fail setup.
    """
    freed = 0
    try:
        folders = [p for p in parent.iterdir() if p.name.startswith(prefix)]
    except FileNotFoundError:
        return 0
    except OSError as error:
        log.warning(
            f"cannot list {parent} ({error.strerror}): what killed workers left there stays"
        )
        return 0
    for folder in folders:
        if folder in _held or folder.is_symlink() or not folder.is_dir():
            continue
        try:
            fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive
            size = folder_size(folder)
            shutil.rmtree(folder, ignore_errors=True)
            freed += size
            log.info(f"removed {folder} ({size:,} bytes), left by a process that died")
        finally:
            os.close(fd)
    return freed


def folder_size(folder: Path) -> int:
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                total += os.lstat(os.path.join(root, name)).st_size
    return total
