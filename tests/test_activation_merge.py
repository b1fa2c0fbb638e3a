"""Activation matching as a re-basin option (`MergeOptions.matching = "activations"`): end to end through
merge_checkpoints and the CLI, validated like every other option, deterministic, cancellable."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lib_rebasin.cli import main as cli_main
from lib_rebasin.errors import Cancelled, RebasinError
from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.merge.run import merge_checkpoints, merge_in_memory
from lib_rebasin.options import MergeOptions
from lib_rebasin.sd1.config import TINY

ACT = MergeOptions(matching="activations", activation_samples=1, precision="fp32")


def _load(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck.get(k).clone() for k in ck.keys()}


def test_planted_permutation_is_undone_by_activation_matching(models: dict[str, Path], tmp_path: Path) -> None:
    """B is A's base fine-tune with every group shuffled; at alpha 1 re-basin by activations gives back the
    unshuffled fine-tune bit for bit (UNet and text encoder by activations, the VAE by weights). The merge is held
    in memory: its tensors and metadata are those the file would hold."""
    from model_cache import cached_checkpoint

    plain = cached_checkpoint(tmp_path / "plain.safetensors", "mini", seed=11, base_seed=1, precision="fp32")
    merged, d = merge_in_memory(plain, models["shuffled"], replace(ACT, alpha=1.0))
    keys = merged.keys()
    out, ref = {k: merged.get(k) for k in keys}, _load(plain)
    wrong = [k for k in ref if not torch.equal(out[k], ref[k])]
    assert not wrong, wrong[:5]
    assert d.matching == "activations" and all(m / n > 0.9 for m, n in d.moved.values()), d.moved
    assert any(line.startswith("Activation matching: ") for line in d.summary_lines())
    stored = json.loads(merged.metadata["lib_rebasin"])
    assert stored["recipe"]["matching"] == "activations" and stored["recipe"]["activation_samples"] == 1


def _meta(path: Path) -> dict[str, str]:
    with open_checkpoint(path) as ck:
        return dict(ck.metadata)


def test_same_seed_same_bytes_and_block_weights_compose(tiny_models: dict[str, Path]) -> None:
    from same_bytes import same_bytes

    opts = replace(ACT, parts=("unet", "te"), blocks=(0.5,) * 13 + (0.25,) * 13)
    one, diagnostics = merge_in_memory(tiny_models["a"], tiny_models["independent"], opts)
    two, _ = merge_in_memory(tiny_models["a"], tiny_models["independent"], opts)
    assert same_bytes(one, two)
    assert diagnostics.moved["unet"][0] > 0 and diagnostics.blocks == list(opts.blocks)


def test_align_for_another_method(tiny_models: dict[str, Path]) -> None:
    _, d = merge_in_memory(tiny_models["a"], tiny_models["independent"],
                           replace(ACT, method="weighted_sum", align=True, parts=("te",)))
    assert d.matching == "activations" and d.moved["te"][0] > 0


@pytest.mark.parametrize("change, words", [
    (dict(matching="activation"), "matching must be one of weights, activations"),
    (dict(matching=1), "matching must be a string"),
    (dict(activation_samples=0), "activation_samples must be between 1 and 64"),
    (dict(activation_samples=2.0), "activation_samples must be a whole number"),
    (dict(method="weighted_sum"), "does not align"),
    (dict(method="legacy"), "does not align"),
])
def test_bad_options_are_refused_in_one_line(change: dict, words: str) -> None:
    with pytest.raises(RebasinError, match=words) as e:
        replace(ACT, **change).validate()
    assert "\n" not in str(e.value)


def test_inpainting_model_is_refused_before_any_work(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    from model_cache import cached_checkpoint

    inpaint = cached_checkpoint(tmp_path / "inpaint.safetensors", replace(TINY, unet_in_channels=9), seed=3,
                                precision="fp32")
    with pytest.raises(RebasinError, match="plain SD 1.x UNets; model A is SD 1.x inpainting"):
        merge_checkpoints(inpaint, tiny_models["a"], tmp_path / "o.safetensors", ACT)
    assert not (tmp_path / "o.safetensors").exists()


def test_cancel_during_activation_matching_leaves_no_file(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    seen: list[str] = []

    def cancel() -> bool:
        return any("activation matching: t=" in m for m in seen)

    with pytest.raises(Cancelled):
        merge_checkpoints(tiny_models["a"], tiny_models["independent"], tmp_path / "o.safetensors", ACT,
                          progress=lambda e: seen.append(e.message), cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_cli_matching_activations(tiny_models: dict[str, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o.safetensors"
    assert cli_main(["merge", str(tiny_models["a"]), str(tiny_models["independent"]), "-o", str(out), "--parts", "te",
                     "--matching", "activations", "--activation-samples", "2", "--seed", "3", "-q"]) == 0
    assert "Activation matching: " in capsys.readouterr().out
    recipe = json.loads(_meta(out)["lib_rebasin"])["recipe"]
    assert (recipe["matching"], recipe["activation_samples"], recipe["seed"]) == ("activations", 2, 3)
    assert cli_main(["merge", str(tiny_models["a"]), str(tiny_models["independent"]), "-o",
                     str(tmp_path / "x.safetensors"), "--method", "weighted_sum", "--matching", "activations",
                     "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: matching = activations") and len(err.splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_iterations_rematch_by_activations_at_every_step(tiny_models: dict[str, Path]) -> None:
    """The closed form that skips iteration steps is a property of weight matching's fixed point; activations are
    not linear in the weights, so every step is matched against the running merge."""
    _, d = merge_in_memory(tiny_models["a"], tiny_models["independent"], replace(ACT, iterations=3, parts=("te",)))
    assert d.match_steps == 3 and d.closed_form_steps == 0


@pytest.mark.parametrize("matching, after, warned", [("activations", 0.66, True), ("activations", 0.97, False),
                                                      ("weights", 0.66, False)])
def test_activation_matching_that_pulls_fine_tunes_apart_is_flagged(matching: str, after: float,
                                                                     warned: bool) -> None:
    """A permutation found by activations that leaves B's weights less like A's than no permutation (what it did
    to the benchmark's fine-tunes of one base) is called out; weight matching never lowers the similarity."""
    from lib_rebasin.merge.diagnostics import Diagnostics

    d = Diagnostics("rebasin", 0.5, 1, ["unet"], matched=True, matching=matching, activation_samples=16,
                    moved={"unet": [7954, 15328]}, objective={"unet": [0.948, after, 1.0, 1.0]})
    lines = d.summary_lines()
    assert lines[0].startswith("Method: Re-basin (activation matching)" if matching == "activations"
                               else "Method: Re-basin (weight matching)")
    flagged = [line for line in lines if line.startswith("Warning: activation matching made B's UNet less like")]
    assert bool(flagged) == warned, lines
    if warned:
        assert "0.9480 -> 0.6600" in flagged[0] and "weight matching (the default)" in flagged[0]
