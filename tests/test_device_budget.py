"""`device = cuda` never ends in an out-of-memory error: where the GPU's free memory is short, or a step runs out of
it, the step runs on the CPU with one notice (lib_rebasin/device_budget.py). Without a GPU, a budget whose device
is a CPU stand-in with a simulated free memory drives the same decisions: the notices must come, and the bytes
must be those of a plain CPU merge."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lib_rebasin import device_budget as db
from lib_rebasin.cli import ProgressBar
from lib_rebasin.device_budget import DeviceBudget, Notify, override_budget
from lib_rebasin.io.checkpoint import Checkpoint, open_checkpoint
from lib_rebasin.merge import alignment
from lib_rebasin.merge.blend import Blend, KeyFunctionBlend, Term
from lib_rebasin.merge.run import merge_checkpoints, merge_in_memory
from lib_rebasin.methods import METHODS
from lib_rebasin.options import MergeOptions
from lib_rebasin.progress import ProgressEvent
from lib_rebasin.sd1.spec import build_spec
from lib_rebasin.sd1.synthetic import SCALES

CPU = torch.device("cpu")


def stand_in(free: int) -> Callable[[torch.device, Notify | None], DeviceBudget]:
    """A 'GPU' that is the CPU with `free` bytes of free memory: decisions and notices happen, results cannot
    differ."""
    return lambda device, notify: DeviceBudget(device, notify, free_bytes=lambda: free)


def test_a_step_that_fits_stays_on_the_device_and_one_that_does_not_falls_back_with_one_notice() -> None:
    notes: list[str] = []
    gpu = torch.device("cuda")  # only a name here: nothing is allocated
    budget = DeviceBudget(gpu, notes.append, free_bytes=lambda: 2**30)
    assert budget.place("blend", 2**20) == gpu
    assert budget.place("blend", 2**30) == CPU
    assert budget.place("blend", 2**31) == CPU
    assert budget.place("weight matching", 2**31) == CPU
    assert budget.fallbacks == {"blend": 2, "weight matching": 1}
    assert len(notes) == 2 and notes[0].startswith("blend needs about 1.00 GiB") and "on cuda: computed on the CPU" \
        in notes[0]


def test_the_headroom_is_kept_free() -> None:
    budget = DeviceBudget("cuda", None, free_bytes=lambda: db.HEADROOM_BYTES + 1200)
    assert budget.fits(1000) and not budget.fits(1001)


def test_a_cpu_merge_decides_nothing() -> None:
    budget = DeviceBudget("cpu")
    assert not budget.limited and budget.place("blend", 2**62) == CPU and budget.fallbacks == {}

    def oom(dev: torch.device) -> None:
        raise torch.OutOfMemoryError("not ours to catch")

    with pytest.raises(torch.OutOfMemoryError):
        budget.run("blend", 1, oom)


def test_running_out_of_memory_on_the_device_repeats_the_work_on_the_cpu() -> None:
    notes: list[str] = []
    budget = DeviceBudget("cuda", notes.append, free_bytes=lambda: 2**40)
    tried: list[torch.device] = []

    def work(dev: torch.device) -> str:
        tried.append(dev)
        if dev.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return "done"

    assert budget.run("REPAIR", 1, work) == "done"
    assert tried == [torch.device("cuda"), CPU]
    assert notes == ["REPAIR ran out of memory on cuda: computed on the CPU (slower, same result); later fallbacks "
                     "of this step are not announced"]


def test_weight_matching_keeps_on_a_gpu_what_fits_and_rereads_otherwise() -> None:
    gpu = torch.device("cuda")
    assert db.matching_keep(gpu, True, True) == (True, True)
    assert db.matching_keep(gpu, True, False) == (False, False)
    assert db.matching_keep(CPU, True, True) == (False, False)   # a file on the CPU: re-read, never held
    assert db.matching_keep(CPU, False, True) == (True, False)   # a running merge is computed: kept


def test_the_estimates_count_what_a_step_holds_at_once() -> None:
    assert db.blend_need((10, 10), 2) == 5 * 100 * 4
    spec = build_spec(SCALES["mini"])
    groups = spec.groups_in(("unet", "te", "vae"))
    kept, visit = db.matching_need(spec, groups)
    widest = max(groups, key=lambda g: g.size)
    assert visit >= 2 * widest.size ** 2 * 4
    keys = {s.key for g in groups for s in g.slots}
    assert kept - visit == 2 * 4 * sum(math.prod(spec.shapes[k]) for k in keys)
    assert db.activations_need(spec, groups, 16) > db.forward_need(spec, 16) > 0


def test_a_blend_computes_each_key_on_the_device_it_is_given(tiny_models: dict[str, Path]) -> None:
    """The per-key fallback needs the blend parameterised by device per call: built for an unusable device
    ('meta'), it still computes every key on the CPU it is handed."""
    from lib_rebasin.io.checkpoint import open_checkpoint

    spec = build_spec(SCALES["tiny"])
    with open_checkpoint(tiny_models["a"]) as a, open_checkpoint(tiny_models["finetune"]) as b:
        key = next(k for k in spec.shapes if spec.axes.get(k))
        meta = torch.device("meta")
        blend = Blend(spec, [Term(0.5, a.get, {}), Term(0.5, b.get, {})], meta)
        out = blend(key, device=CPU)
        assert out.device == CPU and torch.equal(out, 0.5 * a.get(key).float() + 0.5 * b.get(key).float())
        assert blend(key).device == meta
        fn = METHODS["weighted_sum"].fn or (lambda a, b, c, alpha, params, rng: (1 - alpha) * a + alpha * b)
        kfb = KeyFunctionBlend(spec, fn, a.get, b.get, None, {}, lambda k: 0.5, {}, 0, meta)
        assert kfb(key, device=CPU).device == CPU


def _same_bytes_as(path: Path, plain: Checkpoint) -> bool:
    """The written file holds what the plain CPU merge, held in memory, would have written (`same_bytes`)."""
    from same_bytes import same_bytes

    with open_checkpoint(path) as written:
        return same_bytes(written, plain)


@pytest.mark.parametrize("options", [
    MergeOptions(precision="fp32"),
    MergeOptions(precision="fp32", matching="activations", activation_samples=1, repair=True, parts=("unet", "te")),
    MergeOptions(precision="fp32", method="ties", align=True, blocks=[0.0, 1.0] + [0.5] * 24),
], ids=["rebasin", "activations_repair", "ties_aligned_blocks"])
def test_a_merge_on_a_small_simulated_gpu_falls_back_and_writes_the_cpu_bytes(
        tiny_models_without_vae: dict[str, Path], tmp_path: Path, options: MergeOptions) -> None:
    # without a VAE (merged, where a case merges it, by the same steps as the UNet) the file is half the bytes
    tiny_models = tiny_models_without_vae
    c = tiny_models["a"] if options.method == "ties" else None
    plain, _ = merge_in_memory(tiny_models["a"], tiny_models["independent"], options, c=c)
    events: list[ProgressEvent] = []
    with override_budget(stand_in(free=1024)):
        small = merge_checkpoints(tiny_models["a"], tiny_models["independent"], tmp_path / "small.safetensors",
                                  options, c=c, progress=events.append).output
    notices = [e.message for e in events if e.stage == db.NOTICE_STAGE]
    steps = {"weight matching"} if options.matching == "weights" and options.aligned else set()
    if options.matching == "activations":
        steps |= {"activation matching"} | ({"weight matching"} if "vae" in options.parts else set())  # VAE's
    if options.repair:
        steps |= {"REPAIR"}
    steps |= {"blend"}
    assert sorted(n.split(" needs about")[0] for n in notices) == sorted(steps)
    assert _same_bytes_as(small, plain)


def test_weight_matching_that_runs_out_of_memory_is_repeated_on_the_cpu(
        tiny_models_without_vae: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_models = tiny_models_without_vae  # the UNet's matching: without a VAE, the file is half the bytes
    opts = MergeOptions(precision="fp32", parts=("unet",))
    plain, _ = merge_in_memory(tiny_models["a"], tiny_models["independent"], opts)
    real = alignment.weight_matching
    calls: list[torch.device] = []

    def first_call_runs_out(*args: object, **kwargs: object) -> object:
        calls.append(kwargs["device"])  # type: ignore[arg-type]
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(alignment, "weight_matching", first_call_runs_out)
    events: list[ProgressEvent] = []
    with override_budget(stand_in(free=2**40)):
        out = merge_checkpoints(tiny_models["a"], tiny_models["independent"], tmp_path / "oom.safetensors", opts,
                                progress=events.append).output
    assert len(calls) == 2
    assert [e.message for e in events if e.stage == db.NOTICE_STAGE] == [
        "weight matching ran out of memory on cpu: computed on the CPU (slower, same result); later fallbacks of "
        "this step are not announced"]
    assert _same_bytes_as(out, plain)


def test_the_cli_prints_a_notice_on_a_line_of_its_own() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar(ProgressEvent(0.2, "matching", "sweep 1"))
    bar(ProgressEvent(0.2, db.NOTICE_STAGE, "blend needs about 1 GiB, 10 MiB free on cuda: computed on the CPU"))
    assert "note: blend needs about 1 GiB" in stream.getvalue().splitlines()[-1]


@pytest.mark.parametrize("free", [2**40, 1024], ids=["fits", "short"])
def test_each_heavy_step_computes_on_the_device_its_budget_chose(tiny_models: dict[str, Path],
                                                                 monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """`cpu:0` stands for the GPU (a CPU device that compares unequal to the fallback `cpu`): every step must be
    handed the device its budget placed it on, never a device of its own."""
    from lib_rebasin.align import activation_matching as am
    from lib_rebasin.merge import repair_step

    stand_for_gpu = torch.device("cpu", 0)
    seen: dict[str, set[torch.device]] = {}

    def spy(name: str, real: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            seen.setdefault(name, set()).add(torch.device(kwargs["device"]))  # type: ignore[arg-type]
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(am, "activation_matching", spy("activations", am.activation_matching))
    monkeypatch.setattr(alignment, "weight_matching", spy("weights", alignment.weight_matching))
    monkeypatch.setattr(repair_step, "corrections", spy("repair", repair_step.corrections))
    blend_devices: set[torch.device] = set()
    real_blend = Blend.__call__

    # the one blend of every linear merge, whole tensors or (on a CPU-type device) a chunk at a time
    def blend_spy(self: Blend, key: str, device: torch.device | None = None, **kw: Any) -> torch.Tensor:
        blend_devices.add(torch.device(device or self.device))
        return real_blend(self, key, device, **kw)

    monkeypatch.setattr(Blend, "__call__", blend_spy)
    opts = MergeOptions(precision="fp32", matching="activations", activation_samples=1, repair=True)
    with override_budget(lambda device, notify: DeviceBudget(stand_for_gpu, notify, free_bytes=lambda: free)):
        merge_in_memory(tiny_models["a"], tiny_models["independent"], opts)
    expected = stand_for_gpu if free > 2**30 else CPU
    assert seen == {"activations": {expected}, "weights": {expected}, "repair": {expected}}  # weights: the VAE
    # REPAIR reads the merge through the blend on the merge's own device; the written keys follow the budget
    assert expected in blend_devices
