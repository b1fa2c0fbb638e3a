"""Baking a VAE into the output, as A1111's built-in merger does ("Bake in VAE").

The source is a standalone VAE file (LDM key layout: `encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`;
.safetensors, .ckpt or .pt; EMA and loss keys ignored) or any checkpoint, whose `first_stage_model.*` keys are used.
Every VAE key of the output then comes from that file, cast to the output precision; the VAE part is not merged.
The file is checked from its header against the merged architecture's VAE keys and shapes before any work starts: a
diffusers-format VAE or anything else that lacks them is refused in one line. SD 1.x's and SDXL's VAEs share one
layout and shapes, so nothing in the file tells them apart: the user picks the VAE made for the architecture.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..archspec import ArchSpec
from ..errors import RebasinError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.finite import Model
from ..io.input_file import HashProgress
from ..io.model_input import architecture_of
from ..parts import VAE

IGNORED_PREFIXES = ("loss.", "model_ema.")


@dataclass
class BakedVAE:
    path: Path
    ckpt: Checkpoint
    prefix: str                 # "" for a standalone VAE, "first_stage_model." inside a checkpoint
    owned: bool = True          # False: the caller opened the file (a recipe input) and closes it

    def source_key(self, key: str) -> str:
        """The file's key for the output key `first_stage_model.<name>`."""
        return self.prefix + key[len(VAE):]

    def get(self, key: str) -> torch.Tensor:
        """The value for the output key `first_stage_model.<name>`."""
        return self.ckpt.get(self.source_key(key))

    def checked(self) -> Model:
        """The file as the output guard names it when a baked value holds NaN or Inf (keys as in the file)."""
        return Model("VAE", self.path.name, self.ckpt.get, self.ckpt.keys(),
                     title=f"the VAE to bake in ({self.path.name})")

    def sha256(self, progress: HashProgress | None = None) -> str:
        """Of the open file: the bytes that are baked in, even if the path was replaced meanwhile."""
        from ..io.input_file import file_sha256

        return self.ckpt.sha256(progress) or file_sha256(self.path, progress)

    def close(self) -> None:
        if self.owned:
            self.ckpt.close()


def open_vae(source: str | os.PathLike[str] | Checkpoint, spec: ArchSpec[Any]) -> BakedVAE:
    """Open (or take an opened checkpoint) and check a VAE source against the spec's VAE keys and shapes;
    RebasinError with the reason. An opened checkpoint stays the caller's to close."""
    if isinstance(source, Checkpoint):
        ckpt, owned = source, False
    else:
        ckpt, owned = open_checkpoint(Path(source)), True
    p = Path(ckpt.path)
    try:
        names = {k: info for k, info in ckpt.infos.items() if not k.startswith(IGNORED_PREFIXES)}
        prefix = VAE if any(k.startswith(VAE) for k in names) else ""
        arch = architecture_of(spec.config)
        wanted = {k[len(VAE):]: shape for k, shape in spec.shapes.items() if k.startswith(VAE)}
        missing = [k for k in wanted if prefix + k not in names]
        if missing:
            hint = (" It looks like a diffusers-format VAE; use the .safetensors/.pt file made for the WebUI."
                    if any(".down_blocks." in k or ".up_blocks." in k for k in names) else "")
            raise RebasinError(f"{p.name} is not an {arch} VAE: {len(missing)} of its {len(wanted)} VAE weights are "
                               f"missing (e.g. {missing[0]}).{hint}")
        for k, shape in wanted.items():
            got = tuple(names[prefix + k].shape)
            if got != tuple(shape):
                raise RebasinError(f"{p.name} is not an {arch} VAE: {k} has shape {list(got)}, expected "
                                   f"{list(shape)}.")
    except BaseException:
        if owned:
            ckpt.close()
        raise
    return BakedVAE(p, ckpt, prefix, owned)
