"""The tensors weight matching reads: on the compute device in their stored dtype, fetched once or on every visit.

Slices are widened to fp32 only when a cost matrix needs them, so no fp32 copy of a whole model is held. A
checkpoint file on the CPU is better re-read than kept: a read is a copy from the page cache, small next to the
cost matrix it feeds, while keeping both models would hold their whole size in memory.

The getter is usually the merge's finite check (`io/finite.GuardedGetter`): a caller that checks a tensor itself
(the partial certificate's statistics pass NaN and Inf on) reads it `unchecked` and `vouch`es for it, so the tensor
is not scanned twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..io.finite import GuardedGetter

TensorGetter = Callable[[str], torch.Tensor]


@dataclass
class MatchTensors:
    """One model's tensors for a matching run; `keep` holds each fetched tensor for later visits."""

    get: TensorGetter
    device: torch.device
    keep: bool = True
    cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def __call__(self, key: str) -> torch.Tensor:
        t = self.cache.get(key)
        if t is None:
            t = self.get(key).to(self.device)
            if self.keep:
                self.cache[key] = t
        return t

    def unchecked(self, key: str) -> torch.Tensor | None:
        """The key without the getter's finite check, for a caller that checks it itself and then `vouch`es for
        it; None where the getter has no such check to skip."""
        t = self.cache.get(key)
        if t is not None:
            return t  # fetched (and checked) before
        return self.get.unchecked(key).to(self.device) if isinstance(self.get, GuardedGetter) else None

    def vouch(self, key: str, t: torch.Tensor) -> None:
        """`t`, read `unchecked`, was found finite."""
        if isinstance(self.get, GuardedGetter):
            self.get.vouch(key)
        if self.keep:
            self.cache[key] = t
