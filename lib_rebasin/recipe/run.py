"""Recipes: a chain of merges written once (TOML), checked before any work, run in one process.

    [recipe]
    name = "DunkMash"
    precision = "fp16"        # every step's result is rounded to this, exactly as if it had been saved
    device = "cpu"
    seed = 0
    bake_vae = "mse"          # optional: the output gets this model's VAE (a VAE file, or a checkpoint's)

    [models]
    nothing = "Nothing_v2.3.safetensors"              # a file name in the models folder
    meina = { file = "meinamix_v9.safetensors", sha256 = "..." }
    icbinp = { sha256 = "4f5a..." }                    # found by hash in the models folder
    mse = "vae-ft-mse-840000-ema-pruned.safetensors"  # a VAE: also looked for in --vae-dir

    [[step]]
    name = "m1"
    method = "rebasin"        # any method of methods.py; every option of options.OPTIONS is a key
    a = "nothing"
    b = "meina"
    alpha = 0.25
    iterations = 500
    parts = ["unet", "te", "vae"]

A step's `a`/`b`/`c` name a model or an *earlier* step. The last step is the output. Intermediate results stay in
memory (only while a later step still needs them), and each is exactly the tensors that saving that step to a file
would give, so a chain equals running the steps one by one with intermediate files, bit for bit.

The output's metadata carries the canonical recipe text with every input's sha256, so `recipe --from OUT` gives
back a recipe that re-runs to the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import __version__
from ..arguments import check_arguments, is_finite_number, shown
from ..errors import CheckpointReadError, RebasinError
from ..io.checkpoint import Checkpoint, check_header, file_sha256, open_checkpoint
from ..io.model_input import legacy_hash, open_model, same_file
from ..io.parsing import MAX_TOML_CHARS, json_or_none, parse_json, parse_toml
from ..merge.block_weights import parse_blocks
from ..merge.diagnostics import stored_diagnostics
from ..merge.run import (
    CancelCheck,
    Diagnostics,
    MergeResult,
    ProgressCallback,
    Reporter,
    merge_checkpoints,
    merge_in_memory,
)
from ..methods import METHODS
from ..option import Option
from ..options import OPTIONS, MergeOptions
from ..sd1.spec import PARTS, part_of
from .provenance import hash_progress

# Every option a user sets (options.OPTIONS, method parameters included) is a step key and a recipe default.
OPTION_KEYS = {o.name for o in OPTIONS.values() if o.user_input}
STEP_KEYS = {"name", "a", "b", "c", *OPTION_KEYS}
RECIPE_KEYS = {"name", "bake_vae", *OPTION_KEYS}
MODEL_KEYS = {"file", "sha256", "folder"}
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt")


class RecipeError(RebasinError):
    """A recipe that cannot run, with the line it comes from."""


@dataclass
class ModelRef:
    name: str
    file: str | None = None
    sha256: str | None = None
    line: int = 0
    # The folder the file was read from when the recipe was recorded (`recipe --from`): searched by sha256 only,
    # so it can only ever supply the very file that was merged.
    folder: str | None = None


@dataclass
class Step:
    name: str
    options: MergeOptions
    a: str
    b: str
    c: str | None = None
    line: int = 0


@dataclass
class Recipe:
    name: str = "recipe"
    models: dict[str, ModelRef] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None  # the recipe file's folder, where models are also looked for by sha256
    # A [models] name whose VAE (a VAE file, or a checkpoint's) goes into the output, as the WebUI's "bake in VAE".
    bake_vae: str | None = None

    def output_root(self) -> str:
        """The model whose keys the output has: the last step's A, followed back through the steps to a model."""
        by_name = {s.name: s for s in self.steps}
        root = self.steps[-1].a
        while root in by_name:
            root = by_name[root].a
        return root

    def to_toml(self) -> str:
        """The canonical text: parse(to_toml()) round-trips, and equal recipes give equal text."""
        lines = ["# lib_rebasin recipe", "[recipe]", f"name = {_q(self.name)}"]
        if self.bake_vae is not None:
            lines.append(f"bake_vae = {_q(self.bake_vae)}")
        lines += [f"{k} = {_v(v)}" for k, v in sorted(self.defaults.items())]
        lines += ["", "[models]"]
        for m in self.models.values():
            fields = [f"{k} = {_q(v)}" for k, v in (("file", m.file), ("sha256", m.sha256), ("folder", m.folder))
                      if v]
            lines.append(f"{_key(m.name)} = {{ {', '.join(fields)} }}")
        for s in self.steps:
            lines += ["", "[[step]]", f"name = {_q(s.name)}", f"method = {_q(s.options.method)}", f"a = {_q(s.a)}",
                      f"b = {_q(s.b)}"]
            if s.c is not None:
                lines.append(f"c = {_q(s.c)}")
            lines += _option_lines(s.options)
        return "\n".join(lines) + "\n"


