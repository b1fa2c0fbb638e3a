"""Block weights (MBW): a per-block alpha, in the 26-value convention every SD 1.x merge tab uses.

The string is `BASE,IN00,...,IN11,M00,OUT00,...,OUT11`, each value model B's weight in that block. kohya / bbc-mc's
original form has the 25 UNet values only, plus a separate base alpha: 25 values are accepted and BASE is then the
merge's alpha. A preset name (`merge/block_presets.py`) is accepted too.

Which block a key belongs to is written down once, as data (`RULES`), and applied to every key the spec emits
(tested key by key over the full SD 1.5 layout). Where the tools disagree we chose, and record the choice as
`MAPPING_VERSION` in every output's metadata:

- `time_embed.*` follows IN00 (bbc-mc, sd-meh and SuperMerger today; sd-mecha uses BASE, and SuperMerger between
  2023-07 and 2025-11 used OUT11);
- `out.*` (the final GroupNorm and conv) follows OUT11 (all of bbc-mc, sd-meh, SuperMerger, sd-mecha);
- the text encoder follows BASE, and so does the VAE (bbc-mc, sd-meh and SuperMerger's weighted sum do the same;
  Model Mixer keeps A's VAE). `--parts` still decides whether the VAE is merged at all.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..arguments import check_arguments, is_finite_number
from ..errors import FieldError
from ..messages import shown
from .block_presets import ALIASES, PRESETS

BLOCK_IDS: tuple[str, ...] = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
MAPPING_VERSION = "sd1-mbw-1"

# (key pattern, block). The first match wins; `{n}` is the block's number in the key.
RULES: tuple[tuple[str, str], ...] = (
    (r"model\.diffusion_model\.time_embed\.", "IN00"),
    (r"model\.diffusion_model\.input_blocks\.(?P<n>\d+)\.", "IN{n:02d}"),
    (r"model\.diffusion_model\.middle_block\.", "M00"),
    (r"model\.diffusion_model\.output_blocks\.(?P<n>\d+)\.", "OUT{n:02d}"),
    (r"model\.diffusion_model\.out\.", "OUT11"),
    (r"cond_stage_model\.", "BASE"),
    (r"first_stage_model\.", "BASE"),
)
_COMPILED = tuple((re.compile(p), b) for p, b in RULES)


def block_of(key: str) -> str | None:
    """The block a checkpoint key's weight comes from, or None for keys outside the model (buffers, EMA)."""
    for pattern, block in _COMPILED:
        m = pattern.match(key)
        if m:
            name = block.format(n=int(m.group("n"))) if "n" in pattern.groupindex else block
            return name if name in BLOCK_INDEX else None
    return None


BLOCK_INDEX = {b: i for i, b in enumerate(BLOCK_IDS)}


def preset_name(name: str) -> str | None:
    """The canonical preset name for `name` (case-insensitive, sd-meh spellings too), or None."""
    upper = name.strip().upper()
    if upper in PRESETS:
        return upper
    return ALIASES.get(upper)


@dataclass(frozen=True)
class BlockWeights:
    values: tuple[float, ...]          # 26 weights of B, in BLOCK_IDS order
    preset: str | None = None          # the preset they came from, if any

    def alpha_of(self, key: str, default: float) -> float:
        block = block_of(key)
        return default if block is None else self.values[BLOCK_INDEX[block]]

    def text(self) -> str:
        return ",".join(format_value(v) for v in self.values)

    def label(self) -> str:
        return self.preset or self.text()


def format_value(v: float) -> str:
    return repr(float(v)) if v != int(v) else str(int(v))


def parse_blocks(text: str, alpha: float) -> BlockWeights:
    """26 values, 25 UNet values (then BASE = alpha), or a preset name; else a one-line FieldError on `blocks`."""
    check_arguments("parse_blocks", text=text)
    raw = text.strip()
    if not raw:
        raise FieldError("blocks", "Block weights are empty: give 26 comma-separated values, 25 (BASE = alpha), "
                                   "or a preset name such as GRAD_V.")
    name = preset_name(raw)
    if name is not None:
        return BlockWeights(PRESETS[name], name)
    parts = [p.strip() for p in raw.replace(";", ",").split(",")]
    if len(parts) == 1 and not _is_number(parts[0]):
        raise FieldError("blocks", f"Unknown block-weight preset '{raw}'; presets: {', '.join(PRESETS)}.")
    values: list[float] = []
    for i, p in enumerate(parts):
        if not _is_number(p):
            raise FieldError("blocks", f"Block weight {i + 1} ('{p}') is not a number; give 26 comma-separated "
                                       "values (BASE,IN00..IN11,M00,OUT00..OUT11), 25, or a preset name.")
        values.append(float(p))
    if len(values) == 25:
        check_arguments("parse_blocks", alpha=alpha)  # only 25 values use it, as BASE
        values = [float(alpha), *values]
    if len(values) != 26:
        raise FieldError("blocks", f"Block weights need 26 values (BASE,IN00..IN11,M00,OUT00..OUT11) or 25 (UNet "
                                   f"only, BASE = alpha); got {len(values)}.")
    return BlockWeights(tuple(values))


def check_values(values: tuple[float, ...], bounded: bool) -> None:
    if len(values) != 26:
        raise FieldError("blocks", f"Block weights need 26 values, got {len(values)}.")
    for block, v in zip(BLOCK_IDS, values, strict=True):
        if not is_finite_number(v):
            raise FieldError("blocks", f"Block weight {block} must be a finite number, got {shown(v)}.")
        if bounded and not 0.0 <= v <= 1.0:
            raise FieldError("blocks", f"Block weight {block} must be between 0 and 1 for this method, got {v:g}.")


def _is_number(s: str) -> bool:
    try:
        return math.isfinite(float(s))
    except ValueError:
        return False
