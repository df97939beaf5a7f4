"""Small files written whole (files.py): what two writers sharing a volume rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from cogvideox_cog import files

ROOT = Path(__file__).resolve().parent.parent

# A process as a container runs it: the same pid and thread ident as in every other replica
# of that image (pid namespaces start at 1; the server's main thread is started the same way).
SAME_PID_ELSEWHERE = """
import os, sys, threading
from pathlib import Path
from cogvideox_cog import files
os.getpid = lambda: 7
threading.get_ident = lambda: 140000000000000
print(files.temporary_name(Path(sys.argv[1])), flush=True)
os._exit(0)  # threading's shutdown would wait on the faked thread ident
"""


def _temporary_name_in_a_container(path: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SAME_PID_ELSEWHERE, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


def test_two_containers_with_the_same_pid_write_through_different_temporary_files(tmp_path):
    """Two replicas on one volume both write the LoRA index or the compile cache: sharing a
    temporary file, one's bytes would land in the other's, and a rename would fail."""
    target = tmp_path / "shared.json"
    first, second = (_temporary_name_in_a_container(target) for _ in range(2))
    assert first != second
    assert all(Path(name).parent == tmp_path for name in (first, second))


def test_two_threads_write_through_different_temporary_files(tmp_path):
    target = tmp_path / "shared.json"
    names = [files.temporary_name(target)]
    thread = threading.Thread(target=lambda: names.append(files.temporary_name(target)))
    thread.start()
    thread.join()
    assert names[0] != names[1]


def test_a_reader_sees_the_old_file_or_the_new_one(tmp_path):
    target = tmp_path / "index.json"
    files.replace_atomically(target, json.dumps({"n": 0}))
    stop = threading.Event()
    seen: list[int] = []

    def read():
        while not stop.is_set():
            seen.append(json.loads(target.read_text())["n"])

    reader = threading.Thread(target=read)
    reader.start()
    for n in range(1, 200):
        files.replace_atomically(target, json.dumps({"n": n, "padding": "x" * 10_000}))
    stop.set()
    reader.join()
    assert seen and seen == sorted(seen)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_write_leaves_neither_a_temporary_file_nor_a_changed_target(tmp_path):
    target = tmp_path / "marker.json"
    target.write_text("old")

    def fsync_that_fails(path: Path) -> None:
        raise OSError(5, "Input/output error")

    try:
        files.replace_atomically(target, "new", fsync=fsync_that_fails)
    except OSError:
        pass
    else:
        raise AssertionError("the fsync's error was swallowed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["marker.json"]


def test_only_files_of_the_pattern_untouched_for_the_given_time_are_removed(tmp_path):
    abandoned = tmp_path / "cache.bin.aaaa-1-1.tmp"
    in_progress = tmp_path / "cache.bin.bbbb-1-1.tmp"
    published = tmp_path / "cache.bin"
    for path in (abandoned, in_progress, published):
        path.write_bytes(b"part")
    hours_ago = time.time() - 2 * 3600
    for path in (abandoned, published):
        os.utime(path, (hours_ago, hours_ago))
    assert files.remove_untouched(tmp_path, "*.tmp", older_than_s=3600) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([published.name, in_progress.name])


def test_removing_untouched_files_of_a_missing_folder_does_nothing(tmp_path):
    assert files.remove_untouched(tmp_path / "none", "*.tmp", 3600) == 0


def test_a_file_that_cannot_be_removed_leaves_the_others_to_be_removed(tmp_path, monkeypatch):
    """On a shared volume another container's file may be refused (a sticky folder, another
    user's): the files this one can remove still go."""
    hours_ago = time.time() - 2 * 3600
    for name in ("a.bin.1.tmp", "b.bin.2.tmp", "c.bin.3.tmp"):
        (tmp_path / name).write_bytes(b"part")
        os.utime(tmp_path / name, (hours_ago, hours_ago))
    refused: list[str] = []
    unlink = Path.unlink

    def refuse_the_first(path: Path, missing_ok: bool = False) -> None:
        if not refused:
            refused.append(path.name)
            raise PermissionError(1, "Operation not permitted", str(path))
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse_the_first)
    assert files.remove_untouched(tmp_path, "*.tmp", older_than_s=3600) == 2
    assert [p.name for p in tmp_path.iterdir()] == refused


def test_a_durable_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path):
    """Synced after the rename, a power cut could leave the new name on a file without its
    bytes; the folder unsynced, the old file after a restart."""
    target = tmp_path / "index.json"
    synced: list[tuple[Path, bool]] = []
    files.replace_atomically(
        target, "new", fsync=lambda path: synced.append((path, target.exists()))
    )
    assert synced == [(files.temporary_name(target), False), (tmp_path, True)]


def test_a_forked_child_writes_through_another_temporary_file_than_its_parent(tmp_path):
    """A fork keeps the process token and the forking thread's ident: the pid alone differs."""
    target = tmp_path / "shared.json"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write_end, str(files.temporary_name(target)).encode())
        os._exit(0)
    os.close(write_end)
    child_name = os.read(read_end, 4096).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert child_name and child_name != str(files.temporary_name(target))
