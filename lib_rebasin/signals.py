"""SIGTERM as Ctrl-C, for the processes we own (the CLI and the standalone app).

A merge stopped by SIGTERM (kill, systemd, a container stop) must end like one stopped by Ctrl-C: cancelled, its
temporary file removed, one line printed, a non-zero exit. Python's default for SIGTERM is to die on the spot;
raising KeyboardInterrupt instead sends it down the same path as Ctrl-C.

The CLI goes one step further (`interrupts_until_commit`): once its output is committed (`commit_reached`, the
merge's `on_commit`), the file is in place and the merge has succeeded, so a signal then stops nothing: it is
only recorded (`late_signals`) and the CLI reports the file it wrote. A KeyboardInterrupt raised in that instant
would otherwise unwind through the writer and be reported as "no file was written" next to a complete file.

Never installed inside the WebUI: there the host owns the process and its signal handlers.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

_committed = False
_late: list[int] = []


def sigterm_as_interrupt() -> Callable[[], None]:
    """Make SIGTERM raise KeyboardInterrupt in the main thread; returns the function that undoes it."""
    try:
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except (ValueError, OSError, AttributeError):  # not the main thread, or no SIGTERM on this system
        return lambda: None

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def _interrupt_unless_committed(signum: int, frame: Any) -> None:
    if _committed:
        _late.append(signum)
        return
    raise KeyboardInterrupt


def interrupts_until_commit() -> Callable[[], None]:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt in the main thread until `commit_reached`, and are only recorded
    after it. Returns the function that restores the previous handlers (and forgets the commit)."""
    global _committed
    _committed = False
    _late.clear()
    restores = []
    for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
        if sig is None:
            continue
        try:
            current = signal.getsignal(sig)
            if sig == signal.SIGINT and current is not signal.default_int_handler:
                continue  # ignored by whoever started us (nohup, a background job), or someone else's handler
            previous = signal.signal(sig, _interrupt_unless_committed)
        except (ValueError, OSError):  # not the main thread
            continue
        restores.append((sig, previous))

    def restore() -> None:
        global _committed
        for sig, previous in restores:
            signal.signal(sig, previous)
        _committed = False
        _late.clear()

    return restore


def commit_reached(output: object = None) -> None:
    """The output is being put in place: from now on a signal cannot undo the work (a merge's `on_commit`)."""
    global _committed
    _committed = True


def commit_done(result: object = None) -> None:
    """The committed file is in place and more work follows (a sweep's next candidate): signals interrupt again.
    One that came during the commit stays in `late_signals`, for the next candidate to stop at."""
    global _committed
    _committed = False


def late_signals() -> list[str]:
    """The signals that came after the commit, as a user would name them (e.g. ["Ctrl-C"])."""
    names = {signal.SIGINT: "Ctrl-C", getattr(signal, "SIGTERM", None): "SIGTERM"}
    return [names.get(s) or f"signal {s}" for s in dict.fromkeys(_late)]
