"""Run a two-step recipe twice through the tab's service in this (fresh) process and print, as JSON, the live
torch tensor bytes and the RSS before and after each run (test_memory.py reads it). MODELS_DIR holds one, two and
three.safetensors, SD 1.x models without a VAE.

    python tests/memory_probe.py MODELS_DIR
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch


def live_tensor_bytes() -> int:
    """Bytes of every storage a live tensor object holds, each storage counted once."""
    gc.collect()
    seen: dict[int, int] = {}
    for o in gc.get_objects():
        if type(o) is torch.Tensor or type(o) is torch.nn.Parameter:
            s = o.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(folder: Path) -> None:
    from lib_rebasin.ui import recipe_builder as rb
    from lib_rebasin.ui.service import MergeService
    from lib_rebasin.ui.request import RecipeRequest
    from lib_rebasin.ui.standalone import StandaloneHost

    torch.set_num_threads(1)
    host = StandaloneHost(folder, devices=["cpu"])
    svc = MergeService(host)
    e = host.list_checkpoints()
    # The models have no VAE (test_memory.py): both steps merge the UNet and the text encoder.
    parts = ("unet", "te")
    text = rb.add_step("", rb.StepForm("rebasin", "one.safetensors", "two.safetensors", alpha=0.3, iterations=2,
                                       parts=parts), e)
    text = rb.add_step(text, rb.StepForm("weighted_sum", "[step] step1", "three.safetensors", alpha=0.5, parts=parts),
                       e)
    svc.prepare_recipe(RecipeRequest(text, output_name="probe0"))  # imports and header reads: not the run's cost
    report = {"tensors": [live_tensor_bytes()], "rss": [rss()]}
    for run in range(2):
        job = svc.submit_recipe(RecipeRequest(text, output_name=f"probe{run}"))
        if not job.wait(600) or job.status != "done":
            raise SystemExit(f"run {run}: {job.status} {job.error}")
        job.output.unlink()
        report["tensors"].append(live_tensor_bytes())
        report["rss"].append(rss())
    print(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
