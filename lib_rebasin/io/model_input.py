"""Opening and validating the checkpoints of one merge: architecture, parts present, compatibility, identity.

`ModelInput` bundles an open checkpoint with its detected config; `open_model` never loads tensor data, so
validation costs only the headers and is cheap enough to run before every merge (and on every dropdown change in
the WebUI).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

from ..archspec import ArchSpec
from ..errors import IncompatibleModelsError, RebasinError, UnsupportedModelError
from ..parts import part_of
from ..sd1 import config as sd1
from ..sd1 import spec as sd1_spec
from ..sd1.config import SD1Config
from ..sdxl import config as sdxl
from ..sdxl import spec as sdxl_spec
from ..sdxl.config import SDXLConfig
from .checkpoint import Checkpoint, open_checkpoint
from .input_file import HashProgress, hash_sources
from .parsing import json_or_none

# The config of any architecture a merge takes; its type is the architecture (`architecture_of`).
ModelConfig = SD1Config | SDXLConfig
_SPECS: dict[ModelConfig, ArchSpec[Any]] = {}


def spec_for(config: ModelConfig) -> ArchSpec[Any]:
    """The permutation spec of a config, from its architecture's walker (built once per process)."""
    if config not in _SPECS:
        _SPECS[config] = (sdxl_spec.build_spec(config) if isinstance(config, SDXLConfig)
                          else sd1_spec.build_spec(config))
    return _SPECS[config]


def architecture_of(config: ModelConfig) -> str:
    """The architecture's name in a sentence and in metadata: "SD 1.x" or "SDXL"."""
    return "SDXL" if isinstance(config, SDXLConfig) else "SD 1.x"


# A model given to a merge: a file path, or an already open (possibly in-memory) checkpoint.
Source = Union[str, "os.PathLike[str]", Checkpoint]


@dataclass
class ModelInput:
    label: str            # "A", "B", "C"
    ckpt: Checkpoint
    config: ModelConfig
    parts: set[str] = field(default_factory=set)
    owned: bool = True    # opened here (closed with the merge) or handed in by the caller

    @property
    def path(self) -> Path:
        return self.ckpt.path

    @property
    def in_memory(self) -> bool:
        return self.ckpt.in_memory

    def sha256(self, progress: HashProgress | None = None) -> str | None:
        """sha256 of the bytes merged: the open file, which a rename over its path does not change (remembered
        per file version); None for an in-memory checkpoint. `progress(done, total)` as it goes."""
        return self.ckpt.sha256(progress)

    def close(self) -> None:
        if self.owned:
            self.ckpt.close()

    @property
    def spec(self) -> ArchSpec[Any]:
        return spec_for(self.config)

    @property
    def architecture(self) -> str:
        return architecture_of(self.config)


def open_model(path: Source, label: str) -> ModelInput:
    if isinstance(path, Checkpoint):
        ckpt, owned = path, False
    else:
        ckpt, owned = open_checkpoint(path), True
    try:
        shapes = ckpt.shapes()
        has_vae = any(part_of(k) == "vae" for k in shapes)
        config: ModelConfig
        if sdxl.is_sdxl(shapes):
            config = sdxl.detect(shapes)
            sdxl.check_layout(config, shapes, has_vae=has_vae)
        else:
            config = sd1.detect(shapes)
            sd1.check_layout(config, shapes, has_vae=has_vae)
        check_float_weights(ckpt, spec_for(config))
    except RebasinError as e:
        if owned:
            ckpt.close()
        raise type(e)(f"Model {label} ({ckpt.path.name}): {e}") from None
    parts = {"unet", "te"} | ({"vae"} if has_vae else set())
    return ModelInput(label, ckpt, config, parts, owned)


