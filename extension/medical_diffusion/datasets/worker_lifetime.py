"""Worker processes that end with their parent, even when the parent is killed (``kill -9``).

Each worker of :func:`worker_pool` watches its parent: a daemon thread exits the worker as soon as its
parent process changes (the parent died and the worker was re-parented). On Linux, when the pool is
made from the main thread, the kernel is also asked to kill the worker with its parent
(``prctl(PR_SET_PDEATHSIG)``), which acts even while the worker is busy in C code. (That signal follows
the creating *thread*, so it is not used for pools made in other threads, such as UI handlers.)
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

#: how often a worker checks that its parent is alive (seconds)
POLL_SECONDS = 0.25
_PR_SET_PDEATHSIG = 1


def _ask_kernel_to_kill_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the watchdog thread still covers it


def _watch(parent: int) -> None:
    while True:
        time.sleep(POLL_SECONDS)
        if os.getppid() != parent:
            os._exit(1)


def exit_with_parent(use_pdeathsig: bool = False) -> None:
    """Pool initializer: make this worker process end when its parent does."""
    parent = os.getppid()
    if use_pdeathsig:
        _ask_kernel_to_kill_with_parent()
    if os.getppid() != parent:  # the parent died before the kernel was asked
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), name="parent-watchdog", daemon=True).start()


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers exit with this process."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    return ProcessPoolExecutor(max_workers=workers, initializer=exit_with_parent, initargs=(in_main_thread,))
