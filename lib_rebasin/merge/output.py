"""Every output tensor of one merge, in the order of the file: where each comes from (the baked VAE, A, or the
merge), REPAIR's correction folded in, the weight-matching objective measured on the way, and the one guard
every tensor leaves through."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..align.permute import Perms
from ..align.weight_matching import TensorGetter
from ..device_budget import blend_need, budget_for
from ..io.finite import Model, OutputGuard
from ..io.model_input import ModelInput
from ..io.precisions import PRECISIONS
from ..parts import part_of
from ..progress import Reporter
from .blend import Blend, BlockBlend, KeyFunctionBlend
from .diagnostics import Diagnostics, accumulate_objective
from .preflight import Prepared, output_entries
from .repair_step import Corrections, corrected
from .vae_bake import BakedVAE


def merged_keys(A: ModelInput, parts: tuple[str, ...]) -> set[str]:
    """The keys of A the merge computes: the floating-point model weights of the merged parts. position_ids are
    indices even when an old merge stored them as floats: always A's, never blended."""
    return {k for k in A.ckpt if k in A.spec.shapes and part_of(k) in parts
            and not k.endswith("position_ids") and A.ckpt.infos[k].dtype.is_floating_point}


class OutputTensors:
    """`entries` (key, shape, dtype) in the file's order, and `produce(key)` for each, called once per key in
    that order (it reports the writing progress)."""

    def __init__(self, prep: Prepared, parts: tuple[str, ...], blend: Callable[[str], torch.Tensor],
                 merged: set[str], perms: Perms, repaired: Corrections, baked: BakedVAE | None,
                 checked: list[Model], get_b: TensorGetter, report: Reporter, diag: Diagnostics) -> None:
        opts = prep.options
        A, B = prep.a, prep.b
        spec = A.spec
        out_dtype = PRECISIONS[opts.precision]
        keys = A.ckpt.keys()
        if baked is not None:  # the baked VAE replaces the output's VAE: it is neither merged nor copied from A
            vae_keys = {k for k in spec.shapes if part_of(k) == "vae"}
            merged = merged - vae_keys
            keys = keys + [k for k in spec.shapes if k in vae_keys and k not in A.ckpt.infos]
        diag.copied_from_a = sum(1 for k in keys if k not in merged
                                 and not (baked is not None and k in spec.shapes and part_of(k) == "vae"))
        diag.dropped_from_b = sum(1 for k in B.ckpt if k not in A.ckpt.infos)
        diag.kept_a_extra_channels = A.config.unet_in_channels != B.config.unet_in_channels

        # A baked VAE's keys that A lacks come after A's own.
        self.entries = output_entries(A, out_dtype) + [(k, tuple(spec.shapes[k]), out_dtype) for k in keys
                                                       if k not in A.ckpt.infos]
        self._spec, self._A, self._get_b = spec, A, get_b
        self._blend, self._merged, self._perms, self._repaired = blend, merged, perms, repaired
        self._baked, self._checked, self._report = baked, checked, report
        self._budget = budget_for(opts.device, report)
        self._guard = OutputGuard(checked, opts.allow_nonfinite, opts.precision)
        self._dtypes = {k: d for k, _, d in self.entries}
        self._sizes = {k: max(1, math.prod(s)) for k, s, _ in self.entries}
        self._total = sum(self._sizes.values())
        self._done = 0
        # Weight matching's objective (how alike A and the aligned B are) is measured where it costs nothing extra:
        # while the aligned keys are produced anyway.
        self.measure = opts.aligned
        self._objective = {p: [0.0, 0.0, 0.0, 0.0] for p in parts}
        self._baked_model = [baked.checked()] if baked is not None else []

    def produce(self, key: str) -> torch.Tensor:
        """Every output tensor, whatever its source, leaves through the one guard."""
        self._report("writing", self._done / self._total, f"writing {key}")
        self._done += self._sizes[key]
        t, readers, read_as = self._source(key)
        return self._guard(key, t, readers, read_as)

    def objective(self) -> dict[str, list[float]]:
        """The objective per part, once every key is produced (empty when the merge did not align)."""
        return {p: o for p, o in self._objective.items() if o[2] > 0} if self.measure else {}

    def _source(self, key: str) -> tuple[torch.Tensor, list[Model] | None, str]:
        """The value of `key` in the output's dtype, the models it was made from, and their name for it."""
        baked = self._baked
        if baked is not None and part_of(key) == "vae" and key in self._spec.shapes:
            return baked.get(key).to(self._dtypes[key]), self._baked_model, baked.source_key(key)
        if key not in self._merged:
            return self._A.ckpt.get(key).to(self._dtypes[key]), self._checked[:1], key
        return self._value(key), None, key

    def _finish(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """The merged value in the output's precision, with REPAIR's correction folded in (in fp64)."""
        return corrected(self._repaired, key, t.to("cpu")).to(self._dtypes[key])

    def _value(self, key: str) -> torch.Tensor:
        """The merged value, computed on the merge's device or, where that has too little free memory for this
        key, on the CPU (device_budget.py); the objective is counted once, from the attempt that succeeded."""
        blend = self._blend
        if not isinstance(blend, (Blend, BlockBlend, KeyFunctionBlend)):
            # The legacy tool's blend (its six special tensors, else a Blend on the merge's device).
            if self.measure and self._spec.axes.get(key):
                accumulate_objective(self._objective[part_of(key)], self._spec, key, self._A.ckpt.get,
                                     self._get_b, self._perms)
            return self._finish(key, blend(key))
        key_blend = blend.for_key(key) if isinstance(blend, BlockBlend) else blend
        terms = len(key_blend.terms) if isinstance(key_blend, Blend) else 3
        found: list[float] = []

        def attempt(dev: torch.device) -> torch.Tensor:
            found[:] = [0.0, 0.0, 0.0, 0.0]
            return self._blended(key, key_blend, dev, found)

        t = self._budget.run("blend", blend_need(self._spec.shapes.get(key, ()), terms), attempt)
        if self.measure and self._spec.axes.get(key):
            acc = self._objective[part_of(key)]
            for i, v in enumerate(found):
                acc[i] += v
        return self._finish(key, t)

    def _blended(self, key: str, key_blend: Blend | KeyFunctionBlend, dev: torch.device,
                 acc: list[float]) -> torch.Tensor:
        spec, get_b = self._spec, self._get_b
        if not (self.measure and spec.axes.get(key)):
            return key_blend(key, device=dev)
        if isinstance(key_blend, Blend) and len(key_blend.terms) == 2 and key_blend.terms[1].get is get_b:
            # (1-a) A + a pi(B): the objective from the values the blend widens anyway.
            return key_blend(key, device=dev, objective=acc)
        accumulate_objective(acc, spec, key, self._A.ckpt.get, get_b, self._perms)
        return key_blend(key, device=dev)
