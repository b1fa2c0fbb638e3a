"""The GPU check (benchmarks/gpu_check) cannot rot between the rare runs on a GPU: its dry run on the CPU runs here,
every case it would run is a valid merge, and its parity rule tells rounding from a different result.

The dry run is `--device cpu --scale tiny` over the cases that cover each kind of work the script drives (a merge
with weight matching, a per-key method with block weights, a two-step recipe); the other cases differ from these
only in their options, which are validated here, and their paths run on a simulated small GPU in
test_device_budget.py. Two CPU runs must give the same bytes. The tiny scale has SD 1.5's keys and every group the
spec derives, so the script's paths (inputs, each kind of case, parity) run as at mini; the spec itself is tested in
test_spec.py and test_merge.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_rebasin.options import MergeOptions
from lib_rebasin.recipe.parse import parse_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `benchmarks` is no package
from benchmarks.gpu_check import cases, parity
from benchmarks.gpu_check.__main__ import main
from benchmarks.gpu_check.cases import CASES, MODELS, options_of


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The check's four tiny inputs, from the test model cache (the check reuses files that say they are its
    models)."""
    from model_cache import cached_checkpoint

    d = tmp_path_factory.mktemp("gpu_check_data")
    for name, kw in MODELS.items():
        cached_checkpoint(d / "tiny" / f"{name}.safetensors", "tiny", precision="fp16", **kw)
    return d


def test_the_cpu_dry_run_at_tiny_scale_is_bit_identical(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    rc = main(["--device", "cpu", "--scale", "tiny", "--data", str(data), "--out", str(out),
               "--cases", "wm_same_base", "dare_blocks", "recipe_2step"])
    assert rc == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert rows[0]["case"] == "inputs" and rows[0]["made_s"] == 0.0  # the cached inputs were reused
    checked = {r["case"]: r["parity"]["status"] for r in rows[1:]}
    assert checked == dict.fromkeys(["wm_same_base", "dare_blocks", "recipe_2step"], "bit-identical")
    table = out.read_text()
    assert "| wm_same_base | tiny |" in table and "bit-identical" in table


@pytest.mark.parametrize("cheap", [False, True])
def test_every_case_is_a_valid_merge(cheap: bool) -> None:
    for case in CASES:
        assert case.a in MODELS and case.b in MODELS and (case.c is None or case.c in MODELS)
        if case.kind != "recipe":
            MergeOptions(**options_of(case, "cpu", cheap)).validate()
    recipe = next(c for c in CASES if c.kind == "recipe")
    text = cases.recipe_text(recipe, {n: Path(f"/m/{n}.safetensors") for n in MODELS}, "cpu")
    assert [s.name for s in parse_recipe(text).steps] == ["same_base", "plus_difference"]


def _file(path: Path, tensors: dict[str, torch.Tensor], objective: float) -> Path:
    meta = {"lib_rebasin": json.dumps({"recipe": {"method": "rebasin", "device": "x"},
                                       "diagnostics": {"objective": {"unet": [1.0, objective, 2.0, 2.0]},
                                                       "solves": 3}})}
    save_file(tensors, str(path), meta)
    return path


def test_parity_tells_rounding_from_a_different_result(tmp_path: Path) -> None:
    w = torch.linspace(-1, 1, 64, dtype=torch.float32).reshape(8, 8).to(torch.float16)
    ref = _file(tmp_path / "ref.safetensors", {"w": w}, 5.0)
    one_step = w.clone()
    one_step[3, 3] = torch.nextafter(w[3, 3].float(), torch.tensor(2.0)).half() + 2**-10
    rounded = _file(tmp_path / "rounded.safetensors", {"w": one_step}, 5.0 * (1 + 1e-7))
    assert parity.compare(rounded, ref, exact=False).status == "within tolerance"
    assert parity.compare(rounded, ref, exact=True).status == "FAIL"  # two CPU runs: bytes or nothing
    assert parity.compare(ref, ref, exact=True).status == "bit-identical"
    swapped = _file(tmp_path / "swapped.safetensors", {"w": w[[1, 0, 2, 3, 4, 5, 6, 7]]}, 5.0 * (1 + 1e-7))
    assert parity.compare(swapped, ref, exact=False).status == "same objective"  # a near-tie resolved otherwise
    worse = _file(tmp_path / "worse.safetensors", {"w": w[[1, 0, 2, 3, 4, 5, 6, 7]]}, 4.0)
    assert parity.compare(worse, ref, exact=False).status == "FAIL"
