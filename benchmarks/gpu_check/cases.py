"""The inputs and the heavy paths the GPU check runs, each through the entry point users run (`merge_checkpoints`,
`run_recipe`, the CLI for the sweep), and the measurement of one run (wall time per stage, peak VRAM, peak RSS,
the device notices)."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# The benchmarks' two synthetic pairs (benchmarks/README.md): X independent (seeds 1, 2), Y two fine-tunes of X's
# first model (seeds 11, 12 on base 1, delta 0.05). s1 is also Y's true base: the C of the three-model methods.
MODELS: dict[str, dict[str, Any]] = {
    "s1": {"seed": 1}, "s2": {"seed": 2}, "y11": {"seed": 11, "base_seed": 1}, "y12": {"seed": 12, "base_seed": 1},
}
BLOCKS = [0.0, 1.0] + [round(abs(i - 12) / 12, 6) for i in range(24)]  # a V over the 26 block weights


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    a: str
    b: str
    options: dict[str, Any]
    c: str | None = None
    kind: str = "merge"          # merge | recipe | sweep
    cpu_at_full: bool = False    # the CPU reference fits the time budget at full scale
    # At the parity scale (below full): the same code with fewer samples / steps. Parity depends on the code that
    # runs, not on how often it runs; timings at full scale use the options as given.
    cheap: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("wm_same_base", "re-basin, weight matching, same-base pair (Y)", "y11", "y12", {}, cpu_at_full=True),
    Case("wm_independent", "re-basin, weight matching, independent pair (X)", "s1", "s2", {}),
    Case("iterations", "re-basin, --iterations 3 (X)", "s1", "s2", {"iterations": 3}, cheap={"iterations": 2}),
    Case("activations", "re-basin, activation matching (X)", "s1", "s2", {"matching": "activations"},
         cheap={"activation_samples": 1}),
    Case("repair", "re-basin + REPAIR (X)", "s1", "s2", {"repair": True}, cheap={"activation_samples": 1}),
    Case("ws_blocks", "weighted sum, block weights (Y)", "y11", "y12", {"method": "weighted_sum", "blocks": BLOCKS},
         cpu_at_full=True),
    Case("ties_aligned_blocks", "TIES, aligned, block weights (Y, C = base)", "y11", "y12",
         {"method": "ties", "align": True, "blocks": BLOCKS}, c="s1"),
    Case("dare_blocks", "DARE, block weights (Y, C = base)", "y11", "y12", {"method": "dare", "blocks": BLOCKS},
         c="s1"),
    Case("recipe_2step", "recipe: re-basin (Y), then add-difference of X's s2 against s1", "y11", "y12", {},
         kind="recipe"),
    Case("sweep", "sweep: re-basin at alpha 0.25, 0.5, 0.75 from one matching (X)", "s1", "s2", {}, kind="sweep"),
]


def sweep_available() -> bool:
    """The sweep (issue #20.3) is checked once `lib_rebasin.merge.sweep` exists; it is run through its CLI."""
    return importlib.util.find_spec("lib_rebasin.merge.sweep") is not None


# --- inputs ------------------------------------------------------------------------------------------------------

def _make(path: str, scale: str, kw: dict[str, Any]) -> float:
    from lib_rebasin.sd1.synthetic import make_checkpoint

    t0 = time.perf_counter()
    make_checkpoint(path, scale, precision="fp16", overwrite=True, **kw)
    return time.perf_counter() - t0


def _todo(data: Path, scale: str) -> tuple[dict[str, Path], list[tuple[str, str, dict[str, Any]]]]:
    from safetensors import safe_open

    folder = data / scale
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.safetensors" for name in MODELS}
    todo = []
    for name, path in paths.items():
        kw = MODELS[name]
        try:
            with safe_open(str(path), "pt") as f:
                stamp = (f.metadata() or {}).get("lib_rebasin_synthetic", "")
            if stamp.startswith(f"seed={kw['seed']} base_seed={kw.get('base_seed')} "):
                continue
        except Exception:  # absent or unreadable: made again
            pass
        todo.append((str(path), scale, kw))
    return paths, todo


class Inputs:
    """The four fp16 models at `scale` under data/scale, made in parallel processes in the background (an existing
    file is kept when it says it is the same synthetic model); `wait()` returns the paths and the seconds spent."""

    def __init__(self, data: Path, scale: str, workers: int) -> None:
        self.paths, todo = _todo(data, scale)
        self.started = time.perf_counter()
        self.pool = None
        self.futures = []
        if todo:
            # spawn: the parent may hold a CUDA context, which a forked child must not inherit.
            self.pool = ProcessPoolExecutor(max(1, min(workers, len(todo))),
                                            mp_context=multiprocessing.get_context("spawn"))
            self.futures = [self.pool.submit(_make, *args) for args in todo]

    def wait(self) -> tuple[dict[str, Path], float]:
        for f in self.futures:
            f.result()
        if self.pool is not None:
            self.pool.shutdown()
            return self.paths, time.perf_counter() - self.started
        return self.paths, 0.0


# --- one measured run ----------------------------------------------------------------------------------------------

@dataclass
class Run:
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    vram_gib: float | None = None
    rss_gib: float | None = None
    rss_note: str = ""
    notices: list[str] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    error: str = ""


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: clear_refs 5), so each run reports its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_gib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measured(device: str, work: Callable[[Callable[[Any], None]], list[Path]]) -> Run:
    """Run `work(progress)`; wall time per progress stage, peak VRAM and RSS of this run, device notices."""
    from lib_rebasin.device_budget import NOTICE_STAGE
    from lib_rebasin.memory import release_memory

    release_memory()
    run = Run()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if not _reset_peak_rss():
        run.rss_note = "peak RSS of the process so far (the kernel's mark could not be reset)"
    t0 = last = time.perf_counter()
    stage = "loading"

    def progress(ev: Any) -> None:
        nonlocal last, stage
        now = time.perf_counter()
        if ev.stage == NOTICE_STAGE:
            run.notices.append(ev.message)
            return
        run.stages[stage] = run.stages.get(stage, 0.0) + now - last
        last, stage = now, ev.stage

    try:
        run.outputs = work(progress)
    except Exception as e:  # one line in the table: the check goes on with the other cases
        run.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    if cuda:
        torch.cuda.synchronize()
        run.vram_gib = torch.cuda.max_memory_allocated() / 2**30
    end = time.perf_counter()
    run.stages[stage] = run.stages.get(stage, 0.0) + end - last
    run.seconds = end - t0
    run.rss_gib = _peak_rss_gib()
    return run


