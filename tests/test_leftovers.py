"""Claimed working folders (leftovers.py): what a cancelled or killed claim leaves behind."""

from __future__ import annotations

import fcntl
import os

import pytest

from cogvideox_cog import leftovers


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
