"""What the tab needs from the program it lives in (the WebUI, or the standalone app), as one small protocol.

A host lists checkpoints, says where merges go, refreshes its own lists after a save, loads a checkpoint for
generation, runs a job inside its GPU queue, shows progress and forwards interrupts. `BaseHost` gives
harmless defaults so a host only overrides what it has.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import RebasinError
from ..options import OPTIONS
from .generation import GeneratedImage, GenerationSettings

NO_GENERATOR = ("This program has no image generator to load a merge into; use Merge to save it as a file (or run "
                "the tab inside AUTOMATIC1111 or Forge).")
NO_GENERATOR_COMPARE = ("This program has no image generator, so it cannot draw a compare grid; use the sweep "
                        "(one file per alpha: POST /rebasin/v1/sweep, or `python -m lib_rebasin merge A B --alpha "
                        "0.25,0.5,0.75 -o \"AB_{alpha}.safetensors\"`), or run the tab inside AUTOMATIC1111 or Forge.")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint as the host shows it: `title` goes in dropdowns, `path` is the file, `sha256` when the host
    has it already (never computed just to list)."""

    title: str
    path: Path
    sha256: str | None = None

    @property
    def name(self) -> str:
        """The title without the host's " [shorthash]": the file's name inside the checkpoint folder."""
        return _HASH_SUFFIX.sub("", self.title)


@dataclass(frozen=True)
class HiresPreset:
    key: str
    label: str
    denoise: float
    scale: float = 2.0
    steps: int = 0  # 0 = the host's "same as the first pass"
    note: str = ""
    # SDXL's first pass is already about 1024 px (SD 1.x's 512): x1.5, the SDXL guides' usual hires step, keeps
    # the second pass near 1536 px instead of 2048
    sdxl_scale: float = 1.5

    def scale_for(self, architecture: str | None) -> float:
        return self.sdxl_scale if architecture == "SDXL" else self.scale


# From the DunkMash model card: hires fix works best with denoise 0.45-0.7; below 0.3 the result looks soft.
HIRES_PRESETS: tuple[HiresPreset, ...] = (
    HiresPreset("soft", "Hires fix: soft detail (0.45)", 0.45, note="keeps the composition, adds light detail"),
    HiresPreset("balanced", "Hires fix: balanced (0.55)", 0.55, note="the usual choice for re-basin merges"),
    HiresPreset("strong", "Hires fix: strong (0.70)", 0.70, note="sharpest edges, may change small details"),
)

HIRES_ADVICE = (
    "Re-basin merges can come out with soft edges and little detail on small faces. Hires fix helps most with "
    "a denoising strength between **0.45 and 0.7**; **below 0.3 the result stays soft**. To upscale without "
    "changing the composition, use **ControlNet Tile** instead of a high denoise. The presets switch to "
    "txt2img, turn hires fix on with upscale x2 (x1.5 when model A is SDXL) and an installed upscaler, and leave "
    "your prompt alone."
)

# Upscalers tried in this order, among those the host can run right away (weights on disk, or none needed):
# a trained 4x model when one is installed, else Lanczos (a plain resize: the hires pass at 0.45-0.7 denoise adds
# the detail), latent modes last because they need a high denoise to look right. A fresh WebUI lists the ESRGAN
# family only as download links, which it would fetch (64 MB) or, offline, fail on and silently replace.
UPSCALER_PREFERENCE = ("4x-UltraSharp", "R-ESRGAN 4x+", "ESRGAN_4x", "R-ESRGAN 4x+ Anime6B", "SwinIR 4x",
                       "Lanczos", "Latent")

HIRES_ELEM_IDS = {
    "enable": "txt2img_hr-checkbox",
    "denoise": "txt2img_denoising_strength",
    "scale": "txt2img_hr_scale",
    "upscaler": "txt2img_hr_upscaler",
    "steps": "txt2img_hires_steps",
}


def choice_values(choices: Any) -> list[str]:
    """Dropdown choices as plain values (gradio 3 keeps strings, gradio 4 keeps (label, value) pairs)."""
    out = []
    for c in choices or []:
        out.append(str(c[1] if isinstance(c, (tuple, list)) else c))
    return out


def pick_upscaler(choices: Any, current: str | None = None, ready: set[str] | None = None) -> str | None:
    """An upscaler from the host's list that it can run now (`ready`: None = all of them): keep the user's
    non-latent pick, else the first preferred, else any non-latent one."""
    values = [v for v in choice_values(choices) if ready is None or v in ready]
    if current and current in values and not current.lower().startswith("latent"):
        return current
    for name in UPSCALER_PREFERENCE:
        if name in values:
            return name
    non_latent = [v for v in values if not v.lower().startswith("latent") and v.lower() != "none"]
    if non_latent:
        return non_latent[0]
    return current if current in values else (values[0] if values else None)


