"""What a checkpoint file is, in a few facts (for `python -m lib_rebasin inspect` and the WebUI's dropdowns)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..arguments import check_arguments
from ..errors import RebasinError
from ..parts import part_of
from ..sdxl import config as sdxl
from .checkpoint import open_checkpoint
from .model_input import open_model


@dataclass
class CheckpointInfo:
    path: Path
    arch: str
    supported: bool
    error: str | None = None
    dtype: str = ""
    n_keys: int = 0
    size_bytes: int = 0
    parts: dict[str, int] = field(default_factory=dict)   # part -> number of keys
    metadata_keys: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"File: {self.path}", f"Architecture: {self.arch}"]
        if self.error:
            out.append(f"Not supported: {self.error}")
        if self.n_keys:
            out += [f"Tensors: {self.n_keys} keys, mostly {self.dtype}",
                    "Parts: " + ", ".join(f"{p} {n}" for p, n in self.parts.items())]
        out.append(f"Size: {self.size_bytes / 1e9:.3f} GB ({self.size_bytes:,} bytes)")
        if self.metadata_keys:
            out.append("Metadata: " + ", ".join(self.metadata_keys))
        return out


def inspect_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Describe a checkpoint; unsupported files get `supported=False` and the reason instead of an exception."""
    check_arguments("inspect_checkpoint", path=path)
    p = Path(path)
    size = p.stat().st_size if p.is_file() else 0
    try:
        model = open_model(p, "file")
    except RebasinError as e:
        info = CheckpointInfo(p, "unknown", False, str(e).removeprefix("Model file "), size_bytes=size)
        _describe_sdxl(info)
        return info
    with model.ckpt as ck:
        dtypes = Counter(str(i.dtype).removeprefix("torch.") for i in ck.infos.values())
        parts = Counter(map(part_of, ck))
        return CheckpointInfo(p, model.config.describe(), True, None, dtypes.most_common(1)[0][0], len(ck),
                              size, dict(sorted(parts.items())), sorted(ck.metadata))


def _describe_sdxl(info: CheckpointInfo) -> None:
    """Name an SDXL file whose layout is refused (a refiner, a damaged file), with its keys and parts, instead of
    'unknown'."""
    try:
        with open_checkpoint(info.path) as ck:
            shapes = ck.shapes()
            if not sdxl.is_sdxl(shapes):
                return
            try:
                info.arch = sdxl.detect(shapes).describe()
            except RebasinError:
                info.arch = "SDXL (unrecognised layout)"
            dtypes = Counter(str(i.dtype).removeprefix("torch.") for i in ck.infos.values())
            info.dtype, info.n_keys = dtypes.most_common(1)[0][0], len(ck)
            info.parts = dict(sorted(Counter(map(part_of, ck)).items()))
            info.metadata_keys = sorted(ck.metadata)
    except RebasinError:
        return
