"""A merge kept in memory to be tried before it is saved (the WebUI's "Merge & load (no file)").

`merge_held` makes the tensors `merge_checkpoints` would write and keeps, besides them, both metadata records of
that streamed write: the one written first (the header's space is reserved from its size) and the final one (with
what was measured while producing the tensors). `save_held` then writes exactly the bytes the direct merge with
the same inputs and options writes, through the same atomic write, without merging again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..compute import with_merge_compute
from ..io.checkpoint import Checkpoint
from ..io.model_input import Source
from ..io.output_file import FULL_DISK_ERRNOS, write_safetensors
from ..options import MergeOptions
from ..progress import Reporter
from .diagnostics import Diagnostics
from .first_match import FirstMatch
from .metadata import MetadataHook
from .preflight import preflight
from .run import _full_disk, _plan, opened_inputs
from .stages import HEADERS_READ


@dataclass
class HeldMerge:
    """One merge's output in memory: its tensors in the file's order, and the metadata of the file it would be."""

    tensors: dict[str, torch.Tensor]
    entries: list[tuple[str, tuple[int, ...], torch.dtype]]
    header_metadata: dict[str, str]  # what the streamed write puts in the header first
    metadata: dict[str, str]  # what it ends with
    diagnostics: Diagnostics
    released: bool = field(default=False)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def release(self) -> None:
        self.tensors.clear()
        self.released = True


@with_merge_compute
def merge_held(a: Source, b: Source, options: MergeOptions, c: Source | None = None,
               report: Reporter | None = None, extra_metadata: dict[str, str] | None = None,
               bake_vae: str | os.PathLike[str] | Checkpoint | None = None, first: FirstMatch | None = None,
               metadata_hook: MetadataHook | None = None) -> HeldMerge:
    """The merge `merge_checkpoints(a, b, <file>, options, c, extra_metadata=..., bake_vae=..., metadata_hook=...)`
    writes, in memory. `first` shares the match of B onto A between merges of the pair (a compare grid's
    candidates); `metadata_hook` is a recipe's (`recipe_in_memory`). Raises RebasinError (incl. Cancelled from
    `report`'s cancel check)."""
    report = report or Reporter(None, None)
    report.stage(0.0, HEADERS_READ)
    report("loading", 0.0, "reading checkpoint headers")
    prep = preflight(a, b, None, options, c)
    with opened_inputs(prep, bake_vae) as baked:
        plan = _plan(prep, report, dict(extra_metadata or {}), metadata_hook, baked, first)
        header = plan.metadata()  # at the point merge_checkpoints asks for it, before any tensor
        tensors = {key: plan.produce(key) for key, _, _ in plan.entries}
        prep.verify_unchanged()
        metadata = plan.metadata()
        report.check()
    report("writing", 1.0, "kept in memory")
    return HeldMerge(tensors, list(plan.entries), dict(header), dict(metadata), plan.diagnostics)


def save_held(held: HeldMerge, output: str | os.PathLike[str], overwrite: bool = False,
              on_written: Callable[[], Any] | None = None) -> Path:
    """Write `held` to `output` atomically: the same bytes as the direct merge's file. Nothing is left on error."""
    if held.released:
        raise RuntimeError("the held merge was released")

    def final() -> dict[str, str]:
        if on_written is not None:
            on_written()
        return held.metadata

    try:
        return write_safetensors(output, held.entries, held.tensors.__getitem__, held.header_metadata,
                                 overwrite=overwrite, finalize_metadata=final)
    except OSError as e:
        if e.errno not in FULL_DISK_ERRNOS:
            raise
        raise _full_disk(Path(output), e) from None
