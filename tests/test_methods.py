"""The same-base methods of the registry (methods.py): their identities, by hand and through merge_checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lib_rebasin.cli import main as cli_main
from lib_rebasin.errors import RebasinError
from lib_rebasin.io.checkpoint import Checkpoint, memory_checkpoint, open_checkpoint
from lib_rebasin.merge.run import merge_in_memory
from lib_rebasin.methods import (
    METHODS,
    add_difference,
    dare,
    dare_drop,
    dare_ties,
    key_generator,
    ties,
    train_difference,
    trim_top,
)
from lib_rebasin.options import MergeOptions
from lib_rebasin.sd1.config import TINY

FP32 = {"precision": "fp32"}
UNET_KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


def _load(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck.get(k).clone() for k in ck}


def _triple(seed: int = 0, n: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, generator=g)
    return c + 0.1 * torch.randn(n, generator=g), c + 0.1 * torch.randn(n, generator=g), c


def test_ties_full_density_without_sign_conflicts_is_task_arithmetic() -> None:
    g = torch.Generator().manual_seed(3)
    c = torch.randn(2000, generator=g)
    sign = torch.where(torch.rand(2000, generator=g) < 0.5, -1.0, 1.0)
    tau_a = sign * (0.01 + torch.rand(2000, generator=g))
    tau_b = sign * (0.01 + torch.rand(2000, generator=g))  # same sign everywhere, never zero
    a, b = c + tau_a, c + tau_b
    for alpha, scale in ((0.5, 1.0), (0.3, 0.7), (0.8, 1.5)):
        out = ties(a, b, c, alpha, {"ties_density": 1.0, "ties_scale": scale}, key_generator(0, "k"))
        expected = c + scale * ((1 - alpha) * (a - c) + alpha * (b - c))
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_ties_trims_elects_and_averages_by_hand() -> None:
    c = torch.zeros(6)
    a = torch.tensor([0.9, -0.2, 0.5, 0.05, -0.6, 0.3])
    b = torch.tensor([0.3, 0.8, -0.1, -0.4, -0.2, 0.0])
    # density 0.5 keeps the 3 largest magnitudes of each task vector
    assert torch.equal(trim_top(a, 0.5), torch.tensor([0.9, 0.0, 0.5, 0.0, -0.6, 0.0]))
    assert torch.equal(trim_top(b, 0.5), torch.tensor([0.3, 0.8, 0.0, -0.4, 0.0, 0.0]))
    out = ties(a, b, c, 0.5, {"ties_density": 0.5, "ties_scale": 1.0}, key_generator(0, "k"))
    # entry 0: both +, mean 0.6; 1: only b; 2: only a; 3: only b; 4: only a; 5: nothing kept
    torch.testing.assert_close(out, torch.tensor([0.6, 0.8, 0.5, -0.4, -0.6, 0.0]))
    # a sign conflict: the weighted sum elects the sign, only the agreeing value survives
    out = ties(torch.tensor([1.0]), torch.tensor([-3.0]), torch.zeros(1), 0.5,
               {"ties_density": 1.0, "ties_scale": 1.0}, key_generator(0, "k"))
    assert out.item() == -3.0


def test_dare_with_p_zero_is_add_difference() -> None:
    a, b, c = _triple()
    rng = key_generator(0, "k")
    assert torch.equal(dare(a, b, c, 0.4, {"dare_p": 0.0}, rng), add_difference(a, b, c, 0.4, {}, rng))


def test_dare_drops_p_and_rescales_survivors() -> None:
    tau = torch.rand(100_000) + 0.5
    out = dare_drop(tau, 0.9, key_generator(7, "key"))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.005
    torch.testing.assert_close(out[kept], tau[kept] / 0.1)
    assert torch.equal(out, dare_drop(tau, 0.9, key_generator(7, "key")))  # same (seed, key), same mask
    assert not torch.equal(out, dare_drop(tau, 0.9, key_generator(8, "key")))
    assert not torch.equal(out, dare_drop(tau, 0.9, key_generator(7, "other")))


def test_dare_ties_with_p_zero_is_ties_at_full_density() -> None:
    a, b, c = _triple(5)
    rng = key_generator(0, "k")
    params = {"dare_p": 0.0, "ties_scale": 1.0, "ties_density": 1.0}
    assert torch.equal(dare_ties(a, b, c, 0.5, params, rng), ties(a, b, c, 0.5, params, rng))


def test_train_difference_formula_and_b_equals_c_returns_a() -> None:
    a, b, _c = _triple(9)
    rng = key_generator(0, "k")
    assert torch.equal(train_difference(a, b, b.clone(), 0.7, {}, rng), a)
    # by hand: a=0, b=1, c=0.5 -> 0 + 1.8 alpha * (1 / 1.5) * 0.5; a = b adds nothing
    out = train_difference(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0]), 0.5, {}, rng)
    torch.testing.assert_close(out, torch.tensor([1.8 * 0.5 * (1 / 1.5) * 0.5, 2.0]))


def test_registry_parameters_are_merge_options_with_the_same_defaults() -> None:
    defaults = MergeOptions()
    for m in METHODS.values():
        for p in m.params:
            assert getattr(defaults, p.name) == p.default, (m.name, p.name)
    with pytest.raises(RebasinError, match="ties_density must be in"):
        MergeOptions(method="ties", ties_density=0.0).validate()
    with pytest.raises(RebasinError, match="dare_p must be in"):
        MergeOptions(method="dare", dare_p=1.0).validate()


def _merged(a: Path, b: Path, options: MergeOptions, c: Path | Checkpoint | None = None):
    """The merge held in memory (its tensors are those `merge_checkpoints` would write) where the file itself is not
    under test, and its diagnostics."""
    ckpt, diagnostics = merge_in_memory(a, b, options, c=c)
    return {k: ckpt.get(k) for k in ckpt}, diagnostics


# -- through merge_checkpoints and the CLI ---------------------------------------------------------------------

def _base(tmp_path_factory: pytest.TempPathFactory, scale: str) -> Path:
    """The models' common base (their fine-tuning delta at zero): model C of the delta methods."""
    from model_cache import cached_checkpoint

    return cached_checkpoint(tmp_path_factory.mktemp("base") / "base.safetensors", scale, seed=0, base_seed=1,
                             delta=0.0, precision="fp32")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """C beside `tiny_models`: the formulas, seeds, files and CLI need no more than SD 1.5's keys."""
    return _base(tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def mini_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """C beside `models`, for the alignment test (the spec at work)."""
    return _base(tmp_path_factory, "mini")


def test_train_difference_with_b_equal_c_returns_a_file(tiny_models: dict[str, Path]) -> None:
    # C: B's tensors held in memory (not B's file, which the merge refuses as C: B - C would be zero by mistake)
    c = memory_checkpoint(_load(tiny_models["finetune"]), name="c")
    m, _ = _merged(tiny_models["a"], tiny_models["finetune"],
                   MergeOptions(method="train_difference", alpha=1.0, **FP32), c=c)
    a = _load(tiny_models["a"])
    assert all(torch.equal(a[k], m[k]) for k in a)


def test_every_method_runs_by_name_with_params(tiny_models: dict[str, Path], base: Path) -> None:
    a, b, c = _load(tiny_models["a"]), _load(tiny_models["finetune"]), _load(base)
    params = {"ties_density": 0.3, "ties_scale": 0.9, "dare_p": 0.5}
    for name, info in METHODS.items():
        if info.fn is None or name == "rebasin":
            continue
        opts = MergeOptions(method=name, alpha=0.4, seed=3, **{k: v for k, v in params.items()
                                                                  if any(p.name == k for p in info.params)}, **FP32)
        out, _ = _merged(tiny_models["a"], tiny_models["finetune"], opts, c=base if info.needs_c else None)
        expected = info.fn(a[UNET_KEY], b[UNET_KEY], c[UNET_KEY] if info.needs_c else None, 0.4,
                           opts.method_params(), key_generator(3, UNET_KEY))
        torch.testing.assert_close(out[UNET_KEY], expected, rtol=0, atol=2e-6, msg=name)


def test_dare_same_seed_same_bytes_other_seed_differs(tiny_models: dict[str, Path], base: Path) -> None:
    """Held in memory (the tensors and metadata the file would hold, compared as its sha256 would)."""
    from same_bytes import same_bytes

    def run(seed: int) -> Checkpoint:
        return merge_in_memory(tiny_models["a"], tiny_models["finetune"],
                               MergeOptions(method="dare", alpha=0.5, dare_p=0.5, seed=seed, **FP32), c=base)[0]

    first, again = run(0), run(0)
    assert same_bytes(first, again)
    # not only the recorded seed: the drop masks, hence the weights, differ
    assert not torch.equal(first.get(UNET_KEY), run(1).get(UNET_KEY))


def test_dare_at_p_zero_equals_add_difference_file(tiny_models: dict[str, Path], base: Path) -> None:
    ad, _ = _merged(tiny_models["a"], tiny_models["finetune"], MergeOptions(method="add_difference", alpha=0.6, **FP32),
                    c=base)
    dr, _ = _merged(tiny_models["a"], tiny_models["finetune"], MergeOptions(method="dare", alpha=0.6, dare_p=0.0,
                                                                            **FP32), c=base)
    for k in ad:
        torch.testing.assert_close(dr[k], ad[k], rtol=0, atol=1e-6)


def test_alignment_permutes_b_and_c_together(models: dict[str, Path], mini_base: Path, tmp_path: Path) -> None:
    """B and C shuffled by one permutation: aligned TIES / add difference equals the unshuffled merge."""
    from model_cache import cached_permuted_checkpoint

    # `models["finetune"]` and `mini_base` (conftest.py, _base) with every group shuffled by random_perms(seed 5)
    sb = cached_permuted_checkpoint(tmp_path / "sb.safetensors", "sd1", "mini", seed=12, base_seed=1,
                                    precision="fp32", perm_seed=5)
    sc = cached_permuted_checkpoint(tmp_path / "sc.safetensors", "sd1", "mini", seed=0, base_seed=1, delta=0.0,
                                    precision="fp32", perm_seed=5)
    for method in ("add_difference", "ties"):
        ref, _ = _merged(models["a"], models["finetune"], MergeOptions(method=method, alpha=0.5, **FP32), c=mini_base)
        out, diagnostics = _merged(models["a"], sb, MergeOptions(method=method, alpha=0.5, align=True, **FP32), c=sc)
        assert diagnostics.matched and diagnostics.aligned
        for k in ref:
            torch.testing.assert_close(out[k], ref[k], rtol=0, atol=1e-5, msg=f"{method} {k}")


def test_cli_runs_a_method_with_c_and_params(tiny_models_without_vae: dict[str, Path], base: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    from model_cache import cached_without_parts

    # the CLI's method, C and parameters, checked on a UNet key: A, B and C without their VAE (half the bytes)
    tiny_models = tiny_models_without_vae
    base = cached_without_parts(tmp_path / "base.safetensors", base, ("vae",))
    out = tmp_path / "cli_ties.safetensors"
    assert cli_main(["merge", str(tiny_models["a"]), str(tiny_models["finetune"]), str(base), "--method", "ties",
                     "--ties-density", "0.5", "--ties-scale", "0.8", "--precision", "fp32", "-o", str(out),
                     "-q"]) == 0
    a, b, c = _load(tiny_models["a"]), _load(tiny_models["finetune"]), _load(base)
    expected = ties(a[UNET_KEY], b[UNET_KEY], c[UNET_KEY], 0.5, {"ties_density": 0.5, "ties_scale": 0.8},
                    key_generator(0, UNET_KEY))
    torch.testing.assert_close(_load(out)[UNET_KEY], expected, rtol=0, atol=2e-6)
    assert "TIES" in capsys.readouterr().out
    # a method that needs C, without C: one line, no file
    missing = tmp_path / "missing.safetensors"
    assert cli_main(["merge", str(tiny_models["a"]), str(tiny_models["finetune"]), "--method", "dare", "-o",
                     str(missing), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: DARE needs a model C." and not missing.exists()
    assert cli_main(["merge", str(tiny_models["a"]), str(tiny_models["finetune"]), str(base), "--method", "ties",
                     "--ties-density", "2", "-o", str(missing), "-q"]) == 2
    assert "ties_density must be in (0, 1]" in capsys.readouterr().err and not missing.exists()


# -- baking a VAE ----------------------------------------------------------------------------------------------

def test_bake_vae_from_a_vae_file_or_a_checkpoint(tiny_models: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    import json

    from model_cache import cached_state_dict

    donor = _load(tiny_models["independent"])
    vae_file = cached_state_dict(tmp_path / "donor.vae.safetensors",
                                 {k[len("first_stage_model."):]: v for k, v in donor.items()
                                  if k.startswith("first_stage_model.")}, {})
    a, b = _load(tiny_models["a"]), _load(tiny_models["finetune"])
    for source in (vae_file, tiny_models["independent"]):
        # fp16 output (the precision is not under test): every baked value is the donor's cast to fp16
        out = tmp_path / f"baked_{source.stem}.safetensors"
        assert cli_main(["merge", str(tiny_models["a"]), str(tiny_models["finetune"]), "--method", "weighted_sum",
                         "--bake-vae", str(source), "-o", str(out), "-q"]) == 0
        m = _load(out)
        vae = [k for k in m if k.startswith("first_stage_model.")]
        assert vae and all(torch.equal(m[k], donor[k].to(torch.float16)) for k in vae)
        torch.testing.assert_close(m[UNET_KEY], (0.5 * a[UNET_KEY] + 0.5 * b[UNET_KEY]).to(torch.float16))
        with open_checkpoint(out) as ck:
            meta = ck.metadata
        assert json.loads(meta["sd_merge_recipe"])["bake_in_vae"] == source.name
        assert json.loads(meta["lib_rebasin"])["recipe"]["bake_vae"]["file"] == source.name
        assert f"VAE baked in from {source.name}" in capsys.readouterr().out
    # a file without the SD 1.x VAE: refused in one line before any work, no output
    unet_only = cached_state_dict(tmp_path / "unet_only.safetensors",
                                  {k: v for k, v in donor.items() if k.startswith("model.diffusion_model.")}, {})
    bad = tmp_path / "bad.safetensors"
    assert cli_main(["merge", str(tiny_models["a"]), str(tiny_models["finetune"]), "--bake-vae", str(unet_only),
                     "-o", str(bad), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unet_only.safetensors is not an SD 1.x VAE" in err and not bad.exists()


def test_inpainting_a_with_a_delta_method_keeps_its_extra_channels(tiny_models: dict[str, Path], base: Path,
                                                                   tmp_path: Path) -> None:
    from dataclasses import replace

    from model_cache import cached_checkpoint

    inp = cached_checkpoint(tmp_path / "inp.safetensors", replace(TINY, unet_in_channels=9), seed=11, base_seed=1,
                            precision="fp32")
    out, _ = _merged(inp, tiny_models["finetune"], MergeOptions(method="train_difference", alpha=0.5, **FP32), c=base)
    a, b, c = _load(inp), _load(tiny_models["finetune"]), _load(base)
    k = "model.diffusion_model.input_blocks.0.0.weight"
    assert out[k].shape[1] == 9 and torch.equal(out[k][:, 4:], a[k][:, 4:])
    torch.testing.assert_close(out[k][:, :4], train_difference(a[k][:, :4], b[k], c[k], 0.5, {},
                                                               key_generator(0, k)))
