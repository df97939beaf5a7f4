"""A rank process ends with the process that started it, however that one ends: SIGKILL
(the OOM killer's way) runs no cleanup in the parent, so the rank must notice by itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import PROJECT

# A parent that starts one child, as the Cog worker starts its ranks (spawn), and waits.
PARENT = """
import multiprocessing, sys, time

from cogvideox_cog.parallel.lifetime import exit_with_parent


def child():
    exit_with_parent()
    print("watching", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    process = multiprocessing.get_context("spawn").Process(target=child)
    process.start()
    print(process.pid, flush=True)
    time.sleep(600)
"""
GONE_WITHIN_S = 5.0


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_rank_exits_when_its_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=PROJECT,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    child = None
    try:
        child = int(parent.stdout.readline())
        assert parent.stdout.readline() == "watching\n"
        parent.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        parent.wait()
        while _running(child):
            assert time.monotonic() - killed < GONE_WITHIN_S, "the child outlived its parent"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()
        if child is not None and _running(child):
            os.kill(child, signal.SIGKILL)
