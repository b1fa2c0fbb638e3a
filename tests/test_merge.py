"""Merge identities, matching behaviour, copy-through rules, cancellation and the CLI.

What the spec decides (a planted permutation undone, legal permutations, the function kept, how far a pair moves)
runs on the mini models; formulas, copied keys, metadata, cancellation and the CLI on the tiny ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_cache import cached_state_dict

from lib_rebasin.align.permute import is_legal, permute_tensor
from lib_rebasin.align.weight_matching import weight_matching
from lib_rebasin.cli import main as cli_main
from lib_rebasin.errors import Cancelled
from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.merge.blend import telescoping_schedule
from lib_rebasin.merge.run import merge_checkpoints, merge_in_memory
from lib_rebasin.options import MergeOptions
from lib_rebasin.sd1.config import MINI, TINY
from lib_rebasin.sd1.spec import build_spec

FP32 = dict(precision="fp32")


def _load(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck.get(k).clone() for k in ck.keys()}


def _merged(a: Path, b: Path, options: MergeOptions, c: Path | None = None):
    """The merge held in memory (its tensors are those `merge_checkpoints` would write) where the file itself is not
    under test, and its diagnostics."""
    ckpt, diagnostics = merge_in_memory(a, b, options, c=c)
    return {k: ckpt.get(k) for k in ckpt.keys()}, diagnostics


def test_alpha_zero_is_model_a(tiny_models: dict[str, Path]) -> None:
    for method in ("weighted_sum", "rebasin"):
        m, _ = _merged(tiny_models["a"], tiny_models["independent"],
                       MergeOptions(method=method, alpha=0.0, max_sweeps=1, parts=("te",), **FP32))
        a = _load(tiny_models["a"])
        assert a.keys() == m.keys()
        assert all(torch.equal(a[k], m[k]) for k in a), method


def test_weighted_sum_and_add_difference_formulas(tiny_models: dict[str, Path]) -> None:
    a, b, c = (_load(tiny_models[k]) for k in ("a", "finetune", "independent"))
    ws, _ = _merged(tiny_models["a"], tiny_models["finetune"], MergeOptions(method="weighted_sum", alpha=0.3, **FP32))
    ad, _ = _merged(tiny_models["a"], tiny_models["finetune"], MergeOptions(method="add_difference", alpha=0.2, **FP32),
                    c=tiny_models["independent"])
    k = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    torch.testing.assert_close(ws[k], 0.7 * a[k] + 0.3 * b[k])
    torch.testing.assert_close(ad[k], a[k] + 0.2 * (b[k] - c[k]))
    pid = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert ws[pid].dtype == torch.int64 and torch.equal(ws[pid], a[pid])  # integer buffers are never blended
    assert torch.equal(ws["betas"], a["betas"])


def test_planted_permutation_is_recovered(models: dict[str, Path], tmp_path: Path) -> None:
    """B is a fine-tune of A's base with every group shuffled: re-basin at alpha 1 must undo the shuffle,
    i.e. give back that fine-tune in A's basis (compare with an unshuffled copy)."""
    from model_cache import cached_checkpoint

    plain = cached_checkpoint(tmp_path / "plain.safetensors", "mini", seed=11, base_seed=1, precision="fp32")
    out, diagnostics = _merged(plain, models["shuffled"], MergeOptions(alpha=1.0, **FP32))
    ref = _load(plain)
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    moved = diagnostics.moved
    assert all(m / n > 0.9 for m, n in moved.values()), moved
    assert diagnostics.converged


