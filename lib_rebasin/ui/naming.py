"""Output files of the tab and the API: a safe name inside the checkpoint folder, and the default name."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import RebasinError
from ..messages import clipped
from .host import CheckpointEntry

_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_BAD_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


def output_path_for(name: str, folder: Path, default_stem: str) -> Path:
    """A safe file name inside `folder`: refuses separators, '..', reserved or odd characters; adds .safetensors."""
    raw = (name or "").strip()
    name = clipped(name or "", 60)  # the messages below quote it
    if not raw:
        raw = default_stem
    if (raw in (".", "..") or ".." in raw.replace("\\", "/").split("/") or os.path.isabs(raw)
            or "/" in raw or "\\" in raw):
        raise RebasinError(f"Output name '{name}' points outside the checkpoint folder; give a plain file name "
                           f"without '/', '\\' or '..'.")
    if _BAD_CHARS.search(raw):
        raise RebasinError(f"Output name '{name}' contains characters that are not allowed in file names "
                           f"(< > : \" / \\ | ? * or control characters).")
    stem = raw[: -len(".safetensors")] if raw.lower().endswith(".safetensors") else raw
    if stem.lower().endswith(".ckpt") or stem.lower().endswith(".pt"):
        raise RebasinError(f"Output name '{name}': merges are saved as .safetensors; drop the .ckpt/.pt ending.")
    if not stem.strip(" .") or stem.startswith("."):
        raise RebasinError(f"Output name '{name}' is empty or hidden; give a name such as 'my_merge'.")
    if stem.rstrip(" .") != stem:
        raise RebasinError(f"Output name '{name}' ends with a space or a dot; remove it.")
    if stem.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise RebasinError(f"Output name '{name}' is a reserved device name on Windows; pick another name.")
    if len(stem.encode()) > 200:
        raise RebasinError("Output name is too long; keep it under 200 characters.")
    folder = Path(folder)
    out = folder / f"{stem}.safetensors"
    try:
        if out.resolve().parent != folder.resolve():
            raise RebasinError(f"Output name '{name}' points outside the checkpoint folder; give a plain file name.")
    except OSError:
        raise RebasinError(f"Output name '{name}' is not a valid file name.") from None
    return out


def default_output_stem(a: CheckpointEntry, b: CheckpointEntry, method: str, alpha: float,
                        blocks: str = "") -> str:
    """<A>_<B>_<method>_<alpha>, plus the block-weight preset (or "mbw" for custom values) when there is one."""
    sa, sb = a.path.stem, b.path.stem
    tag = {"rebasin": "rebasin", "weighted_sum": "ws", "add_difference": "adddiff", "legacy": "legacy",
           "train_difference": "traindiff", "dare_ties": "dareties"}.get(method, method)
    stem = f"{sa[:40]}_{sb[:40]}_{tag}_{alpha:.2f}"
    if blocks and blocks.strip():
        from ..merge.block_weights import preset_name

        name = preset_name(blocks)
        stem += "_" + (re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") if name else "mbw")
    return stem.replace(" ", "_")

