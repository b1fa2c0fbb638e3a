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
    (also when the host never ran it), or failed with one line; `after()` runs first, whatever ended the job (its
    errors are printed, never the job's), so a client that sees the job end sees everything it does already done
    (a compare grid's model loaded again, a sweep's files registered); then the memory is given back and the job
    marked finished."""
    ran: list[bool] = []

    def body() -> None:
        if job._cancel.is_set():
            raise Cancelled()
        job.status, job.stage, job.message = "running", "loading", "Starting..."
        work()
        ran.append(True)

    try:
        status, error = _outcome(host, job, body, ran)
        if after is not None:
            try:
                after()
            except Exception:
                import traceback

                traceback.print_exc()
        job.eta_s = None
        job.finished = time.time()
        job.status = job.stage = status
        if status == "done":
            job.fraction, job.message = 1.0, done_message()
        elif status == "cancelled":
            job.message = job.status_line()
        else:
            job.error = job.message = error
    finally:
        from ..memory import release_memory

        # A stopped or failed merge leaves big tensors in its frames, and a recipe's freed intermediate models
        # stay in the allocator's heap: give both back, so the host returns to its size before the job.
        release_memory()
        job._done.set()


def _outcome(host: Host, job: Job, body: Callable[[], None], ran: list[bool]) -> tuple[str, str]:
    """How the job's run ended: ("done" | "cancelled" | "failed", the failure's one line)."""
    try:
        host.run_job(job.id, body)
        if not ran:  # the host refused to run it (for example interrupted while queued)
            raise Cancelled()
        return "done", ""
    except Cancelled:
        return "cancelled", ""
    except RebasinError as e:
        return "failed", str(e)
    except Exception as e:  # a bug in the core or the host: still tell the user, in one line
        import traceback

        traceback.print_exc()
        return "failed", f"Unexpected error ({type(e).__name__}: {shown(str(e), 200)}); see the console for details."
