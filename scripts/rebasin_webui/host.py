"""The WebUI as a lib_rebasin Host: its checkpoint list and hash cache, the unsaved merge in its model, its queue
lock, shared.state progress and interrupt, its devices and settings (generation: generation.py)."""

import contextlib
import os
import traceback
from pathlib import Path

from modules import call_queue, devices, sd_models, shared

from lib_rebasin.errors import RebasinError
from lib_rebasin.ui.host import DEFAULTS, BaseHost, CheckpointEntry
from rebasin_webui.dropdown import dropdown_value, persist_checkpoint
from rebasin_webui.generation import WebUIGeneration
from rebasin_webui.host_facts import is_forge, opt, webui_progress
from rebasin_webui.unsaved import (
    UNSAVED_SUFFIX,
    HeldMerge,
    a1111_load,
    forge_load,
    keep_unsaved_listed,
    restore_after_failed_load,
    unregister,
    unsaved_info,
)

PROGRESS_STEPS = 1000  # shared.state.sampling_steps while a merge runs: its fraction in thousandths


class WebUIHost(WebUIGeneration, BaseHost):
    """The WebUI as a Host: its checkpoint list, queue lock, shared.state progress and interrupt."""

    name = "webui"
    shows_eta = webui_progress is not None  # requestProgress draws the host's bar and ETA above the tab's panel

    def __init__(self):
        super().__init__()
        self.targets = {}
        self.checkpoint_dropdown = None
        self._parked_model = None
        self._unsaved = None  # the unsaved merge loaded into the host's model: HeldMerge, or None
        self.last_file_info = None
        self.generation_targets = {}  # txt2img's components by GenerationSettings field (the compare grid reads them)
        self._last_processing = None  # the last compare picture's processing: its grid's file name patterns use it

    # -- checkpoints --------------------------------------------------------------------------------------
    def list_checkpoints(self):
        return [CheckpointEntry(title, Path(info.filename), getattr(info, "sha256", None))
                for title, info in list(sd_models.checkpoints_list.items())]

    def refresh_checkpoints(self):
        sd_models.list_models()

    def list_vaes(self):
        # modules.sd_vae keeps the WebUI's VAE list (models/VAE, --vae-dir, *.vae.* beside checkpoints)
        try:
            from modules import sd_vae
        except ImportError:
            return []
        with contextlib.suppress(Exception):  # a host whose refresh needs a loaded model: use the list as it is
            sd_vae.refresh_vae_list()
        return [CheckpointEntry(name, Path(path)) for name, path in list(sd_vae.vae_dict.items())]

    def output_dir(self):
        configured = str(opt("rebasin_output_dir", "") or "").strip()
        if configured:
            return Path(configured).expanduser()
        return Path(getattr(shared.cmd_opts, "ckpt_dir", None) or sd_models.model_path)

    def _info_for(self, path):
        target = os.path.normcase(os.path.abspath(str(path)))
        for info in list(sd_models.checkpoints_list.values()):
            if os.path.normcase(os.path.abspath(info.filename)) == target:
                return info
        return None

    def remember_hashes(self, paths):
        """Put the merge's files into the host's sha256 cache (modules/hashes.py: cache("hashes"), keyed
        "checkpoint/<name>" with the file's mtime), so the rescan titles them "name [shorthash]" and loading them
        does not hash 2 GB again. Inputs were hashed during the merge and are remembered, not re-read."""
        if getattr(shared.cmd_opts, "no_hashing", False):
            return
        try:
            from modules import hashes
        except ImportError:  # SD.Next and other hosts without it
            return
        from lib_rebasin.io.input_file import file_sha256

        cache = hashes.cache("hashes")
        for path in paths:
            info = self._info_for(path) or sd_models.CheckpointInfo(str(path))
            cache[f"checkpoint/{info.name}"] = {"mtime": os.path.getmtime(path), "sha256": file_sha256(path)}
        dump = getattr(hashes, "dump_cache", None)
        if callable(dump):  # a no-op since the diskcache-backed cache (1.8+), required before
            dump()

    def after_save(self, path):
        sd_models.list_models()
        if self._info_for(path) is None:  # saved outside the scanned folders: register it by hand
            info = sd_models.CheckpointInfo(str(path))
            info.register()

    @property
    def page_selects_checkpoint(self) -> bool:
        """Whether the tab should also ask the page's selectCheckpoint() to show the loaded model: only where the
        host's checkpoint dropdown was not captured (so the adapter cannot update it), and never in Forge, whose
        #change_checkpoint handler passes the name through sd_models.match_checkpoint_to_name, which takes the
        first registered title contained in it ("F2.safetensors" for "fcore_F1F2.safetensors")."""
        return self.checkpoint_dropdown is None and not is_forge()

    def page_name_for(self, title):
        """Also in Forge where its #change_checkpoint handler (match_checkpoint_to_name) maps `title` to the very
        checkpoint it names, as for an unsaved merge's label (no registered title is contained in it)."""
        if self.checkpoint_dropdown is not None or not title:
            return ""
        if not is_forge():
            return title
        wanted = sd_models.checkpoint_aliases.get(title)
        try:
            got = sd_models.get_closet_checkpoint_match(sd_models.match_checkpoint_to_name(title))
        except Exception:
            return ""
        return title if wanted is not None and got is wanted else ""

    # -- an unsaved merge in the host's model ("Merge & load (no file)") -------------------------------------
    loads_in_memory = True

    def load_state_dict(self, state_dict, label, on_replaced):
        """The host's own path for a state dict already in memory: A1111's load_model(info, already_loaded_state_dict)
        with a checkpoint info that names no file (never read, never hashed); Forge's forge_model_reload, whose
        reader is given the dict for that name. The info is registered and selected in sd_model_checkpoint, so the
        next generation's reload finds it loaded and reads nothing from disk. Runs inside the queue lock."""
        keep_unsaved_listed(self)
        previous = self._unsaved
        current = getattr(getattr(sd_models.model_data, "sd_model", None), "sd_checkpoint_info", None)
        if current is not None and not str(getattr(current, "filename", "")).endswith(UNSAVED_SUFFIX):
            self.last_file_info = current
        info = unsaved_info(label)
        info.register()
        self._unsaved = HeldMerge(info, state_dict, on_replaced)
        try:
            if is_forge():
                forge_load(self, info)
            else:
                a1111_load(info, state_dict)
        except Exception as e:
            traceback.print_exc()
            self._unsaved = previous
            unregister(info)
            back = restore_after_failed_load(self, previous)
            raise RebasinError(f"The WebUI could not load the merge ({type(e).__name__}: {str(e)[:200]}); {back}") \
                from None
        if previous is not None:  # replaced by this one (its callback saw our info, not another checkpoint)
            unregister(previous.info)
            previous.forget()
        return dropdown_value(info)

    def model_loaded(self, sd_model):
        """script_callbacks.on_model_loaded: another checkpoint took the unsaved merge's place: let it go."""
        held = self._unsaved
        info = getattr(sd_model, "sd_checkpoint_info", None)
        if info is not None and not str(getattr(info, "filename", "")).endswith(UNSAVED_SUFFIX):
            self.last_file_info = info  # what a failed load of an unsaved merge falls back to
        if held is not None and getattr(sd_model, "sd_checkpoint_info", None) is not held.info:
            self._unsaved = None
            unregister(held.info)
            held.forget()

    def adopt_saved(self, path):
        """The loaded model now is the file just saved (the same bytes): its info, hash and title, no reload."""
        held, model = self._unsaved, getattr(sd_models.model_data, "sd_model", None)
        info = self._info_for(path)
        if held is None or info is None or getattr(model, "sd_checkpoint_info", None) is not held.info:
            return self.load_checkpoint(path)
        self._unsaved = None
        unregister(held.info)
        shorthash = info.calculate_shorthash()  # from the hash cache remember_hashes filled: the file is not read
        model.sd_checkpoint_info = info
        model.sd_model_hash = shorthash
        if is_forge():
            model.filename = info.filename
            value = self.load_checkpoint(path)  # the option and Forge's loading parameters: lazy, nothing loads
            sd_models.model_data.forge_hash = str(sd_models.model_data.forge_loading_parameters)
        else:
            model.sd_model_checkpoint = info.filename
            shared.opts.data["sd_checkpoint_hash"] = info.sha256
            value = dropdown_value(info)
            persist_checkpoint(value)  # its onchange reload finds this file loaded already
        held.forget(notify=False)
        return value

    def load_checkpoint(self, path):
        """Select exactly the file at `path` for generation; returns the value the host's own checkpoint dropdown
        holds for it, which is also what the option sd_model_checkpoint keeps."""
        info = self._info_for(path)
        if info is None:
            sd_models.list_models()
            info = self._info_for(path)
        if info is None:
            raise RebasinError(f"{Path(path).name} is not in the WebUI's checkpoint list; press refresh and try again.")
        if is_forge():
            # Forge's own checkpoint dropdown handler: sets opts.sd_model_checkpoint, saves config.json and
            # refreshes the loading parameters; the model loads lazily at the next generation. Given the dropdown's
            # own entry (a bare name in Forge), which is one of the file's aliases: resolved exactly.
            value = dropdown_value(info)
            try:
                from modules_forge import main_entry

                change = getattr(main_entry, "checkpoint_change", None)
            except ImportError:
                change = None
            if change is not None:
                change(value)
            else:
                persist_checkpoint(value)
            return value
        with call_queue.queue_lock:
            sd_models.reload_model_weights(info=info)
        value = dropdown_value(self._info_for(path) or info)  # loading may have hashed it: "name [hash]" now
        persist_checkpoint(value)  # outside the queue lock: the option's onchange takes it
        return value

    # -- jobs, progress, interrupt ----------------------------------------------------------------------------
    def run_job(self, job_id, work):
        if webui_progress is not None:
            webui_progress.add_task_to_queue(job_id)
        with call_queue.queue_lock:
            # state.begin() leaves sampling_steps alone, and the host's console "Total progress" bar of the next
            # generation is sized job_count * sampling_steps before its sampler sets its own: put back what we set
            kept = {k: getattr(shared.state, k, None) for k in ("sampling_steps", "sampling_step", "textinfo")}
            shared.state.begin(job=job_id)
            if webui_progress is not None:
                webui_progress.start_task(job_id)
            shared.state.job_count = 1
            shared.state.sampling_steps = PROGRESS_STEPS
            shared.state.sampling_step = 0
            shared.state.textinfo = "Re-Basin merge"
            try:
                work()
            finally:
                if webui_progress is not None:
                    webui_progress.finish_task(job_id)
                shared.state.end()
                shared.state.interrupted = False
                shared.state.job_count = 0
                for key, value in kept.items():
                    setattr(shared.state, key, value)

    def discard_job(self, job_id):
        if webui_progress is not None and job_id:
            webui_progress.pending_tasks.pop(job_id, None)
            webui_progress.finish_task(job_id)

    def report_progress(self, fraction, text):
        shared.state.sampling_step = int(max(0.0, min(1.0, fraction)) * PROGRESS_STEPS)
        shared.state.textinfo = text

    def interrupted(self):
        return bool(getattr(shared.state, "interrupted", False))

    def interrupt(self):
        shared.state.interrupt()

    # -- devices --------------------------------------------------------------------------------------------
    def _gpu_name(self):
        try:
            name = devices.get_optimal_device_name()
        except Exception:
            return None
        return name if name and str(name).startswith("cuda") else None  # the core merges on cpu or cuda

    def device_choices(self):
        gpu = self._gpu_name()
        return ["cpu", gpu] if gpu else ["cpu"]

    def default_device(self):
        gpu = self._gpu_name()
        if not gpu or getattr(shared.cmd_opts, "lowvram", False) or getattr(shared.cmd_opts, "medvram", False):
            return "cpu"
        try:
            import torch

            if gpu.startswith("cuda"):
                total = torch.cuda.get_device_properties(torch.device(gpu)).total_memory
                if total < self.min_gpu_bytes:
                    return "cpu"
        except Exception:
            return "cpu"
        return gpu

    def prepare_device(self, device):
        """Free VRAM before a GPU merge: park the loaded model on the CPU (Forge: unload everything)."""
        if device == "cpu":
            return
        try:
            if is_forge():
                sd_models.unload_model_weights()
            else:
                model = getattr(sd_models.model_data, "sd_model", None)
                if model is not None:
                    sd_models.send_model_to_cpu(model)
                    self._parked_model = model
            devices.torch_gc()
        except Exception:
            traceback.print_exc()

    def restore_device(self, device):
        """Release the merge's memory and put a usable model back (Forge reloads lazily by itself)."""
        try:
            devices.torch_gc()
            model, self._parked_model = self._parked_model, None
            if model is not None and getattr(sd_models.model_data, "sd_model", None) is model:
                sd_models.send_model_to_device(model)
        except Exception:
            traceback.print_exc()

    # -- settings and captured components -----------------------------------------------------------------------
    def defaults(self):
        d = dict(DEFAULTS)
        d["method"] = opt("rebasin_default_method", d["method"])
        d["iterations"] = int(opt("rebasin_default_iterations", d["iterations"]) or 1)
        d["precision"] = opt("rebasin_default_precision", d["precision"])
        dev = opt("rebasin_default_device", "auto")
        gpu = self._gpu_name()
        d["device"] = "cpu" if dev == "cpu" else (gpu if dev == "gpu" and gpu else self.default_device())
        return d

    def hires_targets(self):
        return dict(self.targets)
