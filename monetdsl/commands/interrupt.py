"""Ctrl-C during a search: stop it, keep its best schedule; a second Ctrl-C exits at once.

The first SIGINT only sets a flag (a :class:`threading.Event`) that the searches poll
(HiGHS's callbacks, the hybrid engine's phase boundaries), so the command still reports
and writes the best schedule found so far, with status ``interrupted`` and exit status
130 (128 + SIGINT, as shells report a process ended by Ctrl-C). A user who does not want
to wait for that presses Ctrl-C again: the process exits at once with status 130,
without a traceback and without writing anything.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["INTERRUPTED", "stop_on_interrupt"]

#: exit status of a command stopped by Ctrl-C
INTERRUPTED = 130


@contextmanager
def stop_on_interrupt() -> Iterator[threading.Event]:
    """An event that the first Ctrl-C sets while the block runs (main thread only)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers belong to the main thread; nothing to install
        return

    def on_sigint(signum, frame) -> None:
        if stop.is_set():
            os.write(2, b"\nmonetdsl: interrupted again; exiting now\n")
            os._exit(INTERRUPTED)
        stop.set()
        os.write(2, b"\nmonetdsl: interrupted; stopping the search and keeping its best schedule"
                    b" (Ctrl-C again to exit at once)\n")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
