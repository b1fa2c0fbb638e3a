"""Merging SDXL at the test scale SDXL_SMALL (model_cache.py): weight matching (certified same-base pairs, planted
permutations, iterations), every per-key method, `--align`, function preservation of a re-basin merge against
diffusers and transformers, the architecture in the metadata, and the refusals (a pair of two architectures, legacy
mode; activation matching and REPAIR run on SDXL: test_sdxl_forward_merge.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_cache import SDXL_SMALL

from lib_rebasin.errors import IncompatibleModelsError, RebasinError
from lib_rebasin.io.checkpoint import Checkpoint, memory_checkpoint, open_checkpoint
from lib_rebasin.merge.run import merge_checkpoints, merge_in_memory
from lib_rebasin.methods import METHODS, key_generator
from lib_rebasin.options import MergeOptions
from lib_rebasin.parts import part_of

FP32 = {"precision": "fp32"}
IDENTITY_PARAMS = {"ties_density": 1.0, "ties_scale": 1.0, "dare_p": 0.0, "della_eps": 0.0}
# One key of each part, CLIP-G's fused in_proj and the UNet's cross-attention input (both encoders' columns).
PROBES = ("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
          "model.diffusion_model.label_emb.0.0.weight",
          "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
          "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
          "first_stage_model.decoder.up.1.block.0.conv1.weight")


def _load(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck.get(k).clone() for k in ck}


def _merged(a: Path, b: Path, options: MergeOptions, c: Path | Checkpoint | None = None):
    """The merge held in memory (its tensors are those `merge_checkpoints` would write) where the file itself is not
    under test, and its diagnostics."""
    ckpt, diagnostics = merge_in_memory(a, b, options, c=c)
    return {k: ckpt.get(k) for k in ckpt}, diagnostics


def _model_keys(sd: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in sd.items() if part_of(k) != "other" and v.is_floating_point()]


@pytest.fixture(scope="module")
def xl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A, B and C fine-tunes of one base, an independent model, B and C with every group permuted by one random
    legal permutation, and an SD 1.x model."""
    from model_cache import cached_checkpoint, cached_permuted_checkpoint, cached_sdxl_checkpoint

    def cached_xl(name: str, **kwargs) -> Path:  # read-only hard links into the test model cache
        return cached_sdxl_checkpoint(d / f"{name}.safetensors", SDXL_SMALL, **kwargs)

    d = tmp_path_factory.mktemp("sdxl_merge")
    paths = {"a": cached_xl("a", seed=1, base_seed=0), "b": cached_xl("b", seed=2, base_seed=0),
             "c": cached_xl("c", seed=3, base_seed=0), "independent": cached_xl("independent", seed=7)}
    for name, seed in (("b", 2), ("c", 3)):  # one planted permutation for both
        paths[f"{name}_shuffled"] = cached_permuted_checkpoint(d / f"{name}_shuffled.safetensors", "sdxl",
                                                               SDXL_SMALL, seed=seed, base_seed=0, perm_seed=21)
    paths["sd1"] = cached_checkpoint(d / "sd1.safetensors", "tiny", seed=1)
    return paths