def test_parts_unet_reads_the_outputs_text_encoder(models: dict[str, Path]) -> None:
    """`--parts unet` keeps A's text encoder, so B's cross-attention k/v input columns must be re-indexed into
    A's text-encoder basis: the coupled `te.residual` group is still matched (on the text-encoder weights and those
    columns) and applied to B's UNet only. B here is A with every group shuffled: at alpha 1 the output is A."""
    out, diagnostics = _merged(models["a"], models["shuffled"], MergeOptions(alpha=1.0, parts=("unet",), **FP32))
    a, b = _load(models["a"]), _load(models["shuffled"])
    kv = [k for k in a if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    assert kv and all(not torch.equal(a[k], b[k]) for k in kv)
    assert all(torch.equal(out[k], a[k]) for k in a), [k for k in a if not torch.equal(out[k], a[k])][:5]
    # The report counts the stream under the text encoder, whose weights themselves were not merged.
    te_moved, te_units = diagnostics.moved["te"]
    assert te_units == MINI.te_width and te_moved > 0.9 * te_units


def test_rebasin_at_alpha_one_is_a_legal_permutation_of_b(models: dict[str, Path]) -> None:
    spec = build_spec(MINI)
    a, b = _load(models["a"]), _load(models["independent"])
    res = weight_matching(spec, spec.groups_in(["te"]), a.__getitem__, b.__getitem__, max_sweeps=2)
    assert all(is_legal(spec.groups[n].structure, p) for n, p in res.perms.items())
    out, _ = _merged(models["a"], models["independent"], MergeOptions(alpha=1.0, parts=("te",), max_sweeps=2, **FP32))
    for k in b:
        if k.startswith("cond_stage_model.") and b[k].is_floating_point():
            assert torch.equal(out[k], permute_tensor(spec, k, b[k], res.perms)), k


def test_rebasin_at_alpha_one_computes_what_b_computes(models: dict[str, Path]) -> None:
    """Checked with the independent diffusers/transformers forward pass, not with our own code."""
    from reference import Reference, make_inputs, rel_max_error

    out, diagnostics = _merged(models["a"], models["independent"], MergeOptions(alpha=1.0, max_sweeps=1, **FP32))
    assert sum(m for m, _ in diagnostics.moved.values()) > 1000
    b = _load(models["independent"])
    ref_b, ref_o = Reference.build(MINI), Reference.build(MINI)
    ref_b.load(b)
    ref_o.load(out)
    x = make_inputs(MINI, latent_size=8, image_size=16, batch=1)
    with torch.no_grad():
        assert rel_max_error(ref_b.end_to_end(x.latent, x.t, x.ids), ref_o.end_to_end(x.latent, x.t, x.ids)) < 1e-4
        assert rel_max_error(ref_b.decode(x.latent), ref_o.decode(x.latent)) < 1e-4


def test_independent_pair_moves_far_more_than_same_base(models: dict[str, Path]) -> None:
    spec = build_spec(MINI)
    a = _load(models["a"])
    moved = {}
    for name in ("finetune", "independent"):
        b = _load(models[name])
        res = weight_matching(spec, spec.groups_in(["te"]), a.__getitem__, b.__getitem__, max_sweeps=3)
        moved[name] = sum(g.moved for g in res.groups) / sum(g.size for g in res.groups)
    assert moved["finetune"] == 0.0 and moved["independent"] > 0.5, moved


def test_same_base_pair_is_certified_without_solving(tiny_models: dict[str, Path]) -> None:
    _, d = _merged(tiny_models["a"], tiny_models["finetune"], MergeOptions(**FP32))
    assert d.solves == 0 and d.sweeps == [1] and all(m == 0 for m, _ in d.moved.values())
    assert any("share a basin" in line for line in d.summary_lines())


def test_iterations_telescope_and_match_explicit_steps(tiny_models: dict[str, Path]) -> None:
    alpha, n = 0.4, 6
    steps = telescoping_schedule(alpha, n)
    weight_b = 0.0
    for s in steps:
        weight_b = (1 - s) * weight_b + s
    assert weight_b == pytest.approx(alpha, abs=1e-12)
    out, diagnostics = _merged(tiny_models["a"], tiny_models["finetune"],
                               MergeOptions(alpha=alpha, iterations=n, **FP32))
    assert diagnostics.closed_form_steps == n - 1
    a, b = _load(tiny_models["a"]), _load(tiny_models["finetune"])
    k = "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"
    explicit = a[k].double()
    for s in steps:  # what running every step would give (identity permutation throughout)
        explicit = (1 - s) * explicit + s * b[k].double()
    torch.testing.assert_close(out[k].double(), explicit, atol=1e-6, rtol=1e-6)


def test_iterations_realign_and_warm_start(tiny_models: dict[str, Path]) -> None:
    _, d = _merged(tiny_models["a"], tiny_models["independent"],
                   MergeOptions(alpha=0.5, iterations=3, parts=("te",), max_sweeps=50, tolerance=0.0, **FP32))
    assert d.match_steps >= 2 and d.sweeps[0] > d.sweeps[-1]  # later steps start from the previous permutation


def test_unknown_ema_and_extra_keys_are_copied_from_a(tmp_path: Path) -> None:
    from model_cache import cached_checkpoint

    extra = {"model_ema.decay": torch.tensor(0.9999), "embedding_manager.embedder.x": torch.tensor([0.3, -1.2, 2.5]),
             "cond_stage_model.logit_scale": torch.tensor(4.6), "lora_te_text_model_x.alpha": torch.tensor(8.0)}
    a = cached_checkpoint(tmp_path / "a.safetensors", "tiny", seed=1, extra=extra, precision="fp32")
    b = cached_checkpoint(tmp_path / "b.safetensors", "tiny", seed=2, extra={"only_in_b": torch.ones(2)})
    out, diagnostics = _merged(a, b, MergeOptions(method="weighted_sum"))
    for k, v in extra.items():
        assert torch.equal(out[k], v), k
    assert "only_in_b" not in out and diagnostics.dropped_from_b == 1


def test_float_position_ids_are_never_blended(tmp_path: Path) -> None:

    pid = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    states = []
    for seed in (1, 2):
        from lib_rebasin.sd1.spec import build_spec
        from lib_rebasin.sd1.synthetic import synthetic_tensor

        spec = build_spec(TINY)
        sd = {k: synthetic_tensor(k, s, seed, None, 0.0, 1000) for k, s in spec.shapes.items()}
        sd[pid] = sd[pid].float() + (0.3 if seed == 2 else 0.0)  # an old merge's float, slightly-off ids
        states.append(cached_state_dict(tmp_path / f"m{seed}.safetensors", sd))
    out, _ = _merged(states[0], states[1], MergeOptions(method="weighted_sum", **FP32))
    assert torch.equal(out[pid], _load(states[0])[pid])


def test_parts_not_merged_keep_a(tiny_models: dict[str, Path]) -> None:
    out, _ = _merged(tiny_models["a"], tiny_models["independent"],
                     MergeOptions(method="weighted_sum", parts=("unet",), **FP32))
    a = _load(tiny_models["a"])
    assert all(torch.equal(out[k], a[k]) for k in a if not k.startswith("model.diffusion_model."))
    assert not torch.equal(out["model.diffusion_model.out.2.weight"], a["model.diffusion_model.out.2.weight"])


def test_inpainting_a_with_plain_b(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    from dataclasses import replace

    from model_cache import cached_checkpoint

    inp = cached_checkpoint(tmp_path / "inp.safetensors", replace(TINY, unet_in_channels=9), seed=11, base_seed=1,
                            precision="fp32")
    out, _ = _merged(inp, tiny_models["finetune"], MergeOptions(alpha=0.5, **FP32))
    a, b = _load(inp), _load(tiny_models["finetune"])
    k = "model.diffusion_model.input_blocks.0.0.weight"
    assert out[k].shape[1] == 9 and torch.equal(out[k][:, 4:], a[k][:, 4:])
    torch.testing.assert_close(out[k][:, :4], 0.5 * a[k][:, :4] + 0.5 * b[k])
    with pytest.raises(Exception, match="slot A"):
        merge_checkpoints(tiny_models["finetune"], inp, tmp_path / "o2.safetensors", MergeOptions(**FP32))


def test_cancel_leaves_no_file(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > 50

    for method in ("rebasin", "weighted_sum"):
        with pytest.raises(Cancelled):
            merge_checkpoints(tiny_models["a"], tiny_models["independent"], tmp_path / "o.safetensors",
                              MergeOptions(method=method), cancel=cancel)
        calls["n"] = 0
    assert list(tmp_path.iterdir()) == []


def test_metadata_is_in_the_webui_shape(tiny_models_without_vae: dict[str, Path], tmp_path: Path) -> None:
    from lib_rebasin.io.input_file import file_sha256

    tiny_models = tiny_models_without_vae  # what is tested is the header's metadata: the file is half the bytes
    res = merge_checkpoints(tiny_models["a"], tiny_models["finetune"], tmp_path / "o.safetensors", MergeOptions())
    with open_checkpoint(res.output) as ck:
        meta = ck.metadata
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["type"] == "lib_rebasin" and recipe["primary_model_hash"] == file_sha256(tiny_models["a"])
    mm = json.loads(meta["sd_merge_models"])
    assert set(mm) == {file_sha256(tiny_models["a"]), file_sha256(tiny_models["finetune"])}
    assert all({"name", "legacy_hash", "sd_merge_recipe"} <= set(v) for v in mm.values())
    ours = json.loads(meta["lib_rebasin"])
    assert ours["diagnostics"]["objective"]["unet"][0] > 0  # measured while writing, stored in the header


def test_cli_merge_inspect_and_errors(tiny_models_without_vae: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    tiny_models = tiny_models_without_vae  # the CLI's files and errors: without a VAE, half the bytes
    out = tmp_path / "o.safetensors"
    assert cli_main(["merge", str(tiny_models["a"]), str(tiny_models["finetune"]), "-o", str(out), "--alpha", "0.25",
                     "-q"]) == 0
    text = capsys.readouterr().out
    assert "Wrote" in text and "units moved" in text and out.exists()
    assert cli_main(["inspect", str(out)]) == 0
    assert "SD 1.x" in capsys.readouterr().out
    assert cli_main(["merge", str(tiny_models["a"]), str(tiny_models["finetune"]), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "already exists" in err and len(err.splitlines()) == 1
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    assert cli_main(["merge", str(tiny_models["a"]), str(bad), "-o", str(tmp_path / "x.safetensors"), "-q"]) == 2
    assert not (tmp_path / "x.safetensors").exists()
    assert cli_main(["add-difference", str(tiny_models["a"]), str(tiny_models["finetune"]),
                     str(tiny_models["independent"]), "-o", str(tmp_path / "ad.safetensors"), "-q"]) == 0


def test_legacy_method_is_a_weighted_sum_except_six_norm_vectors(tiny_models: dict[str, Path]) -> None:
    from lib_rebasin.merge.legacy import SPECIAL_KEYS, legacy_special_tensors

    out, diagnostics = _merged(tiny_models["a"], tiny_models["independent"],
                               MergeOptions(method="legacy", alpha=0.3, iterations=20, **FP32))
    a, b = _load(tiny_models["a"]), _load(tiny_models["independent"])
    special = legacy_special_tensors(a.__getitem__, b.__getitem__, 0.3, 20)
    for k in SPECIAL_KEYS:
        assert torch.equal(out[k], special[k]), k
    k = "model.diffusion_model.output_blocks.3.1.proj_out.weight"
    torch.testing.assert_close(out[k], 0.7 * a[k] + 0.3 * b[k])
    assert any("not a function-preserving re-basin" in line for line in diagnostics.summary_lines())


def test_cli_repair_reaches_the_options_and_is_recorded(tiny_models_without_vae: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """--repair travels into MergeOptions and both recipes in the metadata, with the prompt count it runs on;
    a merge without it records neither key (its metadata keeps the bytes it always had). The UNet's REPAIR: the
    models without their VAE, and files of half the bytes."""
    tiny_models = tiny_models_without_vae
    out = tmp_path / "r.safetensors"
    assert cli_main(["merge", str(tiny_models["a"]), str(tiny_models["finetune"]), "-o", str(out), "--method",
                     "weighted_sum", "--parts", "unet", "--repair", "--activation-samples", "1", "--seed", "3",
                     "-q"]) == 0
    assert "Wrote" in capsys.readouterr().out
    with open_checkpoint(out) as ck:
        meta = ck.metadata
    ours, webui = json.loads(meta["lib_rebasin"])["recipe"], json.loads(meta["sd_merge_recipe"])
    for recipe in (ours, webui):
        assert (recipe["repair"], recipe["activation_samples"], recipe["seed"]) == (True, 1, 3), recipe
    plain = tmp_path / "p.safetensors"
    assert cli_main(["merge", str(tiny_models["a"]), str(tiny_models["finetune"]), "-o", str(plain), "--method",
                     "weighted_sum", "--parts", "unet", "--activation-samples", "1", "-q"]) == 0
    with open_checkpoint(plain) as ck:
        meta = ck.metadata
    for recipe in (json.loads(meta["lib_rebasin"])["recipe"], json.loads(meta["sd_merge_recipe"])):
        assert "repair" not in recipe and "activation_samples" not in recipe, recipe


def test_the_summary_counts_copied_and_dropped_keys_in_the_right_number() -> None:
    from lib_rebasin.merge.diagnostics import Diagnostics

    def lines(copied: int, dropped: int) -> list[str]:
        d = Diagnostics(method="weighted_sum", alpha=0.5, iterations=1, parts=["unet"], copied_from_a=copied,
                        dropped_from_b=dropped)
        return [x for x in d.summary_lines() if "copied from A" in x or "carried over" in x]

    assert lines(1, 1) == ["1 key outside the merged parts or unknown to the spec was copied from A unchanged.",
                           "1 key only present in B was not carried over."]
    assert lines(3, 2) == ["3 keys outside the merged parts or unknown to the spec were copied from A unchanged.",
                           "2 keys only present in B were not carried over."]
    assert lines(0, 0) == []
