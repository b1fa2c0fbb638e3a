"""Every class of bad input ends the real CLI with exit status 2, one `error:` line, no traceback and no file.

Each test runs the CLI on real files (synthetic SD-1.5-layout checkpoints with one defect each), lists the output
folder before and after (hidden files included), and checks the one line. The CLI runs in this process
(`lib_rebasin.cli.main`, what `python -m lib_rebasin` calls, with its stdout, stderr, progress bar and warnings
captured) except where the process itself is under test: a thread count, a resource limit, a disk filling up.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import resource
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from model_cache import cached_checkpoint, cached_state_dict, cached_without_parts, place

from lib_rebasin.io.checkpoint import open_checkpoint
from lib_rebasin.io.output_file import save_state_dict

ROOT = Path(__file__).resolve().parents[1]
KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


def cli(*args: str | Path, cwd: Path, threads: int = 1, preexec=None, timeout: float = 600,
        in_process: bool = True) -> subprocess.CompletedProcess:
    """`python -m lib_rebasin ARGS` run in `cwd`: in this process unless the process is what is tested (another
    thread count, a `preexec` that limits it, or `in_process=False`)."""
    if not in_process or threads != 1 or preexec is not None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads)}
        return subprocess.run([sys.executable, "-m", "lib_rebasin", *map(str, args)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout, preexec_fn=preexec)
    return _cli_here([str(a) for a in args], cwd)


# What a fresh interpreter shows (Python's default warning filters): a warning the CLI let through would be one
# more stderr line in a real run, so it is one here too.
_IGNORED_BY_PYTHON = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def _cli_here(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    from lib_rebasin import cli as cli_module

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for category in _IGNORED_BY_PYTHON:
            warnings.filterwarnings("ignore", category=category)
        try:
            code = cli_module.main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
    for w in caught:
        err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    return subprocess.CompletedProcess(["python", "-m", "lib_rebasin", *argv], code, out.getvalue(), err.getvalue())


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def assert_refused(r: subprocess.CompletedProcess, folder: Path, before: list[str], *needles: str) -> str:
    """Exit 2, exactly one stderr line starting with `error:`, no traceback, nothing new in `folder`."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert listing(folder) == before, (listing(folder), before)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two fp16 tiny fine-tunes of one base, defective copies of B, and both without their VAE (`a_novae`,
    `novae`): a test whose output file is not about the VAE merges those (--parts unet,te) and writes half the
    bytes."""
    d = tmp_path_factory.mktemp("bad-inputs")
    a = cached_checkpoint(d / "a.safetensors", "tiny", seed=11, base_seed=1)
    b = cached_checkpoint(d / "b.safetensors", "tiny", seed=12, base_seed=1)
    with open_checkpoint(b) as ck:
        sd = {k: ck.get(k).clone() for k in ck.keys()}
    nan = dict(sd)
    nan[KEY] = sd[KEY].clone()
    nan[KEY].view(-1)[5] = float("nan")
    nan["model.diffusion_model.out.2.bias"] = sd["model.diffusion_model.out.2.bias"].clone()
    nan["model.diffusion_model.out.2.bias"][1] = float("inf")
    cached_state_dict(d / "b_nan.safetensors", nan)
    ints = dict(sd)
    ints["model.diffusion_model.out.2.weight"] = sd["model.diffusion_model.out.2.weight"].to(torch.int32)
    cached_state_dict(d / "b_int.safetensors", ints)
    no_vae = {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}
    cached_state_dict(d / "b_novae.safetensors", no_vae)
    cached_state_dict(d / "b_nan_novae.safetensors", {k: v for k, v in nan.items() if k in no_vae})
    return {"dir": d, "a": a, "b": b, "nan": d / "b_nan.safetensors", "int": d / "b_int.safetensors",
            "novae": d / "b_novae.safetensors", "nan_novae": d / "b_nan_novae.safetensors",
            "a_novae": cached_without_parts(d / "a_novae.safetensors", a)}


@pytest.fixture()
def out(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture()
def opened_outputs(out: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The outputs in `out` whose temporary file the CLI (run in this process) opened: a temporary file is
    unnamed where the system allows, so listing the folder cannot tell that one was written and removed."""
    from lib_rebasin.io import output_file

    opened: list[Path] = []
    real = output_file.open_temp_output

    def recording(path: Path):  # type: ignore[no-untyped-def]
        if Path(path).resolve().parent == out.resolve():  # not a test's input that the model cache makes
            opened.append(Path(path))
        return real(path)

    monkeypatch.setattr(output_file, "open_temp_output", recording)
    return opened


