"""Blends: lazily evaluated linear combinations of (possibly permuted) source models, key by key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..align.permute import Perms, permute_tensor
from ..align.weight_matching import TensorGetter
from ..archspec import ArchSpec
from ..arguments import check_arguments
from ..io.model_input import ModelInput
from . import diagnostics
from .diagnostics import ChunkedGram, accumulate

# Takes the next piece of a tensor's value, in order (the streamed write: `io/output_file.write_safetensors`).
Sink = Callable[[torch.Tensor], None]
# Bytes of output handed to a sink at a time: small enough to be still in the CPU's cache when written.
SINK_BYTES = 4 << 20


@dataclass
class Term:
    weight: float
    get: TensorGetter
    perms: Perms


class Blend:
    """A lazily evaluated linear combination sum_i w_i * perm_i(model_i), in fp32, key by key: zeros plus each
    weighted term in turn, per element (the same operations whichever way the elements are visited, so the same
    bits).

    On a CPU device the terms are blended a chunk (`diagnostics.OBJECTIVE_CHUNK` elements) at a time: each term's
    chunk is widened to fp32 into one cache-sized buffer and added there, instead of a whole fp32 copy per term
    written to memory and read back; given the output's dtype, each chunk is cast to it there as well, so no fp32
    copy of the whole tensor is made. Elsewhere (a GPU), and where A is wider than the other terms, whole
    tensors."""

    def __init__(self, spec: ArchSpec[Any], terms: list[Term], device: torch.device) -> None:
        self.spec, self.terms, self.device = spec, terms, device

    def __call__(self, key: str, device: torch.device | None = None, objective: list[float] | None = None,
                 chunked: bool | None = None, dtype: torch.dtype | None = None,
                 sink: Sink | None = None) -> torch.Tensor:
        """The blended fp32 value of `key`, or with `dtype` that value cast to it (the same bits as casting the
        returned fp32 tensor: each element is rounded once, whichever way they are visited). `device` overrides
        the blend's own for this key (device_budget.py's fallback). `objective` (two terms, A and pi(B)): <A,B>,
        <A,pi(B)>, |A|^2, |B|^2 of the key are added to it (`diagnostics.accumulate`), from the fp32 values the
        blend uses. `chunked`: a chunk at a time (default: on a CPU device) or whole tensors; the same bits either
        way. `sink` (with `dtype`): a value made a chunk at a time is handed to it as well, piece by piece in order
        (`SINK_BYTES` at a time), while the pieces are in the cache; a value made whole is not (the caller writes
        the returned tensor then)."""
        device = device or self.device
        if objective is not None and len(self.terms) != 2:
            raise ValueError("the objective is measured on a blend of two terms, A and pi(B)")
        stored = [t.get(key).to(device) for t in self.terms]
        # Re-indexing only: the stored values, widened below. permute_tensor returns its input when nothing moved.
        values = [permute_tensor(self.spec, key, s, t.perms) for s, t in zip(stored, self.terms, strict=True)]
        # The objective compares A with B as stored as well as with pi(B) (one of them when B is not moved).
        b = stored[1] if objective is not None and values[1] is not stored[1] else None
        weights = [t.weight for t in self.terms]
        shape = values[0].shape
        if any(v.shape != shape for v in values):
            # A wider first model (inpainting A, plain B): blend the shared window, keep A's extra channels. The
            # objective has no counterpart of A's extra channels: it adds nothing (`accumulate`).
            wide = [v.to(torch.float32) for v in values]
            common = tuple(slice(0, min(v.shape[d] for v in wide)) for d in range(len(shape)))
            out = wide[0].clone()
            out[common] = 0
            for w, v in zip(weights, wide, strict=True):
                out[common] += w * v[common]
            return out if dtype is None else out.to(dtype)
        if chunked if chunked is not None else device.type == "cpu":
            return _in_chunks(weights, values, b, objective, dtype, sink if dtype is not None else None)
        wide = [v.to(torch.float32) for v in values]
        if objective is not None:
            accumulate(objective, wide[0], wide[1] if b is None else b.to(torch.float32), wide[1])
        out = torch.zeros(shape, dtype=torch.float32, device=device)
        for w, v in zip(weights, wide, strict=True):
            out.add_(v, alpha=w)
        return out if dtype is None else out.to(dtype)


def _in_chunks(weights: list[float], values: list[torch.Tensor], b: torch.Tensor | None,
               objective: list[float] | None, dtype: torch.dtype | None, sink: Sink | None) -> torch.Tensor:
    """`Blend.__call__` a chunk at a time (same-shaped terms): each chunk of every term is widened to fp32 once
    (fp32 terms are read in place) into a cache-sized buffer, where it serves the blend and, with `objective`, the
    objective's Gram matrix (`ChunkedGram`: the chunks `accumulate` takes, so the same float64 sums). With a
    narrower `dtype` each blended chunk is summed in a cache-sized fp32 buffer and cast from there: the output is
    written once, in its own precision, instead of as fp32 that the cast then reads back."""
    srcs = [v.reshape(-1) for v in values] + ([] if b is None else [b.reshape(-1)])
    n, device = srcs[0].numel(), srcs[0].device
    cast = dtype is not None and dtype != torch.float32
    out = torch.empty(values[0].shape, dtype=dtype if cast else torch.float32, device=device)
    flat = out.view(-1)
    gram = None
    if objective is not None:
        gram = ChunkedGram(len(srcs), n, device)  # rows A, pi(B), or A, B, pi(B) below
    step = diagnostics.OBJECTIVE_CHUNK
    width = min(n, step)
    narrow = [i for i, s in enumerate(srcs) if s.dtype != torch.float32]
    # Views made once per key (thousands of chunks each): the widened terms' rows, then (casting) the fp32 sum's;
    # the chunks of every source and of the output, split in one call each.
    rows = list(torch.empty(len(narrow) + cast, width, dtype=torch.float32, device=device).unbind(0))
    terms = len(values)
    piece = max(step, SINK_BYTES // out.element_size() // step * step)  # whole chunks
    lo = done = 0
    for dst, *x in zip(flat.split(step), *(s.split(step) for s in srcs), strict=True):
        k = min(step, n - done)  # counted, not asked of the tensor (Tensor.__len__ is Python, thousands of calls)
        if k < width:  # the last chunk
            rows = [row[:k] for row in rows]
        for i, row in zip(narrow, rows, strict=False):
            x[i] = row.copy_(x[i])
        chunk = rows[-1] if cast else dst
        chunk.zero_()
        for w, v in zip(weights, x[:terms], strict=True):
            chunk.add_(v, alpha=w)
        if cast:
            dst.copy_(chunk)
        if gram is not None:
            gram.add(x if b is None else [x[0], x[2], x[1]])  # `accumulate`'s rows: A, B, pi(B)
        done += k
        if sink is not None and (done - lo >= piece or done == n):
            sink(flat[lo:done])
            lo = done
    if gram is not None and objective is not None:
        gram.add_to(objective)
    return out


def telescoping_schedule(alpha: float, steps: int) -> list[float]:
    """Per-step weights a_x with prod(1 - a_x) = 1 - alpha: after step x, B's total weight is alpha*x/steps."""
    check_arguments("telescoping_schedule", alpha=alpha, steps=steps)
    out = []
    for x in range(1, steps + 1):
        before = 1 - alpha * (x - 1) / steps
        after = 1 - alpha * x / steps
        out.append(1 - after / before if before > 0 else 1.0)
    return out



