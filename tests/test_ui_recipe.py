"""The tab's recipe section without gradio: builder operations on the recipe text, loading from metadata, and a
two-step recipe run through the service's job machinery (progress, Stop, load)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from lib_rebasin.errors import RebasinError
from lib_rebasin.recipe.format import RecipeError
from lib_rebasin.recipe.parse import parse_recipe
from lib_rebasin.ui import recipe_builder as rb
from lib_rebasin.ui.request import MergeRequest, RecipeRequest
from lib_rebasin.ui.service import MergeService
from lib_rebasin.ui.standalone import StandaloneHost


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from model_cache import cached_checkpoint

    d = tmp_path_factory.mktemp("recipe_models")
    for i, name in enumerate(("one", "two", "three"), 1):
        cached_checkpoint(d / f"{name}.safetensors", "tiny", seed=i, base_seed=1)
    return d


@pytest.fixture()
def host(folder) -> StandaloneHost:
    return StandaloneHost(folder, devices=["cpu"])


def entries(host):
    return host.list_checkpoints()


def two_steps(host) -> str:
    e = entries(host)
    text = rb.add_step("", rb.StepForm("rebasin", "one.safetensors", "two.safetensors", alpha=0.3, iterations=2,
                                       parts=("te", "vae")), e, host.output_dir())
    return rb.add_step(text, rb.StepForm("weighted_sum", "[step] step1", "three.safetensors", alpha=0.5,
                                         parts=("te", "vae")), e, host.output_dir())


def test_add_builds_a_canonical_recipe_with_models_and_step_references(host):
    text = two_steps(host)
    r = parse_recipe(text)
    assert text == r.to_toml()
    assert {m.name: m.file for m in r.models.values()} == {"one": "one.safetensors", "two": "two.safetensors",
                                                              "three": "three.safetensors"}
    assert [(s.name, s.options.method, s.a, s.b) for s in r.steps] == [("step1", "rebasin", "one", "two"),
                                                                         ("step2", "weighted_sum", "step1", "three")]
    assert r.steps[0].options.iterations == 2 and r.steps[0].options.parts == ("te", "vae")
    assert rb.step_labels(text) == ["1. step1", "2. step2"]
    assert rb.ref_choices(text, 1, entries(host))[:1] == ["[step] step1"]
    assert "[step] step2" not in rb.ref_choices(text, 1, entries(host))
    form = rb.step_form(text, 1, entries(host), host.output_dir())
    assert (form.a, form.b, form.method, form.alpha) == ("[step] step1", "three.safetensors", "weighted_sum", 0.5)
    assert "step **step1**" in rb.recipe_markdown(text)


def test_refusals_leave_the_text_alone(host):
    e = entries(host)
    with pytest.raises(RebasinError, match="not an earlier step"):
        rb.add_step("", rb.StepForm("rebasin", "[step] nope", "two.safetensors"), e)
    with pytest.raises(RebasinError, match="needs model C"):
        rb.add_step("", rb.StepForm("add_difference", "one.safetensors", "two.safetensors"), e)
    with pytest.raises(RebasinError, match="not in the checkpoint list"):
        rb.add_step("", rb.StepForm("rebasin", "missing.safetensors", "two.safetensors"), e)
    with pytest.raises(RebasinError, match="at least one part"):
        rb.add_step("", rb.StepForm("rebasin", "one.safetensors", "two.safetensors", parts=()), e)


def test_remove_reorder_and_update(host):
    e = entries(host)
    text = two_steps(host)
    # step2 uses step1: moving it up (or step1 down) would use a later result, and the core says so
    with pytest.raises(RecipeError, match="later step"):
        rb.move_step(text, 1, -1)
    with pytest.raises(RebasinError, match="used by step"):
        rb.remove_step(text, 0)
    # make step2 independent, then reorder freely
    text2 = rb.update_step(text, 1, rb.StepForm("weighted_sum", "three.safetensors", "two.safetensors", alpha=0.2,
                                                name="side"), e)
    assert [s.name for s in parse_recipe(text2).steps] == ["step1", "side"]
    moved = rb.move_step(text2, 1, -1)
    assert [s.name for s in parse_recipe(moved).steps] == ["side", "step1"]
    assert rb.move_step(moved, 0, -1) == moved  # already on top
    removed = rb.remove_step(moved, 0)
    r = parse_recipe(removed)
    assert [s.name for s in r.steps] == ["step1"] and set(r.models) == {"one", "two"}  # unused model dropped
    empty = rb.remove_step(removed, 0)
    assert rb.load(empty).steps == [] and rb.step_labels(empty) == []
    # renaming a step carries over to the steps that use it
    renamed = rb.update_step(text, 0, rb.StepForm("rebasin", "one.safetensors", "two.safetensors", name="base"), e)
    assert parse_recipe(renamed).steps[1].a == "base"


def test_settings_apply_to_every_step(host):
    text = rb.set_settings(two_steps(host), name="My mix", precision="bf16", device="cpu", seed=7)
    r = parse_recipe(text)
    assert r.name == "My mix" and r.defaults["precision"] == "bf16"
    assert {(s.options.precision, s.options.seed) for s in r.steps} == {("bf16", 7)}
    assert rb.settings_of(text) == {"name": "My mix", "precision": "bf16", "device": "cpu", "seed": 7}
    # a new step takes the recipe-wide settings
    text = rb.add_step(text, rb.StepForm("weighted_sum", "[step] step2", "one.safetensors"), entries(host))
    assert parse_recipe(text).steps[-1].options.precision == "bf16"
    # and an empty recipe keeps them for later
    assert rb.settings_of(rb.set_settings("", precision="fp32"))["precision"] == "fp32"


def test_editing_a_step_keeps_its_repair_and_matching(host):
    """The form has no fields for activation matching or REPAIR: an edited step keeps the ones its text has, and a
    new step takes them from [recipe] like block weights and alignment."""
    e = entries(host)
    text = rb.add_step("", rb.StepForm("rebasin", "one.safetensors", "two.safetensors", parts=("unet",)), e,
                       host.output_dir())
    text = rb.apply_text(text.replace("tolerance = 0.01\n", 'tolerance = 0.01\nmatching = "activations"\n'
                                      "activation_samples = 2\nrepair = true\n"))
    edited = rb.update_step(text, 0, rb.StepForm("rebasin", "one.safetensors", "three.safetensors", alpha=0.3,
                                                 parts=("unet", "te")), e, host.output_dir())
    o = parse_recipe(edited).steps[0].options
    assert (o.alpha, o.matching, o.activation_samples, o.repair) == (0.3, "activations", 2, True)
    without = text.replace("repair = true\n", "")
    with_default = rb.apply_text(without.replace("[recipe]\n", "[recipe]\nrepair = true\n"))
    added = rb.add_step(with_default, rb.StepForm("weighted_sum", "[step] step1", "three.safetensors",
                                                  parts=("unet",)), e, host.output_dir())
    assert parse_recipe(added).steps[-1].options.repair is True


def test_apply_text_canonicalises_and_reports_line_numbers(host):
    text = two_steps(host)
    messy = text.replace("alpha = 0.3", "alpha   =   0.30") + "\n# a comment\n"
    assert rb.apply_text(messy) == text
    bad = text.replace('b = "three"', 'b = "nowhere"')
    line = next(i for i, l in enumerate(bad.splitlines(), 1) if "nowhere" in l)
    with pytest.raises(RecipeError, match=f"line {line}:.*'nowhere' is neither"):
        rb.apply_text(bad)
    with pytest.raises(RebasinError, match="empty"):
        rb.apply_text("  ")


def test_load_from_metadata(host, folder):
    with pytest.raises(RecipeError, match="not made by lib_rebasin"):
        rb.from_checkpoint(folder / "one.safetensors")


def _run(svc, req, timeout=120):
    job = svc.submit_recipe(req)
    assert job.wait(timeout)
    return job


def test_two_step_recipe_runs_as_a_job_and_replays_from_its_metadata(host, folder):
    svc = MergeService(host)
    text = rb.set_settings(two_steps(host), name="ui chain")
    seen: list[float] = []
    host.report_progress = lambda f, t: seen.append(f)  # type: ignore[method-assign]
    out = folder / "ui_chain.safetensors"
    try:
        job = _run(svc, RecipeRequest(text))
        assert job.status == "done", job.error
        d = job.to_dict()
        assert d["kind"] == "recipe" and d["output_name"] == "ui_chain.safetensors" and d["fraction"] == 1.0
        assert [s["name"] for s in d["diagnostics"]["steps"]] == ["step1", "step2"]
        assert "Step step1:" in d["summary"] and "Step step2:" in d["summary"]
        assert seen and max(seen) > 0.5 and any(0 < f < 0.5 for f in seen)  # both steps reported
        assert "ui_chain.safetensors" in svc.titles()  # the host rescanned after the save
        assert host.load_checkpoint(job.output) == "ui_chain.safetensors"
        # load the recipe back from the output's metadata: same steps, models pinned by sha256
        back = parse_recipe(rb.from_checkpoint(out))
        assert [s.name for s in back.steps] == ["step1", "step2"]
        assert all(m.sha256 and len(m.sha256) == 64 for m in back.models.values())
        with pytest.raises(RebasinError, match="already exists"):
            svc.prepare_recipe(RecipeRequest(text))
    finally:
        out.unlink(missing_ok=True)


def test_recipe_validation_before_any_work(host):
    svc = MergeService(host)
    text = two_steps(host)
    with pytest.raises(RecipeError, match=r"line \d+: model 'three': file gone.safetensors is not among"):
        svc.prepare_recipe(RecipeRequest(text.replace('"three.safetensors"', '"gone.safetensors"')))
    with pytest.raises(RecipeError, match="no|not among"):
        svc.prepare_recipe(RecipeRequest(text.replace('{ file = "three.safetensors" }', f'{{ sha256 = "{"0" * 64}" }}')))
    with pytest.raises(RecipeError, match="only made by a later step"):
        svc.prepare_recipe(RecipeRequest(text.replace('a = "step1"', 'a = "step2"').replace(
            'a = "one"', 'a = "step2"')))
    with pytest.raises(RebasinError, match="empty"):
        svc.prepare_recipe(RecipeRequest(""))
    with pytest.raises(RebasinError, match="outside"):
        svc.prepare_recipe(RecipeRequest(text, output_name="../x"))
    with pytest.raises(RebasinError, match="overwrite one of the recipe's models"):
        svc.prepare_recipe(RecipeRequest(text, output_name="one", overwrite=True))
    # a model pinned by hash only is found among the installed checkpoints
    from lib_rebasin.io.input_file import file_sha256

    sha = file_sha256(host.output_dir() / "three.safetensors")
    p = svc.prepare_recipe(RecipeRequest(text.replace('{ file = "three.safetensors" }', f'{{ sha256 = "{sha[:10]}" }}')))
    assert p.inputs["three"].name == "three.safetensors"


def test_stop_mid_recipe_leaves_no_file_and_frees_the_service(host, folder):
    svc = MergeService(host)
    e = entries(host)
    text = rb.add_step("", rb.StepForm("rebasin", "one.safetensors", "two.safetensors", iterations=50), e)
    text = rb.add_step(text, rb.StepForm("rebasin", "[step] step1", "three.safetensors", iterations=50), e)
    text = rb.set_settings(text, name="stopped")
    fired = threading.Event()

    def progress(f, t):
        if "step 2/2" in t:
            fired.set()
            svc.cancel()

    host.report_progress = progress  # type: ignore[method-assign]
    job = _run(svc, RecipeRequest(text))
    assert fired.is_set() and job.status == "cancelled", (job.status, job.error)
    assert job.status_line() == "Stopped: no file was written."
    assert not (folder / "stopped.safetensors").exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    # the single merge still works afterwards (the same job machinery)
    assert svc.running() is None
    svc.prepare(MergeRequest(model_a="one.safetensors", model_b="two.safetensors", device="cpu", output_name="x"))


def test_settings_fields_only_touch_what_changed(host):
    text = two_steps(host)
    r = rb.load(text)
    from dataclasses import replace

    r.steps[1].options = replace(r.steps[1].options, seed=5)  # a loaded recipe whose steps have their own seeds
    text = r.to_toml()
    same = rb.settings_of(text)
    assert rb.sync_settings(text, same["name"], same["precision"], same["device"], same["seed"]) == text
    changed = parse_recipe(rb.sync_settings(text, same["name"], "fp32", same["device"], same["seed"]))
    assert [s.options.precision for s in changed.steps] == ["fp32", "fp32"]
    assert [s.options.seed for s in changed.steps] == [0, 5]


@pytest.mark.parametrize("file", ["../one.safetensors", "/etc/passwd", "sub/../../one.safetensors"])
def test_recipe_model_names_stay_inside_the_models_folder_in_the_tab(host, file):
    """The tab parses recipes with the core, so a name that leaves the folder is refused as in the CLI, with its
    line, before the host's checkpoint list is even consulted."""
    svc = MergeService(host)
    text = two_steps(host).replace('"three.safetensors"', f'"{file}"')
    with pytest.raises(RecipeError, match=r"line \d+: model 'three': .*(absolute path|goes up out of the folder)"):
        svc.prepare_recipe(RecipeRequest(text))


