"""Helper processes (bench workers) must not outlive the command that started them: a parent killed
with SIGKILL runs no clean-up, so the child arranges its own end."""
from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

PR_SET_PDEATHSIG = 1


def die_with_parent(poll_s: float = 0.5) -> None:
    """Call first thing in a child: the kernel sends it SIGKILL when the parent dies (Linux), and a
    watchdog thread that sees it re-parented exits it elsewhere (or if the parent died before prctl)."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the watchdog alone

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(poll_s)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)
