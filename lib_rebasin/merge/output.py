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
from .blend import Blend, BlockBlend, KeyFunctionBlend, Sink
from .diagnostics import Diagnostics, accumulate_objective
from .preflight import Prepared, output_entries
from .repair_step import Corrections, corrected, has_correction
from .vae_bake import BakedVAE


def merged_keys(A: ModelInput, parts: tuple[str, ...]) -> set[str]:
    """The keys of A the merge computes: the floating-point model weights of the merged parts. position_ids are
    indices even when an old merge stored them as floats: always A's, never blended."""
    return {k for k in A.ckpt if k in A.spec.shapes and part_of(k) in parts
            and not k.endswith("position_ids") and A.ckpt.infos[k].dtype.is_floating_point}


class OutputSources:
    """Where each output key comes from (the baked VAE, A, or the merge), the output's entries (key, shape, dtype)
    in the file's order, and the one guard every output tensor leaves through."""

    def __init__(self, prep: Prepared, merged: set[str], baked: BakedVAE | None, checked: list[Model]) -> None:
        opts = prep.options
        A = prep.a
        spec = A.spec
        out_dtype = PRECISIONS[opts.precision]
        keys = A.ckpt.keys()
        if baked is not None:  # the baked VAE replaces the output's VAE: it is neither merged nor copied from A
            vae_keys = {k for k in spec.shapes if part_of(k) == "vae"}
            merged = merged - vae_keys
            keys = keys + [k for k in spec.shapes if k in vae_keys and k not in A.ckpt.infos]
        self.keys, self.merged = keys, merged
        # A baked VAE's keys that A lacks come after A's own.
        self.entries = output_entries(A, out_dtype) + [(k, tuple(spec.shapes[k]), out_dtype) for k in keys
                                                       if k not in A.ckpt.infos]
        self.dtypes = {k: d for k, _, d in self.entries}
        self.guard = OutputGuard(checked, opts.allow_nonfinite, opts.precision)
        self._spec, self._A, self._baked, self._checked = spec, A, baked, checked
        self._baked_model = [baked.checked()] if baked is not None else []
        self.unblended_checked = False

    def is_baked(self, key: str) -> bool:
        return self._baked is not None and part_of(key) == "vae" and key in self._spec.shapes

    def unblended(self, key: str) -> tuple[torch.Tensor, list[Model], str] | None:
        """A key that is not blended: its value in the output's dtype (from the baked VAE or copied from A), the
        model it comes from and that model's name for it; None for a merged key."""
        baked = self._baked
        if baked is not None and self.is_baked(key):
            return baked.get(key).to(self.dtypes[key]), self._baked_model, baked.source_key(key)
        if key not in self.merged:
            return self._A.ckpt.get(key).to(self.dtypes[key]), self._checked[:1], key
        return None

    def check_unblended(self) -> None:
        """Refuse NaN or Inf (or a value too large for the output precision) in every key that is copied or baked
        in, through the guard that refuses it when the key is produced, with the same message: these values are
        known before any work, so a merge that must fail on them neither matches nor opens its output."""
        for key, _, _ in self.entries:
            source = self.unblended(key)
            if source is not None:
                self.guard(key, *source)
        self.unblended_checked = True


