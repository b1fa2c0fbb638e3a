"""Block weights (MBW): a per-block alpha, in the 26-value convention every SD 1.x merge tab uses and the 20-value
one SDXL mixers use.

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

SDXL (`SDXL`, recorded as `sdxl-mbw-1`): 20 values `BASE,IN00..IN08,M00,OUT00..OUT08`, the blocks of SuperMerger's
XL list, the civitai SDXL block guides and sd-mecha's `sdxl-supermerger_blocks`. Its key mapping follows sd-mecha's
`convert_sdxl_blocks_to_sgm`: `time_embed.*` and `label_emb.*` follow BASE (they come before the input blocks),
`out.*` follows OUT08, both text encoders follow BASE; the VAE follows BASE too, as in our SD 1.x convention (sd-mecha
gives it a 21st `VAE` value). The count tells the conventions apart, and a merge refuses a count that is not its
architecture's before any work.

A named preset is 26 SD 1.x values; for SDXL it means SuperMerger's reading (`weighttoxl`, which every SDXL merge with
a preset goes through there): each SDXL block takes the value of the SD 1.x block of the same name, so IN09..IN11 and
OUT09..OUT11 are dropped. The merge converts the preset once it knows the architecture (`for_architecture`) and
records that reading as `SDXL.preset_version` beside the preset's name. Explicit values are never converted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property

from ..arguments import check_arguments, is_finite_number
from ..errors import FieldError
from ..messages import shown
from .block_presets import ALIASES, PRESETS


def _block_ids(blocks: int) -> tuple[str, ...]:
    return ("BASE", *(f"IN{i:02d}" for i in range(blocks)), "M00", *(f"OUT{i:02d}" for i in range(blocks)))


@dataclass(frozen=True)
class BlockConvention:
    """One architecture's block list and which block each key follows: (key pattern, block) rules, the first match
    winning, `{n}` the block's number in the key."""

    architecture: str
    ids: tuple[str, ...]
    rules: tuple[tuple[str, str], ...]
    version: str                        # recorded in the output's metadata
    # a named preset's 26 SD 1.x values -> this convention's: the blocks of the same name, and how that reading is
    # recorded (None: the presets are this convention's own values)
    preset_version: str | None = None

    @cached_property
    def from_sd1(self) -> tuple[int, ...]:
        """The index, among SD 1.x's 26 blocks, of the block of the same name as each of ours."""
        return tuple(SD1_IDS.index(b) for b in self.ids)

    def preset_values(self, preset: str) -> tuple[float, ...]:
        """A named preset's values in this convention."""
        values = PRESETS[preset]
        return tuple(values[i] for i in self.from_sd1)

    @cached_property
    def _compiled(self) -> tuple[tuple[re.Pattern[str], str], ...]:
        return tuple((re.compile(p), b) for p, b in self.rules)

    @cached_property
    def index(self) -> dict[str, int]:
        return {b: i for i, b in enumerate(self.ids)}

    def block_of(self, key: str) -> str | None:
        """The block a checkpoint key's weight comes from, or None for keys outside the model (buffers, EMA)."""
        for pattern, block in self._compiled:
            m = pattern.match(key)
            if m:
                name = block.format(n=int(m.group("n"))) if "n" in pattern.groupindex else block
                return name if name in self.index else None
        return None

    def listing(self) -> str:
        return f"{self.ids[0]},{self.ids[1]}..{self.ids[len(self.ids) // 2 - 1]},M00,OUT00..{self.ids[-1]}"


SD1_IDS = _block_ids(12)
_UNET = r"model\.diffusion_model\."
SD1 = BlockConvention("SD 1.x", SD1_IDS, (
    (_UNET + r"time_embed\.", "IN00"),
    (_UNET + r"input_blocks\.(?P<n>\d+)\.", "IN{n:02d}"),
    (_UNET + r"middle_block\.", "M00"),
    (_UNET + r"output_blocks\.(?P<n>\d+)\.", "OUT{n:02d}"),
    (_UNET + r"out\.", "OUT11"),
    (r"cond_stage_model\.", "BASE"),
    (r"first_stage_model\.", "BASE"),
), "sd1-mbw-1")
SDXL = BlockConvention("SDXL", _block_ids(9), (
    (_UNET + r"(time_embed|label_emb)\.", "BASE"),
    (_UNET + r"input_blocks\.(?P<n>\d+)\.", "IN{n:02d}"),
    (_UNET + r"middle_block\.", "M00"),
    (_UNET + r"output_blocks\.(?P<n>\d+)\.", "OUT{n:02d}"),
    (_UNET + r"out\.", "OUT08"),
    (r"conditioner\.embedders\.", "BASE"),
    (r"first_stage_model\.", "BASE"),
), "sdxl-mbw-1", preset_version="sdxl-presets-1")
CONVENTIONS = {c.architecture: c for c in (SD1, SDXL)}
_BY_COUNT = {len(c.ids): c for c in (SD1, SDXL)}

