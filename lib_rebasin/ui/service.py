"""Merge jobs for the tab and the HTTP API: validation in plain words, one background job at a time, progress.

Gradio-free. The tab and the API both turn user input into a `MergeRequest`, call `MergeService.prepare` (which
refuses bad choices before anything runs, using the core's cheap `preflight`) and `start` (which runs the core's
`merge_checkpoints` in a thread, inside the host's GPU queue), then read the `Job` for progress and the result.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from ..errors import Cancelled, CheckpointReadError, FieldError, RebasinError
from ..io.model_input import same_file
from ..merge.preflight import preflight
from ..merge.run import merge_checkpoints
from ..messages import shown
from ..methods import METHODS
from ..recipe.format import ModelRef, RecipeError
from ..recipe.parse import parse_recipe
from ..recipe.run import run_recipe
from .host import CheckpointEntry, Host
from .job import Job, Prepared, PreparedRecipe
from .job_runner import cancelled_of, execute, progress_of
from .naming import default_output_stem, output_path_for
from .request import (
    MergeRequest,
    RecipeRequest,
    field_of,
)
from .unsaved import UnsavedSlot

J = TypeVar("J", bound=Job)


class MergeService:
    """One per host. Holds the jobs; only one merge runs at a time."""

    def __init__(self, host: Host, keep: int = 20) -> None:
        self.host = host
        self.jobs: dict[str, Job] = {}
        self._keep = keep
        self._lock = threading.Lock()
        self._hashes: dict[tuple[str, int, int], str] = {}  # sha256 by (path, size, mtime): recipes pin models by hash
        self.unsaved = UnsavedSlot(host)  # the one "Merge & load (no file)" result the host may hold

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
        raise RebasinError(f"{label} {shown(ref, 60)} is not in the checkpoint list; press refresh and pick it again.")

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
    def prepare(self, req: MergeRequest, load: bool = False) -> Prepared:
        """`load`: for "Merge & load (no file)"; the output name is then only what "Save this merge" offers, and
        whether it exists is checked when saving."""
        devices = self.host.device_choices()  # first: the host's list says more than "no CUDA GPU"
        if req.device not in devices:
            raise FieldError("device", f"Device {shown(req.device, 60)} is not available here; choose one of "
                                       f"{', '.join(devices)}.")
        opts = req.options()  # every option by the table, and their combinations (FieldErrors naming the field)
        info = METHODS[opts.method]
        with field_of("model_a"):
            a = self.resolve(req.model_a, "Model A")
        with field_of("model_b"):
            b = self.resolve(req.model_b, "Model B")
        if same_file(a.path, b.path):
            raise RebasinError(f"Model A and Model B are the same file ({a.path.name}); pick two different models.")
        c = None
        if info.needs_c:
            with field_of("model_c"):
                c = self.resolve(req.model_c, "Model C")
            for other, lab in ((a, "Model A"), (b, "Model B")):
                if same_file(c.path, other.path):
                    raise RebasinError(f"Model C is the same file as {lab} ({c.path.name}); {info.label} needs a "
                                       "third, different model.")
        folder = Path(self.host.output_dir())
        if not folder.is_dir():
            raise RebasinError(f"The output folder {folder} does not exist; create it or change it in Settings.")
        with field_of("output_name"):
            out = output_path_for(req.output_name, folder, default_output_stem(a, b, req.method, req.alpha,
                                                                               req.blocks))
        if out.exists() and not req.overwrite and not load:
            raise RebasinError(f"A checkpoint named {out.name} already exists in {folder}; choose another output "
                               f"name.")
        if any(same_file(out, e.path) for e in (a, b, c) if e is not None):
            raise RebasinError(f"The output {out.name} would overwrite one of the input models; choose another name.")
        checked = preflight(a.path, b.path, out, opts, c=c.path if c else None, overwrite=req.overwrite or load)
        vae = None
        try:
            if req.bake_vae and req.bake_vae.strip() and req.bake_vae != "None":
                from ..merge.vae_bake import open_vae

                with field_of("bake_vae"):
                    vae = self.resolve_vae(req.bake_vae.strip())
                    open_vae(vae.path, checked.a.spec).close()  # header check now, not after the merge
        finally:
            checked.close()  # preflight hands back the opened inputs; only validating here
        req.parts = opts.parts
        return Prepared(req, a, b, c, out, checked.options, vae, load=load)  # a preset read for the architecture

    # -- running --------------------------------------------------------------------------------------------
    def start(self, prepared: Prepared | PreparedRecipe, job_id: str | None = None) -> Job:
        job = self.register(Job(job_id or new_job_id(), prepared))
        threading.Thread(target=self._run, args=(job,), name=f"rebasin-{job.id}", daemon=True).start()
        return job

    def register(self, job: J) -> J:
        """Add a new job, refused while another one runs (one job at a time, whatever its kind)."""
        with self._lock:
            if self.running() is not None:
                raise RebasinError("A merge is already running; wait for it to finish or press Stop.")
            if self.unsaved.saving:
                raise RebasinError("The unsaved merge is being saved; wait for it to finish.")
            self.jobs[job.id] = job
            while len(self.jobs) > self._keep:
                self.jobs.pop(next(iter(self.jobs)))
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

    def submit_load(self, req: MergeRequest, job_id: str | None = None) -> Job:
        """"Merge & load (no file)": prepare + start a job that merges in memory and loads the result into the
        host's generator instead of writing a file."""
        try:
            if not self.host.loads_in_memory:
                from .host import NO_GENERATOR

                raise RebasinError(NO_GENERATOR)
            return self.start(self.prepare(req, load=True), job_id)
        except Exception:
            if job_id:
                self.host.discard_job(job_id)
            raise

    def save_unsaved(self, output_name: str = "", overwrite: bool = False) -> tuple[Path, str]:
        """"Save this merge": the loaded unsaved merge to a file (the direct merge's bytes); returns (path, title)."""
        if self.running() is not None:
            raise RebasinError("A merge is running; save the loaded merge once it has finished.")
        return self.unsaved.save(Path(self.host.output_dir()), output_name or "", bool(overwrite))

    # -- recipes ------------------------------------------------------------------------------------------------
    def prepare_recipe(self, req: RecipeRequest) -> PreparedRecipe:
        """Check a whole recipe before anything runs: its text (errors with line numbers, forward references),
        its models against the host's checkpoints (by file name or sha256), devices and the output name."""
        from ..io.model_input import open_model
        from .recipe_refs import entry_for_model as _entry_for_model

        if not (req.text or "").strip():
            raise RebasinError("The recipe is empty; add a step or load a recipe first.")
        recipe = parse_recipe(req.text, "recipe")
        folder = Path(self.host.output_dir())
        if not folder.is_dir():
            raise RebasinError(f"The output folder {folder} does not exist; create it or change it in Settings.")
        entries = self.checkpoints()
        pinned: dict[str, ModelRef] = {}
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
                raise RecipeError(f"line {ref.line}: model '{name}': {what} is not among the installed "
                                     f"{where}; put it in {folder} and press refresh, or fix the recipe.")
            pinned[name] = replace(ref, file=str(entry.path.resolve()))
            inputs[name] = entry.path
        recipe = replace(recipe, models=pinned)
        devices = self.host.device_choices()
        for s in recipe.steps:
            if s.options.device not in devices:
                raise RecipeError(f"line {s.line}: step '{s.name}': device '{s.options.device}' is not "
                                     f"available here; choose one of {', '.join(devices)}.")
        for name, path in inputs.items():  # cheap header reads: architecture and parts, before any work
            if name != recipe.bake_vae or any(name in (s.a, s.b, s.c) for s in recipe.steps):
                open_model(path, name).close()
        if recipe.bake_vae is not None:
            from ..merge.vae_bake import open_vae

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
        if any(same_file(out, path) for path in inputs.values()):
            raise RebasinError(f"The output {out.name} would overwrite one of the recipe's models; choose another "
                               f"name.")
        return PreparedRecipe(req, recipe, folder, inputs, out)

    def _entry_by_hash(self, sha: str, entries: list[CheckpointEntry]) -> CheckpointEntry | None:
        from ..io.checkpoint import check_header
        from ..io.input_file import file_sha256

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
        progress, cancelled = progress_of(self.host, job), cancelled_of(self.host, job)

        def commit(output: Path) -> None:
            with self._lock:
                if cancelled():  # a cancel that came after the merge's last check still leaves no file
                    raise Cancelled()
                job.committed = True

        def work() -> None:
            device = next((d for d in p.devices if d != "cpu"), "cpu")  # a recipe may mix cpu and GPU steps
            self.host.prepare_device(device)
            chain = result = None  # exactly one is set below: the recipe's chain or the single merge's result
            try:
                if isinstance(p, Prepared) and p.load:
                    self.unsaved.run(job, p, progress, cancelled)
                    job.seconds = time.time() - job.started
                    return
                if isinstance(p, PreparedRecipe):
                    chain = run_recipe(p.recipe, p.models_dir, p.output,
                                                   overwrite=p.request.overwrite, progress=progress,
                                                   cancel=cancelled,
                                                   extra_metadata={"lib_rebasin_host": self.host.name},
                                                   confine=False,  # pinned to the host's checkpoints above
                                                   on_commit=commit)
                    output, inputs = chain.output, list(p.inputs.values())
                else:
                    result = merge_checkpoints(
                        p.a.path, p.b.path, p.output, p.options, c=p.c.path if p.c else None,
                        overwrite=p.request.overwrite, progress=progress, cancel=cancelled,
                        extra_metadata={"lib_rebasin_host": self.host.name}, on_commit=commit,
                        bake_vae=p.bake_vae.path if p.bake_vae else None, first=p.first)
                    output, inputs = result.output, [e.path for e in (p.a, p.b, p.c) if e is not None]
            finally:
                self.host.restore_device(device)
            job.output = Path(output)
            job.message = "Saved; telling the host the files' hashes..."
            self.host.report_progress(1.0, job.message)
            try:  # before after_save: the host's rescan then titles the files with their hashes
                self.host.remember_hashes([job.output, *inputs])
            except Exception:  # a hash cache is a convenience, never a reason to fail a saved merge
                import traceback

                traceback.print_exc()
            if chain is not None:
                job.summary = [str(x) for x in chain.summary_lines()]
                job.diagnostics = {"steps": [{"name": n, **d.to_dict()} for n, d in chain.steps]}
                job.seconds = time.time() - job.started
            elif result is not None:
                try:
                    job.summary = [str(x) for x in result.diagnostics.summary_lines()]
                except Exception as e:  # diagnostics are a report, never a reason to fail a saved merge
                    job.summary = [f"(diagnostics could not be summarised: {e})"]
                try:
                    job.diagnostics = result.diagnostics.to_dict()
                except Exception:
                    job.diagnostics = None
                job.seconds = float(result.seconds)
            self.host.after_save(job.output)

        execute(self.host, job, work, lambda: "Loaded (not saved)." if job.loaded is not None else "Saved.")


def new_job_id() -> str:
    return f"task(rebasin-{uuid.uuid4().hex[:12]})"
