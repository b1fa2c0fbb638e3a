"""A merge job of the tab and the API: what was prepared (a merge or a recipe), its progress and its result."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..merge.first_match import FirstMatch
from ..options import MergeOptions
from ..recipe.format import Recipe
from ..recipe.provenance import recorded_options
from .host import CheckpointEntry
from .request import MergeRequest, RecipeRequest


@dataclass
class Prepared:
    request: MergeRequest
    a: CheckpointEntry
    b: CheckpointEntry
    c: CheckpointEntry | None
    output: Path
    options: MergeOptions
    bake_vae: CheckpointEntry | None = None
    # True: "Merge & load (no file)": merged in memory and put into the host's generator; `output` is then only
    # the name "Save this merge" offers.
    load: bool = False
    # The match of B onto A a compare grid made for this pair: loading or saving one of its candidates reuses it
    # (the same bytes as matching again).
    first: FirstMatch | None = field(default=None, repr=False, compare=False)

    @property
    def devices(self) -> list[str]:
        return [self.request.device]

    def request_dict(self) -> dict[str, Any]:
        """The request as the job ran it: the models' titles and the options an output records (the table's)."""
        return {"model_a": self.a.title, "model_b": self.b.title, "model_c": self.c.title if self.c else None,
                **recorded_options(self.options), **({"bake_vae": self.bake_vae.title} if self.bake_vae else {})}


@dataclass
class PreparedRecipe:
    request: RecipeRequest
    recipe: Recipe  # its models pinned to files the host lists
    models_dir: Path
    inputs: dict[str, Path]
    output: Path

    @property
    def devices(self) -> list[str]:
        return sorted({s.options.device for s in self.recipe.steps})

    def request_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe.name, "steps": [s.name for s in self.recipe.steps],
                "models": {k: p.name for k, p in self.inputs.items()}, "devices": self.devices}


def format_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


@dataclass
class Job:
    id: str
    prepared: Prepared | PreparedRecipe
    status: str = "queued"  # queued | running | done | failed | cancelled
    fraction: float = 0.0
    stage: str = "queued"
    message: str = "Waiting for the host's queue..."
    eta_s: float | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    output: Path | None = None
    summary: list[str] = field(default_factory=list)
    diagnostics: dict[str, Any] | None = None
    error: str | None = None
    seconds: float | None = None
    # Set at the output's commit (`merge_checkpoints`'s on_commit): the file is being put in place, the merge has
    # succeeded and a cancel is refused as too late. Set and read under the service's lock.
    committed: bool = False
    loaded: str | None = None  # a load job's result: the title the host shows for the unsaved merge
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def is_load(self) -> bool:
        return isinstance(self.prepared, Prepared) and self.prepared.load

    @property
    def finished_flag(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def too_late_to_cancel(self) -> str | None:
        """Why a cancel changes nothing any more (the output is committed), or None while it still can stop."""
        if not self.committed or self.status == "failed":  # failed: the commit itself failed, nothing was written
            return None
        name = self.prepared.output.name
        if self.status == "done":
            return f"Too late to cancel: the merge is done; {name} was saved."
        return f"Too late to cancel: {name} is being saved; the merge ends done."

    def status_line_cancelled(self) -> str:
        return "Stopped: the model loaded before is kept." if self.is_load else "Stopped: no file was written."

    def status_line(self, eta: bool = True) -> str:
        """One line for the tab and the API; `eta=False` where the host's own progress bar shows one."""
        if self.status == "done" and self.loaded is not None:
            return f"Done in {self.seconds or 0:.1f}s: loaded {self.loaded} (not saved)."
        if self.status == "done":
            return f"Done in {self.seconds or 0:.1f}s: saved {self.output.name if self.output else ''}."
        if self.status == "cancelled":
            return self.status_line_cancelled()
        if self.status == "failed":
            return f"Failed: {self.error}"
        left = format_eta(self.eta_s) if eta else ""
        pct = f"{self.fraction * 100:.0f}%"
        return f"{pct} · {self.message}" + (f" · ETA {left}" if left else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.id, "status": self.status, "fraction": round(self.fraction, 4), "stage": self.stage,
            "message": self.message, "eta_s": self.eta_s, "status_line": self.status_line(),
            "output": str(self.output) if self.output else None,
            "output_name": self.output.name if self.output else self.prepared.output.name,
            "summary": list(self.summary), "diagnostics": self.diagnostics, "error": self.error,
            "seconds": self.seconds, "finished": self.finished_flag,
            "kind": "recipe" if isinstance(self.prepared, PreparedRecipe) else "load" if self.is_load else "merge",
            "loaded": self.loaded,
            "request": self.prepared.request_dict(),
        }