def check_float_weights(ckpt: Checkpoint, spec: ArchSpec[Any]) -> None:
    """Refuse integer or bool tensors where the SD layout has weights (headers only): they cannot be blended, and
    copying them would put integers where every host expects floats."""
    bad = [k for k, info in ckpt.infos.items()
           if k in spec.shapes and part_of(k) != "other" and not k.endswith("position_ids")
           and not info.dtype.is_floating_point]
    if bad:
        dtypes = sorted({str(ckpt.infos[k].dtype).replace("torch.", "") for k in bad})
        raise UnsupportedModelError(
            f"{len(bad)} weight tensor(s) hold {'/'.join(dtypes)} values where floats are needed (e.g. "
            f"{', '.join(sorted(bad)[:3])}); the file is damaged or not a real checkpoint.")


def same_file(a: Source, b: Source) -> bool:
    """Whether two sources are one file (an open checkpoint counts as the file it reads, an in-memory one only
    as itself)."""
    return _file_identity(a) == _file_identity(b)


def _file_identity(src: Source) -> object:
    if isinstance(src, Checkpoint):
        return src.source.identity[:2] if src.source is not None else id(src)
    try:
        st = os.stat(src)
        return (st.st_dev, st.st_ino)
    except (OSError, ValueError):  # it cannot be opened (opening it says why) or has a NUL byte
        return os.path.abspath(src)


def check_compatible(first: ModelInput, other: ModelInput, parts: tuple[str, ...]) -> None:
    """Raise unless `other` can be blended into `first` for the chosen parts.

    The only shape difference tolerated is a wider UNet input on `first` (inpainting / instruct-pix2pix A with a
    plain B), handled like the WebUI's merger: the extra input channels keep A's weights.
    """
    fa, fb = first.config, other.config
    if type(fa) is not type(fb):
        raise IncompatibleModelsError(
            f"Model {first.label} is {architecture_of(fa)} but model {other.label} is {architecture_of(fb)}; "
            "models of different architectures cannot be merged.")
    if "vae" not in parts or "vae" not in first.parts or "vae" not in other.parts:
        # A model without a VAE gets the default VAE width from `detect`; with no VAE to blend, it cannot differ.
        fb = replace(fb, vae_channels=fa.vae_channels, vae_mult=fa.vae_mult, vae_res_blocks=fa.vae_res_blocks,
                     vae_z=fa.vae_z)
    if fa != fb:
        if replace(fb, unet_in_channels=fa.unet_in_channels) == fa and fa.unet_in_channels > fb.unet_in_channels:
            pass
        elif fb.unet_in_channels > fa.unet_in_channels:
            raise IncompatibleModelsError(
                f"Model {other.label} is {fb.variant} but model {first.label} is {fa.variant}: put the "
                f"{fb.variant} model in slot {first.label} (its extra input channels are kept).")
        else:
            raise IncompatibleModelsError(
                f"Models {first.label} and {other.label} have different shapes ({fa.describe()} vs "
                f"{fb.describe()}); they cannot be merged.")
    missing = [p for p in parts if p in first.parts and p not in other.parts]
    if missing:
        names = {"unet": "UNet", "te": "text encoder", "vae": "VAE"}
        raise IncompatibleModelsError(
            f"Model {other.label} has no {names[missing[0]]}; untick that part or pick a full checkpoint.")


def hash_models(models: list[ModelInput], progress: HashProgress | None = None) -> None:
    """Hash the files of `models` at once (`io.input_file.hash_sources`; in-memory ones have nothing to hash);
    each `sha256()` then answers without reading. `progress(done, total)` over all of them."""
    hash_sources([m.ckpt.source for m in models if m.ckpt.source is not None], progress)


def legacy_hash(source: str | os.PathLike[str] | Checkpoint) -> str:
    """The WebUI's old 8-digit model hash (sha256 of 64 KiB at offset 1 MiB), of an open checkpoint's file (the
    bytes it reads) or of a path."""
    if isinstance(source, Checkpoint):
        return hashlib.sha256(source.read_bytes(0x100000, 0x10000)).hexdigest()[:8]
    with open(source, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def merge_history(model: ModelInput) -> dict[str, object]:
    """The input's own `sd_merge_models` entries, so provenance chains survive another merge."""
    value = json_or_none(model.ckpt.metadata.get("sd_merge_models"))
    return value if isinstance(value, dict) else {}