def _option_lines(o: MergeOptions) -> list[str]:
    """A step's options in table order, each where the table records it (`Option.recorded`); block weights last,
    as their preset's name when they came from one."""
    lines = [f"{opt.name} = {_toml(opt, getattr(o, opt.name))}" for opt in OPTIONS.values()
             if opt.user_input and opt.name not in ("method", "blocks") and opt.recorded(o)]
    if o.blocks is not None:
        lines.append(f"blocks = {_q(o.blocks_preset) if o.blocks_preset else _v([float(v) for v in o.blocks])}")
    return lines


def _toml(opt: Option, value: Any) -> str:
    """A value in its canonical TOML: a float option always as a float, so equal options give equal text."""
    if opt.kind is float:
        return repr(float(value))
    if opt.kind is tuple:
        return _v(list(value))
    return _v(value)


def step_options(settings: dict[str, Any]) -> MergeOptions:
    """MergeOptions from a step's (or an API request's) settings; `blocks` may be a preset name, a string of 26
    or 25 comma-separated values, or a list of them. Raises RebasinError."""
    check_arguments("step_options", settings=settings)
    settings = dict(settings)
    blocks = settings.pop("blocks", None)
    settings.pop("blocks_preset", None)
    if isinstance(settings.get("parts"), list):
        settings["parts"] = tuple(settings["parts"])
    options = MergeOptions(**settings)
    if blocks is not None:
        if isinstance(blocks, (list, tuple)):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in blocks):
                raise RebasinError("blocks must be numbers, a string of them, or a preset name.")
            bad = next((i for i, v in enumerate(blocks) if not is_finite_number(v)), None)
            if bad is not None:  # an integer beyond a float's range included
                raise RebasinError(f"blocks value {bad + 1} must be a finite number, got {shown(blocks[bad])}.")
            blocks = ",".join(repr(float(v)) for v in blocks)
        if not isinstance(blocks, str):
            raise RebasinError("blocks must be a preset name, 26 (or 25) comma-separated values, or a list of them.")
        bw = parse_blocks(blocks, options.alpha)
        options = options.with_blocks(bw.values, bw.preset)
    return options


def _q(s: str) -> str:
    return json.dumps(s)


def _v(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, float) else repr(v)


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _q(k)


# -- parsing ---------------------------------------------------------------------------------------------------

