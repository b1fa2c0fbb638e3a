"""Sweeps (merge/sweep.py): each candidate file is the single merge at its alpha (its tensors and metadata, held in
memory; one file compared byte for byte with the single merge's file), and B is matched onto A once; bad values and
names are refused before anything is written; a cancel keeps only finished files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from same_bytes import file_holds

import lib_rebasin.align.weight_matching as weight_matching_module
import lib_rebasin.merge.alignment as alignment_module
from lib_rebasin.errors import Cancelled, FieldError, OutputError, RebasinError
from lib_rebasin.io.checkpoint import Checkpoint
from lib_rebasin.merge.run import merge_checkpoints, merge_in_memory
from lib_rebasin.merge.sweep import sweep_checkpoints, sweep_in_memory
from lib_rebasin.options import MergeOptions

ALPHAS = [0.25, 0.5, 0.75]


@pytest.fixture(scope="module")
def models(tiny_models_without_vae: dict[str, Path]) -> dict[str, Path]:
    """The tiny models without their VAE: what is tested is how a sweep makes, names, commits and refuses its
    files (each the single merge at its alpha, whatever keys it holds), and every candidate is half the bytes."""
    return tiny_models_without_vae


def _counting(patch: pytest.MonkeyPatch) -> list[int]:
    """Counts weight-matching runs (every merge's matching goes through alignment.weight_matching)."""
    calls: list[int] = []
    real = weight_matching_module.weight_matching

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    patch.setattr(alignment_module, "weight_matching", counted)
    return calls


@pytest.fixture
def match_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    return _counting(monkeypatch)


def _options(options: MergeOptions, alpha: float) -> MergeOptions:
    return MergeOptions(**{**options.__dict__, "alpha": alpha})


def _single(models: dict[str, Path], tmp: Path, options: MergeOptions, alpha: float, c: str | None) -> Path:
    out = tmp / f"single_{alpha}.safetensors"
    merge_checkpoints(models["a"], models["independent"], out, _options(options, alpha), c=models[c] if c else None)
    return out


def _single_in_memory(models: dict[str, Path], options: MergeOptions, alpha: float, c: str | None) -> Checkpoint:
    """The single merge at `alpha`, held in memory: the tensors and metadata its file would hold."""
    ckpt, _ = merge_in_memory(models["a"], models["independent"], _options(options, alpha),
                              c=models[c] if c else None)
    return ckpt


# The candidate files at fp16 (half an fp32 file) but for plain re-basin, whose check stays at fp32.
CASES = {
    "weighted_sum": (MergeOptions(method="weighted_sum", precision="fp16"), None, 0),
    "rebasin": (MergeOptions(method="rebasin", precision="fp32"), None, 1),
    "dare": (MergeOptions(method="dare", dare_p=0.5, seed=3), "finetune", 0),
    "rebasin_repair": (MergeOptions(method="rebasin", repair=True, activation_samples=1, parts=("unet",)), None, 1),
}
# The case and alpha whose candidate file is also compared byte for byte with the single merge's written file: the
# one whose metadata says most (the match's and REPAIR's diagnostics), which sizes the header the writer reserves.
BYTE_FOR_BYTE = ("rebasin_repair", 0.5)


@pytest.fixture(scope="module")
def singles(models: dict[str, Path]):
    """`singles(case)`: the single merge at each of ALPHAS, held in memory, made once per case for the module (the
    sweep tests and the in-memory generator test compare against the same merges)."""
    made: dict[str, dict[float, Checkpoint]] = {}

    def get(case: str) -> dict[float, Checkpoint]:
        if case not in made:
            options, c, _ = CASES[case]
            made[case] = {alpha: _single_in_memory(models, options, alpha, c) for alpha in ALPHAS}
        return made[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_each_file_is_the_single_merge(models, tmp_path, singles, case):
    options, c, matches = CASES[case]
    with pytest.MonkeyPatch.context() as patch:  # the sweep's matches only, not the single merges'
        match_runs = _counting(patch)
        results = sweep_checkpoints(models["a"], models["independent"], tmp_path / "AB_{alpha}.safetensors", options,
                                    ALPHAS, c=models[c] if c else None)
    assert len(match_runs) == matches  # B matched onto A once for all three candidates
    assert [r.output.name for r in results] == [f"AB_{a:g}.safetensors" for a in ALPHAS]
    for alpha, result in zip(ALPHAS, results, strict=True):
        # the whole file: every tensor's bits, in the file's order, and the metadata (provenance, recipe, diagnostics)
        assert file_holds(result.output, singles(case)[alpha]), alpha
        if (case, alpha) == BYTE_FOR_BYTE:  # and the file itself, as the single merge writes it
            single = _single(models, tmp_path, options, alpha, c)
            assert result.output.read_bytes() == single.read_bytes(), alpha


def test_iterations_share_the_first_match_only(models, tmp_path, match_runs):
    options = MergeOptions(method="rebasin", iterations=2, precision="fp32")
    results = sweep_checkpoints(models["a"], models["independent"], tmp_path / "it_{alpha}.safetensors", options,
                                [0.3, 0.6])
    # step 1 (against A) once, step 2 (against each running merge) per candidate, unless it collapsed
    second = sum(r.diagnostics.match_steps - 1 for r in results)
    assert len(match_runs) == 1 + second
    for alpha, result in zip([0.3, 0.6], results, strict=True):
        assert file_holds(result.output, _single_in_memory(models, options, alpha, None)), alpha


def test_in_memory_generator(models, singles, match_runs):
    """Each candidate held in memory is the single merge at its alpha: the tensors and metadata of its file (the
    single merges compared with are held in memory too; test_each_file_is_the_single_merge checks them against
    the files)."""
    options = MergeOptions(method="rebasin", precision="fp32")
    assert CASES["rebasin"][:2] == (options, None)  # the singles compared with are this merge's
    merges = singles("rebasin")
    match_runs.clear()  # the single merges' matches (made here if no test made them before)
    alphas = [0.25, 0.75]
    seen = []
    for alpha, ckpt, diag in sweep_in_memory(models["a"], models["independent"], options, alphas):
        single = merges[alpha]
        assert ckpt.keys() == single.keys()
        assert all(torch.equal(ckpt.get(k), single.get(k)) for k in ckpt)
        assert ckpt.metadata == single.metadata
        assert diag.alpha == alpha
        seen.append(alpha)
    assert seen == alphas
    assert len(match_runs) == 1  # the sweep's one match


@pytest.mark.parametrize("alphas, template, field, words", [
    ([0.25, 1.5], "o_{alpha}.safetensors", "alpha", "alpha value 2 of 2: alpha must be in [0, 1]"),
    ([0.5, float("nan")], "o_{alpha}.safetensors", "alpha", "alpha must be a finite number"),
    ([0.5, 0.5], "o_{alpha}.safetensors", "alpha", "alpha 0.5 is listed twice"),
    ([], "o_{alpha}.safetensors", "alpha", "at least one alpha"),
    ([0.25, 0.5], "o.safetensors", "output", "must contain {alpha}"),
    ([0.25, 0.5], "o_{beta}.safetensors", "output", "is not a template with {alpha}"),
    ([0.25, 0.5], "o_{alpha.real}_{.safetensors", "output", "is not a template"),
    ([0.251, 0.252], "o_{alpha:.2f}.safetensors", "output", "give the same output name"),
])
def test_bad_values_and_names_are_refused_before_any_work(models, tmp_path, alphas, template, field, words):
    with pytest.raises(FieldError) as e:
        sweep_checkpoints(models["a"], models["independent"], tmp_path / template,
                          MergeOptions(method="weighted_sum"), alphas)
    assert e.value.field == field and words in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_and_blocks_are_refused(models, tmp_path):
    (tmp_path / "o_0.75.safetensors").write_bytes(b"keep")
    with pytest.raises(OutputError, match="already exists"):
        sweep_checkpoints(models["a"], models["independent"], tmp_path / "o_{alpha}.safetensors",
                          MergeOptions(method="weighted_sum"), ALPHAS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o_0.75.safetensors"]
    options = MergeOptions(method="weighted_sum").with_blocks((0.5,) * 26, None)
    with pytest.raises(FieldError, match="block weights") as e:
        sweep_checkpoints(models["a"], models["independent"], tmp_path / "b_{alpha}.safetensors", options, ALPHAS)
    assert e.value.field == "blocks"


def test_cancel_keeps_finished_files_only(models, tmp_path):
    written: list[Path] = []

    def cancel() -> bool:
        return len(written) == 1 and len(list(tmp_path.iterdir())) == 1  # once the first file is in place

    with pytest.raises(Cancelled) as e:
        sweep_checkpoints(models["a"], models["independent"], tmp_path / "c_{alpha}.safetensors",
                          MergeOptions(method="weighted_sum"), ALPHAS, cancel=cancel,
                          on_written=lambda r: written.append(r.output))
    assert [p.name for p in tmp_path.iterdir()] == ["c_0.25.safetensors"]
    assert "c_0.25.safetensors" in str(e.value) and "no partial file" in str(e.value)


def test_cancel_inside_a_candidate_leaves_no_partial_file(models, tmp_path):
    events: list[str] = []

    def progress(ev) -> None:
        events.append(ev.message)

    def cancel() -> bool:  # stop while the second candidate is being written
        return any(m.startswith("alpha 0.5 (2/3): writing") for m in events)

    with pytest.raises(RebasinError, match="kept the 1 finished file"):
        sweep_checkpoints(models["a"], models["independent"], tmp_path / "d_{alpha}.safetensors",
                          MergeOptions(method="weighted_sum"), ALPHAS, progress=progress, cancel=cancel)
    assert [p.name for p in tmp_path.iterdir()] == ["d_0.25.safetensors"]
    assert any(m.startswith("alpha 0.25 (1/3): ") for m in events)  # progress names the candidate


def test_cli_sweep(models, tmp_path, capsys):
    from lib_rebasin.cli import main as cli_main

    a, b = str(models["a"]), str(models["independent"])
    assert cli_main(["merge", a, b, "--method", "weighted_sum", "--alpha", "0.25, 0.5", "-o",
                     str(tmp_path / "AB_{alpha}.safetensors"), "-q"]) == 0
    assert cli_main(["merge", a, b, "--method", "weighted_sum", "--alpha", "0.5", "-o",
                     str(tmp_path / "single.safetensors"), "-q"]) == 0
    assert (tmp_path / "AB_0.5.safetensors").read_bytes() == (tmp_path / "single.safetensors").read_bytes()
    assert (tmp_path / "AB_0.25.safetensors").exists()
    out = capsys.readouterr()
    assert "Wrote" in out.out and str(tmp_path / "AB_0.25.safetensors") in out.out
    assert cli_main(["merge", a, b, "--method", "weighted_sum", "--alpha", "0.25,x", "-o",
                     str(tmp_path / "e_{alpha}.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'x' is not a number" in err
    assert cli_main(["merge", a, b, "--alpha", "0.3,0.6", "-o", str(tmp_path / "same.safetensors")]) == 2
    assert "must contain {alpha}" in capsys.readouterr().err
    assert not list(tmp_path.glob("e_*")) and not (tmp_path / "same.safetensors").exists()


def test_cli_alpha_with_block_weights(models, tmp_path, capsys):
    """--alpha is text now (a list makes a sweep): with 25 block weights BASE is still the one alpha given."""
    import json

    from lib_rebasin.cli import main as cli_main
    from lib_rebasin.io.checkpoint import open_checkpoint

    a, b = str(models["a"]), str(models["independent"])
    out = tmp_path / "blocks.safetensors"
    blocks = ",".join(["0.5"] * 25)
    assert cli_main(["merge", a, b, "--method", "weighted_sum", "--alpha", "0.3", "--blocks", blocks, "-o", str(out),
                     "-q"]) == 0
    with open_checkpoint(out) as ck:
        assert json.loads(ck.metadata["lib_rebasin"])["recipe"]["blocks"][0] == 0.3
    assert cli_main(["merge", a, b, "--method", "weighted_sum", "--alpha", "0.3,0.4", "--blocks", blocks, "-o",
                     str(tmp_path / "b_{alpha}.safetensors"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "with block weights each block has its own weight" in err


@pytest.mark.skipif(__import__("sys").platform == "win32", reason="POSIX signals")
def test_cli_signal_at_a_commit_keeps_that_file_and_stops_the_sweep(models, tmp_path):
    """SIGTERM while the first file is being put in place: it is kept and reported, the second value never starts,
    and the one error line names the kept file (the CLI's interrupts resume after each file, signals.py)."""
    import signal

    from test_io_safety import Paused

    run = Paused("placed", 1, ["merge", str(models["a"]), str(models["independent"]), "--method", "weighted_sum",
                               "--alpha", "0.3,0.6", "-o", str(tmp_path / "s_{alpha}.safetensors"), "-q"])
    run.proc.send_signal(signal.SIGTERM)
    rc, out, err = run.resume()
    assert rc == 2, (rc, out, err)
    assert f"Wrote {tmp_path / 's_0.3.safetensors'}" in out
    assert err.splitlines() == ["error: Cancelled; kept the 1 finished file(s) s_0.3.safetensors; no partial file "
                                "was written."]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s_0.3.safetensors"]
