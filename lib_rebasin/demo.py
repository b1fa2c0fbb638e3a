"""The README's first command: a real re-basin merge on small checkpoints generated here (nothing downloaded).

Model A is a "fine-tune" of a random base. Model B is another fine-tune of the same base whose channels were
shuffled by random *legal* permutations, which is what independent training does to a network: it computes the
same function in a different basis, so a plain weighted sum would average unrelated channels. Re-basin has to find
those permutations again; the diagnostics show how many units it moved and how close B came to A.
"""

from __future__ import annotations

import os
from pathlib import Path

from .align.permute import permute_tensor, random_perms
from .arguments import check_arguments
from .errors import OutputError
from .io.output_file import save_state_dict
from .io.precisions import PRECISIONS
from .merge.run import merge_checkpoints
from .options import MergeOptions
from .sd1.config import SD1Config
from .sd1.spec import build_spec
from .sd1.synthetic import SCALES, make_checkpoint, synthetic_tensor


def make_shuffled_finetune(path: Path, base_seed: int, seed: int, perm_seed: int, precision: str = "fp16",
                           config: SD1Config | str = "mini") -> Path:
    """A fine-tune of base `base_seed` (at scale `config`, as `make_checkpoint`'s) with every permutation group
    randomly (legally) shuffled."""
    check_arguments("make_shuffled_finetune", path=path, base_seed=base_seed, seed=seed, perm_seed=perm_seed,
                    precision=precision, config=config)
    cfg = SCALES[config] if isinstance(config, str) else config
    spec = build_spec(cfg)
    perms = random_perms(spec.groups.values(), perm_seed)
    dtype = PRECISIONS[precision]
    tensors = {}
    for key, shape in spec.shapes.items():
        t = synthetic_tensor(key, shape, seed, base_seed, 0.05, cfg.timesteps)
        tensors[key] = t if not t.is_floating_point() else permute_tensor(spec, key, t, perms).to(dtype)
    return save_state_dict(path, tensors, {"lib_rebasin_synthetic": "shuffled fine-tune (demo)"}, overwrite=True)


# Stand-ins for the DunkMash card's models (examples/dunkmash.toml): fine-tunes of one small base, plus one
# "independently trained" model (shuffled channels) so that a step has real re-basin work to do.
DUNKMASH_STANDINS = {
    "nothing_v2.3.safetensors": {"seed": 21}, "meinamix_v9.safetensors": {"seed": 22},
    "icbinp.safetensors": {"seed": 23, "shuffle": 3}, "dreamshaper_6.safetensors": {"seed": 24},
    "atozovya_v2_art.safetensors": {"seed": 25}, "noise_offset.safetensors": {"seed": 26},
    "v1-5-pruned-emaonly.safetensors": {"seed": 27},
}


def _output_folder(function: str, folder: str | os.PathLike[str]) -> Path:
    """The folder the demo writes into, created if needed; a one-line OutputError when it cannot be."""
    check_arguments(function, folder=folder)
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = "it is a file, not a folder" if path.exists() else e.strerror
        raise OutputError(f"Cannot write into {path}: {reason}; choose another folder.") from None
    return path


def make_dunkmash_standins(folder: str | os.PathLike[str]) -> None:
    folder = _output_folder("make_dunkmash_standins", folder)
    for name, kw in DUNKMASH_STANDINS.items():
        if "shuffle" in kw:
            make_shuffled_finetune(folder / name, base_seed=1, seed=kw["seed"], perm_seed=kw["shuffle"])
        else:
            make_checkpoint(folder / name, "mini", seed=kw["seed"], base_seed=1, delta=0.05, overwrite=True)


def run_demo(folder: str | os.PathLike[str]) -> int:
    folder = _output_folder("run_demo", folder)
    a, b, out = folder / "model_a.safetensors", folder / "model_b_shuffled.safetensors", folder / "merged.safetensors"
    print(f"Generating two small SD-1.5-layout checkpoints in {folder}/ ...")
    make_checkpoint(a, "mini", seed=11, base_seed=1, delta=0.05, overwrite=True)
    make_shuffled_finetune(b, base_seed=1, seed=12, perm_seed=7)
    print("Re-basin merge, alpha 0.5 (UNet + text encoder + VAE):")
    from .cli import ProgressBar

    bar = ProgressBar()
    result = merge_checkpoints(a, b, out, MergeOptions(alpha=0.5), overwrite=True, progress=bar)
    if bar.tty:
        bar.finish()
    print(f"Wrote {result.output}")
    for line in result.diagnostics.summary_lines():
        print(f"  {line}")
    return 0
