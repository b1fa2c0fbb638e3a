"""Comparing merges held in memory (`merge_in_memory`) with each other or with a written file, where a test's point
is that two merges give the same bytes and neither file is otherwise under test."""

from __future__ import annotations

import os

import torch

from lib_rebasin.io.checkpoint import Checkpoint, memory_checkpoint, open_checkpoint
from lib_rebasin.merge.held import HeldMerge


def same_bytes(x: Checkpoint, y: Checkpoint) -> bool:
    """What comparing the two files' sha256 tells: the same keys, every tensor's dtype, shape and bits (NaN and -0.0
    included, which torch.equal would not tell apart), and the same metadata. The key order is the writer's (the
    same for the same entries), so it is not compared: a file read back lists its keys in its header's order."""
    keys = x.keys()
    if sorted(keys) != sorted(y.keys()) or dict(x.metadata) != dict(y.metadata):
        return False
    for k in keys:
        s, t = x.get(k), y.get(k)
        if s.dtype != t.dtype or s.shape != t.shape:
            return False
        if not torch.equal(s.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)):
            return False
    return True


def file_holds(path: str | os.PathLike[str], expected: Checkpoint) -> bool:
    """The file at `path` holds what `expected` (a merge held in memory) would write: `same_bytes`, and its keys in
    the same order (the writer's order is that of the merge's entries, as the held tensors are)."""
    with open_checkpoint(path) as written:
        return same_bytes(written, expected) and written.keys() == expected.keys()


def held_checkpoint(held: HeldMerge) -> Checkpoint:
    """A `merge_held` merge (which takes the extra metadata a host adds, as `merge_checkpoints` does) as a Checkpoint
    holding what its file would: the tensors in the file's order and the final metadata."""
    return memory_checkpoint(held.tensors, held.metadata, "held")
