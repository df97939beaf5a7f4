"""A rank process ends with the Cog worker that started it, however the worker ends.

A SIGKILL (the OOM killer, coglet's own kill of a worker that does not stop) runs no cleanup
in the worker, so each rank watches for itself: multiprocessing's parent sentinel is a pipe
that the kernel closes when the parent dies. A thread, not prctl(PR_SET_PDEATHSIG): that
signal fires when the parent *thread* that started the rank ends, and coglet may run setup()
on a thread that does not outlive it. Imports nothing heavy, so a test can use it alone.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import threading


def exit_with_parent() -> None:
    """Start a thread that ends this process (exit code 1) when its parent process ends."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
