"""The output precisions a merge can write, by the names options, recipes, the CLI and the UI use."""

from __future__ import annotations

import torch

PRECISIONS: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
