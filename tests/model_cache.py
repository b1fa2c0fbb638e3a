"""Synthetic checkpoints for tests, made once and kept in an on-disk cache across test runs.

A test asks for a model with the arguments it would give `make_checkpoint` (or `make_shuffled_finetune`) plus the
path it wants the file at. The first request makes the file in the cache; every request then hard-links it to
that path (a copy where the cache is on another file system), so a whole run holds each model once however many
tests use it. A test that damages its inputs (truncates, rewrites in place) asks for `writable=True` and gets its
own copy: a hard link shares the cached bytes, and a test runs as root in CI, where file modes protect nothing.

The cache never serves a stale model: a file's name is a hash of the generator's arguments, of the source of every
lib_rebasin module the generator imports (so any change to what makes the bytes makes a new name), and of the
torch and safetensors versions (whose random streams and format write the bytes). A cached file whose size or
modification time no longer matches what was recorded when it was made (a test wrote into a hard link) is made
again. Files made from other source are removed once unused for two days. The cache lives in
$LIB_REBASIN_TEST_CACHE, else $XDG_CACHE_HOME/lib_rebasin-tests, else ~/.cache/lib_rebasin-tests; a fresh checkout
with an empty cache makes each model once, on first use.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import torch

from lib_rebasin.sdxl.config import MINI

CACHE_ENV = "LIB_REBASIN_TEST_CACHE"

# An SDXL test scale below lib_rebasin's MINI: the same three UNet levels, attention depths, heads of 64 channels,
# text encoders and four VAE levels, with the UNet's last level and the VAE's two first levels no wider than the
# level before. For merging, block weights and the UI on SDXL files; the spec and the forward pass are tested at
# MINI (test_sdxl_function_preservation.py, test_sdxl_forward_merge.py).
SDXL_SMALL = replace(MINI, channel_mult=(1, 2, 2), vae_mult=(1, 1, 2, 2))


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lib_rebasin-tests"


def _module_file(package_root: Path, dotted: str) -> Path | None:
    """The file of a lib_rebasin module given its dotted name (None: not a module of the package)."""
    parts = dotted.split(".")
    if parts[0] != package_root.name:
        return None
    base = package_root.parent.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, package_root: Path) -> set[Path]:
    """The package's files that `path` imports anywhere in its body (function-level imports included)."""
    rel = path.relative_to(package_root.parent).with_suffix("")
    module = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
    package = module if path.name == "__init__.py" else module[:-1]
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]  # `from . import x`: x may be a module
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # a package's __init__ runs before its module
                f = _module_file(package_root, ".".join(parts[:i]))
                if f is not None:
                    found.add(f)
    return found