def merge_equal_terms(terms: list[Term]) -> list[Term]:
    """Fold terms that read the same source with the same permutation (fewer passes when writing)."""
    out: list[Term] = []
    for t in terms:
        for o in out:
            if o.get == t.get and o.perms.keys() == t.perms.keys() and all(
                    torch.equal(o.perms[k], t.perms[k]) for k in o.perms):
                o.weight += t.weight
                break
        else:
            out.append(Term(t.weight, t.get, dict(t.perms)))
    return out



def shared_window(get: TensorGetter, like: ModelInput) -> TensorGetter:
    """`get`, narrowed to `like`'s shapes where they differ (A's wider inpainting conv_in vs a plain B)."""
    infos = like.ckpt.infos

    def narrowed(key: str) -> torch.Tensor:
        t = get(key)
        shape = infos[key].shape if key in infos else t.shape
        if tuple(t.shape) != tuple(shape):
            t = t[tuple(slice(0, n) for n in shape)]
        return t

    return narrowed



class BlockBlend:
    """Block weights over a linear method: each key is produced by the blend built for its own alpha.

    `blend_for(alpha)` builds the linear combination for one weight of B; keys of blocks that share a weight share
    one blend (at most 26)."""

    def __init__(self, blend_for: Callable[[float], Blend], alpha_of: Callable[[str], float]) -> None:
        self.blend_for, self.alpha_of = blend_for, alpha_of
        self.blends: dict[float, Blend] = {}

    def for_key(self, key: str) -> Blend:
        alpha = self.alpha_of(key)
        if alpha not in self.blends:
            self.blends[alpha] = self.blend_for(alpha)
        return self.blends[alpha]

    def __call__(self, key: str, device: torch.device | None = None) -> torch.Tensor:
        return self.for_key(key)(key, device)


class KeyFunctionBlend:
    """A non-linear method: its per-key function (methods.py) over the fp32 A, B, C of each key, B and C permuted
    by `perms` (re-basin alignment), with the key's alpha and its own seeded generator."""

    def __init__(self, spec: ArchSpec[Any], fn: Callable[..., torch.Tensor], get_a: TensorGetter, get_b: TensorGetter,
                 get_c: TensorGetter | None, perms: Perms, alpha_of: Callable[[str], float],
                 params: dict[str, object], seed: int, device: torch.device) -> None:
        self.spec, self.fn, self.perms, self.device = spec, fn, perms, device
        self.gets = (get_a, get_b, get_c)
        self.alpha_of, self.params, self.seed = alpha_of, params, seed

    def __call__(self, key: str, device: torch.device | None = None) -> torch.Tensor:
        from ..methods import key_generator

        device = device or self.device
        vals = [None if g is None else permute_tensor(self.spec, key, g(key).to(device, torch.float32),
                                                      {} if i == 0 else self.perms)
                for i, g in enumerate(self.gets)]
        a, b, c = vals
        assert a is not None and b is not None
        rng = key_generator(self.seed, key)
        alpha = self.alpha_of(key)
        present = [v for v in vals if v is not None]
        if all(v.shape == a.shape for v in present):
            return self.fn(a, b, c, alpha, self.params, rng)
        # A wider first model (inpainting A, plain B/C): merge the shared window, keep A's extra channels.
        common = tuple(slice(0, min(v.shape[d] for v in present)) for d in range(a.dim()))
        out = a.clone()
        out[common] = self.fn(a[common], b[common], None if c is None else c[common], alpha, self.params, rng)
        return out