def test_a_recipe_bakes_a_vae_from_the_hosts_vae_folder(folder):
    """`bake_vae` in the recipe text: the tab finds the VAE in the host's VAE list (by name, then by hash), checks
    it before any work, bakes it in, and the recipe keeps it through the builder's edits."""
    import torch

    from lib_rebasin.io.checkpoint import open_checkpoint
    from lib_rebasin.io.output_file import save_state_dict

    with open_checkpoint(folder / "three.safetensors") as ck:
        donor = {k[len("first_stage_model."):]: ck.get(k).clone() for k in ck.keys()
                 if k.startswith("first_stage_model.")}
    (folder / "VAE").mkdir(exist_ok=True)
    save_state_dict(folder / "VAE" / "donor.vae.safetensors", donor, {}, overwrite=True)
    save_state_dict(folder / "VAE" / "unet_only.safetensors", {"x": torch.zeros(2)}, {}, overwrite=True)
    host = StandaloneHost(folder, devices=["cpu"])
    svc = MergeService(host)
    text = rb.set_settings(two_steps(host), name="baked chain")
    text = text.replace('name = "baked chain"', 'name = "baked chain"\nbake_vae = "mse"').replace(
        "[models]", '[models]\nmse = { file = "donor.vae.safetensors" }')
    text = rb.apply_text(text)  # the builder keeps the VAE although no step uses it
    assert 'bake_vae = "mse"' in text and "donor.vae.safetensors" in text
    bad = text.replace("donor.vae.safetensors", "unet_only.safetensors")
    with pytest.raises(RebasinError, match="unet_only.safetensors is not an SD 1.x VAE"):
        svc.prepare_recipe(RecipeRequest(bad))
    out = folder / "baked_chain.safetensors"
    try:
        job = _run(svc, RecipeRequest(text))
        assert job.status == "done", job.error
        with open_checkpoint(out) as ck:
            assert all(torch.equal(ck.get("first_stage_model." + k), v) for k, v in donor.items())
        back = parse_recipe(rb.from_checkpoint(out))
        assert back.bake_vae == "mse" and back.models["mse"].sha256
    finally:
        out.unlink(missing_ok=True)
        for f in (folder / "VAE").iterdir():
            f.unlink()
        (folder / "VAE").rmdir()


def test_tab_recipe_search_by_hash_never_hashes_a_listed_file_that_is_no_checkpoint(host, folder, monkeypatch):
    """The tab's lookup of a model pinned by sha256 reads headers first, as the core's does: a listed file of
    holes (a sparse 32 GB `.safetensors` that is no checkpoint) is never read whole."""
    import lib_rebasin.io.input_file as input_file

    junk = folder / "0_holes.safetensors"  # sorts first: searched first
    with open(junk, "wb") as f:
        f.truncate(32 * 10**9)
    hashed: list[str] = []
    real = input_file.file_sha256

    def spy(path, *args, **kwargs):
        hashed.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(input_file, "file_sha256", spy)  # looked up there when the tab hashes
    try:
        host.refresh_checkpoints()
        assert "0_holes.safetensors" in [e.name for e in host.list_checkpoints()]
        svc = MergeService(host)
        sha = real(folder / "three.safetensors")
        text = two_steps(host).replace('{ file = "three.safetensors" }', f'{{ sha256 = "{sha}" }}')
        p = svc.prepare_recipe(RecipeRequest(text))
        assert p.inputs["three"].name == "three.safetensors"
        assert "0_holes.safetensors" not in hashed and "three.safetensors" in hashed
    finally:
        junk.unlink()