def _header_lines(text: str) -> tuple[list[int], dict[str, int], dict[tuple[int, str], int]]:
    """Line numbers of each [[step]] header, of each [models] entry, and of `key =` lines inside each step."""
    step_lines: list[int] = []
    model_lines: dict[str, int] = {}
    key_lines: dict[tuple[int, str], int] = {}
    section = ""
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("[[step]]"):
            step_lines.append(n)
            section = "step"
        elif line.startswith("["):
            section = line.strip("[] ")
        elif "=" in line and not line.startswith("#"):
            key = line.split("=", 1)[0].strip().strip('"')
            if section == "models":
                model_lines[key] = n
            elif section == "step":
                key_lines[(len(step_lines) - 1, key)] = n
    return step_lines, model_lines, key_lines


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    """Parse and check a recipe; every error names its line."""
    check_arguments("parse_recipe", text=text, source=source)
    data = parse_toml(text, lambda why: RecipeError(f"{source}: {why}"))
    step_lines, model_lines, key_lines = _header_lines(text)

    def fail(line: int, msg: str) -> RecipeError:
        return RecipeError(f"{source}, line {line}: {msg}" if line else f"{source}: {msg}")

    unknown = set(data) - {"recipe", "models", "step"}
    if unknown:
        raise fail(0, f"unknown section(s) {', '.join(sorted(unknown))}; expected [recipe], [models], [[step]].")
    head = data.get("recipe", {})
    if not isinstance(head, dict):
        raise fail(0, "'recipe' must be a [recipe] table.")
    bad = set(head) - RECIPE_KEYS
    if bad:
        raise fail(0, f"unknown [recipe] key(s) {', '.join(sorted(bad))}.")
    if not isinstance(head.get("name", ""), str):
        raise fail(0, "[recipe] name must be a string.")
    bake_vae = head.get("bake_vae")
    if bake_vae is not None and not isinstance(bake_vae, str):
        raise fail(0, f"[recipe] bake_vae must be a string naming a model in [models], got {_show(bake_vae)}.")
    recipe = Recipe(name=str(head.get("name", "recipe")), bake_vae=bake_vae,
                    defaults={k: v for k, v in head.items() if k not in ("name", "bake_vae")})

    models = data.get("models", {})
    if not isinstance(models, dict):
        raise fail(0, "'models' must be a [models] table of name = file entries.")
    for name, value in models.items():
        line = model_lines.get(name, 0)
        if isinstance(value, str):
            ref = ModelRef(name, file=value, line=line)
        elif (isinstance(value, dict) and set(value) <= MODEL_KEYS and ({"file", "sha256"} & set(value))
              and all(isinstance(v, str) for v in value.values())):
            ref = ModelRef(name, value.get("file"), value.get("sha256"), line, value.get("folder"))
        else:
            raise fail(line, f"model '{name}' must be a file name or {{ file = \"...\", sha256 = \"...\" }} "
                             "(strings).")
        if ref.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{10}|[0-9a-fA-F]{64}", ref.sha256):
            raise fail(line, f"model '{name}': sha256 must be 64 hex digits (or the WebUI's 10-digit short hash).")
        if ref.file is not None:
            problem = _unsafe_name(ref.file)
            if problem:
                raise fail(line, f"model '{name}': file {_show(ref.file)} {problem}; name a file inside the models "
                                 "folder (--models-dir) by its relative path.")
        if ref.folder is not None and (not os.path.isabs(ref.folder) or "\0" in ref.folder):
            raise fail(line, f"model '{name}': folder must be an absolute path (where the file was found).")
        recipe.models[name] = ref
    if bake_vae is not None and bake_vae not in recipe.models:
        raise fail(0, f"[recipe] bake_vae = {_q(bake_vae)} is not a model in [models]; add the VAE file there "
                      f"(e.g. {_key(bake_vae)} = \"vae-ft-mse-840000-ema-pruned.safetensors\").")

    steps = data.get("step", [])
    if not isinstance(steps, list) or not all(isinstance(st, dict) for st in steps):
        raise fail(0, "'step' must be a list of [[step]] tables.")
    if not steps:
        raise fail(0, "a recipe needs at least one [[step]].")
    known: set[str] = set(recipe.models)
    later = {str(s.get("name", f"step{i + 1}")): i for i, s in enumerate(steps)}
    for i, raw in enumerate(steps):
        line = step_lines[i] if i < len(step_lines) else 0
        bad = set(raw) - STEP_KEYS
        if bad:
            raise fail(key_lines.get((i, sorted(bad)[0]), line), f"unknown step key(s) {', '.join(sorted(bad))}.")
        name = raw.get("name", f"step{i + 1}")
        if not isinstance(name, str) or not name:
            raise fail(key_lines.get((i, "name"), line), f"step {i + 1}: name must be a non-empty string.")
        if name in known:
            raise fail(line, f"the name '{name}' is already used by a model or an earlier step.")
        settings = {**recipe.defaults, **{k: v for k, v in raw.items() if k in MergeOptions.__dataclass_fields__}}
        parts = settings.get("parts", PARTS)
        try:
            options = step_options({**settings, "parts": tuple(parts) if isinstance(parts, list) else parts})
            options.validate()
        except RebasinError as e:
            field_name = str(e).split(" ", 1)[0]
            # a message starts with its key ("seed must ..."), or with the key's name in capitals ("REPAIR ...")
            at = key_lines.get((i, field_name), key_lines.get((i, field_name.lower()), line))
            raise fail(at, f"step '{name}': {e}") from None
        except TypeError as e:
            raise fail(line, f"step '{name}': {e}") from None
        refs = {}
        for slot in ("a", "b", "c"):
            ref = raw.get(slot)
            if ref is None:
                continue
            ref_line = key_lines.get((i, slot), line)
            if not isinstance(ref, str):
                raise fail(ref_line, f"step '{name}': {slot} must be a string naming a model or an earlier step, "
                                     f"got {_show(ref)}.")
            if ref not in known:
                if ref in later and later[ref] >= i:
                    raise fail(ref_line, f"step '{name}' uses '{ref}', which is only made by a later step.")
                raise fail(ref_line, f"step '{name}': '{ref}' is neither a model in [models] nor an earlier step.")
            refs[slot] = ref
        if "a" not in refs or "b" not in refs:
            raise fail(line, f"step '{name}' needs both a and b.")
        if METHODS[options.method].needs_c and "c" not in refs:
            raise fail(line, f"step '{name}': {METHODS[options.method].label} needs c.")
        recipe.steps.append(Step(name, options, refs["a"], refs["b"], refs.get("c"), line))
        known.add(name)
    return recipe


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unsafe_name(file: str) -> str | None:
    """Why a recipe's file name could point outside the models folder (None: it cannot)."""
    if "\0" in file:
        return "contains a NUL byte"
    if not file.strip():
        return "is empty"
    if os.path.isabs(file) or file.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", file):
        return "is an absolute path"
    if ".." in re.split(r"[\\/]", file):
        return "goes up out of the folder ('..')"
    return None


