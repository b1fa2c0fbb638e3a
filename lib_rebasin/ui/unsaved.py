"""The one unsaved merge a host may hold ("Merge & load (no file)", then "Save this merge").

A load job merges into memory (`merge/held.py`), hands the host a state dict over those tensors and keeps them,
so "Save this merge" writes the very bytes a direct merge with the same settings writes, without merging again.
At most one is held: a new load job releases the previous one before it merges, and the host's `on_replaced`
(another checkpoint was loaded) releases it too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RebasinError
from ..io.model_input import same_file
from ..merge.held import HeldMerge, merge_held, save_held
from ..messages import shown
from ..progress import Reporter
from .host import Host
from .job import Job, Prepared
from .naming import output_path_for

_SHORT = {"rebasin": "re-basin", "legacy": "legacy re-basin"}


def unsaved_label(p: Prepared) -> str:
    """What the host shows for the loaded merge: "A + B, re-basin, alpha 0.35, unsaved" (C, block preset added)."""
    models = f"{p.a.path.stem} + {p.b.path.stem}" + (f" (C {p.c.path.stem})" if p.c is not None else "")
    method = _SHORT.get(p.options.method, p.options.method.replace("_", " "))
    blocks = ""
    if p.options.blocks is not None:
        blocks = f", blocks {p.options.blocks_preset}" if p.options.blocks_preset else ", block weights"
    return f"{models}, {method}, alpha {p.options.alpha:g}{blocks}, unsaved"


@dataclass
class Unsaved:
    prepared: Prepared
    held: HeldMerge
    label: str
    title: str  # how the host shows it

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "title": self.title, "save_as": self.prepared.output.name,
                "request": self.prepared.request_dict(), "bytes": self.held.nbytes}


class UnsavedSlot:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.current: Unsaved | None = None
        self._lock = threading.Lock()  # one save at a time; a load job never starts during one
        self.saving = False

    def release(self) -> None:
        held, self.current = self.current, None
        if held is not None:
            held.held.release()
            from ..memory import release_memory

            release_memory()  # the merged tensors' pages back to the system, not kept in the allocator's heap

    def _replaced(self, which: list[Unsaved]) -> Callable[[], None]:
        def replaced() -> None:
            if which and self.current is which[0]:
                self.release()
        return replaced

    def detach(self) -> Unsaved | None:
        """Take the held merge out of the slot without releasing it (a compare grid loads its candidates in its
        place, then `reattach`es it)."""
        cur, self.current = self.current, None
        return cur

    def reattach(self, cur: Unsaved) -> None:
        """Load a detached merge into the host again and hold it as before."""
        try:
            cur.title = self.host.load_state_dict(cur.held.tensors, cur.label, self._replaced([cur]))
        except BaseException:
            cur.held.release()
            raise
        self.release()
        self.current = cur

    def run(self, job: Job, p: Prepared, progress: Callable[[Any], None], cancelled: Callable[[], bool]) -> None:
        """The work of a load job, inside the host's queue: merge in memory, then load into the host."""
        if not self.host.loads_in_memory:
            from .host import NO_GENERATOR

            raise RebasinError(NO_GENERATOR)
        self.release()  # at most one held: the host keeps using its model meanwhile, it just can't be saved
        report = Reporter(progress, cancelled)
        held = merge_held(p.a.path, p.b.path, p.options, c=p.c.path if p.c else None, report=report,
                          extra_metadata={"lib_rebasin_host": self.host.name},
                          bake_vae=p.bake_vae.path if p.bake_vae else None, first=p.first)
        try:
            report.check()  # a Stop during the merge keeps the model loaded before
            label = unsaved_label(p)
            job.message = "Loading into the WebUI's model..."
            self.host.report_progress(1.0, job.message)
            slot: list[Unsaved] = []
            # the held dict itself (the host copies it before a loader pops keys): releasing it frees the tensors
            title = self.host.load_state_dict(held.tensors, label, self._replaced(slot))
        except BaseException:
            held.release()
            raise
        slot.append(Unsaved(p, held, label, title))
        self.current = slot[0]
        job.loaded = title
        job.diagnostics = held.diagnostics.to_dict()
        job.summary = [str(x) for x in held.diagnostics.summary_lines()]

    def save(self, folder: Path, output_name: str = "", overwrite: bool = False) -> tuple[Path, str]:
        """Write the loaded unsaved merge; afterwards the host's model is that file. Returns (path, title)."""
        if not self._lock.acquire(blocking=False):
            raise RebasinError("The unsaved merge is being saved already; wait for it.")
        self.saving = True
        try:
            cur = self.current
            if cur is None:
                raise RebasinError("No unsaved merge is loaded; use Merge & load (no file) first, or the model "
                                   "was replaced by another checkpoint since.")
            p = cur.prepared
            if not folder.is_dir():
                raise RebasinError(f"The output folder {folder} does not exist; create it or change it in Settings.")
            out = output_path_for(output_name, folder, p.output.stem) if output_name.strip() else folder / p.output.name
            if out.exists() and not overwrite:
                raise RebasinError(f"A checkpoint named {shown(out.name, 80)} already exists in {folder}; choose "
                                   "another output name.")
            inputs = [e.path for e in (p.a, p.b, p.c) if e is not None]
            if any(same_file(out, x) for x in inputs):
                raise RebasinError(f"The output {out.name} would overwrite one of the input models; choose another "
                                   "name.")
            path = save_held(cur.held, out, overwrite=overwrite)
            try:  # the hashes first: the host's rescan then titles the file with its hash
                self.host.remember_hashes([path, *inputs])
            except Exception:  # a hash cache is a convenience, never a reason to fail a saved merge
                import traceback

                traceback.print_exc()
            self.host.after_save(path)
            title = self.host.adopt_saved(path)
            if self.current is cur:
                self.release()
            return path, title
        finally:
            self.saving = False
            self._lock.release()