# The SD 1.x convention under its long-standing names.
BLOCK_IDS, RULES, MAPPING_VERSION, BLOCK_INDEX = SD1.ids, SD1.rules, SD1.version, SD1.index
block_of = SD1.block_of


def convention_for(values: tuple[float, ...]) -> BlockConvention:
    """The convention a list of block weights is in (told apart by its count, checked by `check_values`)."""
    return _BY_COUNT[len(values)]


def for_architecture(architecture: str, values: tuple[float, ...], preset: str | None) -> tuple[float, ...]:
    """Block weights in the merged architecture's convention: a named preset's 26 values read for it (see the
    module's docstring), anything else as given; a count that is not the architecture's is refused in one line."""
    want = CONVENTIONS[architecture]
    if preset is not None and preset in PRESETS and want is not SD1 and len(values) == len(SD1.ids):
        return want.preset_values(preset)
    if len(values) != len(want.ids):
        raise FieldError("blocks", f"Block weights for {architecture} need {len(want.ids)} values "
                                   f"({want.listing()}); got {len(values)}.")
    return values


def preset_reading(values: tuple[float, ...], preset: str | None) -> str | None:
    """How a preset's name was read for these values' convention (recorded in metadata), None where the preset's
    values are the convention's own or there is no preset."""
    return convention_for(values).preset_version if preset is not None else None


def preset_name(name: str) -> str | None:
    """The canonical preset name for `name` (case-insensitive, sd-meh spellings too), or None."""
    upper = name.strip().upper()
    if upper in PRESETS:
        return upper
    return ALIASES.get(upper)


@dataclass(frozen=True)
class BlockWeights:
    values: tuple[float, ...]          # weights of B in a convention's block order (26: SD 1.x, 20: SDXL)
    preset: str | None = None          # the preset they came from, if any

    def alpha_of(self, key: str, default: float) -> float:
        convention = convention_for(self.values)
        block = convention.block_of(key)
        return default if block is None else self.values[convention.index[block]]

    def text(self) -> str:
        return ",".join(format_value(v) for v in self.values)

    def label(self) -> str:
        return self.preset or self.text()


def format_value(v: float) -> str:
    return repr(float(v)) if v != int(v) else str(int(v))


def parse_blocks(text: str, alpha: float) -> BlockWeights:
    """26 values, 25 UNet values (then BASE = alpha), 20 (SDXL) or a preset name; else a one-line FieldError on
    `blocks`."""
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
                                       "values (BASE,IN00..IN11,M00,OUT00..OUT11), 25, 20 for SDXL, or a preset "
                                       "name.")
        values.append(float(p))
    if len(values) == 25:
        check_arguments("parse_blocks", alpha=alpha)  # only 25 values use it, as BASE
        values = [float(alpha), *values]
    if len(values) not in _BY_COUNT:
        raise FieldError("blocks", f"Block weights need 26 values (BASE,IN00..IN11,M00,OUT00..OUT11) or 25 (UNet "
                                   f"only, BASE = alpha), or 20 for SDXL ({SDXL.listing()}); got {len(values)}.")
    return BlockWeights(tuple(values))


def check_values(values: tuple[float, ...], bounded: bool) -> None:
    if len(values) not in _BY_COUNT:
        raise FieldError("blocks", f"Block weights need 26 values (SD 1.x) or 20 (SDXL), got {len(values)}.")
    for block, v in zip(convention_for(values).ids, values, strict=True):
        if not is_finite_number(v):
            raise FieldError("blocks", f"Block weight {block} must be a finite number, got {shown(v)}.")
        if bounded and not 0.0 <= v <= 1.0:
            raise FieldError("blocks", f"Block weight {block} must be between 0 and 1 for this method, got {v:g}.")


def _is_number(s: str) -> bool:
    try:
        return math.isfinite(float(s))
    except ValueError:
        return False