# -- resolving models ------------------------------------------------------------------------------------------

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


# -- running ---------------------------------------------------------------------------------------------------

@dataclass
class RecipeResult:
    output: Path
    steps: list[tuple[str, Diagnostics]]
    metadata: dict[str, str]

    def summary_lines(self) -> list[str]:
        out = []
        for name, d in self.steps:
            out.append(f"Step {name}:")
            out += [f"  {line}" for line in d.summary_lines()]
        return out


def run_recipe(recipe: Recipe, models_dir: Path, output: str | os.PathLike[str], overwrite: bool = False,
               progress: ProgressCallback | None = None, cancel: CancelCheck | None = None,
               extra_metadata: dict[str, str] | None = None, confine: bool = True,
               vae_dir: Path | None = None, on_commit: Callable[[Path], None] | None = None) -> RecipeResult:
    """Run every step; only the last one is written (atomically). Raises RebasinError; no file then.

    `confine`: model names must resolve inside `models_dir` (see `resolve_models`); `vae_dir`: where the VAE to
    bake in is looked for first. The last step's commit (`merge_checkpoints`, `on_commit`) is the recipe's only
    one: earlier steps stay in memory, so a cancel before it leaves no file and one after it changes nothing."""
    from ..io.checkpoint import check_output_path

    check_arguments("run_recipe", ("vae_dir",), recipe=recipe, models_dir=models_dir, output=output,
                    overwrite=overwrite, progress=progress, cancel=cancel, extra_metadata=extra_metadata,
                    confine=confine, vae_dir=vae_dir)
    out_path = check_output_path(output, overwrite)
    paths = resolve_models(recipe, models_dir, confine, vae_dir, Reporter(progress, cancel))
    # Every input is read, and hashed, through one open file for the whole chain: an input replaced meanwhile
    # cannot get its new hash recorded for the old bytes, nor give two steps two different versions.
    opened = _open_inputs(paths)
    try:
        return _run_opened(recipe, paths, opened, out_path, overwrite, progress, cancel, extra_metadata, on_commit)
    finally:
        for ck in set(opened.values()):
            ck.close()


def _open_inputs(paths: dict[str, Path]) -> dict[str, Checkpoint]:
    opened: dict[str, Checkpoint] = {}
    try:
        for name, p in paths.items():
            same = next((ck for ck in opened.values() if same_file(ck, p)), None)
            opened[name] = same or open_checkpoint(p)  # one file under two names stays one source
    except BaseException:
        for ck in set(opened.values()):
            ck.close()
        raise
    return opened