class OutputTensors:
    """`entries` (key, shape, dtype) in the file's order, and `produce(key)` for each, called once per key in
    that order (it reports the writing progress)."""

    def __init__(self, prep: Prepared, parts: tuple[str, ...], blend: Callable[[str], torch.Tensor],
                 sources: OutputSources, perms: Perms, repaired: Corrections, get_b: TensorGetter,
                 report: Reporter, diag: Diagnostics) -> None:
        opts = prep.options
        A, B = prep.a, prep.b
        spec = A.spec
        diag.copied_from_a = sum(1 for k in sources.keys if k not in sources.merged and not sources.is_baked(k))
        diag.dropped_from_b = sum(1 for k in B.ckpt if k not in A.ckpt.infos)
        diag.kept_a_extra_channels = A.config.unet_in_channels != B.config.unet_in_channels

        self.entries = sources.entries
        self._spec, self._A, self._get_b = spec, A, get_b
        self._blend, self._merged, self._perms, self._repaired = blend, sources.merged, perms, repaired
        self._sources, self._report = sources, report
        self._budget = budget_for(opts.device, report)
        self._guard = sources.guard
        self._dtypes = sources.dtypes
        self._sizes = {k: max(1, math.prod(s)) for k, s, _ in self.entries}
        self._total = sum(self._sizes.values())
        self._done = 0
        # Weight matching's objective (how alike A and the aligned B are) is measured where it costs nothing extra:
        # while the aligned keys are produced anyway.
        self.measure = opts.aligned
        self._objective = {p: [0.0, 0.0, 0.0, 0.0] for p in parts}

    def produce(self, key: str, sink: Sink | None = None) -> torch.Tensor:
        """Every output tensor, whatever its source, leaves through the one guard (a copied or baked-in one
        passed it before any work: every read of an input gets the bytes checked then, io/input_file.py). A
        blend made a chunk at a time hands its value to `sink` as it goes (`write_safetensors`' streamed write);
        the guard then refuses it before the file is committed, as it refuses a tensor written whole."""
        self._report("writing", self._done / self._total, f"writing {key}")
        self._done += self._sizes[key]
        unblended = self._sources.unblended(key)
        if unblended is not None and self._sources.unblended_checked:
            return unblended[0]
        t, readers, read_as = unblended if unblended is not None else (self._value(key, sink), None, key)
        return self._guard(key, t, readers, read_as)

    def objective(self) -> dict[str, list[float]]:
        """The objective per part, once every key is produced (empty when the merge did not align)."""
        return {p: o for p, o in self._objective.items() if o[2] > 0} if self.measure else {}

    def _finish(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """The merged value in the output's precision, with REPAIR's correction folded in (in fp64)."""
        return corrected(self._repaired, key, t.to("cpu")).to(self._dtypes[key])

    def _value(self, key: str, sink: Sink | None = None) -> torch.Tensor:
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
        # A Blend casts to the output's dtype as it goes (and may hand its chunks to the sink: the value is then
        # final), unless REPAIR's correction is still to be folded in (fp64).
        dtype = None if has_correction(self._repaired, key) else self._dtypes[key]

        def attempt(dev: torch.device) -> torch.Tensor:
            found[:] = [0.0, 0.0, 0.0, 0.0]
            # What the sink takes is written at once: only an attempt that is not repeated elsewhere after running
            # out of memory hands its pieces out (a GPU's blend is whole tensors anyway).
            final = dev == self._budget.fallback or not self._budget.limited
            return self._blended(key, key_blend, dev, found, dtype, sink if dtype is not None and final else None)

        t = self._budget.run("blend", blend_need(self._spec.shapes.get(key, ()), terms), attempt)
        if self.measure and self._spec.axes.get(key):
            acc = self._objective[part_of(key)]
            for i, v in enumerate(found):
                acc[i] += v
        return self._finish(key, t)

    def _blended(self, key: str, key_blend: Blend | KeyFunctionBlend, dev: torch.device,
                 acc: list[float], dtype: torch.dtype | None, sink: Sink | None) -> torch.Tensor:
        spec, get_b = self._spec, self._get_b
        measured = self.measure and spec.axes.get(key)
        if not isinstance(key_blend, Blend):
            if measured:
                accumulate_objective(acc, spec, key, self._A.ckpt.get, get_b, self._perms)
            return key_blend(key, device=dev)
        if not measured:
            return key_blend(key, device=dev, dtype=dtype, sink=sink)
        if len(key_blend.terms) == 2 and key_blend.terms[1].get is get_b:
            # (1-a) A + a pi(B): the objective from the values the blend widens anyway.
            return key_blend(key, device=dev, objective=acc, dtype=dtype, sink=sink)
        accumulate_objective(acc, spec, key, self._A.ckpt.get, get_b, self._perms)
        return key_blend(key, device=dev, dtype=dtype, sink=sink)