@pytest.fixture(scope="module")
def loaded(xl: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    """The inputs' tensors, each read once for the module (no test changes them)."""
    return {name: _load(xl[name]) for name in ("a", "b", "c", "independent")}


def _b_copy(loaded: dict[str, dict[str, torch.Tensor]]) -> Checkpoint:
    """B's tensors as another model (held in memory: a model C equal to B that is not B's file, which the merge
    refuses as C)."""
    return memory_checkpoint(dict(loaded["b"]), name="b_copy")


def test_same_base_rebasin_is_the_weighted_sum_certified(xl: dict[str, Path], loaded) -> None:
    out, d = _merged(xl["a"], xl["b"], MergeOptions(alpha=0.3, **FP32))
    ref, _ = _merged(xl["a"], xl["b"], MergeOptions(method="weighted_sum", alpha=0.3, **FP32))
    assert out.keys() == ref.keys() and all(torch.equal(out[k], ref[k]) for k in ref)
    assert d.solves == 0 and all(m == 0 for m, _ in d.moved.values()) and set(d.moved) == {"unet", "te", "vae"}
    a, b = loaded["a"], loaded["b"]
    k = PROBES[3]
    torch.testing.assert_close(out[k], 0.7 * a[k].float() + 0.3 * b[k].float())


def test_planted_permutation_is_undone_and_iterations_agree(xl: dict[str, Path], loaded) -> None:
    """B with every group shuffled merges exactly as B unshuffled: at alpha 1 the output is B, and with
    `iterations` 2 at alpha 0.5 the output equals the unshuffled pair's."""
    out, diagnostics = _merged(xl["a"], xl["b_shuffled"], MergeOptions(alpha=1.0, **FP32))
    b = loaded["b"]
    assert all(torch.equal(out[k], b[k].float()) for k in _model_keys(b))
    assert all(m / n > 0.9 for m, n in diagnostics.moved.values()), diagnostics.moved
    opts = MergeOptions(alpha=0.5, iterations=2, **FP32)
    shuffled, _ = _merged(xl["a"], xl["b_shuffled"], opts)
    plain, _ = _merged(xl["a"], xl["b"], opts)
    assert all(torch.equal(shuffled[k], plain[k]) for k in plain)


def test_independent_rebasin_at_alpha_one_computes_what_b_computes(xl: dict[str, Path], loaded) -> None:
    """Checked with diffusers' UNet2DConditionModel and transformers' CLIP text models, not with our own code."""
    from reference import rel_max_error
    from sdxl_reference import SDXLReference, make_inputs

    out, diagnostics = _merged(xl["a"], xl["independent"], MergeOptions(alpha=1.0, max_sweeps=2, **FP32))
    assert all(m > 0 for m, _ in diagnostics.moved.values()), diagnostics.moved
    b = loaded["independent"]
    assert any(not torch.equal(out[k], b[k].float()) for k in PROBES)  # B really moved
    ref_b, ref_o = SDXLReference.build(SDXL_SMALL), SDXLReference.build(SDXL_SMALL)
    ref_b.load({k: v.float() if v.is_floating_point() else v for k, v in b.items()})
    ref_o.load(out)
    x = make_inputs(SDXL_SMALL, latent_size=8, image_size=16, batch=1)
    with torch.no_grad():
        assert rel_max_error(ref_b.end_to_end(x.latent, x.t, x.ids, x.time_ids),
                             ref_o.end_to_end(x.latent, x.t, x.ids, x.time_ids)) < 1e-4
        assert rel_max_error(ref_b.decode(x.z), ref_o.decode(x.z)) < 1e-4


@pytest.mark.parametrize("method", [m for m, info in METHODS.items() if info.fn is not None and m != "rebasin"])
def test_every_per_key_method_on_sdxl(method: str, xl: dict[str, Path], loaded) -> None:
    """Each method's file merge is its formula on SDXL weights of every part, and its identity holds on every
    weight: alpha 0 gives A for the weighted sum, TIES, DARE + TIES, DELLA and the geometric median; B = C gives A
    for the difference methods."""
    info = METHODS[method]
    difference = method in ("add_difference", "train_difference", "dare")
    a, b, cc = loaded["a"], loaded["b"], loaded["b" if difference else "c"]
    # At alpha 0 the parameters that keep A whole: no trimming (TIES), no drops (DARE, DELLA).
    identity = {p.name: v for p in info.params for n, v in IDENTITY_PARAMS.items() if p.name == n}
    for alpha in (0.0, 0.4) if not difference else (0.6,):
        opts = MergeOptions(method=method, alpha=alpha, seed=3, **(identity if alpha == 0.0 else {}), **FP32)
        c = (_b_copy(loaded) if difference else xl["c"]) if info.needs_c else None
        out, _ = _merged(xl["a"], xl["b"], opts, c=c)
        keys = _model_keys(a)
        assert out.keys() == a.keys()
        for k in PROBES:
            expected = info.fn(a[k].float(), b[k].float(), cc[k].float() if info.needs_c else None, alpha,
                               opts.method_params(), key_generator(3, k))
            torch.testing.assert_close(out[k], expected, rtol=0, atol=2e-6, msg=f"{method} {k}")
        if alpha == 0.0 or difference:
            worst = max((out[k] - a[k].float()).abs().max().item() for k in keys)
            assert worst <= 2e-6, (method, worst)


def test_align_before_a_method_undoes_a_planted_permutation(xl: dict[str, Path]) -> None:
    """`--align` re-bases B onto A before the method and moves C with B: add difference of B and C shuffled by one
    permutation equals that of B and C."""
    opts = MergeOptions(method="add_difference", alpha=0.7, align=True, **FP32)
    got, _ = _merged(xl["a"], xl["b_shuffled"], opts, c=xl["c_shuffled"])
    plain, _ = _merged(xl["a"], xl["b"], MergeOptions(method="add_difference", alpha=0.7, **FP32), c=xl["c"])
    for k in plain:
        torch.testing.assert_close(got[k], plain[k], rtol=0, atol=1e-6, msg=k)


def test_metadata_names_the_architecture(xl: dict[str, Path]) -> None:
    merged, _ = merge_in_memory(xl["a"], xl["b"], MergeOptions(method="weighted_sum"))  # the file's metadata
    recipe = json.loads(merged.metadata["sd_merge_recipe"])
    own = json.loads(merged.metadata["lib_rebasin"])
    assert recipe["architecture"] == own["architecture"] == "SDXL"
    assert recipe["spec"] == own["spec"] == "sdxl-walk-1"


@pytest.mark.parametrize("options, slots, message", [
    ({}, ("a", "sd1"), r"^Model A is SDXL but model B is SD 1\.x; models of different architectures cannot "
                           r"be merged\.$"),
    ({}, ("sd1", "a"), "^Model A is SD 1.x but model B is SDXL"),
    ({"method": "legacy"}, ("a", "b"), r"^Legacy mode reproduces an SD 1\.x-only tool and is not available for "
                                        r"SDXL"),
])
def test_refusals_in_one_line_before_any_work(options: dict, slots: tuple[str, str], message: str,
                                              xl: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    with pytest.raises(RebasinError, match=message) as err:
        merge_checkpoints(xl[slots[0]], xl[slots[1]], out, MergeOptions(**options))
    assert "\n" not in str(err.value) and not any(tmp_path.iterdir())
    if slots[1] == "sd1" or slots[0] == "sd1":
        assert isinstance(err.value, IncompatibleModelsError)


def test_bake_vae_into_an_sdxl_merge(xl: dict[str, Path], loaded, tmp_path: Path) -> None:
    """The VAE of another SDXL checkpoint is baked in as is; a VAE of other shapes is refused in one line."""
    res = merge_checkpoints(xl["a"], xl["b"], tmp_path / "o.safetensors",
                            MergeOptions(method="weighted_sum", **FP32), bake_vae=xl["independent"])
    out, donor = _load(res.output), loaded["independent"]
    vae = [k for k in donor if part_of(k) == "vae"]
    assert vae and all(torch.equal(out[k], donor[k].float()) for k in vae)
    assert res.diagnostics.baked_vae == "independent.safetensors"
    with pytest.raises(RebasinError, match=r"^sd1\.safetensors is not an SDXL VAE: .* has shape"):
        merge_checkpoints(xl["a"], xl["b"], tmp_path / "p.safetensors", MergeOptions(method="weighted_sum"),
                          bake_vae=xl["sd1"])
    assert not (tmp_path / "p.safetensors").exists()