def _run_opened(recipe: Recipe, paths: dict[str, Path], opened: dict[str, Checkpoint], out_path: Path,
                overwrite: bool, progress: ProgressCallback | None, cancel: CancelCheck | None,
                extra_metadata: dict[str, str] | None, on_commit: Callable[[Path], None] | None) -> RecipeResult:
    from ..io.checkpoint import PRECISIONS, check_free_space, output_bytes
    from ..merge.run import output_entries

    # Check every step's inputs from the headers before any work (architectures, shapes, parts).
    for step in recipe.steps:
        for slot in ("a", "b", "c"):
            ref = getattr(step, slot)
            if ref in opened:
                open_model(opened[ref], slot.upper()).close()
    first = open_model(opened[recipe.output_root()], "A")
    try:
        out_dtype = PRECISIONS[recipe.steps[-1].options.precision]
        baked_extra = 0
        if recipe.bake_vae is not None:
            from ..merge.vae_bake import open_vae

            # Checked against the output's architecture before any work; the same open file is baked in later.
            open_vae(opened[recipe.bake_vae], first.spec).close()
            # A baked VAE's keys that A lacks are added to the output, in the output's precision.
            baked_extra = sum(out_dtype.itemsize * math.prod(s) for k, s in first.spec.shapes.items()
                              if part_of(k) == "vae" and k not in first.ckpt.infos)
        check_free_space(out_path, baked_extra + output_bytes(output_entries(first, out_dtype)))
    finally:
        first.close()

    canonical = _canonical(recipe, paths, opened, Reporter(progress, cancel))
    last_use = {}
    for i, step in enumerate(recipe.steps):
        for ref in (step.a, step.b, step.c):
            if ref is not None:
                last_use[ref] = i
    results: dict[str, Checkpoint] = {}
    done: list[tuple[str, Diagnostics]] = []
    n = len(recipe.steps)
    inputs = {name: {"file": p.name, "sha256": canonical.models[name].sha256, "folder": str(p.parent.resolve())}
              for name, p in paths.items()}

    # One bar and one ETA for the whole chain: each step's own 0..1 fills its share.
    chain = Reporter(progress, None)
    for i, step in enumerate(recipe.steps):
        step_progress = chain.relay(i / n, (i + 1) / n, f"step {i + 1}/{n} ({step.name})")
        a_src, b_src = (results.get(r) or opened[r] for r in (step.a, step.b))
        c_src = results.get(step.c) or opened[step.c] if step.c is not None else None
        if i < n - 1:
            ckpt, diag = merge_in_memory(a_src, b_src, step.options, c=c_src,
                                         report=Reporter(step_progress, cancel), name=step.name)
            results[step.name] = ckpt
            done.append((step.name, diag))
        else:
            def metadata_hook(diag: Diagnostics) -> dict[str, str]:
                return _recipe_metadata(canonical, paths, opened, inputs, done + [(step.name, diag)])

            res: MergeResult = merge_checkpoints(a_src, b_src, out_path, step.options, c=c_src,
                                                 overwrite=overwrite, progress=step_progress, cancel=cancel,
                                                 extra_metadata=extra_metadata, metadata_hook=metadata_hook,
                                                 bake_vae=(opened[recipe.bake_vae] if recipe.bake_vae is not None
                                                           else None), on_commit=on_commit)
            done.append((step.name, res.diagnostics))
            return RecipeResult(res.output, done, res.metadata)
        for name in [r for r, last in last_use.items() if last <= i and r in results]:
            results.pop(name).close()  # no later step needs it: free the memory now
    raise AssertionError("unreachable")


def _canonical(recipe: Recipe, paths: dict[str, Path], opened: dict[str, Checkpoint], report: Reporter) -> Recipe:
    """The recipe with every model pinned to its file name and full sha256 (of the open file that is merged)."""
    models = {name: ModelRef(name, paths[name].name,
                             opened[name].sha256(hash_progress(report, paths[name].name, 0.0, 0.0)), ref.line)
              for name, ref in recipe.models.items()}
    return replace(recipe, models=models)


def _recipe_metadata(recipe: Recipe, paths: dict[str, Path], opened: dict[str, Checkpoint],
                     inputs: dict[str, dict[str, str | None]], steps: list[tuple[str, Diagnostics]]) -> dict[str, str]:
    text = recipe.to_toml()
    merge_models: dict[str, object] = {}
    for name, p in paths.items():
        sha = inputs[name]["sha256"]
        ck = opened[name]
        ck.verify_unchanged()  # the hashes above are of the bytes merged only if nothing changed since
        own = ck.metadata.get("sd_merge_recipe")
        history = ck.metadata.get("sd_merge_models")
        merge_models[str(sha)] = {"name": p.stem, "legacy_hash": legacy_hash(ck),
                                  "sd_merge_recipe": json_or_none(own)}
        if history:
            parsed = json_or_none(history)
            if isinstance(parsed, dict):
                merge_models.update(parsed)
    recipe_meta = {"type": "lib_rebasin_recipe", "version": __version__, "name": recipe.name, "recipe": text,
                   "models": inputs}
    ours = {"version": __version__, "recipe_toml": text, "inputs": inputs,
            "steps": [{"name": n, "diagnostics": stored_diagnostics(d)} for n, d in steps]}
    return {"sd_merge_recipe": json.dumps(recipe_meta), "sd_merge_models": json.dumps(merge_models),
            "lib_rebasin": json.dumps(ours)}


