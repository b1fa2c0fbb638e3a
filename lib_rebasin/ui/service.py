"""Merge jobs for the tab and the HTTP API: validation in plain words, one background job at a time, progress.

Gradio-free. The tab and the API both turn user input into a `MergeRequest`, call `MergeService.prepare` (which
refuses bad choices before anything runs, using the core's cheap `preflight`) and `start` (which runs the core's
`merge_checkpoints` in a thread, inside the host's GPU queue), then read the `Job` for progress and the result.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import arguments
from ..errors import Cancelled, FieldError, RebasinError
from ..options import MAX_DIFFERENCE_ALPHA
from .host import CheckpointEntry, Host

PARTS = ("unet", "te", "vae")
PART_LABELS = {"unet": "UNet", "te": "Text encoder", "vae": "VAE"}
PRECISION_CHOICES = ("fp16", "bf16", "fp32")
MAX_ITERATIONS = 1000
MAX_SEED = 2**63 - 1
MAX_TEXT = 512  # characters in a name field
ADD_DIFFERENCE_ALPHA = MAX_DIFFERENCE_ALPHA  # the core's bound, checked here first to name the field (HTTP 422)
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_BAD_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


def shown(value: Any, limit: int = 60) -> str:
    """A value for an error message, cut short: a message never echoes a large field back."""
    text = arguments.shown(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clipped(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FieldError(name, f"Field '{name}' must be a number, got {shown(v)}.")
    try:
        f = float(v)
    except OverflowError:  # a huge JSON integer
        f = math.inf
    if not math.isfinite(f):
        raise FieldError(name, f"Field '{name}' must be a finite number, got {shown(v)}.")
    return f


def _integer(name: str, v: Any) -> int:
    f = _number(name, v)
    if f != int(f):
        raise FieldError(name, f"Field '{name}' must be a whole number, got {shown(v)}.")
    return int(f)


@contextmanager
def field_of(name: str) -> Iterator[None]:
    """Any refusal raised while checking the value of field `name` names that field (the API's 422)."""
    try:
        yield
    except FieldError:
        raise
    except RebasinError as e:
        raise FieldError(name, str(e)) from None


def _core():
    from .. import merge  # the lead's core; imported late so the tab module loads even while it is being written

    return merge


def method_table() -> dict[str, Any]:
    return dict(_core().METHODS)


@dataclass
class MergeRequest:
    model_a: str = ""
    model_b: str = ""
    model_c: str | None = None
    method: str = "rebasin"
    alpha: float = 0.5
    iterations: int = 1
    parts: tuple[str, ...] = PARTS
    device: str = "cpu"
    precision: str = "fp16"
    output_name: str = ""
    overwrite: bool = False
    seed: int = 0
    tolerance: float = 0.01   # fraction of the first sweep's gain below which matching stops (MergeOptions)
    blocks: str = ""          # block weights: a preset name or 26 (25) comma-separated values; "" = alpha everywhere
    align: bool = False       # re-basin B (and C) onto A before a non-rebasin method
    matching: str = "weights"  # how re-basin finds the permutation: "weights" or "activations" (MergeOptions)
    activation_samples: int = 4
    repair: bool = False      # REPAIR after blending (MergeOptions.repair; rebasin / weighted_sum with the UNet)
    ties_density: float = 0.2  # method parameters (lib_rebasin/methods.py); each is used only by its methods
    ties_scale: float = 1.0
    dare_p: float = 0.9
    bake_vae: str = ""        # a VAE from the host's VAE list, or a checkpoint, whose VAE goes into the output

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MergeRequest:
        """Build from JSON (the API): unknown fields, wrong types and out-of-range values are a FieldError naming
        the field. Numbers must be JSON numbers (no strings, no booleans), finite, and in range."""
        if not isinstance(d, dict):
            raise FieldError("body", "The request body must be a JSON object.")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            names = ", ".join(shown(k, 40) for k in unknown[:5])
            raise FieldError(str(unknown[0])[:40], f"Unknown field(s) {names}; allowed: {', '.join(sorted(known))}.")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k in ("alpha", "tolerance", "ties_density", "ties_scale", "dare_p"):
                kw[k] = _number(k, v)
            elif k in ("iterations", "seed", "activation_samples"):
                kw[k] = _integer(k, v)
            elif k in ("overwrite", "align", "repair"):
                if not isinstance(v, bool):
                    raise FieldError(k, f"Field '{k}' must be true or false, got {shown(v)}.")
                kw[k] = v
            elif k == "parts":
                if isinstance(v, str):
                    v = [p.strip() for p in v.split(",") if p.strip()]
                if not isinstance(v, list) or not all(isinstance(p, str) for p in v) or len(v) > len(PARTS):
                    raise FieldError(k, f"Field 'parts' must be a list of unet, te, vae; got {shown(v)}.")
                if not v or set(v) - set(PARTS):
                    raise FieldError(k, f"Field 'parts' must name at least one of unet, te, vae; got {shown(v)}.")
                kw[k] = tuple(v)
            elif k == "blocks" and isinstance(v, list):
                if len(v) > 26:
                    raise FieldError(k, f"Field 'blocks' takes 26 (or 25) values, got {len(v)}.")
                kw[k] = ",".join(repr(_number(k, x)) for x in v)
            elif k in ("model_c", "blocks", "bake_vae") and v is None:
                kw[k] = None if k == "model_c" else ""
            else:
                if not isinstance(v, str):
                    raise FieldError(k, f"Field '{k}' must be a string, got {shown(v)}.")
                if len(v) > MAX_TEXT:
                    raise FieldError(k, f"Field '{k}' is too long ({len(v)} characters; at most {MAX_TEXT}).")
                kw[k] = v
        req = cls(**kw)
        req.check_ranges()
        return req

    def check_ranges(self) -> None:
        """Ranges of the numeric fields, as FieldErrors (the tab's sliders keep to them; the API may not)."""
        info = method_table().get(self.method)
        if info is not None and not info.alpha_bounded:
            if not -ADD_DIFFERENCE_ALPHA <= self.alpha <= ADD_DIFFERENCE_ALPHA:
                raise FieldError("alpha", f"alpha must be between -{ADD_DIFFERENCE_ALPHA:g} and "
                                          f"{ADD_DIFFERENCE_ALPHA:g} for {info.label}, got {shown(self.alpha)}.")
        elif not 0.0 <= self.alpha <= 1.0:
            raise FieldError("alpha", f"alpha must be between 0 and 1, got {shown(self.alpha)}.")
        if not 1 <= self.iterations <= MAX_ITERATIONS:
            raise FieldError("iterations", f"iterations must be between 1 and {MAX_ITERATIONS}, got "
                                           f"{shown(self.iterations)}.")
        if not 0.0 <= self.tolerance < 1.0:
            raise FieldError("tolerance", f"tolerance must be at least 0 and below 1, got {shown(self.tolerance)}.")
        if self.matching not in ("weights", "activations"):
            raise FieldError("matching", f"matching must be weights or activations, got {shown(self.matching)}.")
        if not 1 <= self.activation_samples <= 64:
            raise FieldError("activation_samples", f"activation_samples must be between 1 and 64, got "
                                                   f"{shown(self.activation_samples)}.")
        if not 0 <= self.seed <= MAX_SEED:
            raise FieldError("seed", f"seed must be between 0 and {MAX_SEED}, got {shown(self.seed)}.")
        self._check_repair(info)
        self.block_weights()
        for param in (info.params if info is not None else ()):
            problem = param.check(getattr(self, param.name), info.label)
            if problem:
                raise FieldError(param.name, problem)

    def block_weights(self) -> Any:
        """The parsed block weights (a blocks.BlockWeights; None without), in range for this method, else a
        FieldError on `blocks` (a preset name that does not exist, a wrong count, NaN, a negative weight for a
        weighted sum)."""
        if not self.blocks or not self.blocks.strip():
            return None
        from ..blocks import check_values, parse_blocks

        bw = parse_blocks(self.blocks, float(self.alpha))
        info = method_table().get(self.method)
        if info is not None:
            check_values(bw.values, info.alpha_bounded)
        return bw

    def _check_repair(self, info: Any) -> None:
        """REPAIR with a method or parts it does not apply to, as a FieldError on `repair` (the API's 422) with
        the core's own message: the core's options are built from this method, these parts and defaults, so the
        only check that can fail is REPAIR's."""
        if not self.repair or info is None or not self.parts or set(self.parts) - set(PARTS):
            return  # unknown methods and parts are refused with their own field
        try:
            _core().MergeOptions(method=self.method, parts=tuple(self.parts), repair=True).validate()
        except RebasinError as e:
            raise FieldError("repair", str(e)) from None


@dataclass
class Prepared:
    request: MergeRequest
    a: CheckpointEntry
    b: CheckpointEntry
    c: CheckpointEntry | None
    output: Path
    options: Any  # core MergeOptions
    bake_vae: CheckpointEntry | None = None

    @property
    def devices(self) -> list[str]:
        return [self.request.device]

    def request_dict(self) -> dict[str, Any]:
        r = self.request
        return {"model_a": self.a.title, "model_b": self.b.title, "model_c": self.c.title if self.c else None,
                "method": r.method, "alpha": r.alpha, "iterations": r.iterations, "parts": list(r.parts),
                "device": r.device, "precision": r.precision, **_method_fields(self.options),
                **({"bake_vae": self.bake_vae.title} if self.bake_vae else {})}


def _method_fields(options: Any) -> dict[str, Any]:
    """What only some merges have: alignment, REPAIR, the method's parameters, the block weights (with their
    preset)."""
    out: dict[str, Any] = {}
    if getattr(options, "align", False):
        out["align"] = True
    if getattr(options, "repair", False):
        out["repair"] = True
    method_params = getattr(options, "method_params", None)
    if callable(method_params):
        out.update(method_params())
    if getattr(options, "blocks", None) is not None:
        out["blocks"] = list(options.blocks)
        out["blocks_preset"] = options.blocks_preset
    return out


@dataclass
class RecipeRequest:
    """A whole recipe (its TOML text) to run into `output_name` in the checkpoint folder."""

    text: str = ""
    output_name: str = ""
    overwrite: bool = False


@dataclass
class PreparedRecipe:
    request: RecipeRequest
    recipe: Any  # core Recipe, its models pinned to files the host lists
    models_dir: Path
    inputs: dict[str, Path]
    output: Path

    @property
    def devices(self) -> list[str]:
        return sorted({s.options.device for s in self.recipe.steps})

    def request_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe.name, "steps": [s.name for s in self.recipe.steps],
                "models": {k: p.name for k, p in self.inputs.items()}, "devices": self.devices}


