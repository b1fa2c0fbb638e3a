"""Comparing merges held in memory (`merge_in_memory`) with each other or with a written file, where a test's point
is that two merges give the same bytes and neither file is otherwise under test."""

from __future__ import annotations

import torch

from lib_rebasin.io.checkpoint import Checkpoint


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
