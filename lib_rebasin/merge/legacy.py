"""Legacy mode, "DunkMash tool compatible": what T0b1maru/re-basin_merger (f434b1c) really computes, in one pass.

That tool (used for DunkMash's "500 iteration re-basin merges, all layers") runs, with its defaults (fast mode,
which cannot be switched off; fix-clip on in its GUI; fp32 on CPU), N iterations of

    theta = (1 - a_x) * theta + a_x * B              over every key of B     (theta starts as A, in fp32)
    theta = P1(theta)     P1: assignment (LAP) of theta's channels onto A's, mean gain y
    theta3 = P2(theta)    P2: assignment of theta's channels onto B's, mean gain z
    theta = (1 - w) * theta + w * theta3             over every key,  w = sigmoid(y) / (sigmoid(y) + sigmoid(z))

with a_0 = alpha/N and a_x = 1 - (1 - (x+1)alpha/N) / (1 - x alpha/N), so that the weights telescope to B = alpha.
Its permutations only ever touch three permutation groups, each the affine pair of one final GroupNorm
(`SPECIAL_GROUPS`); every other group stays the identity, so P1 and P2 are exact copies for all other keys and
the second blend mixes a tensor with itself. Hence, computed here analytically:

- every key present in both models, except the six special ones, is ONE weighted sum `(1 - alpha) A + alpha B`
  (the tool's own result differs from it only by fp32 rounding accumulated over its 2N blends: ~100 ulp of
  max(|A|, |B|) after 500 iterations, i.e. ~1e-5 relative);
- the six special 1-D tensors are iterated like the tool (same fp32 blends, same cost matrices, same scipy LAP):
  N * 2 * 3 small assignment problems, nothing model-sized. The three groups are coupled through the shared
  weight w (y and z are mean gains over the groups that moved), so all six are always computed together.
  The tool measures the gains with fp32 BLAS dot products whose rounding depends on the thread count, and the
  iteration amplifies that: the tool's own results differ between 1 and 2 threads (`tool_thread_variation` in
  tests/data, whose README says how it was measured). We sum the gains exactly instead (deterministic on every
  machine, and as close to the tool as the tool is to itself); `tool_dot=True` repeats the tool's dot products,
  bit-identical to it on the same machine and thread count (checked up to 500 iterations).

Cost: the N * 6 assignment problems (n = 320, 512, 128) are the tool's own and dominate, as they do inside the
tool. They cannot be handed to a faster or warm-started solver: the tool's fp32 cost matrices are rank 2 and often
have exactly tied optima (how often, on a full-size pair: benchmarks/results.md, "Legacy"), and which of the tied
permutations scipy returns steers every later iteration. So each one is scipy's on the tool's exact matrix; the
three groups of an iteration are independent and run on parallel threads (scipy releases the GIL).

Key-set rules (`legacy_action`; the output has A's keys, like every other method of this library), and where we
deliberately differ from the tool:
- `position_ids` and other non-float keys: copied from A unchanged (int64). The tool upcasts them to fp32, blends
  them and writes fp32 values a little off 0..76 (fix-clip only snaps deviations above 1e-4; 500 iterations leave
  e.g. 71.99998), which become wrong indices wherever they are cast back to integers by truncation.
- `model_ema.*` keys: copied from A. The tool drops them; they are never blended and unused for inference.
- keys only in A: copied from A. The tool copies A-only keys of a few categories (text encoder, schedule buffers,
  `embedding_manager`, `lora_te_*`) but silently drops any other A-only key (it rebuilds the dict from B's keys);
  dropping weights is never what a user wants.
- keys only in B: dropped. The tool copies B-only keys of the same categories and crashes (KeyError) on the rest.
- output dtype: the tool computes and always writes fp32; here values are fp32 and the caller casts them to the
  requested output precision.
Not reproduced: `--usefp16` (half-precision accumulation that stalls small steps), `--layers convolutional /
fully_connected` (they select keys starting with "conv"/"fc": none exist, so nothing would be re-matched), the
random visiting order of the three groups (it only changes the float64 summation order of y and z).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..align.assignment import lap
from ..arguments import check_arguments
from ..errors import IncompatibleModelsError, RebasinError
from ..io.model_input import ModelConfig, architecture_of
from ..sd1.config import SD1Config

# (weight key, bias key) of the three GroupNorms the tool re-matches: UNet `out.0` (P_bg324 in its spec),
# VAE `encoder.norm_out` (P_bg337) and `decoder.norm_out` (P_bg358).
SPECIAL_GROUPS: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.out.0.weight", "model.diffusion_model.out.0.bias"),
    ("first_stage_model.encoder.norm_out.weight", "first_stage_model.encoder.norm_out.bias"),
    ("first_stage_model.decoder.norm_out.weight", "first_stage_model.decoder.norm_out.bias"),
)
SPECIAL_KEYS: tuple[str, ...] = tuple(k for pair in SPECIAL_GROUPS for k in pair)
_POOL = ThreadPoolExecutor(max_workers=min(len(SPECIAL_GROUPS), os.cpu_count() or 1),
                           thread_name_prefix="legacy-lap")

Action = Literal["special", "weighted_sum", "copy_a", "drop"]
Getter = Callable[[str], torch.Tensor]


def check_supported(config: ModelConfig) -> None:
    """The tool this mode reproduces merges SD 1.x only: for another architecture there is nothing to be
    compatible with, so it is refused rather than run on a layout the tool never saw."""
    if not isinstance(config, SD1Config):
        raise RebasinError(f"Legacy mode reproduces an SD 1.x-only tool and is not available for "
                           f"{architecture_of(config)}; use weighted sum with matching = weights instead.")


def alpha_schedule(alpha: float, iterations: int) -> list[float]:
    """The tool's per-iteration blend weights (float64, as it computes them); B's total weight telescopes to alpha."""
    check_arguments("alpha_schedule", alpha=alpha, iterations=iterations)
    if not 0.0 <= alpha <= 1.0:
        raise RebasinError(f"Legacy mode needs alpha between 0 and 1, got {alpha}.")
    if iterations < 1:
        raise RebasinError(f"Legacy mode needs at least 1 iteration, got {iterations}.")
    step = alpha / iterations
    return [step if x == 0 else 1 - (1 - step * (x + 1)) / (1 - step * x) for x in range(iterations)]


def legacy_action(key: str, in_a: bool, in_b: bool, floating: bool = True) -> Action:
    """What legacy mode writes for `key` (`floating`: A's tensor has a float dtype); see the module docstring."""
    if not in_a:
        return "drop"
    if not in_b or not floating or "model_ema" in key or key.endswith("position_ids"):
        return "copy_a"
    return "special" if key in SPECIAL_KEYS else "weighted_sum"


def _match(ref: tuple[torch.Tensor, torch.Tensor], cur: tuple[torch.Tensor, torch.Tensor], tool_dot: bool
           ) -> tuple[torch.Tensor, float]:
    """One group's matching as the tool does it: the permutation of `cur` that best matches `ref`, and its gain.

    The cost is the sum over (weight, bias) of the outer products ref[i] * cur[j] in fp32, in that order: each entry
    is the same correctly rounded product and sum as in the tool's fp32 matmuls, so scipy sees the very same matrix
    and returns the very same permutation. (numpy, not torch: torch would spread these small ops over its threads,
    which only costs time.) The gain only feeds the blend weight. The tool measures it with fp32 BLAS dot products
    against dense 0/1 matrices, whose rounding depends on the BLAS thread count; `tool_dot` repeats that
    (bit-identical to the tool on the same machine and thread count), otherwise the gain is summed exactly
    (math.fsum), which is deterministic everywhere.
    """
    n = ref[0].numel()
    cost = np.outer(ref[0].numpy(), cur[0].numpy())
    cost += np.outer(ref[1].numpy(), cur[1].numpy())
    cols, _ = lap(cost)
    perm = torch.from_numpy(cols).long()
    if tool_dot:
        eye, flat = torch.eye(n), torch.from_numpy(cost).flatten()
        return perm, (torch.vdot(flat, eye[perm].flatten()) - torch.vdot(flat, eye.flatten())).item()
    rows = np.arange(n)
    return perm, math.fsum(cost[rows, cols].tolist()) - math.fsum(cost[rows, rows].tolist())


def _matching(ref: dict[str, torch.Tensor], cur: dict[str, torch.Tensor], tool_dot: bool
              ) -> tuple[dict[str, torch.Tensor], float]:
    """Re-match every special group of `cur` onto `ref`; returns the permuted tensors and the mean nonzero gain."""
    out: dict[str, torch.Tensor] = {}
    total, moved = 0.0, 0
    # The three groups are independent problems and scipy's solver releases the GIL: solve them side by side.
    # Each result is the same as solving it alone, so this never changes the output. Not with `tool_dot`: torch's
    # dot products would then run on threads with their own thread count, which is what decides their rounding.
    def one(wb: tuple[str, str]) -> tuple[torch.Tensor, float]:
        return _match((ref[wb[0]], ref[wb[1]]), (cur[wb[0]], cur[wb[1]]), tool_dot)

    results = list(map(one, SPECIAL_GROUPS) if tool_dot else _POOL.map(one, SPECIAL_GROUPS))
    for (w, b), (perm, gain) in zip(SPECIAL_GROUPS, results, strict=True):
        out[w], out[b] = cur[w].index_select(0, perm), cur[b].index_select(0, perm)
        if gain != 0:
            total, moved = total + abs(gain), moved + 1
    return out, (total / moved if moved else 0.0)


def legacy_special_tensors(get_a: Getter, get_b: Getter, alpha: float, iterations: int,
                           on_iteration: Callable[[int, int], None] | None = None, tool_dot: bool = False
                           ) -> dict[str, torch.Tensor]:
    """The tool's final values (fp32) of the six `SPECIAL_KEYS`, given A and B and the tool's alpha / iterations.

    `get_a` / `get_b` return a model's tensor for a key (any float dtype; it is upcast to fp32 like the tool does).
    `on_iteration(done, total)` is called after each iteration, for progress; it may raise to cancel.
    `tool_dot=True` measures the matching gains with the tool's fp32 dot products (see `_match`): bit-identical to
    the tool run on the same machine with the same torch thread count, but then the result depends on that count.
    """
    check_arguments("legacy_special_tensors", get_a=get_a, get_b=get_b, on_iteration=on_iteration, tool_dot=tool_dot)
    schedule = alpha_schedule(alpha, iterations)
    try:
        a = {k: get_a(k).detach().to("cpu", torch.float32) for k in SPECIAL_KEYS}
        b = {k: get_b(k).detach().to("cpu", torch.float32) for k in SPECIAL_KEYS}
    except KeyError as e:
        raise IncompatibleModelsError(f"Legacy mode needs the final UNet and VAE GroupNorms in both models; "
                                      f"missing {e}.") from None
    for k in SPECIAL_KEYS:
        if a[k].shape != b[k].shape or a[k].dim() != 1:
            raise IncompatibleModelsError(f"{k} has shapes {tuple(a[k].shape)} and {tuple(b[k].shape)}; legacy mode "
                                          f"needs equal 1-D tensors.")
    theta = dict(a)
    for x, ax in enumerate(schedule):
        theta = {k: (1 - ax) * theta[k] + ax * b[k] for k in SPECIAL_KEYS}
        theta, y = _matching(a, theta, tool_dot)
        theta3, z = _matching(b, theta, tool_dot)
        # The tool's weight: sigmoid of both mean gains, L1-normalised, first entry (in fp32).
        w = F.normalize(torch.sigmoid(torch.tensor([y, z], dtype=torch.float32)), p=1, dim=0).tolist()[0]
        theta = {k: (1 - w) * theta[k] + w * theta3[k] for k in SPECIAL_KEYS}
        if on_iteration is not None:
            on_iteration(x + 1, iterations)
    return theta


def legacy_weighted_sum(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """The value legacy mode gives every "weighted_sum" key: (1 - alpha) A + alpha B, in fp32 like the tool."""
    return (1 - alpha) * a.to(torch.float32) + alpha * b.to(torch.float32)