def known_downloads(choices: Any, ready: set[str] | None, chosen: str | None, limit: int = 2) -> list[str]:
    """The upscalers users know (UPSCALER_PREFERENCE) that the host offers, that rank above `chosen` and that need
    a download first: what the preset would have used had they been installed."""
    if ready is None:
        return []
    offered = set(choice_values(choices))
    rank = UPSCALER_PREFERENCE.index(chosen) if chosen in UPSCALER_PREFERENCE else len(UPSCALER_PREFERENCE)
    return [n for n in UPSCALER_PREFERENCE[:rank] if n in offered and n not in ready][:limit]


def hires_values(preset: HiresPreset, upscaler_choices: Any, current_upscaler: str | None,
                 ready: set[str] | None = None, architecture: str | None = None) -> dict[str, Any]:
    """The txt2img values one preset sets for a model of `architecture`, keyed like HIRES_ELEM_IDS (None = leave
    as is)."""
    return {
        "enable": True,
        "denoise": preset.denoise,
        "scale": preset.scale_for(architecture),
        "upscaler": pick_upscaler(upscaler_choices, current_upscaler, ready),
        "steps": preset.steps,
    }


@runtime_checkable
class Host(Protocol):
    name: str
    shows_eta: bool                # the host draws its own progress bar with an ETA (the tab then shows none)
    page_selects_checkpoint: bool  # the page's own checkpoint selector must be told about a loaded model
    loads_in_memory: bool          # the host has an image generator that can take an unsaved merge

    def list_checkpoints(self) -> list[CheckpointEntry]: ...
    def refresh_checkpoints(self) -> None: ...
    def output_dir(self) -> Path: ...
    def after_save(self, path: Path) -> None: ...
    def remember_hashes(self, paths: list[Path]) -> None: ...
    def load_checkpoint(self, path: Path) -> str: ...
    def load_state_dict(self, state_dict: dict[str, Any], label: str, on_replaced: Callable[[], None]) -> str: ...
    def adopt_saved(self, path: Path) -> str: ...
    def page_name_for(self, title: str) -> str: ...
    def run_job(self, job_id: str, work: Callable[[], None]) -> None: ...
    def discard_job(self, job_id: str) -> None: ...
    def report_progress(self, fraction: float, text: str) -> None: ...
    def interrupted(self) -> bool: ...
    def interrupt(self) -> None: ...
    def device_choices(self) -> list[str]: ...
    def default_device(self) -> str: ...
    def prepare_device(self, device: str) -> None: ...
    def restore_device(self, device: str) -> None: ...
    def defaults(self) -> dict[str, Any]: ...
    def hires_targets(self) -> dict[str, Any]: ...
    def list_vaes(self) -> list[CheckpointEntry]: ...
    def ready_upscalers(self) -> set[str] | None: ...
    def loaded_checkpoint(self) -> Path | None: ...
    def txt2img_inputs(self) -> dict[str, Any]: ...
    def generate(self, settings: GenerationSettings, label: str) -> GeneratedImage: ...
    def save_grid(self, image: Any, infotext: str, settings: GenerationSettings) -> Path: ...


DEFAULTS: dict[str, Any] = {
    **{name: OPTIONS[name].default for name in ("method", "alpha", "iterations", "precision")},
    "device": "",  # "" = the host's default_device()
    "output_dir": "",  # "" = the host's checkpoint folder
}


def torch_device_choices() -> list[str]:
    """cpu, plus cuda when torch sees a CUDA GPU (the core merges on cpu or cuda only)."""
    choices = ["cpu"]
    try:
        import torch

        if torch.cuda.is_available():
            choices.append("cuda")
    except Exception:  # pragma: no cover - torch broken is the host's problem
        pass
    return choices


def cuda_free_bytes() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info()
            return int(free)
    except Exception:  # pragma: no cover
        pass
    return None


