"""SIGTERM as Ctrl-C, for the processes we own (the CLI and the standalone app).

A merge stopped by SIGTERM (kill, systemd, a container stop) must end like one stopped by Ctrl-C: cancelled, its
temporary file removed, one line printed, a non-zero exit. Python's default for SIGTERM is to die on the spot;
raising KeyboardInterrupt instead sends it down the same path as Ctrl-C.

Never installed inside the WebUI: there the host owns the process and its signal handlers.
"""

from __future__ import annotations

import signal
from typing import Callable


def sigterm_as_interrupt() -> Callable[[], None]:
    """Make SIGTERM raise KeyboardInterrupt in the main thread; returns the function that undoes it."""
    try:
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except (ValueError, OSError, AttributeError):  # not the main thread, or no SIGTERM on this system
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)
