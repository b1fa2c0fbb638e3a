"""How every job of the tab and the API runs (a merge, a recipe, a load, a sweep, a compare grid): inside the host's
queue, its progress into the job and the host's bar, a cancel seen through the job or the host's interrupt, and one
way to end: done, cancelled (also when the host never ran it) or failed with one line, the memory given back."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..errors import Cancelled, RebasinError
from ..messages import shown
from ..progress import ProgressEvent
from .host import Host
from .job import Job


def progress_of(host: Host, job: Job) -> Callable[[ProgressEvent], None]:
    """The core's progress events into `job` and the host's progress bar (which adds its own ETA)."""
    def progress(ev: ProgressEvent) -> None:
        job.fraction = max(0.0, min(1.0, float(ev.fraction or 0.0)))
        job.stage = ev.stage or job.stage
        job.message = ev.message or job.stage
        job.eta_s = ev.eta_s
        host.report_progress(job.fraction, job.message)
    return progress


def cancelled_of(host: Host, job: Job) -> Callable[[], bool]:
    return lambda: job._cancel.is_set() or host.interrupted()


def execute(host: Host, job: Job, work: Callable[[], None], done_message: Callable[[], str],
            after: Callable[[], None] | None = None) -> None:
    """Run `work` inside the host's queue and end `job` the one way every kind of job ends: done, cancelled
    (also when the host never ran it), or failed with one line; then `after()` (whatever ended the job; its
    errors are printed, never the job's), the memory given back and the job marked finished."""
    ran: list[bool] = []

    def body() -> None:
        if job._cancel.is_set():
            raise Cancelled()
        job.status, job.stage, job.message = "running", "loading", "Starting..."
        work()
        ran.append(True)

    try:
        host.run_job(job.id, body)
        if not ran:  # the host refused to run it (for example interrupted while queued)
            raise Cancelled()
        job.status, job.fraction, job.stage = "done", 1.0, "done"
        job.message = done_message()
    except Cancelled:
        job.status, job.stage = "cancelled", "cancelled"
        job.message = job.status_line()
    except RebasinError as e:
        job.status, job.stage, job.error = "failed", "failed", str(e)
        job.message = job.error
    except Exception as e:  # a bug in the core or the host: still tell the user, in one line
        job.status, job.stage = "failed", "failed"
        job.error = f"Unexpected error ({type(e).__name__}: {shown(str(e), 200)}); see the console for details."
        job.message = job.error
        import traceback

        traceback.print_exc()
    finally:
        job.eta_s = None
        job.finished = time.time()
        if after is not None:
            try:
                after()
            except Exception:
                import traceback

                traceback.print_exc()
        from ..memory import release_memory

        # A stopped or failed merge leaves big tensors in its frames, and a recipe's freed intermediate models
        # stay in the allocator's heap: give both back, so the host returns to its size before the job.
        release_memory()
        job._done.set()
