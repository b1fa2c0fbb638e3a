"""Activation matching and REPAIR on SDXL pairs (the SDXL forward pass of `sdxl/forward.py`, proven in
test_sdxl_forward.py), end to end through the merge at the reduced MINI scale (and the CLI at SDXL_SMALL): a
planted permutation is undone exactly, an activation-matched B computes what B computes in diffusers/transformers,
a REPAIR merge has the parents' interpolated statistics, and SDXL inpainting is refused in one line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lib_rebasin.align import repair
from lib_rebasin.cli import main as cli_main
from lib_rebasin.errors import RebasinError
from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.merge.diagnostics import Diagnostics
from lib_rebasin.merge.run import merge_checkpoints, merge_in_memory
from lib_rebasin.options import MergeOptions
from lib_rebasin.sdxl.config import MINI
from lib_rebasin.sdxl.spec import build_spec

# The default four prompts: `label_emb`'s hidden units see one ADM vector per prompt (and the empty prompt's); with
# one or two prompts their correlations nearly tie (docs/sdxl.md), and a planted permutation of them is not found.
ACT = MergeOptions(matching="activations", activation_samples=4, precision="fp32")
REPAIR = MergeOptions(method="weighted_sum", repair=True, activation_samples=2, precision="fp32")


def _load(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck.get(k).clone() for k in ck}


@pytest.fixture(scope="module")
def xl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fine-tune, the same model with every group permuted by one random legal permutation, an independent
    model, and an SDXL inpainting model."""
    from model_cache import cached_permuted_checkpoint, cached_sdxl_checkpoint  # read-only hard links into the cache

    d = tmp_path_factory.mktemp("sdxl_forward_merge")
    return {"a": cached_sdxl_checkpoint(d / "a.safetensors", "mini", seed=1, base_seed=0, precision="fp32"),
            "a_shuffled": cached_permuted_checkpoint(d / "a_shuffled.safetensors", "sdxl", "mini", seed=1,
                                                     base_seed=0, precision="fp32", perm_seed=21),
            "independent": cached_sdxl_checkpoint(d / "independent.safetensors", "mini", seed=7, precision="fp32"),
            **{f"inpainting{i}": cached_sdxl_checkpoint(d / f"inpainting{i}.safetensors",
                                                        replace(MINI, unet_in_channels=9), seed=i) for i in (1, 2)}}


def _merged(a: Path, b: Path, options: MergeOptions) -> tuple[dict[str, torch.Tensor], Diagnostics]:
    """The merge held in memory (the tensors `merge_checkpoints` would write) where the file is not under test."""
    ckpt, diagnostics = merge_in_memory(a, b, options)
    return {k: ckpt.get(k) for k in ckpt}, diagnostics


def test_planted_permutation_is_undone_and_repair_leaves_it_alone(xl: dict[str, Path]) -> None:
    """B is A with every group shuffled: activation matching (UNet and both text encoders; the VAE by weights)
    finds every permutation, so at alpha 1 the merge is A bit for bit, and REPAIR, whose statistics are then
    already the target, changes no weight."""
    out, d = _merged(xl["a"], xl["a_shuffled"], replace(ACT, alpha=1.0, repair=True))
    ref = _load(xl["a"])
    wrong = [k for k in ref if not torch.equal(out[k], ref[k])]
    assert not wrong, wrong[:5]
    assert d.matching == "activations" and set(d.moved) == {"unet", "te", "vae"}
    assert all(m / n > 0.9 for m, n in d.moved.values()), d.moved
    assert d.repaired_layers == len(repair.sites(build_spec(MINI))) and d.repair_scale == [1.0, 1.0, 1.0]


def test_activation_matched_b_computes_what_b_computes(xl: dict[str, Path]) -> None:
    """An independent pair at alpha 1 writes B permuted by activation matching's permutations; diffusers'
    UNet2DConditionModel and transformers' CLIP models (not our forward pass) compute the same with it as with B."""
    from reference import rel_max_error
    from sdxl_reference import SDXLReference, make_inputs

    out, diagnostics = _merged(xl["a"], xl["independent"],
                               replace(ACT, alpha=1.0, parts=("unet", "te"), activation_samples=1))
    assert all(m > 0 for m, _ in diagnostics.moved.values()), diagnostics.moved
    b = _load(xl["independent"])
    assert sum(not torch.equal(out[k], b[k]) for k in b) > len(b) // 2  # B really moved
    parts = ("unet", "te")
    ref_b, ref_o = SDXLReference.build(MINI, parts), SDXLReference.build(MINI, parts)
    ref_b.load(b, parts)
    ref_o.load(out, parts)
    x = make_inputs(MINI, latent_size=8)
    tb, to = ref_b.text(x.ids), ref_o.text(x.ids)
    assert rel_max_error(tb["pooled"], to["pooled"]) < 1e-4  # invariant: the projection space is fixed
    assert rel_max_error(ref_b.end_to_end(x.latent, x.t, x.ids, x.time_ids),
                         ref_o.end_to_end(x.latent, x.t, x.ids, x.time_ids)) < 1e-4