# --- the work of one case ----------------------------------------------------------------------------------------

def options_of(case: Case, device: str, cheap: bool) -> dict[str, Any]:
    return {**case.options, **(case.cheap if cheap else {}), "device": device}


def recipe_text(case: Case, models: dict[str, Path], device: str) -> str:
    """The two-step recipe: a re-basin of the case's pair, then an add-difference onto that step's result."""
    return (f'[recipe]\ndevice = "{device}"\n\n[models]\n'
            + "".join(f'{n} = "{p.name}"\n' for n, p in models.items())
            + f'\n[[step]]\nname = "same_base"\nmethod = "rebasin"\na = "{case.a}"\nb = "{case.b}"\n'
            + 'alpha = 0.4\n\n[[step]]\nname = "plus_difference"\nmethod = "add_difference"\n'
            + 'a = "same_base"\nb = "s2"\nc = "s1"\nalpha = 0.3\n')


def work_of(case: Case, models: dict[str, Path], out_dir: Path, device: str,
            cheap: bool) -> Callable[[Callable[[Any], None]], list[Path]]:
    """What runs for `case` on `device`, writing into out_dir; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = options_of(case, device, cheap)

    def merge(progress: Callable[[Any], None]) -> list[Path]:
        from lib_rebasin.merge.run import merge_checkpoints
        from lib_rebasin.options import MergeOptions

        out = out_dir / f"{case.name}.safetensors"
        c = models[case.c] if case.c else None
        merge_checkpoints(models[case.a], models[case.b], out, MergeOptions(**opts), c=c, overwrite=True,
                          progress=progress)
        return [out]

    def recipe(progress: Callable[[Any], None]) -> list[Path]:
        from lib_rebasin.recipe.parse import parse_recipe
        from lib_rebasin.recipe.run import run_recipe

        out = out_dir / f"{case.name}.safetensors"
        run_recipe(parse_recipe(recipe_text(case, models, device), case.name), models[case.a].parent, out,
                   overwrite=True, progress=progress)
        return [out]

    def sweep(progress: Callable[[Any], None]) -> list[Path]:
        from lib_rebasin.cli import main

        for old in out_dir.glob("*.safetensors"):
            old.unlink()
        argv = ["merge", str(models[case.a]), str(models[case.b]), "--alpha", "0.25,0.5,0.75",
                "-o", str(out_dir / "sweep_{alpha}.safetensors"), "--device", device, "--overwrite", "-q"]
        for k, v in opts.items():
            if k != "device":
                argv += [f"--{k.replace('_', '-')}", str(v)]
        rc = main(argv)
        if rc != 0:
            raise RuntimeError(f"the sweep's CLI ended with {rc}: {' '.join(argv)}")
        return sorted(out_dir.glob("*.safetensors"))

    return {"merge": merge, "recipe": recipe, "sweep": sweep}[case.kind]


def card_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} CPUs)"
