"""Non-finite weights (NaN, Inf): refused by default, kept only when the user asks, never created by a merge.

A weighted sum carries a NaN of an input straight into the output, and weight matching cannot compare units that
hold one (the assignment solver fails on a non-finite cost matrix). Scanning every input up front would cost a
full read of each model, so the checks sit where the data passes anyway:

- every tensor weight matching reads is checked once when it is fetched (`guard_getter`);
- every tensor written is checked after its cast to the output dtype (`OutputGuard`), which also catches a
  blend that overflows (a huge alpha, or fp32 values beyond fp16's range). The write is atomic, so refusing
  there leaves no file.

Only when a check fails are the inputs searched, to name the model, the part and the first few keys.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch

from .errors import NonFiniteWeightsError
from .spec import part_of

TensorGetter = Callable[[str], torch.Tensor]

PART_WORDS = {"unet": "UNet", "te": "text encoder", "vae": "VAE", "other": "non-model keys"}
SHOW_KEYS = 3
HOW_TO_KEEP = ("replace the model, or keep them with --allow-nonfinite (recipe: allow_nonfinite = true) if you "
               "really want them in the output")


def all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or Inf. A float32 sum is NaN/Inf exactly when an element is, unless finite
    values overflow it (only possible beyond fp16's range); that rare case is settled by the exact test."""
    if not t.dtype.is_floating_point or t.numel() == 0:
        return True
    if math.isfinite(float(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def nonfinite_keys(get: TensorGetter, keys: Iterable[str], limit: int = SHOW_KEYS + 1) -> list[str]:
    """The first `limit` of `keys` whose tensors hold NaN or Inf (reads them: only for an error message)."""
    out = []
    for k in keys:
        if not all_finite(get(k)):
            out.append(k)
            if len(out) >= limit:
                break
    return out


def input_error(label: str, name: str, part: str, keys: Sequence[str]) -> NonFiniteWeightsError:
    shown = ", ".join(keys[:SHOW_KEYS]) + (" and more" if len(keys) > SHOW_KEYS else "")
    return NonFiniteWeightsError(f"Model {label} ({name}) has NaN or Inf weights in its {PART_WORDS[part]} "
                                 f"({shown}); they would end up in the merge: {HOW_TO_KEEP}.")


class Model:
    """What the checks need to know about one input: its label, file name, getter and keys."""

    def __init__(self, label: str, name: str, get: TensorGetter, keys: Sequence[str]) -> None:
        self.label, self.name, self.get, self.keys = label, name, get, keys

    def error_at(self, key: str) -> NonFiniteWeightsError:
        part = part_of(key)
        same_part = [k for k in self.keys if part_of(k) == part and k != key]
        return input_error(self.label, self.name, part, [key] + nonfinite_keys(self.get, same_part, SHOW_KEYS))


def guard_getter(get: TensorGetter, model: Model, allow: bool) -> TensorGetter:
    """`get` for weight matching: a non-finite tensor is refused, or with `allow` matched as if it were 0 there
    (the output still gets the real values: matching only decides the permutation)."""

    def checked(key: str) -> torch.Tensor:
        t = get(key)
        if all_finite(t):
            return t
        if not allow:
            raise model.error_at(key)
        return torch.nan_to_num(t.float(), nan=0.0, posinf=0.0, neginf=0.0)

    return checked


class OutputGuard:
    """Checks each produced output tensor; see the module docstring."""

    def __init__(self, sources: Sequence[Model], allow: bool, precision: str) -> None:
        self.sources, self.allow, self.precision = sources, allow, precision

    def __call__(self, key: str, t: torch.Tensor, readers: Sequence[Model] | None = None) -> torch.Tensor:
        if all_finite(t):
            return t
        readers = self.sources if readers is None else readers
        bad = [m for m in readers if key in m.keys and not all_finite(m.get(key))]
        if bad and not self.allow:
            raise bad[0].error_at(key)
        if not bad:
            raise NonFiniteWeightsError(
                f"The merged value of {key} overflows (it is too large for {self.precision}) although the inputs "
                "are finite; use a smaller alpha" + (", or precision fp32 or bf16" if self.precision == "fp16"
                                                     else "") + ".")
        return t