# -- non-finite weights --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["weighted_sum", "rebasin"])
def test_nan_in_an_input_is_refused_with_its_keys_and_part(pair: dict, out: Path, method: str,
                                                           opened_outputs: list[Path]) -> None:
    before = listing(out)
    r = cli("merge", pair["a"], pair["nan"], "-o", out / "m.safetensors", "--method", method, "-q", cwd=out)
    assert_refused(r, out, before, "Model B", "UNet", KEY, "model.diffusion_model.out.2.bias", "--allow-nonfinite")
    if method == "rebasin":  # weight matching reads the blended keys first: refused before the output is opened
        assert opened_outputs == []


def test_allow_nonfinite_keeps_exactly_the_inputs_nan(pair: dict, out: Path) -> None:
    r = cli("merge", pair["a_novae"], pair["nan_novae"], "-o", out / "m.safetensors", "--method", "rebasin",
            "--parts", "unet,te", "--allow-nonfinite", "-q", cwd=out)
    assert r.returncode == 0, r.stderr
    with open_checkpoint(out / "m.safetensors") as ck:
        bad = [k for k in ck.keys() if ck.infos[k].dtype.is_floating_point and not torch.isfinite(ck.get(k)).all()]
    assert sorted(bad) == sorted([KEY, "model.diffusion_model.out.2.bias"])


def test_add_difference_alpha_that_overflows_is_refused(pair: dict, out: Path) -> None:
    before = listing(out)
    r = cli("add-difference", pair["a"], pair["b"], pair["nan"], "-o", out / "m.safetensors", "--alpha", "1e308",
            "-q", cwd=out)
    assert_refused(r, out, before, "alpha", "[-10, 10]")


def test_blend_that_overflows_the_output_precision_is_refused(tmp_path: Path, out: Path) -> None:
    """Finite fp32 inputs whose difference, scaled, exceeds fp16's range: refused, not written as Inf."""
    a = cached_checkpoint(tmp_path / "a.safetensors", "tiny", seed=1, precision="fp32")
    with open_checkpoint(a) as ck:
        sd = {k: ck.get(k).clone() for k in ck.keys()}
    big = dict(sd)
    big[KEY] = sd[KEY] + 30000.0
    cached_state_dict(tmp_path / "big.safetensors", big)
    before = listing(out)
    r = cli("add-difference", a, tmp_path / "big.safetensors", a, "-o", out / "m.safetensors", "--alpha", "3",
            "-q", cwd=out)
    assert_refused(r, out, before, KEY, "overflows", "fp16")


def test_copied_value_too_large_for_the_output_precision_is_refused_before_any_work(
        tmp_path: Path, out: Path, opened_outputs: list[Path]) -> None:
    """A finite fp32 value of A's text encoder beyond fp16's range, copied (--parts unet): the cast would make it
    Inf. Known before any work, like a copied NaN: refused without opening the output."""
    a = cached_checkpoint(tmp_path / "a.safetensors", "tiny", seed=1, precision="fp32")
    te_key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    with open_checkpoint(a) as ck:
        sd = {k: ck.get(k).clone() for k in ck}
    sd[te_key] = sd[te_key].clone()
    sd[te_key][0] = 1e6
    big = cached_state_dict(tmp_path / "big_te.safetensors", sd)
    before = listing(out)
    r = cli("merge", big, a, "-o", out / "m.safetensors", "--parts", "unet", "--method", "rebasin", "-q", cwd=out)
    assert_refused(r, out, before, te_key, "model A (big_te.safetensors)", "too large for fp16", "fp32 or bf16")
    assert opened_outputs == []