def recipe_from_checkpoint(path: str | os.PathLike[str]) -> str:
    """The recipe text stored in a checkpoint's metadata (a recipe run, or a single merge made by this tool)."""
    check_arguments("recipe_from_checkpoint", path=path)
    with open_checkpoint(path) as ck:
        meta = ck.metadata
    name = Path(path).name
    raw = meta.get("lib_rebasin")
    ours = parse_json(raw, lambda why: RecipeError(f"{name}: its 'lib_rebasin' metadata is {why}; no recipe can "
                                                   "be made from it.")) if raw else None
    if not isinstance(ours, dict):
        raise RecipeError(f"{Path(path).name} was not made by lib_rebasin (no 'lib_rebasin' metadata).")
    if "recipe_toml" in ours:
        return _with_folders(str(ours["recipe_toml"]), ours.get("inputs"), path)
    single = ours.get("recipe")
    webui = json_or_none(meta.get("sd_merge_recipe")) or {}
    if not isinstance(single, dict):
        raise RecipeError(f"{Path(path).name}: its lib_rebasin metadata holds no recipe.")
    try:
        return _single_merge_recipe(Path(path).stem, single, webui)
    except (KeyError, TypeError, ValueError, AttributeError, RebasinError):
        raise RecipeError(f"{Path(path).name}: its lib_rebasin metadata is incomplete or damaged; no recipe can be "
                          "made from it.") from None


# What a single merge's record means when it lacks a key: outputs made before `tolerance` existed used the paper's
# rule (0). Every option recorded always (no `recorded_when`) and not added since must be there.
_RECORDED_SINCE: dict[str, Any] = {"tolerance": 0.0}
_ALWAYS_RECORDED = [o.name for o in OPTIONS.values()
                    if o.user_input and o.recorded_when is None and o.name not in _RECORDED_SINCE]


def _single_merge_recipe(stem: str, single: dict[str, Any], webui: Any) -> str:
    models = single.get("models", {})
    hashes = {"A": webui.get("primary_model_hash"), "B": webui.get("secondary_model_hash"),
              "C": webui.get("tertiary_model_hash")}
    folders = single.get("folders", {})
    refs = {label.lower(): ModelRef(label.lower(), file, hashes.get(label), folder=folders.get(label))
            for label, file in models.items()}
    for name in _ALWAYS_RECORDED:
        single[name]
    settings = {**_RECORDED_SINCE, **{o.name: single[o.name] for o in OPTIONS.values()
                                      if o.user_input and o.name != "blocks" and o.name in single}}
    opts = MergeOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    if single.get("blocks") is not None:
        opts = opts.with_blocks(tuple(single["blocks"]), single.get("blocks_preset"))
    opts.validate()
    step = Step("merge", opts, "a", "b", "c" if "c" in refs else None)
    baked = single.get("bake_vae")
    bake_name = None
    if isinstance(baked, dict) and isinstance(baked.get("file"), str):
        bake_name = "vae"
        refs[bake_name] = ModelRef(bake_name, baked["file"], baked.get("sha256"), folder=baked.get("folder") if isinstance(baked.get("folder"), str) else None)
    return Recipe(name=stem, models=refs, steps=[step], bake_vae=bake_name).to_toml()


def _with_folders(text: str, inputs: Any, source: str | os.PathLike[str]) -> str:
    """A recorded recipe with the folders its inputs were read from (so running it finds them by sha256)."""
    if not isinstance(inputs, dict):
        return text
    try:
        recipe = parse_recipe(text, Path(source).name)
    except RecipeError:
        return text
    for name, ref in recipe.models.items():
        entry = inputs.get(name)
        if isinstance(entry, dict) and isinstance(entry.get("folder"), str) and os.path.isabs(entry["folder"]):
            ref.folder = entry["folder"]
    return recipe.to_toml()


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    check_arguments("load_recipe", path=path)
    p = Path(path)
    try:
        with open(p, encoding="utf-8") as f:  # one character past the limit: a device or a huge file is not read
            text = f.read(MAX_TOML_CHARS + 1)
    except OSError as e:
        raise RecipeError(f"Cannot read recipe {p}: {e.strerror}.") from None
    except UnicodeDecodeError:
        raise RecipeError(f"Cannot read recipe {p}: it is not UTF-8 text (a recipe is a TOML file).") from None
    recipe = parse_recipe(text, p.name)
    recipe.folder = p.resolve().parent
    return recipe