@cache
def source_fingerprint(function: Callable[..., Any]) -> str:
    """A hash of the source of `function`'s module and of every package module it imports, transitively."""
    import safetensors

    start = Path(function.__code__.co_filename).resolve()
    package_root = start.parent
    while (package_root.parent / "__init__.py").is_file():
        package_root = package_root.parent
    seen: set[Path] = set()
    todo = [start]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo.extend(_imports(f, package_root) - seen)
    h = hashlib.sha256(f"torch {torch.__version__} safetensors {safetensors.__version__}".encode())
    for f in sorted(seen):
        h.update(str(f.relative_to(package_root.parent)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _argument_text(value: Any) -> Any:
    """JSON-able form of a generator argument; tensors (the `extra` keys) by dtype, shape and bytes."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        return [str(t.dtype), list(t.shape), digest]
    if isinstance(value, dict):
        return {str(k): _argument_text(v) for k, v in sorted(value.items())}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)  # an SD1Config: a frozen dataclass, whose repr lists every field


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns}"


# Files made from another version of the source are removed once unused this long: other checkouts sharing the
# cache (worktrees, branches) keep theirs while they run, and the cache does not grow with every edit.
STALE_AFTER_S = 2 * 24 * 3600


def _prune(folder: Path, generator_name: str, source: str) -> None:
    """Remove the generator's files made from other source, last made or used over STALE_AFTER_S ago."""
    now = time.time()
    for stamp in folder.glob(f"{generator_name}-*.stamp"):
        if stamp.name.startswith(f"{generator_name}-{source}-"):
            continue
        try:
            if now - stamp.stat().st_mtime > STALE_AFTER_S:
                stamp.with_suffix(".safetensors").unlink(missing_ok=True)
                stamp.unlink(missing_ok=True)
        except OSError:
            pass  # another run removed it first


def _cached(generator: Callable[..., Path], kwargs: dict[str, Any], source: str | None = None) -> Path:
    """The cache's file for `generator(**kwargs)`, made first if missing or damaged. `source` (a hash) stands for
    `source_fingerprint(generator)` where the generator is this module's, not lib_rebasin's."""
    source = (source or source_fingerprint(generator))[:16]
    arguments = json.dumps(_argument_text(kwargs), sort_keys=True)
    folder = cache_dir()
    path = folder / f"{generator.__name__}-{source}-{hashlib.sha256(arguments.encode()).hexdigest()[:16]}.safetensors"
    stamp = path.with_suffix(".stamp")
    try:
        if stamp.read_text() == _stamp(path):
            os.utime(stamp)  # used: not pruned (the model's own times stay as recorded)
            return path
    except OSError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    _prune(folder, generator.__name__, source)
    # Made under a private name in the cache's folder, then renamed: a concurrent run (another checkout, the UI
    # environments) sees either no file or a whole one, and two runs making the same file write the same bytes.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".making-") as tmp:
        made = generator(Path(tmp) / path.name, **kwargs)
        made.chmod(0o444)
        new_stamp = _stamp(made)
        os.replace(made, path)
    stamp_tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}")
    stamp_tmp.write_text(new_stamp)
    os.replace(stamp_tmp, stamp)
    return path


def place(source: Path, path: str | os.PathLike[str], writable: bool = False) -> Path:
    """Put `source` at `path`: a hard link (a copy across file systems), or an own copy when `writable`."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() or dest.is_symlink():
        dest.unlink()
    if writable:
        shutil.copyfile(source, dest)
        return dest
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)
        dest.chmod(0o444)
    return dest


def cached_checkpoint(path: str | os.PathLike[str], config: Any = "mini", seed: int = 0,
                      base_seed: int | None = None, delta: float = 0.05, precision: str = "fp16",
                      extra: dict[str, torch.Tensor] | None = None, writable: bool = False) -> Path:
    """`make_checkpoint(path, ...)` from the cache (same arguments and defaults); see the module docstring."""
    from lib_rebasin.sd1.synthetic import make_checkpoint

    kwargs = {"config": config, "seed": seed, "base_seed": base_seed, "delta": delta, "precision": precision}
    if extra:
        kwargs["extra"] = extra
    return place(_cached(make_checkpoint, kwargs), path, writable)


def cached_shuffled_finetune(path: str | os.PathLike[str], base_seed: int, seed: int, perm_seed: int,
                             precision: str = "fp16", config: Any = "mini", writable: bool = False) -> Path:
    """`make_shuffled_finetune(path, ...)` from the cache (same arguments and defaults)."""
    from lib_rebasin.demo import make_shuffled_finetune

    kwargs = {"base_seed": base_seed, "seed": seed, "perm_seed": perm_seed, "precision": precision, "config": config}
    return place(_cached(make_shuffled_finetune, kwargs), path, writable)


def cached_sdxl_checkpoint(path: str | os.PathLike[str], config: Any = "mini", seed: int = 0,
                           base_seed: int | None = None, precision: str = "fp16", writable: bool = False) -> Path:
    """The SDXL `make_checkpoint(path, ...)` (lib_rebasin.sdxl.synthetic) from the cache (same defaults)."""
    from lib_rebasin.sdxl.synthetic import make_checkpoint

    kwargs: dict[str, Any] = {"config": config, "seed": seed, "base_seed": base_seed}
    if precision != "fp16":
        kwargs["precision"] = precision
    return place(_cached(make_checkpoint, kwargs), path, writable)


def _permuted_checkpoint(path: Path, family: str, config: Any, seed: int, base_seed: int | None, delta: float,
                         precision: str, perm_seed: int) -> Path:
    """`family`'s (sd1, sdxl) synthetic checkpoint with every permutation group shuffled by one random legal
    permutation, `random_perms(spec.groups.values(), perm_seed)`: a planted permutation to be found again."""
    from lib_rebasin.align.permute import permute_tensor, random_perms
    from lib_rebasin.io.checkpoint import open_checkpoint
    from lib_rebasin.io.output_file import save_state_dict

    make, scales, build_spec = _family(family)
    made = make(path.with_name(f"unpermuted-{path.name}"), config, seed=seed, base_seed=base_seed, delta=delta,
                precision=precision)
    spec = build_spec(scales[config] if isinstance(config, str) else config)
    perms = random_perms(spec.groups.values(), perm_seed)
    with open_checkpoint(made) as ck:  # written while the source is open: unpermuted tensors may be views of it
        save_state_dict(path, {k: permute_tensor(spec, k, ck.get(k), perms) for k in ck},
                        {**ck.metadata, "lib_rebasin_synthetic_perm_seed": str(perm_seed)})
    made.unlink()
    return path


def _family(family: str) -> tuple[Callable[..., Path], dict[str, Any], Callable[[Any], Any]]:
    if family == "sd1":
        from lib_rebasin.sd1 import spec as sd1_spec
        from lib_rebasin.sd1 import synthetic as sd1_synthetic
        return sd1_synthetic.make_checkpoint, sd1_synthetic.SCALES, sd1_spec.build_spec
    from lib_rebasin.sdxl import spec as sdxl_spec
    from lib_rebasin.sdxl import synthetic as sdxl_synthetic
    return sdxl_synthetic.make_checkpoint, sdxl_synthetic.SCALES, sdxl_spec.build_spec


def cached_permuted_checkpoint(path: str | os.PathLike[str], family: str = "sd1", config: Any = "mini",
                               seed: int = 0, base_seed: int | None = None, delta: float = 0.05,
                               precision: str = "fp16", perm_seed: int = 0, writable: bool = False) -> Path:
    """`cached_checkpoint(...)` (family "sd1") or `cached_sdxl_checkpoint(...)` (family "sdxl") with every
    permutation group shuffled by `random_perms(spec.groups.values(), perm_seed)`, from the cache."""
    from lib_rebasin.align.permute import permute_tensor
    from lib_rebasin.io.output_file import save_state_dict

    make, _, _ = _family(family)
    # this module's generator: its own text, and the lib_rebasin code that makes the bytes
    source = hashlib.sha256("".join([inspect.getsource(_permuted_checkpoint), inspect.getsource(_family),
                                     source_fingerprint(make), source_fingerprint(permute_tensor),
                                     source_fingerprint(save_state_dict)]).encode()).hexdigest()
    kwargs = {"family": family, "config": config, "seed": seed, "base_seed": base_seed, "delta": delta,
              "precision": precision, "perm_seed": perm_seed}
    return place(_cached(_permuted_checkpoint, kwargs, source), path, writable)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], keys: list[str], metadata: dict[str, str] | None,
                  writer: str) -> Path:
    """`save_state_dict(path, tensors, metadata)` with the keys in the order `keys` gives (the file's order).
    `writer`, the writer's source fingerprint, only keys the cache: this module's own fingerprint does not cover
    lib_rebasin."""
    from lib_rebasin.io.output_file import save_state_dict

    return save_state_dict(path, {k: tensors[k] for k in keys}, metadata)


def cached_state_dict(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None, writable: bool = False) -> Path:
    """`save_state_dict(path, tensors, metadata)` (lib_rebasin.io.output_file) from the cache, keyed by the tensors'
    bytes and order and the metadata: for an input a test derives from a cached model (a copy with a NaN, a model
    without its VAE, one with odd metadata), made once per cache rather than once per run. The tensors must not
    depend on unseeded randomness."""
    from lib_rebasin.io.output_file import save_state_dict

    kwargs = {"tensors": tensors, "keys": list(tensors), "metadata": metadata,
              "writer": source_fingerprint(save_state_dict)}
    return place(_cached(_save_tensors, kwargs), path, writable)


def cached_without_parts(path: str | os.PathLike[str], source: str | os.PathLike[str],
                         parts: tuple[str, ...] = ("vae",), writable: bool = False) -> Path:
    """The checkpoint file `source` without the keys of `parts` (lib_rebasin.parts.part_of), metadata kept, from the
    cache (`cached_state_dict`): a smaller input, still a checkpoint of its kind, for tests of what happens to a
    merge's output file (its commit, a route that writes it) rather than of what it holds."""
    from lib_rebasin.io.checkpoint import open_checkpoint
    from lib_rebasin.parts import part_of

    with open_checkpoint(source) as ck:
        tensors = {k: ck.get(k) for k in ck if part_of(k) not in parts}
        return cached_state_dict(path, tensors, dict(ck.metadata), writable)


def _torch_saved(path: Path, tensors: dict[str, torch.Tensor], keys: list[str], wrapper: str | None) -> Path:
    """`torch.save` of the tensors, in the order `keys` gives, under `wrapper` ("state_dict", as a training
    checkpoint holds them) or bare; written at `path` whatever its extension."""
    state = {k: tensors[k] for k in keys}
    torch.save({wrapper: state} if wrapper else state, path)
    return path


def cached_torch_file(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                      wrapper: str | None = "state_dict", writable: bool = False) -> Path:
    """A PyTorch (pickle) checkpoint of `tensors` from the cache, keyed by the tensors' bytes and order: for a test
    that reads a model in PyTorch's format (under any name, `.safetensors` included). The torch version, which
    writes the bytes, is part of every cached file's key."""
    kwargs = {"tensors": tensors, "keys": list(tensors), "wrapper": wrapper}
    return place(_cached(_torch_saved, kwargs), path, writable)
