"""What a merge records about itself: its diagnostics, begun from the options, and the output's metadata (the
provenance with the inputs' hashes, the VAE baked in, the stored diagnostics)."""

from __future__ import annotations

import json
from collections.abc import Callable

from .. import __version__
from ..methods import METHODS
from ..options import MergeOptions
from ..progress import Reporter
from ..recipe.provenance import architecture_fields, hash_progress, provenance_metadata, recipe_of
from .diagnostics import Diagnostics, stored_diagnostics
from .preflight import Prepared
from .vae_bake import BakedVAE

MetadataHook = Callable[[Diagnostics], dict[str, str]]


def begin_diagnostics(opts: MergeOptions, parts: tuple[str, ...]) -> Diagnostics:
    """The diagnostics of a merge with these options over these parts, before any work."""
    return Diagnostics(opts.method, opts.alpha, opts.iterations, list(parts),
                       blocks=list(opts.blocks) if opts.blocks is not None else None,
                       blocks_preset=opts.blocks_preset, aligned=opts.align,
                       params={**opts.method_params(), **({"seed": opts.seed} if METHODS[opts.method].random else {})},
                       matching=opts.matching,
                       activation_samples=opts.activation_samples if opts.matching == "activations" else 0)


def hashed_provenance(prep: Prepared, parts: tuple[str, ...], extra: dict[str, str], baked: BakedVAE | None,
                      report: Reporter, diag: Diagnostics) -> tuple[dict[str, str], dict[str, str] | None]:
    """The provenance metadata with every input's sha256 (the VAE to bake in too), and the baked VAE's record.

    Hashed before writing, so the output file itself is never hashed by mistake."""
    metadata = provenance_metadata(prep, parts, extra, report)
    if baked is None:
        return metadata, None
    report("hashing", 1.0, f"hashing the VAE to bake in ({baked.path.name})")
    vae_sha256 = baked.sha256(hash_progress(report, f"the VAE to bake in ({baked.path.name})", 1.0, 1.0))
    record = {"file": baked.path.name, "sha256": vae_sha256, "folder": str(baked.path.resolve().parent)}
    webui = json.loads(metadata["sd_merge_recipe"])
    webui["bake_in_vae"] = baked.path.name
    metadata["sd_merge_recipe"] = json.dumps(webui)
    diag.baked_vae = baked.path.name
    return metadata, record


def output_metadata(prep: Prepared, parts: tuple[str, ...], provenance: dict[str, str],
                    baked_record: dict[str, str] | None, diag: Diagnostics,
                    metadata_hook: MetadataHook | None) -> dict[str, str]:
    """The output's metadata once every tensor is produced: the provenance, our own record (the recipe that
    re-runs the merge, and the diagnostics without wall time, so the same inputs give the same bytes), then
    whatever `metadata_hook(diag)` replaces."""
    stored = stored_diagnostics(diag)
    meta = {**provenance, "lib_rebasin": json.dumps({"version": __version__, **architecture_fields(prep),
                                                      "recipe": {**recipe_of(prep, parts),
                                                                 **({"bake_vae": baked_record}
                                                                    if baked_record else {})},
                                                      "diagnostics": stored})}
    return {**meta, **metadata_hook(diag)} if metadata_hook is not None else meta
