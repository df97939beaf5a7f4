"""Claimed working folders (leftovers.py): what a cancelled or killed claim leaves behind."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cogvideox_cog import leftovers

PROJECT = Path(__file__).resolve().parent.parent


class Cancelled(BaseException):
    """Stands for Cog's cancel, raised in the prediction's thread wherever it happens to be."""


def _cancel_when_the_lock_file_is_opened(monkeypatch):
    real_open = os.open

    def open_then_cancel(path, *args, **kwargs):
        if os.path.basename(path) == leftovers.LOCK_NAME:
            raise Cancelled
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_then_cancel)


def _cancel_while_waiting_for_the_lock(monkeypatch):
    def flock_then_cancel(fd, operation):
        raise Cancelled

    monkeypatch.setattr(fcntl, "flock", flock_then_cancel)


@pytest.mark.parametrize(
    "cancel", [_cancel_when_the_lock_file_is_opened, _cancel_while_waiting_for_the_lock]
)
def test_a_claim_cancelled_before_its_lock_is_held_leaves_no_folder(tmp_path, monkeypatch, cancel):
    """Without its lock file such a folder is another program's to remove_dead(): kept for good."""
    cancel(monkeypatch)
    with pytest.raises(Cancelled):
        leftovers.claim(tmp_path, "cogvideox-output-")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_a_claim_cancelled_while_waiting_for_the_lock_closes_the_lock_file(tmp_path, monkeypatch):
    opened: list[int] = []
    real_open = os.open

    def recording_open(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        opened.append(fd)
        return fd

    monkeypatch.setattr(os, "open", recording_open)
    _cancel_while_waiting_for_the_lock(monkeypatch)
    with pytest.raises(Cancelled):
        leftovers.claim(tmp_path, "cogvideox-output-")
    monkeypatch.undo()
    with pytest.raises(OSError):
        os.fstat(opened[0])


def test_a_claimed_folder_is_kept_while_held_and_removed_once_released(tmp_path):
    folder = leftovers.claim(tmp_path, "cogvideox-output-")
    assert leftovers.remove_dead(tmp_path, "cogvideox-output-") == 0
    assert folder.is_dir()
    leftovers.release(folder)
    assert not folder.exists()


NOBODY = 65534  # the uid and gid a root test drops to: for root, no mode stops anything
CANNOT_DROP = 77
# A worker's setup as a user that may create folders in TMPDIR but not list it: the leftovers'
# cleanup, then an output folder. Entered before dropping to that user, whom pytest's folders
# above it keep out; so TMPDIR is named relative to the working directory.
_SETUP_IN_TMPDIR = """
import logging, os, sys
from pathlib import Path
from cogvideox_cog import leftovers
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
os.chdir(sys.argv[1])
if os.geteuid() == 0:
    try:
        os.setgroups([])
        os.setgid(int(sys.argv[2]))
        os.setuid(int(sys.argv[2]))
    except PermissionError:  # a root without CAP_SETUID (a restricted container)
        sys.exit(CANNOT_DROP)
tmpdir = Path("tmp")
print(leftovers.remove_dead(tmpdir, "cogvideox-"))
leftovers.release(leftovers.claim(tmpdir, "cogvideox-output-"))
"""


def test_a_tmpdir_that_cannot_be_listed_leaves_its_leftovers_and_setup_goes_on(tmp_path):
    """Only the cleanup needs the listing; folders are still created there, so setup must not
    fail on it. One line says what is not done and why. For root a mode 1733 TMPDIR, for
    another user the user's own one without its read bit."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    dead = tmpdir / "cogvideox-output-dead"  # a killed worker's folder, its lock free
    dead.mkdir()
    (dead / leftovers.LOCK_NAME).touch()
    tmp_path.chmod(0o711)
    tmpdir.chmod(0o1733 if os.geteuid() == 0 else 0o1333)
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                f"CANNOT_DROP = {CANNOT_DROP}\n{_SETUP_IN_TMPDIR}",
                str(tmp_path),
                str(NOBODY),
            ],
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        tmpdir.chmod(0o700)
    if done.returncode == CANNOT_DROP:
        pytest.skip("root here cannot become another user, and a mode stops no root")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert warnings == [
        "WARNING cannot list tmp (Permission denied): what killed workers left there stays"
    ]
    assert [p.name for p in tmpdir.iterdir()] == [dead.name]


def _dead_folder(parent: Path, name: str, size: int) -> Path:
    """A folder as a killed worker leaves it: its lock file, let go of by the kill."""
    folder = parent / name
    folder.mkdir()
    (folder / leftovers.LOCK_NAME).touch()
    (folder / "video.mp4").write_bytes(b"x" * size)
    return folder


def test_a_folder_whose_holder_died_is_removed_and_its_bytes_counted(tmp_path):
    dead = _dead_folder(tmp_path, "cogvideox-output-dead", 1000)
    assert leftovers.remove_dead(tmp_path, "cogvideox-") == 1000
    assert not dead.exists()


def test_a_dead_folder_named_without_the_prefix_is_left_alone(tmp_path):
    """TMPDIR is shared: another program's folder is not ours to remove, whatever is in it."""
    other = _dead_folder(tmp_path, "another-program-dead", 10)
    assert leftovers.remove_dead(tmp_path, "cogvideox-") == 0
    assert other.is_dir()


def test_a_link_named_with_the_prefix_is_not_followed(tmp_path):
    """A link into another folder would have its target's files counted, and left."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = _dead_folder(elsewhere, "cogvideox-output-dead", 10)
    parent = tmp_path / "tmp"
    parent.mkdir()
    (parent / "cogvideox-output-link").symlink_to(target)
    assert leftovers.remove_dead(parent, "cogvideox-") == 0
    assert (target / "video.mp4").is_file()


def test_a_released_folder_leaves_no_descriptor_open(tmp_path):
    """One claim per prediction: a descriptor kept per release runs a long-lived worker out."""
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        leftovers.release(leftovers.claim(tmp_path, "cogvideox-output-"))
    assert len(os.listdir("/proc/self/fd")) == before


def _removed_first_by_another_setup(monkeypatch, patched: str) -> None:
    """Another worker's remove_dead() removes the new folder (its lock file still free) just
    before this claim opens, or locks, its lock file."""
    real = os.open if patched == "open" else fcntl.flock
    removed: list[Path] = []

    def remove_then_call(target, *args, **kwargs):
        lock = Path(target) if patched == "open" else Path(os.readlink(f"/proc/self/fd/{target}"))
        if not removed and lock.name == leftovers.LOCK_NAME:
            removed.append(lock.parent)
            shutil.rmtree(lock.parent)
        return real(target, *args, **kwargs)

    monkeypatch.setattr(os if patched == "open" else fcntl, patched, remove_then_call)


@pytest.mark.parametrize("patched", ["open", "flock"])
def test_a_claim_whose_folder_another_setup_removed_claims_a_new_one(
    tmp_path, monkeypatch, patched
):
    _removed_first_by_another_setup(monkeypatch, patched)
    folder = leftovers.claim(tmp_path, "cogvideox-output-")
    monkeypatch.undo()
    try:
        assert folder.is_dir() and (folder / leftovers.LOCK_NAME).is_file()
        assert leftovers.remove_dead(tmp_path, "cogvideox-") == 0
        assert folder.is_dir()
    finally:
        leftovers.release(folder)


def test_a_folder_whose_lock_file_is_a_link_is_left_alone(tmp_path):
    """Its lock is not the folder's own: taking the lock of whatever it points to proves
    nothing about who holds the folder."""
    folder = tmp_path / "cogvideox-output-linked"
    folder.mkdir()
    (tmp_path / "elsewhere.lock").touch()
    (folder / leftovers.LOCK_NAME).symlink_to(tmp_path / "elsewhere.lock")
    assert leftovers.remove_dead(tmp_path, "cogvideox-") == 0
    assert folder.is_dir()
