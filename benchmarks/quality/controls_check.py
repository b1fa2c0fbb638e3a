"""What the controls must show; `--quick` exits non-zero when one fails."""

from __future__ import annotations


def failures(controls: dict) -> list[str]:
    out = []
    pp, sb = controls["planted_permutation"], controls["same_base_identity"]
    if abs(pp["loss_b"] - pp["loss_a"]) > 1e-4 * max(pp["loss_a"], 1e-6):
        out.append(f"the planted permutation changed the model's function (loss {pp['loss_a']} -> {pp['loss_b']})")
    if pp["rebasin_merge_max_abs_diff_from_a"] != 0.0 or pp["rebasin_barrier"] > 1e-5:
        out.append(f"re-basin did not recover the planted permutation (barrier {pp['rebasin_barrier']:.2e}, "
                   f"merge differs from A by {pp['rebasin_merge_max_abs_diff_from_a']:.2e})")
    if pp["activation_matching_max_abs_diff_from_a"] != 0.0:
        out.append("activation matching did not recover the planted permutation (merge differs from A by "
                   f"{pp['activation_matching_max_abs_diff_from_a']:.2e})")
    if not pp["weighted_sum_barrier"] > 0:
        out.append("the weighted sum of a model and its permutation showed no barrier: the control is vacuous")
    if not sb["bit_identical"]:
        out.append(f"same-base re-basin differs from the weighted sum in {sb['keys_differing']} tensors "
                   f"({sb['units_moved']} units moved)")
    return out
