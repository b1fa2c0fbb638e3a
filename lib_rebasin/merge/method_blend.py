"""How a merge that does not iterate produces each key: a registry method's exact linear blend or its per-key
function, and the legacy tool's result; with block weights, each key at its own weight of B."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..align.permute import Perms
from ..align.weight_matching import TensorGetter
from ..archspec import ArchSpec
from ..io.finite import Model, guard_getter
from ..methods import METHODS
from ..options import MergeOptions
from ..progress import Reporter
from .blend import Blend, BlockBlend, KeyFunctionBlend, Term
from .preflight import Prepared


def method_blend(spec: ArchSpec[Any], prep: Prepared, opts: MergeOptions, perms: Perms,
                 device: torch.device) -> Callable[[str], torch.Tensor]:
    """How a registry method produces each key: its exact linear blend when it has one, else its function."""
    info = METHODS[opts.method]
    get_a, get_b = prep.a.ckpt.get, prep.b.ckpt.get
    get_c = prep.c.ckpt.get if (prep.c is not None and info.needs_c) else None
    if info.linear is not None:
        def blend_for(alpha: float) -> Blend:
            wa, wb, wc = info.linear(alpha)  # type: ignore[misc]
            terms = [Term(wa, get_a, {}), Term(wb, get_b, perms)]
            if get_c is not None:
                terms.append(Term(wc, get_c, perms))
            return Blend(spec, terms, device)

        return blend_for(opts.alpha) if opts.blocks is None else BlockBlend(blend_for, alpha_lookup(opts))
    assert info.fn is not None
    alpha_of = alpha_lookup(opts) if opts.blocks is not None else (lambda key: opts.alpha)
    return KeyFunctionBlend(spec, info.fn, get_a, get_b, get_c, perms, alpha_of, opts.method_params(), opts.seed,
                            device)


def alpha_lookup(opts: MergeOptions) -> Callable[[str], float]:
    """opts.alpha_of, remembered per key (the merge asks for each key several times)."""
    cache: dict[str, float] = {}

    def alpha_of(key: str) -> float:
        if key not in cache:
            cache[key] = opts.alpha_of(key)
        return cache[key]

    return alpha_of


def legacy_blend(spec: ArchSpec[Any], get_a: TensorGetter, get_b: TensorGetter, opts: MergeOptions,
                 device: torch.device, report: Reporter, checked: list[Model]) -> Callable[[str], torch.Tensor]:
    """T0b1maru/re-basin_merger's result (see merge/legacy.py): a weighted sum, except six GroupNorm vectors that the
    tool re-matches every iteration; those are iterated exactly (they are tiny), everything else is one blend."""
    from .legacy import SPECIAL_KEYS, legacy_special_tensors

    special = legacy_special_tensors(
        guard_getter(get_a, checked[0], opts.allow_nonfinite), guard_getter(get_b, checked[1], opts.allow_nonfinite),
        opts.alpha, opts.iterations,
        on_iteration=lambda done, total: report("matching", done / total,
                                                f"legacy: iteration {done}/{total} (three output GroupNorms)"))
    weighted = Blend(spec, [Term(1 - opts.alpha, get_a, {}), Term(opts.alpha, get_b, {})], device)

    def value(key: str) -> torch.Tensor:
        return special[key] if key in SPECIAL_KEYS else weighted(key)

    return value
