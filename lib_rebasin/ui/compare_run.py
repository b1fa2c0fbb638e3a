"""A compare grid's run, inside the host's queue: per candidate merge in memory (sharing the match), load into
the host's generator, generate with the one seed; then the labelled grid, saved where the host saves txt2img grids.

Whatever ends it (done, Stop between or inside a candidate, an error), the host gets back the model it had before:
an unsaved merge it held is loaded again from the tensors kept meanwhile, a checkpoint file is loaded again once
the queue is free; with neither, the last candidate stays loaded (the host is never left without a model).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from ..merge.held import merge_held
from ..progress import Reporter
from .compare import CompareJob
from .compare_grid import labelled_grid
from .job_runner import cancelled_of, execute, progress_of
from .service import MergeService
from .unsaved import Unsaved

MERGE_SHARE = 0.6  # of each candidate's part of the bar; the picture takes the rest


def grid_infotext(job: CompareJob) -> str:
    """The grid's parameters: the first candidate's infotext (prompt, seed, sampler, hires fix...) and the axis."""
    p = job.compare
    cells = "; ".join(f"{i + 1}: {c.label}" for i, c in enumerate(p.candidates))
    first = p.candidates[0].infotext if p.candidates else ""
    return f"{first}\nRe-Basin compare: {p.axis} = {', '.join(c.value for c in p.candidates)} ({cells})"


def run_compare(service: MergeService, job: CompareJob) -> None:
    host = service.host
    p = job.compare
    n = len(p.candidates)
    progress, cancelled = progress_of(host, job), cancelled_of(host, job)
    before: dict[str, Any] = {"file": None, "unsaved": None, "loaded": False}

    def work() -> None:
        before["file"] = host.loaded_checkpoint()
        before["unsaved"] = service.unsaved.detach()
        host.prepare_device(p.request.device)
        try:
            generate_all(before)
        finally:
            host.restore_device(p.request.device)
            kept: Unsaved | None = before["unsaved"]
            if kept is not None and not before["loaded"]:  # the host's model never changed: it is held as before
                service.unsaved.current = kept
            elif kept is not None:  # inside the queue, before anyone generates with a candidate
                job.message = "Loading the unsaved merge loaded before again..."
                host.report_progress(1.0, job.message)
                service.unsaved.reattach(kept)
                job.restored = f"The unsaved merge {kept.label} is loaded again."

    def generate_all(before: dict[str, Any]) -> None:
        settings = p.settings
        job.seed = settings.seed if settings.seed >= 0 else random.randrange(2**32 - 1)
        settings = settings.with_seed(job.seed)
        images = []
        report = Reporter(progress, cancelled)
        for k, cand in enumerate(p.candidates):
            report.check()
            lo, hi = k / n, (k + 1) / n
            mid = lo + (hi - lo) * MERGE_SHARE
            q = cand.prepared
            sub = Reporter(report.relay(lo, mid, f"{cand.value} ({k + 1}/{n})"), cancelled)
            held = merge_held(q.a.path, q.b.path, q.options, c=q.c.path if q.c else None, report=sub,
                              extra_metadata={"lib_rebasin_host": host.name},
                              bake_vae=q.bake_vae.path if q.bake_vae else None, first=q.first)
            last = k == n - 1 and before["file"] is None and before["unsaved"] is None
            try:
                report.check()
                job.message = f"{cand.value} ({k + 1}/{n}): loading into the generator"
                host.report_progress(mid, job.message)
                # the last candidate's tensors stay with the host when nothing is loaded again after the grid
                host.load_state_dict(held.tensors, cand.label, held.release if last else _nothing)
                before["loaded"] = True
                job.fraction, job.message = mid, f"{cand.value} ({k + 1}/{n}): generating"
                host.report_progress(mid, job.message)
                picture = host.generate(settings, cand.label)
            finally:
                if not last:
                    held.release()  # the host has its own copy in its model; the next candidate needs the room
            report.check()  # an interrupted generation ends early with a partial picture: no grid from it
            cand.infotext = picture.infotext
            images.append(picture.image)
            job.done = k + 1
            job.fraction = hi
            host.report_progress(hi, f"{cand.value} ({k + 1}/{n}): done")
        job.message = "Saving the grid..."
        grid = labelled_grid(images, [c.value for c in p.candidates])
        images.clear()
        job.grid_image = grid
        job.grid = Path(host.save_grid(grid, grid_infotext(job), settings))
        job.seconds = time.time() - job.started

    def restore_file() -> None:
        """Outside the queue (a host's checkpoint loading takes the queue itself), before the job shows its end."""
        path = before["file"]
        if before["unsaved"] is None and path is not None and before["loaded"]:
            job.message = f"Loading {path.name} again..."
            host.report_progress(1.0, job.message)
            try:
                title = host.load_checkpoint(path)
                job.restored = f"{title} is loaded again."
            except Exception as e:
                job.restored = f"Loading {path.name} again failed ({type(e).__name__}); pick a checkpoint."
                raise
        elif before["loaded"] and before["unsaved"] is None:
            job.restored = "The last candidate stays loaded (no model was loaded before)."

    execute(host, job, work, lambda: "Grid saved.", after=restore_file)


def _nothing() -> None:
    pass
