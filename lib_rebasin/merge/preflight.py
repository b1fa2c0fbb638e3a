"""The inputs of one merge, checked and opened before any work: everything that can be checked from the file
headers is, so that minutes of matching never end in an error that was knowable at the start."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..align.repair import check_supported as repair_supported
from ..arguments import check_arguments
from ..errors import InputChangedError, RebasinError
from ..io.checkpoint import Checkpoint
from ..io.input_file import check_input_path
from ..io.model_input import ModelInput, Source, check_compatible, open_model, same_file
from ..io.output_file import check_free_space, check_output_path, output_bytes
from ..io.precisions import PRECISIONS
from ..methods import METHODS
from ..options import MergeOptions
from ..parts import PARTS, part_of
from .block_weights import for_architecture as blocks_for_architecture
from .legacy import check_supported as legacy_supported


@dataclass
class Prepared:
    a: ModelInput
    b: ModelInput
    c: ModelInput | None
    output: Path | None
    options: MergeOptions
    overwrite: bool = False

    def close(self) -> None:
        for m in (self.a, self.b, self.c):
            if m is not None:
                m.close()

    def verify_unchanged(self) -> None:
        for m in (self.a, self.b, self.c):
            if m is not None:
                m.ckpt.verify_unchanged()

    def changed_error(self, e: InputChangedError) -> InputChangedError:
        """The error naming the model slot whose file changed, in one line."""
        for m in (self.a, self.b, self.c):
            if m is not None and m.ckpt.source is not None and m.ckpt.source.path == e.path:
                return InputChangedError(e.path, f"Model {m.label} ({m.path.name}) changed while it was being "
                                                 f"read; nothing was written.")
        return e


def preflight(a: Source, b: Source, output: str | os.PathLike[str] | None, options: MergeOptions,
              c: Source | None = None, overwrite: bool = False) -> Prepared:
    """Check everything that can be checked from the file headers; raise RebasinError with the reason.

    Sources are file paths or already open checkpoints (a recipe's in-memory intermediate results). `output` is
    None when the result stays in memory. Returns the opened inputs (call `.close()` when only validating).
    """
    check_arguments("preflight", ("output",), a=a, b=b, output=output, options=options, c=c, overwrite=overwrite)
    options.validate()
    info = METHODS[options.method]
    if info.needs_c and c is None:
        raise RebasinError(f"{info.label} needs a model C.")
    for src in (a, b, c):  # a missing file, a link loop or a NUL byte: say so before comparing paths
        if src is not None and not isinstance(src, Checkpoint):
            check_input_path(src)
    if same_file(a, b):
        raise RebasinError("Model A and model B are the same file; pick two different models.")
    if c is not None and info.needs_c and same_file(b, c):
        raise RebasinError("Model B and model C are the same file, so B - C is zero; pick different models.")
    for src in (a, b, c):
        if src is not None and output is not None and Path(output).exists() and same_file(src, output):
            raise RebasinError("The output would overwrite an input model; choose another output name.")
    out = check_output_path(output, overwrite) if output is not None else None
    opened: list[ModelInput] = []
    try:
        ma = open_model(a, "A")
        opened.append(ma)
        mb = open_model(b, "B")
        opened.append(mb)
        mc = open_model(c, "C") if (c is not None and info.needs_c) else None
        if mc is not None:
            opened.append(mc)
        parts = tuple(p for p in options.parts if p in ma.parts)
        if not parts:
            raise RebasinError("Model A has none of the chosen parts.")
        check_compatible(ma, mb, parts)
        if options.method == "legacy":
            legacy_supported(ma.config)
        if options.blocks is not None:  # a preset's name is read for the architecture here, where it is known
            options = options.with_blocks(blocks_for_architecture(ma.architecture, tuple(options.blocks),
                                                                  options.blocks_preset), options.blocks_preset)
        if options.matching == "activations":
            from ..align.activation_matching import check_supported

            check_supported(ma.config, mb.config)
        if options.repair:
            if "unet" not in parts:
                raise RebasinError("REPAIR corrects UNet layers; model A has no UNet.")
            repair_supported(ma.config, mb.config)
        if mc is not None:
            check_compatible(ma, mc, parts)
        if out is not None:  # before any matching: minutes of work must not end in a full disk
            check_free_space(out, output_bytes(output_entries(ma, PRECISIONS[options.precision])))
    except BaseException:
        for m in opened:
            m.close()
        raise
    return Prepared(ma, mb, mc, out, options, overwrite)


def output_entries(A: ModelInput, out_dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The output's keys, shapes and dtypes, in A's order: model weights at the output precision, the rest as
    stored in A."""
    spec = A.spec
    entries = []
    for k in A.ckpt:
        info = A.ckpt.infos[k]
        model_weight = k in spec.shapes and part_of(k) in PARTS and info.dtype.is_floating_point
        entries.append((k, info.shape, out_dtype if model_weight else info.dtype))
    return entries
