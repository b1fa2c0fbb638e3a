"""Non-finite weights (NaN, Inf): refused by default, kept only when the user asks, never created by a merge.

A weighted sum carries a NaN of an input straight into the output, and weight matching cannot compare units that
hold one (the assignment solver fails on a non-finite cost matrix). Scanning every input up front would cost a
full read of each model, so the checks sit where the data passes anyway:

- every tensor weight matching reads is checked when it is first fetched (`guard_getter`), or, where the partial
  certificate's statistics read it, by those statistics (NaN and Inf pass through sums of squares);
- every output tensor, whatever its source (blended, copied from A, or taken from a VAE baked in), is checked
  after its cast to the output dtype (`OutputGuard`, applied once where the merge produces each key), which
  also catches a blend that overflows (a huge alpha, or fp32 values beyond fp16's range). The write is
  atomic, so refusing there leaves no file;
- the tensors that are not blended (copied from A, or baked in) are known before any work: the same guard
  checks them first (`merge/output.py`, `OutputSources.check_unblended`), so a merge that must fail on them
  neither matches nor opens its output.

Only when a check fails are the inputs searched, to name the model, the part and the first few keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from ..errors import NonFiniteWeightsError
from ..parts import part_of

TensorGetter = Callable[[str], torch.Tensor]

PART_WORDS = {"unet": "UNet", "te": "text encoder", "vae": "VAE", "other": "non-model keys"}
SHOW_KEYS = 3
HOW_TO_KEEP = ("replace the model, or keep them with --allow-nonfinite (recipe: allow_nonfinite = true) if you "
               "really want them in the output")


def all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or Inf: the minimum and maximum are finite exactly then (both propagate NaN).
    One pass in the tensor's own dtype, without the widened copy a float32 sum of an fp16 tensor makes."""
    if not t.dtype.is_floating_point or t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def nonfinite_keys(get: TensorGetter, keys: Iterable[str], limit: int = SHOW_KEYS + 1) -> list[str]:
    """The first `limit` of `keys` whose tensors hold NaN or Inf (reads them: only for an error message)."""
    out = []
    for k in keys:
        if not all_finite(get(k)):
            out.append(k)
            if len(out) >= limit:
                break
    return out


def input_error(title: str, where: str, keys: Sequence[str]) -> NonFiniteWeightsError:
    shown = ", ".join(keys[:SHOW_KEYS]) + (" and more" if len(keys) > SHOW_KEYS else "")
    return NonFiniteWeightsError(f"{title[:1].upper()}{title[1:]} has NaN or Inf weights{where} ({shown}); they "
                                 f"would end up in the merge: {HOW_TO_KEEP}.")


class Model:
    """What the checks need to know about one input: its label, file name, getter and keys. `title` names a
    source that is not a model slot ("the VAE to bake in (name)"); its message then names no part."""

    def __init__(self, label: str, name: str, get: TensorGetter, keys: Sequence[str],
                 title: str | None = None) -> None:
        self.label, self.name, self.get, self.keys = label, name, get, keys
        self.title = title

    def error_at(self, key: str) -> NonFiniteWeightsError:
        part = part_of(key)
        same_part = [k for k in self.keys if part_of(k) == part and k != key]
        keys = [key, *nonfinite_keys(self.get, same_part, SHOW_KEYS)]
        if self.title is not None:
            return input_error(self.title, "", keys)
        return input_error(f"Model {self.label} ({self.name})", f" in its {PART_WORDS[part]}", keys)


def guard_getter(get: TensorGetter, model: Model, allow: bool) -> GuardedGetter:
    """`get` for weight matching: a non-finite tensor is refused, or with `allow` matched as if it were 0 there
    (the output still gets the real values: matching only decides the permutation).

    A key found finite is not checked again when a later visit fetches it: every read checks that the file is
    still the version opened (io/input_file.py), so it gets the same bytes."""
    return GuardedGetter(get, model, allow)


class GuardedGetter:
    """`guard_getter`'s getter. A reader that passes every value of a tensor through a computation that NaN and
    Inf survive (the partial certificate's row statistics: sums of squares) may read it `unchecked` and `vouch`
    for it when the result is finite, instead of the separate pass of the check; where the result is not finite
    it reads the key through the guard, which then refuses it (or gives the zeroed copy) as always."""

    def __init__(self, get: TensorGetter, model: Model, allow: bool) -> None:
        self.get, self.model, self.allow = get, model, allow
        self.finite: set[str] = set()

    def __call__(self, key: str) -> torch.Tensor:
        t = self.get(key)
        if key in self.finite or all_finite(t):
            self.finite.add(key)
            return t
        if not self.allow:
            raise self.model.error_at(key)
        return torch.nan_to_num(t.float(), nan=0.0, posinf=0.0, neginf=0.0)

    def unchecked(self, key: str) -> torch.Tensor:
        """The stored value, not checked: the caller checks it and vouches for it, or reads it through the guard."""
        return self.get(key)

    def vouch(self, key: str) -> None:
        """`key`, read `unchecked`, was found finite by the caller's own pass over it."""
        self.finite.add(key)


class OutputGuard:
    """Checks each produced output tensor; see the module docstring."""

    def __init__(self, sources: Sequence[Model], allow: bool, precision: str) -> None:
        self.sources, self.allow, self.precision = sources, allow, precision

    def __call__(self, key: str, t: torch.Tensor, readers: Sequence[Model] | None = None,
                 read_as: str | None = None) -> torch.Tensor:
        """`t` if it is finite, or if its NaN/Inf come from an input and are allowed. `readers` are the models the
        value was made from (default: every source), which hold it under `read_as` (default: `key`)."""
        if all_finite(t):
            return t
        readers = self.sources if readers is None else readers
        src = key if read_as is None else read_as
        bad = [m for m in readers if src in m.keys and not all_finite(m.get(src))]
        if bad and not self.allow:
            raise bad[0].error_at(src)
        if bad:
            return t
        wider = "precision fp32 or bf16" if self.precision == "fp16" else ""
        if len(readers) == 1:  # copied or baked in: nothing was blended, only the cast can have overflowed
            m = readers[0]
            raise NonFiniteWeightsError(
                f"{key} of {m.title or f'model {m.label} ({m.name})'} is too large for {self.precision}"
                + (f"; use {wider}." if wider else "."))
        raise NonFiniteWeightsError(
            f"The merged value of {key} overflows (it is too large for {self.precision}) although the inputs "
            f"are finite; use a smaller alpha{', or ' + wider if wider else ''}.")
