"""Finding a recipe's model files: by name inside the models folder, or by sha256 in the folders it may be in."""

from __future__ import annotations

from pathlib import Path

from ..arguments import check_arguments
from ..errors import CheckpointReadError
from ..io.checkpoint import check_header
from ..io.input_file import file_sha256
from ..progress import Reporter
from .format import ModelRef, Recipe, RecipeError
from .provenance import hash_progress

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt")


def resolve_models(recipe: Recipe, models_dir: Path, confine: bool = True,
                   vae_dir: Path | None = None, report: Reporter | None = None) -> dict[str, Path]:
    """Find every model file: by name inside `models_dir`, or by sha256 in `models_dir` (recursively), the recipe's
    folder and the folders recorded with the recipe; raise for the first one that is missing. The VAE to bake in is
    looked for in `vae_dir` (the host's VAE folder) first, by name and by sha256, then like any model.

    With `confine` (the CLI) a name must stay inside `models_dir`, symbolic links included; a caller that pinned
    the files itself (the WebUI tab, to the host's checkpoint list) passes False. Only files that are checkpoints
    by their header are hashed, each reporting its progress to `report` (which can cancel).
    """
    check_arguments("resolve_models", ("vae_dir",), recipe=recipe, models_dir=models_dir, confine=confine,
                    vae_dir=vae_dir)
    models_dir, vae_dir = Path(models_dir), (Path(vae_dir) if vae_dir is not None else None)
    found: dict[str, Path] = {}
    hashes: dict[Path, str] = {}
    if not models_dir.is_dir():
        raise RecipeError(f"--models-dir {models_dir} is not a folder.")
    if vae_dir is not None and not vae_dir.is_dir():
        raise RecipeError(f"--vae-dir {vae_dir} is not a folder.")
    root = models_dir.resolve()

    def sha(p: Path) -> str:
        if p not in hashes:
            try:
                check_header(p)  # a file that is no checkpoint is never read whole
                hashes[p] = file_sha256(p, hash_progress(report, p.name, 0.0, 0.0) if report else None)
            except (OSError, CheckpointReadError):  # unreadable, or no checkpoint: it cannot be the pinned file
                hashes[p] = ""
        return hashes[p]

    def by_hash(ref: ModelRef) -> Path | None:
        assert ref.sha256 is not None
        want = ref.sha256.lower()
        folders: list[tuple[Path, bool]] = [(models_dir, True)]
        if vae_dir is not None and ref.name == recipe.bake_vae:
            folders.insert(0, (vae_dir, True))
        folders += [(Path(f), False) for f in (recipe.folder, ref.folder) if f is not None]
        seen: set[Path] = set()
        for folder, recursive in folders:
            try:
                listing = folder.rglob("*") if recursive else folder.glob("*")
                candidates = sorted(p for p in listing if p.suffix.lower() in MODEL_EXTENSIONS and p.is_file())
            except OSError:
                continue
            for p in candidates:
                real = p.resolve()
                if real in seen:
                    continue
                seen.add(real)
                if sha(p) and sha(p).startswith(want):
                    return p
        return None

    def where(ref: ModelRef) -> str:
        extra = [str(f) for f in (recipe.folder, ) if f is not None and Path(f).resolve() != root]
        vae = f"--vae-dir {vae_dir}, " if vae_dir is not None and ref.name == recipe.bake_vae else ""
        return vae + f"--models-dir {models_dir}" + "".join(f", {e}" for e in extra)

    for ref in recipe.models.values():
        path = None
        if ref.file is not None:
            folders = [models_dir]
            if vae_dir is not None and ref.name == recipe.bake_vae:
                folders.insert(0, vae_dir)
            candidates = ([Path(ref.file)] if (Path(ref.file).is_absolute() and not confine)
                          else [f / ref.file for f in folders])
            path = next((p for p in candidates if p.is_file()), None)
            if path is None and ref.sha256 is None:
                hint = (" or --vae-dir" if ref.name == recipe.bake_vae else "")
                raise RecipeError(f"line {ref.line}: model '{ref.name}': file {ref.file} not found in "
                                  f"{where(ref)}; put it there or pass --models-dir{hint}.")
        if path is not None and ref.sha256:
            check_header(path)  # one line saying what the named file is, before it is hashed
        if path is not None and ref.sha256 and not (sha(path) and sha(path).startswith(ref.sha256.lower())):
            raise RecipeError(f"line {ref.line}: model '{ref.name}': {path.name} does not have sha256 {ref.sha256}.")
        if path is None and ref.sha256:
            path = by_hash(ref)
            if path is None:
                also = f" or {ref.folder}" if ref.folder else ""
                raise RecipeError(f"line {ref.line}: model '{ref.name}': no file with sha256 {ref.sha256} in "
                                  f"{where(ref)}{also}; put it in one of them or pass --models-dir.")
        assert path is not None
        found[ref.name] = path
    return found