def output_path_for(name: str, folder: Path, default_stem: str) -> Path:
    """A safe file name inside `folder`: refuses separators, '..', reserved or odd characters; adds .safetensors."""
    raw = (name or "").strip()
    name = clipped(name or "")  # the messages below quote it
    if not raw:
        raw = default_stem
    if raw in (".", "..") or ".." in raw.replace("\\", "/").split("/") or os.path.isabs(raw) or "/" in raw or "\\" in raw:
        raise RebasinError(f"Output name '{name}' points outside the checkpoint folder; give a plain file name "
                           f"without '/', '\\' or '..'.")
    if _BAD_CHARS.search(raw):
        raise RebasinError(f"Output name '{name}' contains characters that are not allowed in file names "
                           f"(< > : \" / \\ | ? * or control characters).")
    stem = raw[: -len(".safetensors")] if raw.lower().endswith(".safetensors") else raw
    if stem.lower().endswith(".ckpt") or stem.lower().endswith(".pt"):
        raise RebasinError(f"Output name '{name}': merges are saved as .safetensors; drop the .ckpt/.pt ending.")
    if not stem.strip(" .") or stem.startswith("."):
        raise RebasinError(f"Output name '{name}' is empty or hidden; give a name such as 'my_merge'.")
    if stem.rstrip(" .") != stem:
        raise RebasinError(f"Output name '{name}' ends with a space or a dot; remove it.")
    if stem.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise RebasinError(f"Output name '{name}' is a reserved device name on Windows; pick another name.")
    if len(stem.encode()) > 200:
        raise RebasinError("Output name is too long; keep it under 200 characters.")
    folder = Path(folder)
    out = folder / f"{stem}.safetensors"
    try:
        if out.resolve().parent != folder.resolve():
            raise RebasinError(f"Output name '{name}' points outside the checkpoint folder; give a plain file name.")
    except OSError:
        raise RebasinError(f"Output name '{name}' is not a valid file name.") from None
    return out