class BaseHost:
    """Defaults for every Host method; subclasses override what their program has."""

    name = "base"
    shows_eta = False  # True where the host draws its own progress bar with an ETA (the tab then shows none)
    # True where, after load_checkpoint, the tab should also call the page's selectCheckpoint(title) (the WebUI's
    # JavaScript) to show the loaded model; False where the host needs no such call or it would pick another file.
    page_selects_checkpoint = False
    # True where load_state_dict puts a merge made in memory into the host's image generator.
    loads_in_memory = False
    # A GPU merge keeps two fp32 UNets and the matching buffers on the device: about 8 GiB for SD 1.5.
    min_gpu_bytes = 8 * 1024**3

    def __init__(self) -> None:
        self._interrupted = threading.Event()

    def list_checkpoints(self) -> list[CheckpointEntry]:
        return []

    def refresh_checkpoints(self) -> None:
        pass

    def output_dir(self) -> Path:
        raise NotImplementedError

    def after_save(self, path: Path) -> None:
        self.refresh_checkpoints()

    def remember_hashes(self, paths: list[Path]) -> None:
        """Called with a merge's output and inputs before `after_save`; hosts with a hash cache fill it."""

    def load_checkpoint(self, path: Path) -> str:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any], label: str, on_replaced: Callable[[], None]) -> str:
        """Put a merge made in memory into the host's image generator for its next generations, shown as `label`
        (its models, method and alpha, marked unsaved); returns the title the host shows for it. `state_dict` is
        the caller's: the host hands its loaders a copy of the dict and keeps no other reference to the tensors
        after `on_replaced()`, which it calls once another model takes its place. On failure: RebasinError, and
        the model loaded before still works."""
        raise RebasinError(NO_GENERATOR)

    def page_name_for(self, title: str) -> str:
        """The name to give the page's selectCheckpoint() for a model just loaded under `title`, or "" where the
        page must not be told (see page_selects_checkpoint)."""
        return title if self.page_selects_checkpoint else ""

    def adopt_saved(self, path: Path) -> str:
        """The unsaved merge loaded by load_state_dict was just saved, byte for byte, to `path`: from now on the
        loaded model is that file (listed, hashed, loadable), without reading it again. Returns its title."""
        return self.load_checkpoint(path)

    def run_job(self, job_id: str, work: Callable[[], None]) -> None:
        self._interrupted.clear()
        work()

    def discard_job(self, job_id: str) -> None:
        pass

    def report_progress(self, fraction: float, text: str) -> None:
        pass

    def interrupted(self) -> bool:
        return self._interrupted.is_set()

    def interrupt(self) -> None:
        self._interrupted.set()

    def device_choices(self) -> list[str]:
        return torch_device_choices()

    def default_device(self) -> str:
        choices = self.device_choices()
        gpu = [c for c in choices if c != "cpu"]
        if gpu:
            free = cuda_free_bytes()
            if free is None or free >= self.min_gpu_bytes:
                return gpu[0]
        return "cpu"

    def prepare_device(self, device: str) -> None:
        pass

    def restore_device(self, device: str) -> None:
        pass

    def defaults(self) -> dict[str, Any]:
        return dict(DEFAULTS)

    def hires_targets(self) -> dict[str, Any]:
        return {}

    def list_vaes(self) -> list[CheckpointEntry]:
        """VAE files the host knows (its VAE folder), for "bake in VAE"; none by default."""
        return []

    def ready_upscalers(self) -> set[str] | None:
        """Upscaler names that need no download first; None = the host does not say (all are taken as ready)."""
        return None

    # -- generation (the compare grid) -------------------------------------------------------------------------
    def loaded_checkpoint(self) -> Path | None:
        """The checkpoint file the host's generator has loaded now (None: none, or an unsaved merge): what a
        compare grid loads again when it ends."""
        return None

    def txt2img_inputs(self) -> dict[str, Any]:
        """txt2img's components by GenerationSettings field name, where the host has them (the tab reads the
        compare grid's prompt, seed, size, sampler and hires fix from them)."""
        return {}

    def generate(self, settings: GenerationSettings, label: str) -> GeneratedImage:
        """One txt2img picture with the model loaded now (`label` names it, for the infotext); runs inside
        `run_job`. An interrupt stops it early: the caller checks `interrupted()` after."""
        raise RebasinError(NO_GENERATOR_COMPARE)

    def save_grid(self, image: Any, infotext: str, settings: GenerationSettings) -> Path:
        """Save a compare grid where the host saves txt2img grids, `infotext` as its parameters; returns the file."""
        raise RebasinError(NO_GENERATOR_COMPARE)


VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt")


def scan_vaes(*folders: str | os.PathLike[str]) -> list[CheckpointEntry]:
    """VAE files as A1111 finds them: everything under a VAE folder, plus `*.vae.*` next to checkpoints."""
    out: dict[str, CheckpointEntry] = {}
    for i, folder in enumerate(folders):
        root = Path(folder)
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            name = p.name.lower()
            if not p.is_file() or not name.endswith(VAE_SUFFIXES) or name.startswith(".") or ".tmp" in name:
                continue
            if i > 0 and ".vae." not in name:  # a checkpoint folder: only files named *.vae.*
                continue
            out.setdefault(p.name, CheckpointEntry(p.name, p))
    return sorted(out.values(), key=lambda e: e.title.lower())


def scan_checkpoints(folder: str | os.PathLike[str], skip: tuple[str, ...] = ()) -> list[CheckpointEntry]:
    """Every *.safetensors / *.ckpt under `folder` (VAE files, and the subfolders named in `skip`, left out), titled
    by their path relative to it."""
    root = Path(folder)
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.rglob("*")):
        name = p.name.lower()
        if not p.is_file() or not name.endswith(CHECKPOINT_SUFFIXES):
            continue
        if p.relative_to(root).parts[0] in skip:
            continue
        if ".vae." in name or name.startswith(".") or ".tmp" in name:
            continue
        out.append(CheckpointEntry(p.relative_to(root).as_posix(), p))
    return out
