"""PyTorch checkpoints (.ckpt, .pt): loaded with `torch.load(weights_only=True)`, so a pickle that needs arbitrary
code is refused, never executed; what the load would allocate is read from the file's index first
(`io/torch_file_sizes.py`)."""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointReadError, InputChangedError
from ..messages import clipped
from .input_file import FileSource
from .torch_file_sizes import check_sizes


def refuse_pickle_kind(p: Path, kind: str) -> None:
    """Refuse the containers that are not torch.save's zip or legacy format."""
    if kind == "tar":
        raise CheckpointReadError(
            f"{p.name}: this is PyTorch's legacy tar checkpoint format (torch 0.3 and older), which cannot be read "
            "without running its code. If you trust its source, load it in a trusted PyTorch and save it as "
            ".safetensors.")
    if kind == "pickle":
        raise CheckpointReadError(
            f"{p.name}: refused to load: this is a plain Python pickle, not a checkpoint saved by torch.save, and "
            "loading it could run code (nothing was executed). If you trust its source, convert it to .safetensors "
            "with a trusted tool.")
    if kind not in ("zip", "legacy"):
        raise CheckpointReadError(f"{p.name}: not a checkpoint (neither safetensors nor a PyTorch file); the file "
                                  "is corrupt or of another kind.")


def load_pickle_tensors(p: Path, src: FileSource, kind: str) -> dict[str, torch.Tensor]:
    """The tensors of a torch.save file, keys as stored (a nested `state_dict` is unwrapped)."""
    # What torch.load would allocate is read from the file's own index first (io/torch_file_sizes.py): a small file
    # that declares gigabytes is refused before anything is allocated.
    check_sizes(src.file, src.size, p.name, kind)
    src.file.seek(0)
    try:
        # Read into memory, not memory-mapped (a mapped file that changes while it is read kills the process
        # with SIGBUS), from the descriptor that is hashed later, so the recorded hash is of these bytes. A file
        # handle also keeps torch.load from choosing its reader by the file's name (a .pt named .safetensors).
        obj = torch.load(src.file, map_location="cpu", weights_only=True)
        src.verify()
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported (?:global|operand)[^.]*", str(e))
        if refused is None:  # the unpickler choked on the bytes themselves: damage, not code
            raise CheckpointReadError(f"{p.name}: the PyTorch checkpoint is corrupt "
                                      f"({clipped(str(e).splitlines()[0] if str(e) else 'unreadable pickle', 120)}); "
                                      "download or export it again.") from None
        raise CheckpointReadError(
            f"{p.name}: refused to load: this pickle needs code beyond plain tensors "
            f"({clipped(refused.group(0), 120)}). It was not executed. If you trust its source, convert it to "
            ".safetensors with a trusted tool."
        ) from None
    except (OSError, InputChangedError):
        raise
    except Exception as e:  # weights_only loading runs no code: anything else it raises means a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointReadError(f"{p.name}: the PyTorch checkpoint is truncated or corrupt ({clipped(first, 120)}); "
                                  "download or export it again.") from None
    while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"{p.name}: does not contain a state dict (found {type(obj).__name__}).")
    tensors: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            tensors[str(k)] = v
    if not tensors:
        raise CheckpointReadError(f"{p.name}: contains no tensors.")
    return tensors