VAE_KEY = "first_stage_model.decoder.conv_out.weight"


@pytest.fixture(scope="module")
def nan_sources(pair: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Sources of output bytes that are not blended, each with one NaN: a VAE file and a checkpoint to bake in,
    and a model A without a VAE whose text encoder (copied: --parts unet) and extra key (copied: not a weight) hold
    NaN (merged with B without a VAE).
    Returns {case: (file, the key as that file names it)}; made once for the module's tests, which only read them."""
    where = tmp_path_factory.mktemp("nan-sources")
    with open_checkpoint(pair["b"]) as ck:
        sd = {k: ck.get(k).clone() for k in ck.keys()}
    vae = {k[len("first_stage_model."):]: v.clone() for k, v in sd.items() if k.startswith("first_stage_model.")}
    vae["decoder.conv_out.weight"].view(-1)[3] = float("nan")
    ckpt = dict(sd)
    ckpt[VAE_KEY] = sd[VAE_KEY].clone()
    ckpt[VAE_KEY].view(-1)[0] = float("inf")
    te_key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    with open_checkpoint(pair["a_novae"]) as ck:
        a = {k: ck.get(k).clone() for k in ck.keys()}
    te = dict(a)
    te[te_key] = a[te_key].clone()
    te[te_key][0] = float("nan")
    extra = dict(a)
    extra["model_ema.decay"] = torch.tensor(float("nan"))
    return {"vae_file": (cached_state_dict(where / "nan.vae.safetensors", vae), "decoder.conv_out.weight"),
            "vae_checkpoint": (cached_state_dict(where / "nan_vae_donor.safetensors", ckpt), VAE_KEY),
            "copied_part": (cached_state_dict(where / "a_nan_te.safetensors", te), te_key),
            "copied_key": (cached_state_dict(where / "a_nan_extra.safetensors", extra), "model_ema.decay")}


def _merge_args(pair: dict, case: str, path: Path) -> list[str | Path]:
    if case.startswith("vae"):
        return [pair["a"], pair["b"], "--bake-vae", path]
    return [path, pair["novae"], "--parts", "unet" if case == "copied_part" else "unet,te"]


@pytest.mark.parametrize("case", ["vae_file", "vae_checkpoint", "copied_part", "copied_key"])
def test_nan_that_is_baked_in_or_copied_is_refused_like_a_blended_one(pair: dict, nan_sources: dict, out: Path,
                                                                     case: str, opened_outputs: list[Path]) -> None:
    """Refused before any work: the values that are not blended are known from the start, so no temporary
    output is ever opened (not only removed again)."""
    path, key = nan_sources[case]
    before = listing(out)
    r = cli("merge", *_merge_args(pair, case, path), "-o", out / "m.safetensors", "--method", "weighted_sum",
            "-q", cwd=out)
    assert_refused(r, out, before, path.name, key, "NaN or Inf", "--allow-nonfinite")
    assert opened_outputs == []


@pytest.mark.parametrize("case", ["vae_file", "vae_checkpoint", "copied_part", "copied_key"])
def test_allow_nonfinite_writes_baked_and_copied_nan(pair: dict, nan_sources: dict, out: Path, case: str) -> None:
    path, key = nan_sources[case]
    r = cli("merge", *_merge_args(pair, case, path), "-o", out / "m.safetensors", "--method", "weighted_sum",
            "--allow-nonfinite", "-q", cwd=out)
    assert r.returncode == 0, r.stderr
    with open_checkpoint(out / "m.safetensors") as ck:
        bad = [k for k in ck.keys() if ck.infos[k].dtype.is_floating_point and not torch.isfinite(ck.get(k)).all()]
    assert bad == [VAE_KEY if case.startswith("vae") else key]


# -- layouts, dtypes and what a file is ----------------------------------------------------------------------

def test_integer_weights_are_refused_in_preflight(pair: dict, out: Path) -> None:
    before = listing(out)
    r = cli("merge", pair["int"], pair["a"], "-o", out / "m.safetensors", "-q", cwd=out)
    assert_refused(r, out, before, "model.diffusion_model.out.2.weight", "int32", "Model A")


def test_reduced_width_model_without_vae_merges_its_unet_and_te(pair: dict, out: Path) -> None:
    r = cli("merge", pair["a"], pair["novae"], "-o", out / "m.safetensors", "--parts", "unet,te",
            "--method", "weighted_sum", "-q", cwd=out)
    assert r.returncode == 0, r.stderr
    before = listing(out)
    r = cli("merge", pair["a"], pair["novae"], "-o", out / "n.safetensors", "--method", "weighted_sum", "-q",
            cwd=out)
    assert_refused(r, out, before, "has no VAE", "untick")


def _non_sd(path: Path) -> Path:
    save_state_dict(path, {"encoder.layer.0.attention.self.query.weight": torch.zeros(4, 4),
                           "encoder.layer.0.output.dense.weight": torch.zeros(4, 4)})
    return path


def _legacy_tar(path: Path) -> Path:
    with tarfile.open(path, "w") as tf:
        for name in ("storages", "tensors", "pickle"):
            data = pickle.dumps([])
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


MISNAMED = {
    "non_sd.safetensors": (_non_sd, "not a Stable Diffusion checkpoint"),
    "random.ckpt": (lambda p: p.write_bytes(os.urandom(4096)) and p, "not a checkpoint"),
    "text.ckpt": (lambda p: p.write_bytes(b"hello\n" * 100) and p, "not a checkpoint"),
    "plain_dict.ckpt": (lambda p: p.write_bytes(pickle.dumps({"a": 1, "b": [2]})) and p, "plain Python pickle"),
    "legacy.tar.ckpt": (_legacy_tar, "legacy tar checkpoint format"),
    "empty.ckpt": (lambda p: p.write_bytes(b"") and p, "empty"),
}


@pytest.mark.parametrize("name", sorted(MISNAMED))
def test_what_a_file_is_is_said_plainly(pair: dict, tmp_path: Path, out: Path, name: str) -> None:
    make, words = MISNAMED[name]
    path = tmp_path / name
    make(path)
    before = listing(out)
    r = cli("merge", path, pair["a"], "-o", out / "m.safetensors", "-q", cwd=out)
    line = assert_refused(r, out, before, words)
    assert "standalone VAE" not in line and "needs code" not in line
    assert line.endswith("."), line  # a whole sentence, never cut mid-word


# -- paths -----------------------------------------------------------------------------------------------------

def test_output_name_too_long_for_the_folder_is_found_before_matching(pair: dict, out: Path) -> None:
    before = listing(out)
    name = "x" * 240 + ".safetensors"  # a legal 252-byte name, but the temporary file's name would not fit
    r = cli("merge", pair["a"], pair["b"], "-o", out / name, "-q", cwd=out)
    assert_refused(r, out, before, "too long", "255")


@pytest.mark.parametrize("kind", ["loop", "dangling"])
@pytest.mark.parametrize("side", ["input", "output"])
def test_symlink_loops_and_dangling_links(pair: dict, tmp_path: Path, out: Path, kind: str, side: str) -> None:
    link = (out if side == "output" else tmp_path) / "link.safetensors"
    if kind == "loop":
        link.symlink_to(link.name)
    else:
        link.symlink_to(tmp_path / "gone.safetensors")
    before = listing(out)
    args = (link, pair["b"], "-o", out / "m.safetensors") if side == "input" else (pair["a"], pair["b"], "-o", link)
    r = cli("merge", *args, "-q", cwd=out)
    assert_refused(r, out, before, "symbolic link loop" if kind == "loop" else "does not exist")


def test_nul_byte_in_a_recipe_path(pair: dict, out: Path) -> None:
    recipe = out.parent / "r.toml"
    recipe.write_text('[models]\na = "a\\u0000.safetensors"\nb = "b.safetensors"\n'
                      '[[step]]\nname = "s"\na = "a"\nb = "b"\n')
    before = listing(out)
    r = cli("recipe", recipe, "-o", out / "m.safetensors", "--models-dir", pair["dir"], "-q", cwd=out)
    assert_refused(r, out, before, "NUL byte", "line 2")


def test_nul_byte_in_a_path_through_the_python_api(tmp_path: Path) -> None:
    from lib_rebasin.errors import CheckpointReadError, OutputError
    from lib_rebasin.io.output_file import check_output_path

    with pytest.raises(CheckpointReadError, match="NUL byte"):
        open_checkpoint(str(tmp_path / "a\0b.safetensors"))
    with pytest.raises(OutputError, match="NUL byte"):
        check_output_path(str(tmp_path / "a\0b.safetensors"))


# -- full disks ------------------------------------------------------------------------------------------------

@pytest.fixture()
def tmpfs(tmp_path: Path):
    """A real, small file system (tmpfs; needs root), unmounted afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def mount(size: str) -> Path:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
        return mnt

    yield mount
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_not_enough_free_space_is_found_before_any_work(pair: dict, tmpfs) -> None:
    folder = tmpfs("1m")
    before = listing(folder)
    r = cli("merge", pair["a"], pair["b"], "-o", folder / "m.safetensors", "-q", cwd=pair["dir"])
    assert_refused(r, folder, before, "Not enough free space", str(folder), "MB")


def test_disk_filling_up_during_the_merge_is_one_line(pair: dict, tmpfs) -> None:
    """ENOSPC for real: the folder has room at preflight, and is filled up while weight matching runs."""
    folder = tmpfs("160m")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    independent = cached_checkpoint(pair["dir"] / "independent.safetensors", "tiny", seed=3)
    proc = subprocess.Popen([sys.executable, "-m", "lib_rebasin", "merge", str(pair["a"]), str(independent), "-o",
                             str(folder / "m.safetensors")], env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # progress lines: preflight has passed once matching starts
        seen.append(line)
        if "matching" in line:
            break
    filler = folder / "filler"
    with open(filler, "wb") as f:  # fill the file system to the last block
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    seen.append(proc.stderr.read())
    proc.wait(timeout=600)
    stderr = "".join(seen)
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr and len(errors) == 1, stderr
    assert "No space left on device" in errors[0] and "nothing was written" in errors[0]
    filler.unlink()
    assert listing(folder) == []


def test_file_size_limit_during_writing_is_one_line(pair: dict, out: Path) -> None:
    """EFBIG for real: RLIMIT_FSIZE below the output's size (Python ignores SIGXFSZ, so write() fails)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))

    before = listing(out)
    r = cli("merge", pair["a"], pair["b"], "-o", out / "m.safetensors", "--method", "weighted_sum", "-q", cwd=out,
            preexec=limit)
    assert_refused(r, out, before, "File too large", "nothing was written")


# -- recipes ---------------------------------------------------------------------------------------------------

STEP = '[models]\na = "a.safetensors"\nb = "b.safetensors"\n[[step]]\nname = "s1"\na = "a"\nb = "b"\n'


@pytest.mark.parametrize("line, field", [
    ('iterations = "abc"', "iterations"), ("iterations = 2.5", "iterations"), ("iterations = true", "iterations"),
    ("device = 5", "device"), ("seed = [1]", "seed"), ('alpha = "0.5"', "alpha"), ("alpha = nan", "alpha"),
    ('parts = "unet"', "parts"), ("max_sweeps = 1e400", "max_sweeps"), ('method = ["rebasin"]', "method"),
    ("allow_nonfinite = 1", "allow_nonfinite"), ("tolerance = true", "tolerance"), ('repair = "yes"', "repair"),
])
def test_wrong_types_in_a_recipe_name_the_step_and_field(pair: dict, out: Path, line: str, field: str) -> None:
    recipe = out.parent / "r.toml"
    recipe.write_text(STEP + line + "\n")
    before = listing(out)
    r = cli("recipe", recipe, "-o", out / "m.safetensors", "--models-dir", pair["dir"], "-q", cwd=out)
    assert_refused(r, out, before, "step 's1'", field, "line 8")


@pytest.mark.parametrize("file", ["../a.safetensors", "sub/../../a.safetensors", "/etc/passwd"])
def test_recipe_models_stay_inside_models_dir(pair: dict, tmp_path: Path, out: Path, file: str) -> None:
    models = tmp_path / "models"
    models.mkdir()
    place(pair["b"], models / "b.safetensors")
    (models / "link.safetensors").symlink_to(pair["a"])  # escapes through a symbolic link
    recipe = tmp_path / "r.toml"
    recipe.write_text(STEP.replace('"a.safetensors"', f'"{file}"'))
    before = listing(out)
    r = cli("recipe", recipe, "-o", out / "m.safetensors", "--models-dir", models, "-q", cwd=out)
    assert_refused(r, out, before, "models folder")


def test_a_link_the_user_put_in_the_models_dir_is_followed(pair: dict, tmp_path: Path, out: Path) -> None:
    """The recipe names stay inside --models-dir; a symbolic link the user placed there is theirs to make (the
    WebUI follows such links too), so it is read like the file it points to."""
    models = tmp_path / "models"
    models.mkdir()
    place(pair["b"], models / "b.safetensors")
    (models / "link.safetensors").symlink_to(pair["a"])
    recipe = tmp_path / "r.toml"
    recipe.write_text(STEP.replace('"a.safetensors"', '"link.safetensors"'))
    r = cli("recipe", recipe, "-o", out / "m.safetensors", "--models-dir", models, "-q", cwd=out)
    assert r.returncode == 0, r.stderr
    assert (out / "m.safetensors").is_file()


def test_recipe_from_an_output_finds_its_inputs_by_hash(pair: dict, tmp_path: Path) -> None:
    """`recipe --from OUT` written elsewhere, run with an empty --models-dir: the inputs are found by sha256 in
    the folders they were read from; a missing one names --models-dir."""
    made = tmp_path / "made"
    made.mkdir()
    r = cli("merge", pair["a_novae"], pair["novae"], "-o", made / "m.safetensors", "--method", "weighted_sum",
            "--parts", "unet,te", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = cli("recipe", "--from", made / "m.safetensors", "-o", elsewhere / "r.toml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("recipe", elsewhere / "r.toml", "-o", made / "again.safetensors", "--models-dir", empty, "-q",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with open_checkpoint(made / "again.safetensors") as x, open_checkpoint(made / "m.safetensors") as y:
        assert all(torch.equal(x.get(k), y.get(k)) for k in y.keys())

    text = (elsewhere / "r.toml").read_text()
    (elsewhere / "r2.toml").write_text(text.replace(str(pair["dir"]), str(empty)))
    before = listing(made)
    r = cli("recipe", elsewhere / "r2.toml", "-o", made / "third.safetensors", "--models-dir", empty, "-q",
            cwd=tmp_path)
    assert_refused(r, made, before, "--models-dir", "sha256")


# -- determinism -----------------------------------------------------------------------------------------------

def test_same_merge_same_bytes_whatever_the_thread_count(pair: dict, tmp_path: Path) -> None:
    outputs = []
    for threads in (1, 2):
        o = tmp_path / f"t{threads}.safetensors"
        r = cli("merge", pair["a_novae"], pair["novae"], "-o", o, "--parts", "unet,te", "-q", cwd=tmp_path,
                threads=threads)
        assert r.returncode == 0, r.stderr
        outputs.append(o.read_bytes())
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("args, needle", [
    (("merge", "--method", "legacy"), "Legacy"),
    (("merge", "--parts", "te,vae"), "REPAIR corrects UNet layers; parts must include unet."),
    (("add-difference", "C"), "Add difference is not one (use it with rebasin or weighted_sum)."),
])
def test_repair_where_it_does_not_apply_is_one_line_and_no_file(pair: dict, out: Path, args: tuple[str, ...],
                                                                needle: str) -> None:
    command, *rest = args
    inputs = [pair["a"], pair["b"]] + ([pair["novae"]] if "C" in rest else [])
    before = listing(out)
    r = cli(command, *inputs, "-o", out / "m.safetensors", "--repair", *(a for a in rest if a != "C"), "-q",
            cwd=out)
    assert needle in assert_refused(r, out, before, "error: REPAIR ")


# -- the Python API: the same classes, as RebasinError subclasses ----------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("iterations", "abc"), ("iterations", 2.5), ("iterations", True), ("device", 5), ("seed", [1]),
    ("alpha", "0.5"), ("alpha", float("inf")), ("parts", "unet"), ("max_sweeps", 0), ("tolerance", None),
    ("allow_nonfinite", "yes"), ("method", None),
])
def test_merge_options_name_the_field_of_the_wrong_type(field: str, value: object) -> None:
    from lib_rebasin.errors import RebasinError
    from lib_rebasin.options import MergeOptions

    with pytest.raises(RebasinError, match=field):
        MergeOptions(**{field: value}).validate()


def test_add_difference_alpha_bounds() -> None:
    from lib_rebasin.errors import RebasinError
    from lib_rebasin.options import MergeOptions

    MergeOptions(method="add_difference", alpha=-10.0).validate()
    MergeOptions(method="add_difference", alpha=2).validate()
    for alpha in (1e308, -10.5, float("nan")):
        with pytest.raises(RebasinError, match="alpha"):
            MergeOptions(method="add_difference", alpha=alpha).validate()


def test_a_pytorch_checkpoint_named_safetensors_is_read(pair: dict, tmp_path: Path, out: Path) -> None:
    """Legal data under the wrong extension gives a correct result, not an error."""
    from model_cache import cached_torch_file

    with open_checkpoint(pair["novae"]) as ck:
        cached_torch_file(tmp_path / "b_torch.safetensors", {k: ck.get(k).clone() for k in ck})
    r = cli("merge", pair["a_novae"], tmp_path / "b_torch.safetensors", "-o", out / "m.safetensors", "--method",
            "weighted_sum", "--parts", "unet,te", "-q", cwd=out)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("case", ["not_utf8", "models_dir_missing", "no_metadata_recipe"])
def test_recipe_files_and_folders_that_cannot_be_used(pair: dict, tmp_path: Path, out: Path, case: str) -> None:
    recipe = tmp_path / "r.toml"
    models = pair["dir"]
    if case == "not_utf8":
        recipe.write_bytes(b"\xff\xfe[models]\n")
        args = ("recipe", recipe, "-o", out / "m.safetensors", "--models-dir", models)
        words = "not UTF-8"
    elif case == "models_dir_missing":
        recipe.write_text(STEP)
        args = ("recipe", recipe, "-o", out / "m.safetensors", "--models-dir", tmp_path / "nowhere")
        words = "is not a folder"
    else:
        args = ("recipe", "--from", pair["a"], "-o", out / "r.toml")
        words = "was not made by lib_rebasin"
    before = listing(out)
    assert_refused(cli(*args, "-q", cwd=out) if case != "no_metadata_recipe" else cli(*args, cwd=out), out, before,
                   words)


def test_the_tab_shows_the_same_one_line_errors(pair: dict, tmp_path: Path) -> None:
    """The tab (and the HTTP API, which goes through the same service): refused in validation where the headers
    tell (integer weights), or as the job's one-line error (NaN weights); nothing written either way."""
    from lib_rebasin.errors import RebasinError
    from lib_rebasin.ui.request import MergeRequest
    from lib_rebasin.ui.service import MergeService
    from lib_rebasin.ui.standalone import StandaloneHost

    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("a", "nan", "int"):
        place(pair[name], folder / pair[name].name)
    svc = MergeService(StandaloneHost(folder, devices=["cpu"]))
    before = listing(folder)
    with pytest.raises(RebasinError, match="model.diffusion_model.out.2.weight"):
        svc.prepare(MergeRequest(model_a="b_int.safetensors", model_b="a.safetensors", output_name="x"))
    job = svc.submit(MergeRequest(model_a="a.safetensors", model_b="b_nan.safetensors", output_name="y",
                                  method="weighted_sum"))
    assert job.wait(300)
    assert job.status == "failed" and "NaN or Inf" in job.error and KEY in job.error and "\n" not in job.error
    assert listing(folder) == before
