"""Provenance written into every output: A1111's `sd_merge_recipe` / `sd_merge_models` and our own recipe.

The options recorded are the option table's (`options.OPTIONS`), each where its `recorded_when` says. Key names
are the options' own (A1111's `interp_method` and `multiplier` for method and alpha in `sd_merge_recipe`); the
order of the keys follows the table, and `allow_nonfinite` is recorded when it is on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import __version__
from ..io.model_input import hash_models, legacy_hash, merge_history
from ..io.parsing import json_or_none
from ..merge.block_weights import convention_for, preset_reading
from ..options import OPTIONS, MergeOptions
from ..progress import Reporter

if TYPE_CHECKING:
    from ..merge.preflight import Prepared

# The permutation groups a re-basin merge searches over. 2: whole attention heads reorder; one-channel GroupNorms
# constrain nothing; GroupNorm blocks move inside straddled intervals (the same inputs now give other merges).
SPEC_VERSION = "sd1-walk-2"
# The spec version per architecture. An SD 1.x output names no architecture (every file made before SDXL could be
# merged is SD 1.x, and its bytes stay as they were); any other names it.
SPEC_VERSIONS = {"SD 1.x": SPEC_VERSION, "SDXL": "sdxl-walk-1"}


def architecture_fields(prep: Prepared) -> dict[str, str]:
    """The spec version of the merged architecture, and its name unless it is SD 1.x."""
    arch = prep.a.architecture
    return {"spec": SPEC_VERSIONS[arch], **({} if arch == "SD 1.x" else {"architecture": arch})}


def recorded_options(o: MergeOptions) -> dict[str, object]:
    """The options an output records, from the table: each where `Option.recorded` says (so an output made without
    an option keeps the bytes it always had), block weights with the key mapping's version."""
    out: dict[str, object] = {}
    for opt in OPTIONS.values():
        if opt.recorded(o):
            value = getattr(o, opt.name)
            out[opt.name] = list(value) if isinstance(value, tuple) else value
    if o.blocks is not None:
        out["block_mapping"] = convention_for(tuple(o.blocks)).version
        reading = preset_reading(tuple(o.blocks), o.blocks_preset)
        if reading is not None:  # the preset's 26 SD 1.x values were read for another architecture
            out["blocks_preset_mapping"] = reading
    return out


def recipe_of(prep: Prepared, parts: tuple[str, ...]) -> dict[str, object]:
    return {**recorded_options(prep.options), "parts": list(parts),
            "models": {m.label: m.path.name for m in (prep.a, prep.b, prep.c) if m is not None},
            # where each input was read from, so `recipe --from` can find it again by sha256
            "folders": {m.label: str(m.path.resolve().parent) for m in (prep.a, prep.b, prep.c)
                        if m is not None and not m.in_memory}}


def webui_block_fields(o: MergeOptions) -> dict[str, object]:
    """Block weights also in the names SuperMerger's sd_merge_recipe uses (25 UNet weights + base alpha)."""
    if o.blocks is None:
        return {"mbw": False}
    return {"mbw": True, "weights_alpha": list(o.blocks[1:]), "base_alpha": o.blocks[0]}


def hash_progress(report: Reporter, what: str, lo: float, hi: float) -> Callable[[int, int], None]:
    """Progress of hashing one file as `report` events from `lo` to `hi` of the stage (each checks for a
    cancel, so a huge file stays cancellable)."""
    def on_chunk(done: int, total: int) -> None:
        local = done / total if total else 1.0
        report("hashing", lo + (hi - lo) * local, f"hashing {what}: {local:.0%}")

    return on_chunk


def provenance_metadata(prep: Prepared, parts: tuple[str, ...], extra: dict[str, str],
                        report: Reporter) -> dict[str, str]:
    models = [m for m in (prep.a, prep.b, prep.c) if m is not None]
    files = [m for m in models if not m.in_memory]
    if files:
        what = " and ".join(f"model {m.label} ({m.path.name})" for m in files)
        report("hashing", 0.0, f"hashing {what}")
        hash_models(files, hash_progress(report, what, 0.0, 1.0))  # at once, on as many threads as files
    hashes = {m.label: m.sha256() for m in models}
    o = prep.options
    # A1111's recipe: the same options under its names where it has them (OPTIONS' webui_name).
    webui = {(OPTIONS[k].webui_name if k in OPTIONS else "") or k: v for k, v in recorded_options(o).items()}
    recipe = {"type": "lib_rebasin", "version": __version__, **architecture_fields(prep),
              "primary_model_hash": hashes["A"], "secondary_model_hash": hashes["B"],
              "tertiary_model_hash": hashes.get("C"), **webui, "parts": list(parts),
              "save_as_half": o.precision == "fp16", **webui_block_fields(o),
              "is_inpainting": prep.a.config.unet_in_channels == 9,
              "is_instruct_pix2pix": prep.a.config.unet_in_channels == 8}
    merge_models: dict[str, object] = {}
    for m in models:
        own = m.ckpt.metadata.get("sd_merge_recipe")
        own_recipe = json_or_none(own)
        sha = hashes[m.label]
        if sha is None:
            continue  # an in-memory intermediate: the recipe that made it is recorded by the caller
        merge_models[sha] = {"name": m.path.stem, "legacy_hash": legacy_hash(m.ckpt),
                                         "sd_merge_recipe": own_recipe}
        merge_models.update(merge_history(m))
    meta = {"format": "pt", "sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(merge_models)}
    meta.update(extra)
    return meta
