"""Legacy mode, "DunkMash tool compatible": what T0b1maru/re-basin_merger (f434b1c) really computes, in one pass.

That tool (used for DunkMash's "500 iteration re-basin merges, all layers") runs, with its defaults (fast mode,
which cannot be switched off; fix-clip on in its GUI; fp32 on CPU), N iterations of

    theta = (1 - a_x) * theta + a_x * B              over every key of B     (theta starts as A, in fp32)
    theta = P1(theta)     P1 = sort-matching of theta onto A, gain y
    theta3 = P2(theta)    P2 = sort-matching of theta onto B, gain z
    theta = (1 - w) * theta + w * theta3             over every key,  w = sigmoid(y) / (sigmoid(y) + sigmoid(z))

with a_0 = alpha/N and a_x = 1 - (1 - (x+1)alpha/N) / (1 - x alpha/N), so that the weights telescope to B = alpha.
Its permutations only ever touch three permutation groups, each the affine pair of one final GroupNorm
(`SPECIAL_GROUPS`); every other group stays the identity, so P1 and P2 are exact copies for all other keys and
the second blend mixes a tensor with itself. Hence, computed here analytically:

- every key present in both models, except the six special ones, is ONE weighted sum `(1 - alpha) A + alpha B`
  (the tool's own result differs from it only by fp32 rounding accumulated over its 2N blends: a few ulp);
- the six special 1-D tensors are iterated exactly like the tool (same fp32 operations, same scipy LAP), which
  costs nothing model-sized: N * 2 * 3 small assignment problems. The three groups are coupled through the
  shared weight w (y and z are mean gains over the groups that moved), so all six are always computed together.

Key-set rules (`legacy_action`), and where we deliberately differ from the tool:
- `model_ema.*` keys: dropped, as the tool does (they are not used for inference).
- `position_ids`: copied from A unchanged (int64). The tool upcasts them to fp32, blends them and relies on its
  fix-clip pass to snap them back to 0..76, then saves them as fp32; the values are the same, the dtype is not.
- keys only in A: copied from A. The tool copies A-only keys of a few categories (text encoder, schedule buffers,
  `embedding_manager`, `lora_te_*`) but silently drops any other A-only key (it rebuilds the dict from B's keys);
  dropping weights is never what a user wants.
- keys only in B: copied from B. The tool does so for the same categories and crashes (KeyError) on the rest.
- output dtype: the tool computes and always writes fp32; here values are fp32 and the caller casts them to the
  requested output precision.
Not reproduced: `--usefp16` (half-precision accumulation that stalls small steps), `--layers convolutional /
fully_connected` (they select keys starting with "conv"/"fc": none exist, so nothing would be re-matched), the
random visiting order of the three groups (it only changes the summation order of y and z in float64).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .errors import IncompatibleModelsError, RebasinError

# (weight key, bias key) of the three GroupNorms the tool re-matches: UNet `out.0` (P_bg324 in its spec),
# VAE `encoder.norm_out` (P_bg337) and `decoder.norm_out` (P_bg358).
SPECIAL_GROUPS: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.out.0.weight", "model.diffusion_model.out.0.bias"),
    ("first_stage_model.encoder.norm_out.weight", "first_stage_model.encoder.norm_out.bias"),
    ("first_stage_model.decoder.norm_out.weight", "first_stage_model.decoder.norm_out.bias"),
)
SPECIAL_KEYS: tuple[str, ...] = tuple(k for pair in SPECIAL_GROUPS for k in pair)

Action = Literal["special", "weighted_sum", "copy_a", "copy_b", "drop"]
Getter = Callable[[str], torch.Tensor]


def alpha_schedule(alpha: float, iterations: int) -> list[float]:
    """The tool's per-iteration blend weights (float64, as it computes them); B's total weight telescopes to alpha."""
    if not 0.0 <= alpha <= 1.0:
        raise RebasinError(f"Legacy mode needs alpha between 0 and 1, got {alpha}.")
    if iterations < 1:
        raise RebasinError(f"Legacy mode needs at least 1 iteration, got {iterations}.")
    step = alpha / iterations
    return [step if x == 0 else 1 - (1 - step * (x + 1)) / (1 - step * x) for x in range(iterations)]


def legacy_action(key: str, in_a: bool, in_b: bool) -> Action:
    """What legacy mode writes for `key`: see the module docstring for why each rule is what it is."""
    if "model_ema" in key:
        return "drop"
    if in_a and in_b:
        if key.endswith("position_ids"):
            return "copy_a"
        return "special" if key in SPECIAL_KEYS else "weighted_sum"
    return "copy_a" if in_a else "copy_b"


def _match(ref: tuple[torch.Tensor, torch.Tensor], cur: tuple[torch.Tensor, torch.Tensor]
           ) -> tuple[torch.Tensor, float]:
    """One group's matching as the tool does it: the permutation of `cur` that best matches `ref`, and its gain.

    The cost is sum over (weight, bias) of the outer product ref[i] * cur[j], built in fp32 in that order, so the LAP
    sees the very same matrix. The gain is measured like the tool (fp32 dot products with dense 0/1 matrices),
    because it feeds the blend weight and a different summation order would change its last bits.
    """
    n = ref[0].numel()
    cost = torch.zeros(n, n)
    for r, c in zip(ref, cur):
        cost += r.reshape(n, 1) @ c.reshape(1, n)
    _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    perm = torch.from_numpy(cols).long()
    eye = torch.eye(n)
    flat = cost.flatten()
    gain = torch.vdot(flat, eye[perm].flatten()) - torch.vdot(flat, eye.flatten())
    return perm, gain.item()


def _matching(ref: dict[str, torch.Tensor], cur: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """Re-match every special group of `cur` onto `ref`; returns the permuted tensors and the mean nonzero gain."""
    out: dict[str, torch.Tensor] = {}
    total, moved = 0.0, 0
    for w, b in SPECIAL_GROUPS:
        perm, gain = _match((ref[w], ref[b]), (cur[w], cur[b]))
        out[w], out[b] = cur[w].index_select(0, perm), cur[b].index_select(0, perm)
        if gain != 0:
            total, moved = total + abs(gain), moved + 1
    return out, (total / moved if moved else 0.0)


def legacy_special_tensors(get_a: Getter, get_b: Getter, alpha: float, iterations: int,
                           on_iteration: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """The tool's final values (fp32) of the six `SPECIAL_KEYS`, given A and B and the tool's alpha / iterations.

    `get_a` / `get_b` return a model's tensor for a key (any float dtype; it is upcast to fp32 like the tool does).
    `on_iteration(done, total)` is called after each iteration, for progress; it may raise to cancel.
    """
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
        theta, y = _matching(a, theta)
        theta3, z = _matching(b, theta)
        # The tool's weight: sigmoid of both mean gains, L1-normalised, first entry (in fp32).
        w = F.normalize(torch.sigmoid(torch.tensor([y, z], dtype=torch.float32)), p=1, dim=0).tolist()[0]
        theta = {k: (1 - w) * theta[k] + w * theta3[k] for k in SPECIAL_KEYS}
        if on_iteration is not None:
            on_iteration(x + 1, iterations)
    return theta


def legacy_weighted_sum(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """The value legacy mode gives every "weighted_sum" key: (1 - alpha) A + alpha B, in fp32 like the tool."""
    return (1 - alpha) * a.to(torch.float32) + alpha * b.to(torch.float32)