def test_repair_merge_has_the_parents_interpolated_statistics(xl: dict[str, Path]) -> None:
    """Run A, B and the merge (held in memory: the tensors the file would hold) on the calibration inputs with the
    SDXL forward pass: at every corrected UNet layer the merge's per-channel mean and std are the interpolation of
    the parents' (re-basin with REPAIR runs in the planted and CLI tests)."""
    opts = replace(REPAIR, alpha=0.4)
    merged, diagnostics = _merged(xl["a"], xl["independent"], opts)
    spec = build_spec(MINI)
    a, b = _load(xl["a"]), _load(xl["independent"])
    cpu = torch.device("cpu")
    cal = repair.calibration(MINI, a.__getitem__, opts.activation_samples, opts.seed, cpu)
    names = repair.sites(spec)

    def stats(sd: dict[str, torch.Tensor]) -> dict[str, repair.Stats]:
        return repair.site_stats(MINI, sd.__getitem__, cal, names, cpu)

    sa, sb, got = stats(a), stats(b), stats(merged)
    assert len(names) == diagnostics.repaired_layers and any(n.endswith(".proj_in") for n in names)
    for name in names:
        al = opts.alpha_of(f"{name}.weight")
        torch.testing.assert_close(got[name].std, (1 - al) * sa[name].std + al * sb[name].std, rtol=2e-3,
                                   atol=2e-4, msg=name)
        torch.testing.assert_close(got[name].mean, (1 - al) * sa[name].mean + al * sb[name].mean, rtol=2e-3,
                                   atol=2e-4, msg=name)


def test_cli_activation_matching_with_repair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's plumbing and the written recipe, on SDXL_SMALL models (the merge itself is tested above)."""
    from model_cache import SDXL_SMALL, cached_sdxl_checkpoint

    a = cached_sdxl_checkpoint(tmp_path / "a.safetensors", SDXL_SMALL, seed=1, base_seed=0)
    b = cached_sdxl_checkpoint(tmp_path / "b.safetensors", SDXL_SMALL, seed=7)
    out = tmp_path / "o.safetensors"
    assert cli_main(["merge", str(a), str(b), "-o", str(out), "--matching", "activations",
                     "--activation-samples", "1", "--repair", "--seed", "3", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "Activation matching: " in printed and "REPAIR: " in printed
    with open_checkpoint(out) as ck:
        own = json.loads(ck.metadata["lib_rebasin"])
    assert own["architecture"] == "SDXL"
    recipe = own["recipe"]
    assert (recipe["matching"], recipe["activation_samples"], recipe["repair"], recipe["seed"]) == (
        "activations", 1, True, 3)


@pytest.mark.parametrize("options, who", [({"matching": "activations"}, "Activation matching"),
                                          ({"repair": True, "method": "weighted_sum"}, "REPAIR")])
def test_sdxl_inpainting_is_refused_in_one_line(xl: dict[str, Path], tmp_path: Path, options: dict,
                                                who: str) -> None:
    with pytest.raises(RebasinError, match=rf"^{who} runs plain SDXL UNets; model A is SDXL inpainting "
                                           r"\(9 input channels\)\. ") as err:
        merge_checkpoints(xl["inpainting1"], xl["inpainting2"], tmp_path / "o.safetensors", MergeOptions(**options))
    assert "\n" not in str(err.value) and not any(tmp_path.iterdir())


def test_a_file_without_the_pooled_projection_is_refused_in_one_line(xl: dict[str, Path], tmp_path: Path) -> None:
    """`text_projection` is optional in SDXL files (weight matching merges without it); the forward pass needs it
    for the UNet's pooled conditioning, so activation matching stops in one line and writes nothing. (Pruned
    copies of the smaller SDXL_SMALL models at fp16: the refusal comes before any forward pass.)"""
    from model_cache import SDXL_SMALL, cached_sdxl_checkpoint, cached_state_dict

    pruned = {}
    for name, seed, base_seed in (("a", 1, 0), ("independent", 7, None)):
        full = cached_sdxl_checkpoint(tmp_path / f"{name}.safetensors", SDXL_SMALL, seed=seed, base_seed=base_seed)
        sd = {k: v for k, v in _load(full).items() if not k.endswith("text_projection")}
        pruned[name] = cached_state_dict(tmp_path / f"{name}_pruned.safetensors", sd)
    out = tmp_path / "out" / "o.safetensors"
    out.parent.mkdir()
    with pytest.raises(RebasinError, match=r"^This SDXL model has no '.*text_projection' \(a pruned file\)") as err:
        merge_checkpoints(pruned["a"], pruned["independent"], out, ACT)
    assert "\n" not in str(err.value) and not any(out.parent.iterdir())
