"""Parity of a merge run on the device with the same merge run on the CPU: the tensors, the objective weight
matching reached, and the metadata apart from the device and the counts of work done.

Two CPU runs must be bit-identical (the merge is deterministic). Against the CPU, a GPU's fp32 sums run in another
order and may fuse multiply-adds, so the tolerances are:

- A tensor agrees when max|device - cpu| <= TENSOR_TOL * max|cpu|: two fp16 steps at the tensor's largest value
  (fp32 results a few ulps apart can round to neighbouring fp16 values). The methods that threshold or vote per
  element (TIES' trim and sign election, DARE / DELLA's rescaling) may resolve an element that sits exactly at its
  threshold either way: up to ELEMENT_SHARE of a tensor's elements may then exceed the bound.
- Where the tensors of an aligned merge do not agree, the permutations differ; the run still agrees when the
  objective weight matching reached, <A, pi(B)> summed over the parts, is within OBJECTIVE_RTOL of the CPU's:
  near-tied assignments resolved differently, each optimal to within rounding.
- Metadata: equal, except `device`, the counts of certified and solved groups (the bf16 screen runs on GPUs and
  not on every CPU: it changes how a group is certified, never the result), and floats, which agree within
  OBJECTIVE_RTOL.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TENSOR_TOL = 2.0**-9
ELEMENT_SHARE = 1e-5
OBJECTIVE_RTOL = 1e-5
IGNORED = {"device"}
WORK_COUNTS = {"solves", "certified"}
PER_ELEMENT_METHODS = {"ties", "dare", "dare_ties", "della", "geometric_median", "train_difference"}


@dataclass
class Parity:
    status: str                  # "bit-identical" | "within tolerance" | "same objective" | "FAIL" | "-"
    detail: str = ""
    metadata: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def _decoded(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def metadata_differences(dev: dict[str, str], ref: dict[str, str], exact: bool, prefix: str = "") -> list[str]:
    """Where two outputs' metadata differ beyond what the device may change."""
    out: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        name = where.rsplit(".", 1)[-1]
        if name in IGNORED or (not exact and name in WORK_COUNTS):
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if k not in a or k not in b:
                    out.append(f"{where}.{k}: only in {'the device run' if k in a else 'the CPU run'}")
                else:
                    walk(a[k], b[k], f"{where}.{k}" if where else k)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{where}[{i}]")
        elif isinstance(a, float) and isinstance(b, float) and not exact:
            if not math.isclose(a, b, rel_tol=OBJECTIVE_RTOL, abs_tol=1e-12):
                out.append(f"{where}: {a} vs {b}")
        elif a != b:
            out.append(f"{where}: {str(a)[:60]} vs {str(b)[:60]}")

    walk({k: _decoded(v) for k, v in dev.items()}, {k: _decoded(v) for k, v in ref.items()}, prefix)
    return out


def _objective(meta: dict[str, str]) -> float | None:
    """<A, pi(B)> summed over the parts, from the stored diagnostics (None: the merge did not align)."""
    try:
        objective = json.loads(meta["lib_rebasin"])["diagnostics"]["objective"]
    except (KeyError, ValueError, TypeError):
        return None
    return sum(o[1] for o in objective.values()) if objective else None


def _method(meta: dict[str, str]) -> str:
    try:
        return str(json.loads(meta["lib_rebasin"])["recipe"]["method"])
    except (KeyError, ValueError, TypeError):
        return ""


def compare_tensors(dev: Path, ref: Path, per_element: bool) -> tuple[bool, str]:
    from safetensors import safe_open

    worst, worst_key, over, tensors = 0.0, "", 0, 0
    with safe_open(str(dev), "pt") as fd, safe_open(str(ref), "pt") as fr:
        kd, kr = set(fd.keys()), set(fr.keys())
        if kd != kr:
            return False, f"keys differ: {len(kd - kr)} only on the device, {len(kr - kd)} only on the CPU"
        ok = True
        for key in sorted(kr):
            a, b = fd.get_tensor(key), fr.get_tensor(key)
            if a.shape != b.shape or a.dtype != b.dtype:
                return False, f"{key}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
            tensors += 1
            if not a.dtype.is_floating_point:
                if not torch.equal(a, b):
                    return False, f"{key}: integer tensor differs"
                continue
            a, b = a.float(), b.float()
            scale = float(b.abs().max()) if b.numel() else 0.0
            d = (a - b).abs()
            rel = float(d.max()) / scale if scale > 0 else float(d.max()) if d.numel() else 0.0
            n_over = int((d > TENSOR_TOL * scale).sum())
            over += n_over
            if rel > worst:
                worst, worst_key = rel, key
            if n_over and (not per_element or n_over > ELEMENT_SHARE * b.numel()):
                ok = False
    detail = f"{tensors} tensors, worst max|d|/max|cpu| {worst:.2e}" + (f" ({worst_key})" if worst else "")
    if over:
        detail += f", {over} elements over {TENSOR_TOL:.1e}"
    return ok, detail


def compare(dev: Path, ref: Path, exact: bool) -> Parity:
    """Parity of one output file of the device run with the CPU run's."""
    if not dev.exists() or not ref.exists():
        return Parity("FAIL", f"missing output: {dev if not dev.exists() else ref}")
    md, mr = _metadata(dev), _metadata(ref)
    if exact:
        if _sha256(dev) == _sha256(ref):
            return Parity("bit-identical", "same file bytes")
        ok, detail = compare_tensors(dev, ref, per_element=False)
        return Parity("FAIL", f"two CPU runs differ: {detail}", metadata_differences(md, mr, True))
    meta = metadata_differences(md, mr, False)
    ok, detail = compare_tensors(dev, ref, per_element=_method(mr) in PER_ELEMENT_METHODS)
    if ok:
        return Parity("within tolerance" if not meta else "FAIL", detail, meta)
    od, orf = _objective(md), _objective(mr)
    if od is not None and orf is not None and math.isclose(od, orf, rel_tol=OBJECTIVE_RTOL):
        return Parity("same objective", f"permutations differ, objective {od:.9g} vs {orf:.9g}; {detail}",
                      [m for m in meta if ".moved" not in m and "top_groups" not in m and ".objective" not in m])
    return Parity("FAIL", detail, meta)


def compare_all(dev: list[Path], ref: list[Path], exact: bool) -> Parity:
    """Parity over a run's outputs (a sweep writes several), matched by file name; the worst one is reported."""
    if [p.name for p in dev] != [p.name for p in ref] or not ref:
        return Parity("FAIL", f"outputs differ: {[p.name for p in dev]} vs {[p.name for p in ref]}")
    results = [compare(d, r, exact) for d, r in zip(dev, ref, strict=True)]
    order = ["FAIL", "same objective", "within tolerance", "bit-identical"]
    worst = min(results, key=lambda p: order.index(p.status))
    if len(results) > 1:
        worst.detail = f"{len(results)} files, worst: {worst.detail}"
    return worst
