"""lib_rebasin.align.repair: REPAIR's per-channel correction and its folding into a layer, on real torch layers."""

from __future__ import annotations

import pytest
import torch

from lib_rebasin.align import repair


def _stats(x: torch.Tensor, batches: int = 1) -> repair.Stats:
    st = repair.Stats(x.shape[1])
    for chunk in x.chunk(batches):
        st.update(chunk)
    return st


def test_stats_accumulate_batches_like_one_pass() -> None:
    x = torch.randn(1000, 7) * torch.linspace(0.1, 3, 7) + torch.arange(7.0)
    one, many = _stats(x), _stats(x, batches=9)
    torch.testing.assert_close(many.mean, x.double().mean(0))
    torch.testing.assert_close(many.std, x.double().std(0, unbiased=False))
    torch.testing.assert_close(one.std, many.std)


def test_correction_gives_the_interpolated_mean_and_std() -> None:
    g = torch.Generator().manual_seed(0)
    ya = torch.randn(5000, 6, generator=g) * 2.0 + 1.0
    yb = torch.randn(5000, 6, generator=g) * 4.0 - 3.0
    ym = torch.randn(5000, 6, generator=g) * 0.5 + 0.2     # a collapsed merge
    sa, sb, sm = _stats(ya), _stats(yb), _stats(ym)
    scale, shift = repair.correction(sa, sb, sm, 0.25)
    fixed = _stats(ym.double() * scale + shift)
    torch.testing.assert_close(fixed.mean, 0.75 * sa.mean + 0.25 * sb.mean)
    torch.testing.assert_close(fixed.std, 0.75 * sa.std + 0.25 * sb.std, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [torch.nn.Conv2d(5, 4, 3, padding=1), torch.nn.Linear(5, 4)])
def test_fold_applies_the_correction_to_the_layer_output(layer: torch.nn.Module) -> None:
    x = torch.randn(8, 5, 6, 6) if isinstance(layer, torch.nn.Conv2d) else torch.randn(8, 3, 5)
    scale, shift = torch.tensor([0.5, 2.0, 1.0, 3.0]), torch.tensor([0.1, -1.0, 0.0, 2.0])
    ch = [1, -1, 1, 1] if isinstance(layer, torch.nn.Conv2d) else [1, 1, -1]
    with torch.no_grad():
        want = layer(x) * scale.view(ch) + shift.view(ch)
        w, b = repair.fold(layer.weight, layer.bias, scale, shift)
        layer.weight.copy_(w)
        layer.bias.copy_(b)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_mismatched_statistics_are_refused_with_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(samples, 4\)"):
        repair.Stats(4).update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="channel count"):
        repair.correction(_stats(torch.randn(9, 3)), _stats(torch.randn(9, 3)), _stats(torch.randn(9, 4)), 0.5)
    with pytest.raises(ValueError, match="saw no activations"):
        repair.Stats(2).mean
    with pytest.raises(ValueError, match="cannot fold"):
        repair.fold(torch.zeros(4, 5), torch.zeros(4), torch.ones(3), torch.zeros(3))