def default_output_stem(a: CheckpointEntry, b: CheckpointEntry, method: str, alpha: float,
                        blocks: str = "") -> str:
    """<A>_<B>_<method>_<alpha>, plus the block-weight preset (or "mbw" for custom values) when there is one."""
    sa, sb = a.path.stem, b.path.stem
    tag = {"rebasin": "rebasin", "weighted_sum": "ws", "add_difference": "adddiff", "legacy": "legacy",
           "train_difference": "traindiff", "dare_ties": "dareties"}.get(method, method)
    stem = f"{sa[:40]}_{sb[:40]}_{tag}_{alpha:.2f}"
    if blocks and blocks.strip():
        from ..blocks import preset_name

        name = preset_name(blocks)
        stem += "_" + (re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") if name else "mbw")
    return stem.replace(" ", "_")


def _same_file(p: Path, q: Path) -> bool:
    try:
        return p.resolve() == q.resolve() or os.path.samefile(p, q)
    except OSError:
        return False


def format_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


@dataclass
class Job:
    id: str
    prepared: Prepared | PreparedRecipe
    status: str = "queued"  # queued | running | done | failed | cancelled
    fraction: float = 0.0
    stage: str = "queued"
    message: str = "Waiting for the host's queue..."
    eta_s: float | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    output: Path | None = None
    summary: list[str] = field(default_factory=list)
    diagnostics: dict[str, Any] | None = None
    error: str | None = None
    seconds: float | None = None
    # Set at the output's commit (`merge_checkpoints`'s on_commit): the file is being put in place, the merge has
    # succeeded and a cancel is refused as too late. Set and read under the service's lock.
    committed: bool = False
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def finished_flag(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def too_late_to_cancel(self) -> str | None:
        """Why a cancel changes nothing any more (the output is committed), or None while it still can stop."""
        if not self.committed or self.status == "failed":  # failed: the commit itself failed, nothing was written
            return None
        name = self.prepared.output.name
        if self.status == "done":
            return f"Too late to cancel: the merge is done; {name} was saved."
        return f"Too late to cancel: {name} is being saved; the merge ends done."

    def status_line(self, eta: bool = True) -> str:
        """One line for the tab and the API; `eta=False` where the host's own progress bar shows one."""
        if self.status == "done":
            return f"Done in {self.seconds or 0:.1f}s: saved {self.output.name if self.output else ''}."
        if self.status == "cancelled":
            return "Stopped: no file was written."
        if self.status == "failed":
            return f"Failed: {self.error}"
        left = format_eta(self.eta_s) if eta else ""
        pct = f"{self.fraction * 100:.0f}%"
        return f"{pct} · {self.message}" + (f" · ETA {left}" if left else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.id, "status": self.status, "fraction": round(self.fraction, 4), "stage": self.stage,
            "message": self.message, "eta_s": self.eta_s, "status_line": self.status_line(),
            "output": str(self.output) if self.output else None,
            "output_name": self.output.name if self.output else self.prepared.output.name,
            "summary": list(self.summary), "diagnostics": self.diagnostics, "error": self.error,
            "seconds": self.seconds, "finished": self.finished_flag,
            "kind": "recipe" if isinstance(self.prepared, PreparedRecipe) else "merge",
            "request": self.prepared.request_dict(),
        }


class MergeService:
    """One per host. Holds the jobs; only one merge runs at a time."""

    def __init__(self, host: Host, keep: int = 20) -> None:
        self.host = host
        self.jobs: dict[str, Job] = {}
        self._keep = keep
        self._lock = threading.Lock()
        self._hashes: dict[tuple[str, int, int], str] = {}  # sha256 by (path, size, mtime): recipes pin models by hash

    # -- lookups ------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[CheckpointEntry]:
        return list(self.host.list_checkpoints())

    def titles(self) -> list[str]:
        return [c.title for c in self.checkpoints()]

    def resolve(self, ref: str | None, label: str) -> CheckpointEntry:
        """A dropdown title (or file name, stem, or path inside the host's lists) -> its entry."""
        if not ref or not str(ref).strip():
            raise RebasinError(f"{label} is not set; pick a checkpoint from the list.")
        ref = str(ref).strip()
        entries = self.checkpoints()
        stripped = re.sub(r"\s*\[[0-9a-fA-F]+\]\s*$", "", ref)
        for test in (lambda e: e.title == ref, lambda e: e.title == stripped or
                     re.sub(r"\s*\[[0-9a-fA-F]+\]\s*$", "", e.title) == stripped,
                     lambda e: str(e.path) == ref, lambda e: e.path.name == ref or e.path.stem == ref):
            hits = [e for e in entries if test(e)]
            if hits:
                return hits[0]
        raise RebasinError(f"{label} {shown(ref)} is not in the checkpoint list; press refresh and pick it again.")

    def suggest_output_name(self, a: str | None, b: str | None, method: str, alpha: float, blocks: str = "") -> str:
        """The name an empty output field gives (models, method, alpha, block preset), or "" until A and B are set."""
        try:
            ea, eb = self.resolve(a, "Model A"), self.resolve(b, "Model B")
        except RebasinError:
            return ""
        return default_output_stem(ea, eb, method, float(alpha), blocks)

    def vae_titles(self) -> list[str]:
        return [e.title for e in self.host.list_vaes()]

    def resolve_vae(self, ref: str) -> CheckpointEntry:
        """A VAE title from the host's VAE list, else a checkpoint (its VAE is used)."""
        for e in self.host.list_vaes():
            if ref in (e.title, e.path.name, str(e.path)):
                return e
        try:
            return self.resolve(ref, "VAE to bake in")
        except RebasinError:
            raise RebasinError(f"VAE to bake in '{ref}' is neither in the VAE list nor a checkpoint; press refresh "
                               "and pick it again.") from None

    def running(self) -> Job | None:
        for j in self.jobs.values():
            if not j.finished_flag:
                return j
        return None

    def latest(self) -> Job | None:
        return next(reversed(self.jobs.values()), None) if self.jobs else None

    # -- validation -----------------------------------------------------------------------------------------
    def prepare(self, req: MergeRequest) -> Prepared:
        core = _core()
        methods = core.METHODS
        if req.method not in methods:
            raise FieldError("method", f"Unknown merge method {shown(req.method)}; choose one of "
                                       f"{', '.join(methods)}.")
        req.check_ranges()
        info = methods[req.method]
        with field_of("model_a"):
            a = self.resolve(req.model_a, "Model A")
        with field_of("model_b"):
            b = self.resolve(req.model_b, "Model B")
        if _same_file(a.path, b.path):
            raise RebasinError(f"Model A and Model B are the same file ({a.path.name}); pick two different models.")
        c = None
        if getattr(info, "needs_c", False):
            with field_of("model_c"):
                c = self.resolve(req.model_c, "Model C")
            for other, lab in ((a, "Model A"), (b, "Model B")):
                if _same_file(c.path, other.path):
                    raise RebasinError(f"Model C is the same file as {lab} ({c.path.name}); "
                                       f"{getattr(info, 'label', req.method)} needs a third, different model.")
        parts = tuple(p for p in PARTS if p in set(req.parts))
        bad = sorted(set(req.parts) - set(PARTS))
        if bad:
            raise FieldError("parts", f"Unknown part(s) {', '.join(shown(b, 20) for b in bad[:3])}; choose from "
                                      f"unet, te, vae.")
        if not parts:
            raise FieldError("parts", "Pick at least one part to merge (UNet, text encoder or VAE).")
        devices = self.host.device_choices()
        if req.device not in devices:
            raise FieldError("device", f"Device {shown(req.device)} is not available here; choose one of "
                                       f"{', '.join(devices)}.")
        if req.precision not in PRECISION_CHOICES:
            raise FieldError("precision", f"Precision must be one of {', '.join(PRECISION_CHOICES)}, got "
                                          f"{shown(req.precision)}.")
        folder = Path(self.host.output_dir())
        if not folder.is_dir():
            raise RebasinError(f"The output folder {folder} does not exist; create it or change it in Settings.")
        with field_of("output_name"):
            out = output_path_for(req.output_name, folder, default_output_stem(a, b, req.method, req.alpha,
                                                                               req.blocks))
        if out.exists() and not req.overwrite:
            raise RebasinError(f"A checkpoint named {out.name} already exists in {folder}; choose another output "
                               f"name.")
        if any(_same_file(out, e.path) for e in (a, b, c) if e is not None):
            raise RebasinError(f"The output {out.name} would overwrite one of the input models; choose another name.")
        opts = core.MergeOptions(method=req.method, alpha=float(req.alpha), iterations=int(req.iterations),
                                 parts=parts, device=req.device, precision=req.precision, seed=int(req.seed),
                                 tolerance=float(req.tolerance), align=bool(req.align),
                                 matching=req.matching, activation_samples=int(req.activation_samples),
                                 repair=bool(req.repair),
                                 ties_density=float(req.ties_density), ties_scale=float(req.ties_scale),
                                 dare_p=float(req.dare_p))
        bw = req.block_weights()
        if bw is not None:
            from dataclasses import replace as _replace

            opts = _replace(opts, blocks=bw.values, blocks_preset=bw.preset)
        checked = core.preflight(a.path, b.path, out, opts, c=c.path if c else None, overwrite=req.overwrite)
        vae = None
        try:
            if req.bake_vae and req.bake_vae.strip() and req.bake_vae != "None":
                from ..vae_bake import open_vae

                with field_of("bake_vae"):
                    vae = self.resolve_vae(req.bake_vae.strip())
                    open_vae(vae.path, checked.a.spec).close()  # header check now, not after the merge
        finally:
            close = getattr(checked, "close", None)  # preflight hands back the opened inputs; only validating
            if callable(close):
                close()
        req.parts = parts
        return Prepared(req, a, b, c, out, opts, vae)

    # -- running --------------------------------------------------------------------------------------------
    def start(self, prepared: Prepared | PreparedRecipe, job_id: str | None = None) -> Job:
        job_id = job_id or f"task(rebasin-{uuid.uuid4().hex[:12]})"
        with self._lock:
            busy = self.running()
            if busy is not None:
                raise RebasinError("A merge is already running; wait for it to finish or press Stop.")
            job = Job(job_id, prepared)
            self.jobs[job_id] = job
            while len(self.jobs) > self._keep:
                self.jobs.pop(next(iter(self.jobs)))
        threading.Thread(target=self._run, args=(job,), name=f"rebasin-{job_id}", daemon=True).start()
        return job

    def submit(self, req: MergeRequest, job_id: str | None = None) -> Job:
        """prepare + start; on a refusal the host is told to drop its progress task for `job_id`."""
        try:
            prepared = self.prepare(req)
            return self.start(prepared, job_id)
        except Exception:
            if job_id:
                self.host.discard_job(job_id)
            raise

    # -- recipes ------------------------------------------------------------------------------------------------
    def prepare_recipe(self, req: RecipeRequest) -> PreparedRecipe:
        """Check a whole recipe before anything runs: its text (errors with line numbers, forward references),
        its models against the host's checkpoints (by file name or sha256), devices and the output name."""
        from dataclasses import replace

        from .. import recipe as rm
        from ..models import open_model
        from .recipe_refs import entry_for_model as _entry_for_model

        if not (req.text or "").strip():
            raise RebasinError("The recipe is empty; add a step or load a recipe first.")
        recipe = rm.parse_recipe(req.text, "recipe")
        folder = Path(self.host.output_dir())
        if not folder.is_dir():
            raise RebasinError(f"The output folder {folder} does not exist; create it or change it in Settings.")
        entries = self.checkpoints()
        pinned: dict[str, Any] = {}
        inputs: dict[str, Path] = {}
        for name, ref in recipe.models.items():
            # The VAE to bake in is looked for in the host's VAE list first, then among the checkpoints.
            vaes = list(self.host.list_vaes()) if name == recipe.bake_vae else []
            look_in = vaes + entries
            entry = _entry_for_model(ref, look_in, folder) if ref.file else None
            if entry is None and ref.sha256:
                entry = self._entry_by_hash(ref.sha256, look_in)
            if entry is None:
                what = f"file {ref.file}" if ref.file else f"a file with sha256 {ref.sha256}"
                where = "VAEs or checkpoints" if vaes or name == recipe.bake_vae else "checkpoints"
                raise rm.RecipeError(f"line {ref.line}: model '{name}': {what} is not among the installed "
                                     f"{where}; put it in {folder} and press refresh, or fix the recipe.")
            pinned[name] = replace(ref, file=str(entry.path.resolve()))
            inputs[name] = entry.path
        recipe = replace(recipe, models=pinned)
        devices = self.host.device_choices()
        for s in recipe.steps:
            if s.options.device not in devices:
                raise rm.RecipeError(f"line {s.line}: step '{s.name}': device '{s.options.device}' is not available "
                                     f"here; choose one of {', '.join(devices)}.")
        for name, path in inputs.items():  # cheap header reads: architecture and parts, before any work
            if name != recipe.bake_vae or any(name in (s.a, s.b, s.c) for s in recipe.steps):
                open_model(path, name).close()
        if recipe.bake_vae is not None:
            from ..vae_bake import open_vae

            first = open_model(inputs[recipe.output_root()], "A")
            try:
                open_vae(inputs[recipe.bake_vae], first.spec).close()
            finally:
                first.close()
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", recipe.name).strip("._") or "recipe"
        out = output_path_for(req.output_name, folder, stem)
        if out.exists() and not req.overwrite:
            raise RebasinError(f"A checkpoint named {out.name} already exists in {folder}; choose another output "
                               f"name.")
        if any(_same_file(out, path) for path in inputs.values()):
            raise RebasinError(f"The output {out.name} would overwrite one of the recipe's models; choose another "
                               f"name.")
        return PreparedRecipe(req, recipe, folder, inputs, out)

    def _entry_by_hash(self, sha: str, entries: list[CheckpointEntry]) -> CheckpointEntry | None:
        from ..checkpoint import check_header, file_sha256
        from ..errors import CheckpointReadError

        cache = self._hashes
        for e in entries:
            try:
                st = e.path.stat()
            except OSError:
                continue
            key = (str(e.path), st.st_size, st.st_mtime_ns)
            if key not in cache:
                try:
                    check_header(e.path)  # a listed file that is no checkpoint is never read whole
                    cache[key] = file_sha256(e.path)
                except (OSError, CheckpointReadError):  # unreadable, or no checkpoint: not the pinned file
                    cache[key] = ""
            if cache[key].startswith(sha.lower()):
                return e
        return None

    def submit_recipe(self, req: RecipeRequest, job_id: str | None = None) -> Job:
        """prepare_recipe + start (the same job machinery, progress and Stop as a single merge)."""
        try:
            return self.start(self.prepare_recipe(req), job_id)
        except Exception:
            if job_id:
                self.host.discard_job(job_id)
            raise

    def cancel(self, job_id: str | None = None) -> Job | None:
        """Ask the job to stop; returns it (None if there is no such job). Once its output is committed
        (`job.committed`) it is too late: the request changes nothing and the job ends "done"."""
        job = self.jobs.get(job_id) if job_id else self.running()
        if job is None or job.finished_flag:
            return job
        with self._lock:  # against `commit` below: a cancel is either seen by it or refused
            if job.committed:
                return job
            job._cancel.set()
        job.message = "Stopping..."
        if job.status == "running":  # while queued, the host may be busy with someone else's job: leave it be
            self.host.interrupt()
        return job

    def _run(self, job: Job) -> None:
        p = job.prepared
        core = _core()

        def progress(ev: Any) -> None:
            job.fraction = max(0.0, min(1.0, float(getattr(ev, "fraction", job.fraction) or 0.0)))
            job.stage = str(getattr(ev, "stage", job.stage) or job.stage)
            job.message = str(getattr(ev, "message", "") or job.stage)
            job.eta_s = getattr(ev, "eta_s", None)
            self.host.report_progress(job.fraction, job.message)  # hosts with a progress bar add their own ETA

        def cancelled() -> bool:
            return job._cancel.is_set() or self.host.interrupted()

        def commit(output: Path) -> None:
            with self._lock:
                if cancelled():  # a cancel that came after the merge's last check still leaves no file
                    raise Cancelled()
                job.committed = True

        def work() -> None:
            if job._cancel.is_set():
                raise Cancelled()
            job.status, job.stage, job.message = "running", "loading", "Starting..."
            device = next((d for d in p.devices if d != "cpu"), "cpu")  # a recipe may mix cpu and GPU steps
            self.host.prepare_device(device)
            try:
                if isinstance(p, PreparedRecipe):
                    from .. import recipe as recipe_core

                    result = recipe_core.run_recipe(p.recipe, p.models_dir, p.output,
                                                    overwrite=p.request.overwrite, progress=progress,
                                                    cancel=cancelled,
                                                    extra_metadata={"lib_rebasin_host": self.host.name},
                                                    confine=False,  # pinned to the host's checkpoints above
                                                    on_commit=commit)
                else:
                    result = core.merge_checkpoints(
                        p.a.path, p.b.path, p.output, p.options, c=p.c.path if p.c else None,
                        overwrite=p.request.overwrite, progress=progress, cancel=cancelled,
                        extra_metadata={"lib_rebasin_host": self.host.name}, on_commit=commit,
                        **({"bake_vae": p.bake_vae.path} if p.bake_vae else {}))
            finally:
                self.host.restore_device(device)
            job.output = Path(result.output)
            inputs = list(p.inputs.values()) if isinstance(p, PreparedRecipe) else [
                e.path for e in (p.a, p.b, p.c) if e is not None]
            job.message = "Saved; telling the host the files' hashes..."
            self.host.report_progress(1.0, job.message)
            try:  # before after_save: the host's rescan then titles the files with their hashes
                self.host.remember_hashes([job.output, *inputs])
            except Exception:  # a hash cache is a convenience, never a reason to fail a saved merge
                import traceback

                traceback.print_exc()
            if isinstance(p, PreparedRecipe):
                job.summary = [str(x) for x in result.summary_lines()]
                job.diagnostics = {"steps": [{"name": n, **d.to_dict()} for n, d in result.steps]}
                job.seconds = time.time() - job.started
                self.host.after_save(job.output)
                return
            diag = getattr(result, "diagnostics", None)
            if diag is not None:
                try:
                    job.summary = [str(x) for x in diag.summary_lines()]
                except Exception as e:  # diagnostics are a report, never a reason to fail a saved merge
                    job.summary = [f"(diagnostics could not be summarised: {e})"]
                try:
                    job.diagnostics = diag.to_dict()
                except Exception:
                    job.diagnostics = None
            job.seconds = float(getattr(result, "seconds", time.time() - job.started))
            self.host.after_save(job.output)

        try:
            self.host.run_job(job.id, work)
            if job.output is None:  # the host refused to run it (for example interrupted while queued)
                raise Cancelled()
            job.status, job.fraction, job.stage = "done", 1.0, "done"
            job.message = "Saved."
        except Cancelled:
            job.status, job.stage, job.message = "cancelled", "cancelled", "Stopped: no file was written."
        except RebasinError as e:
            job.status, job.stage, job.error = "failed", "failed", str(e)
            job.message = job.error
        except Exception as e:  # a bug in the core or the host: still tell the user, in one line
            job.status, job.stage = "failed", "failed"
            job.error = f"Unexpected error ({type(e).__name__}: {e}); see the console for details."
            job.message = job.error
            import traceback

            traceback.print_exc()
        finally:
            job.eta_s = None
            job.finished = time.time()
            from ..memory import release_memory

            # A stopped or failed merge leaves big tensors in its frames, and a recipe's freed intermediate models
            # stay in the allocator's heap: give both back, so the host returns to its size before the job.
            release_memory()
            job._done.set()
