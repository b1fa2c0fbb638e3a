"""AUTOMATIC1111 / Forge / reForge (and, best effort, SD.Next) entry point of the Re-Basin extension.

The only file that imports the WebUI's `modules`. It adapts the host to `lib_rebasin.ui.host.Host` and registers:
  - the "Re-Basin" tab (elem_id `rebasin`) via on_ui_tabs,
  - default settings via on_ui_settings (read back with opts.data.get, so --nowebui still works),
  - the txt2img hires-fix components and the top-left checkpoint dropdown via on_after_component,
  - the HTTP API via on_app_started, only when the host serves its own API (--api or --nowebui), behind the
    host's --api-auth and CORS origins.
Callbacks are registered without `name=` because SD.Next's on_* functions do not accept it.
"""

import os
import sys
import traceback
from pathlib import Path

_EXT_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if _EXT_ROOT not in sys.path:  # the WebUI prefixes it only while importing this file
    sys.path.insert(0, _EXT_ROOT)

import gradio as gr  # noqa: E402

from modules import call_queue, devices, script_callbacks, sd_models, shared  # noqa: E402

from lib_rebasin.errors import RebasinError  # noqa: E402
from lib_rebasin.methods import METHODS  # noqa: E402
from lib_rebasin.options import OPTIONS  # noqa: E402
from lib_rebasin.ui.api import register_api  # noqa: E402
from lib_rebasin.ui.api_policy import ALLOWED_HOSTS_ENV, ApiPolicy, listen_address  # noqa: E402
from lib_rebasin.ui.generation import GENERATION_FIELDS  # noqa: E402
from lib_rebasin.ui.host import DEFAULTS, HIRES_ELEM_IDS, BaseHost, CheckpointEntry  # noqa: E402
from lib_rebasin.ui.service import MergeService  # noqa: E402
from lib_rebasin.ui.tab import build_tab  # noqa: E402

try:
    from modules import progress as webui_progress
except ImportError:  # pragma: no cover - very old or exotic hosts
    webui_progress = None

TAB_TITLE = "Re-Basin"
TAB_ID = "rebasin"
SECTION = ("rebasin", "Re-Basin")
_ID_TO_KEY = {v: k for k, v in HIRES_ELEM_IDS.items()}
_GEN_ID_TO_KEY = {f.elem_id: f.name for f in GENERATION_FIELDS}
_PROGRESS_STEPS = 1000


def _opt(key, default):
    return shared.opts.data.get(key, default)


def _is_forge():
    return hasattr(sd_models, "forge_model_reload")


class WebUIHost(BaseHost):
    """The WebUI as a Host: its checkpoint list, queue lock, shared.state progress and interrupt."""

    name = "webui"
    shows_eta = webui_progress is not None  # requestProgress draws the host's bar and ETA above the tab's panel

    def __init__(self):
        super().__init__()
        self.targets = {}
        self.checkpoint_dropdown = None
        self._parked_model = None
        self._unsaved = None  # the unsaved merge loaded into the host's model: _Unsaved, or None
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
        try:
            sd_vae.refresh_vae_list()
        except Exception:  # a host whose refresh needs a loaded model: use the list as it is
            pass
        return [CheckpointEntry(name, Path(path)) for name, path in list(sd_vae.vae_dict.items())]

    def output_dir(self):
        configured = str(_opt("rebasin_output_dir", "") or "").strip()
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
        return self.checkpoint_dropdown is None and not _is_forge()

    def page_name_for(self, title):
        """Also in Forge where its #change_checkpoint handler (match_checkpoint_to_name) maps `title` to the very
        checkpoint it names, as for an unsaved merge's label (no registered title is contained in it)."""
        if self.checkpoint_dropdown is not None or not title:
            return ""
        if not _is_forge():
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
        _keep_unsaved_listed()
        previous = self._unsaved
        current = getattr(getattr(sd_models.model_data, "sd_model", None), "sd_checkpoint_info", None)
        if current is not None and not str(getattr(current, "filename", "")).endswith(UNSAVED_SUFFIX):
            self.last_file_info = current
        info = _unsaved_info(label)
        info.register()
        self._unsaved = _Unsaved(info, state_dict, on_replaced)
        try:
            if _is_forge():
                _forge_load(info)
            else:
                _a1111_load(info, state_dict)
        except Exception as e:
            traceback.print_exc()
            self._unsaved = previous
            _unregister(info)
            back = _restore_after_failed_load(previous)
            raise RebasinError(f"The WebUI could not load the merge ({type(e).__name__}: {str(e)[:200]}); {back}") \
                from None
        if previous is not None:  # replaced by this one (its callback saw our info, not another checkpoint)
            _unregister(previous.info)
            previous.forget()
        return _dropdown_value(info)

    def model_loaded(self, sd_model):
        """script_callbacks.on_model_loaded: another checkpoint took the unsaved merge's place: let it go."""
        held = self._unsaved
        info = getattr(sd_model, "sd_checkpoint_info", None)
        if info is not None and not str(getattr(info, "filename", "")).endswith(UNSAVED_SUFFIX):
            self.last_file_info = info  # what a failed load of an unsaved merge falls back to
        if held is not None and getattr(sd_model, "sd_checkpoint_info", None) is not held.info:
            self._unsaved = None
            _unregister(held.info)
            held.forget()

    def adopt_saved(self, path):
        """The loaded model now is the file just saved (the same bytes): its info, hash and title, no reload."""
        held, model = self._unsaved, getattr(sd_models.model_data, "sd_model", None)
        info = self._info_for(path)
        if held is None or info is None or getattr(model, "sd_checkpoint_info", None) is not held.info:
            return self.load_checkpoint(path)
        self._unsaved = None
        _unregister(held.info)
        shorthash = info.calculate_shorthash()  # from the hash cache remember_hashes filled: the file is not read
        model.sd_checkpoint_info = info
        model.sd_model_hash = shorthash
        if _is_forge():
            model.filename = info.filename
            value = self.load_checkpoint(path)  # the option and Forge's loading parameters: lazy, nothing loads
            sd_models.model_data.forge_hash = str(sd_models.model_data.forge_loading_parameters)
        else:
            model.sd_model_checkpoint = info.filename
            shared.opts.data["sd_checkpoint_hash"] = info.sha256
            value = _dropdown_value(info)
            _persist_checkpoint(value)  # its onchange reload finds this file loaded already
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
        if _is_forge():
            # Forge's own checkpoint dropdown handler: sets opts.sd_model_checkpoint, saves config.json and
            # refreshes the loading parameters; the model loads lazily at the next generation. Given the dropdown's
            # own entry (a bare name in Forge), which is one of the file's aliases: resolved exactly.
            value = _dropdown_value(info)
            try:
                from modules_forge import main_entry

                change = getattr(main_entry, "checkpoint_change", None)
            except ImportError:
                change = None
            if change is not None:
                change(value)
            else:
                _persist_checkpoint(value)
            return value
        with call_queue.queue_lock:
            sd_models.reload_model_weights(info=info)
        value = _dropdown_value(self._info_for(path) or info)  # loading may have hashed it: "name [hash]" now
        _persist_checkpoint(value)  # outside the queue lock: the option's onchange takes it
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
            shared.state.sampling_steps = _PROGRESS_STEPS
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
        shared.state.sampling_step = int(max(0.0, min(1.0, fraction)) * _PROGRESS_STEPS)
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
            if _is_forge():
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
        d["method"] = _opt("rebasin_default_method", d["method"])
        d["iterations"] = int(_opt("rebasin_default_iterations", d["iterations"]) or 1)
        d["precision"] = _opt("rebasin_default_precision", d["precision"])
        dev = _opt("rebasin_default_device", "auto")
        gpu = self._gpu_name()
        d["device"] = "cpu" if dev == "cpu" else (gpu if dev == "gpu" and gpu else self.default_device())
        return d

    def hires_targets(self):
        return dict(self.targets)

    # -- generation: the compare grid ---------------------------------------------------------------------------
    def loaded_checkpoint(self):
        """The file the generator uses now: the loaded model's (A1111), the selected one (Forge loads it lazily);
        None for an unsaved merge or nothing."""
        info = getattr(getattr(sd_models.model_data, "sd_model", None), "sd_checkpoint_info", None)
        if info is None or _is_forge():
            info = sd_models.checkpoint_aliases.get(shared.opts.data.get("sd_model_checkpoint")) or info
        if info is None or str(getattr(info, "filename", "")).endswith(UNSAVED_SUFFIX):
            return None
        return Path(info.filename)

    def txt2img_inputs(self):
        return dict(self.generation_targets)

    def generate(self, settings, label):
        """One txt2img picture through the host's own processing (hires fix, sampler, infotext), inside our
        job's queue lock; nothing saved (the grid is). The infotext names the candidate."""
        from modules import processing

        from lib_rebasin.ui.generation import GeneratedImage

        opts = shared.opts.data
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=getattr(shared, "sd_model", None),
            outpath_samples=opts.get("outdir_samples") or opts.get("outdir_txt2img_samples"),
            outpath_grids=opts.get("outdir_grids") or opts.get("outdir_txt2img_grids"),
            prompt=settings.prompt, negative_prompt=settings.negative_prompt, seed=settings.seed,
            sampler_name=settings.sampler_name or None, steps=settings.steps, cfg_scale=settings.cfg_scale,
            width=settings.width, height=settings.height, batch_size=1, n_iter=1,
            enable_hr=settings.enable_hr, hr_scale=settings.hr_scale, hr_upscaler=settings.hr_upscaler or None,
            denoising_strength=settings.denoising_strength,
            hr_second_pass_steps=settings.hr_second_pass_steps, do_not_save_samples=True, do_not_save_grid=True)
        if settings.scheduler:
            p.scheduler = settings.scheduler
        if hasattr(p, "hr_additional_modules"):  # Forge: its txt2img passes these; the dataclass defaults break it
            if p.hr_additional_modules is None:  # (processing.py: 'Use same choices' not in None)
                p.hr_additional_modules = ["Use same choices"]
            p.hr_cfg = settings.cfg_scale  # its default 1.0 would run the hires pass without guidance
        p.extra_generation_params["Re-Basin candidate"] = label
        kept = {k: getattr(shared.state, k, None) for k in ("sampling_steps", "sampling_step", "textinfo")}
        try:
            processed = processing.process_images(p)
        finally:
            p.close()
            for key, value in kept.items():  # the sampler sized the bar by its steps; ours counts to 1000
                setattr(shared.state, key, value)
        self._last_processing = p
        if not processed.images:
            if self.interrupted():
                return GeneratedImage(None, "")
            raise RebasinError(f"The WebUI generated no picture for {label}.")
        return GeneratedImage(processed.images[0], processed.infotexts[0] if processed.infotexts else "")

    def save_grid(self, image, infotext, settings):
        """Where txt2img saves its grids (outdir_grids, else outdir_txt2img_grids), in the grid format, the
        infotext as the picture's parameters (images.save_image)."""
        from modules import images

        opts = shared.opts.data
        folder = opts.get("outdir_grids") or opts.get("outdir_txt2img_grids") or "outputs/txt2img-grids"
        fullfn, _txt = images.save_image(image, folder, "grid", settings.seed, settings.prompt,
                                         opts.get("grid_format", "png"), info=infotext,
                                         short_filename=not opts.get("grid_extended_filename", False), grid=True,
                                         p=self._last_processing)
        return Path(fullfn).resolve()  # the host saves relative to its own folder; callers elsewhere need it whole

    def ready_upscalers(self):
        """Latent modes, plus the upscalers in shared.sd_upscalers whose weights are on disk or that need none.
        The host's ESRGAN / RealESRGAN / SwinIR entries keep a URL in local_data_path until the file is
        downloaded (modules/upscaler.py UpscalerData, realesrgan_model.py); Lanczos, Nearest, None have no path."""
        upscalers = getattr(shared, "sd_upscalers", None)
        if upscalers is None:
            return None
        ready = set(getattr(shared, "latent_upscale_modes", None) or ())
        for u in upscalers:
            path = getattr(u, "local_data_path", None) or getattr(u, "data_path", None)
            if path is None or (not str(path).startswith(("http://", "https://")) and os.path.exists(str(path))):
                ready.add(u.name)
        return ready


class _Unsaved:
    def __init__(self, info, state_dict, on_replaced):
        self.info, self.state_dict, self.on_replaced = info, state_dict, on_replaced

    def forget(self, notify=True):
        """Drop every reference the adapter and the host's caches keep to its tensors; tell the service."""
        self.state_dict = None
        loaded = getattr(sd_models, "checkpoints_loaded", None)  # the host's RAM cache (sd_checkpoint_cache > 0)
        if loaded is not None:
            loaded.pop(self.info, None)
        if notify:
            try:
                self.on_replaced()
            except Exception:
                traceback.print_exc()


UNSAVED_SUFFIX = ".unsaved"  # never a checkpoint's suffix: no host lists, hashes or reads such a name


def _unsaved_info(label):
    """A CheckpointInfo titled `label` for a merge that has no file: its filename (in the checkpoint folder, so it
    is unique there and no sidecar .yaml/.vae is found) does not exist, no hash is known or computed, and the
    infotext's "Model" is the label."""
    info = sd_models.CheckpointInfo(os.path.join(sd_models.model_path, label + UNSAVED_SUFFIX))
    for field in ("name", "name_for_extra", "model_name", "title", "short_title"):
        setattr(info, field, label)
    info.ids = [label]
    info.sha256 = info.shorthash = None
    info.metadata = {}
    info.calculate_shorthash = lambda: None  # the host's loaders call it: nothing to hash
    return info


def _unregister(info):
    if sd_models.checkpoints_list.get(info.title) is info:
        del sd_models.checkpoints_list[info.title]
    for key, value in list(sd_models.checkpoint_aliases.items()):
        if value is info:
            del sd_models.checkpoint_aliases[key]


def _keep_unsaved_listed():
    """The host's list_models() clears the registry (any refresh button, a save): register the loaded unsaved
    merge again afterwards, or the next generation would fall back to a file. Installed once; a no-op while
    nothing unsaved is loaded."""
    original = sd_models.list_models
    if getattr(original, "_rebasin_keeps_unsaved", False):
        return

    def list_models(*args, **kwargs):
        result = original(*args, **kwargs)
        held = HOST._unsaved
        if held is not None:
            held.info.register()
        return result

    list_models._rebasin_keeps_unsaved = True
    sd_models.list_models = list_models


def _a1111_load(info, state_dict):
    """sd_models.load_model sends the current model to the meta device and builds the new one from the dict."""
    current = getattr(sd_models.model_data, "sd_model", None)
    loaded = getattr(sd_models.model_data, "loaded_sd_models", None)
    if current is not None and loaded is not None and current in loaded:
        # left in that list on the meta device, it would be "reused" by the next checkpoint switch (sd_models
        # reuse_model_from_already_loaded) and fail with "Cannot copy out of meta tensor"
        loaded.remove(current)
    sd_models.load_model(checkpoint_info=info, already_loaded_state_dict=dict(state_dict))


def _forge_load(info):
    """Forge loads what sd_model_checkpoint selects, through its reader, which gives the unsaved dict for its name."""
    from modules_forge import main_entry

    _forge_reads_unsaved()
    _forge_drops_unsaved_when_another_is_picked()
    shared.opts.data["sd_model_checkpoint"] = info.title  # not saved to config.json: no file stands behind it
    main_entry.refresh_model_loading_parameters()
    sd_models.forge_model_reload()  # now, in our job, so a failure is reported here and not at the next generation


def _forge_reads_unsaved():
    import backend.loader as loader

    original = loader.load_torch_file
    if getattr(original, "_rebasin_reads_unsaved", False):
        return

    def load_torch_file(ckpt, *args, **kwargs):
        held = HOST._unsaved
        if held is not None and held.state_dict is not None and isinstance(ckpt, str) and ckpt == held.info.filename:
            return dict(held.state_dict)  # a copy: the loader pops and renames keys
        return original(ckpt, *args, **kwargs)

    load_torch_file._rebasin_reads_unsaved = True
    loader.load_torch_file = load_torch_file


def _forge_drops_unsaved_when_another_is_picked():
    """Forge loads lazily: picking a checkpoint (its dropdown, /sdapi/v1/options) only refreshes the loading
    parameters, and on_model_loaded comes at the next generation. Until then the unsaved merge would still count as
    loaded: a compare would take it for the model before and put it back after Stop, undoing the user's pick. So
    it is let go as soon as the loading parameters select anything else."""
    from modules_forge import main_entry

    original = main_entry.refresh_model_loading_parameters
    if getattr(original, "_rebasin_drops_unsaved", False):
        return

    def refresh_model_loading_parameters(*args, **kwargs):
        result = original(*args, **kwargs)
        held = HOST._unsaved
        params = getattr(sd_models.model_data, "forge_loading_parameters", None) or {}
        if held is not None and params.get("checkpoint_info") is not held.info:
            HOST._unsaved = None
            _unregister(held.info)
            held.forget()
        return result

    refresh_model_loading_parameters._rebasin_drops_unsaved = True
    main_entry.refresh_model_loading_parameters = refresh_model_loading_parameters


def _restore_after_failed_load(previous):
    """After a failed load: the model that was loaded before (A1111 moved it to the meta device; Forge reloads it
    at the next generation): the previous unsaved merge while its tensors are still held, else the last checkpoint
    file loaded. Returns what the user is told."""
    try:
        if previous is not None and previous.state_dict:
            info = previous.info
            HOST._unsaved = previous
            info.register()
        else:
            if previous is not None:
                _unregister(previous.info)
                HOST._unsaved = None
            info = HOST.last_file_info or sd_models.select_checkpoint()
        shared.opts.data["sd_model_checkpoint"] = info.title
        if _is_forge():
            from modules_forge import main_entry

            main_entry.refresh_model_loading_parameters()
            sd_models.model_data.forge_hash = ""
            return f"{info.title} is loaded again at the next generation."
        model = getattr(sd_models.model_data, "sd_model", None)
        if model is None or getattr(model, "sd_checkpoint_info", None) is not info:
            sd_models.model_data.sd_model = None
            state_dict = dict(previous.state_dict) if HOST._unsaved is previous and previous else None
            sd_models.load_model(checkpoint_info=info, already_loaded_state_dict=state_dict)
        return f"{info.title} is loaded again."
    except Exception as e:
        traceback.print_exc()
        return f"reloading the model before failed too ({type(e).__name__}); pick a checkpoint."


def _dropdown_value(info):
    """The entry the host's checkpoint dropdowns list for `info` (sd_models.checkpoint_tiles, in the order of
    checkpoints_list): "name [hash]" titles in A1111, bare names in Forge, short titles with the host's
    sd_checkpoint_dropdown_use_short. Every one of them is among the file's checkpoint_aliases."""
    infos = list(sd_models.checkpoints_list.values())
    tiles = _checkpoint_choices()
    for i, candidate in enumerate(infos):
        if candidate is info and len(tiles) == len(infos):
            return tiles[i]
    return info.title


def _persist_checkpoint(title):
    """What the host's checkpoint dropdown does on change (ui_settings.run_settings_single): set the option, then
    save config.json, so a restart keeps the model. The option's onchange reload finds it loaded already."""
    shared.opts.set("sd_model_checkpoint", title)
    shared.opts.save(shared.config_filename)


HOST = WebUIHost()
SERVICE = MergeService(HOST)
TAB = None


def _method_choices():
    """(label, key) pairs: the Settings page shows "Re-basin (weight matching)", the option stores "rebasin"."""
    return [(m.label, key) for key, m in METHODS.items()]


# The Settings page groups sections by category (modules/options.py: a section without one is "Uncategorized");
# merging checkpoints sits with the host's own Stable Diffusion settings.
CATEGORY = "sd"


def on_ui_settings():
    section = SECTION
    add = shared.opts.add_option
    options = {
        "rebasin_default_method": shared.OptionInfo(
            OPTIONS["method"].default, "Default merge method", gr.Radio, {"choices": _method_choices()},
            section=section),
        "rebasin_default_iterations": shared.OptionInfo(
            1, "Default iterations (re-basin and legacy)", gr.Slider,
            {"minimum": OPTIONS["iterations"].low, "maximum": OPTIONS["iterations"].high, "step": 1},
            section=section),
        "rebasin_default_device": shared.OptionInfo(
            "auto", "Default device (auto = GPU when it has enough VRAM and no --lowvram/--medvram, else CPU)",
            gr.Radio, {"choices": [("Auto", "auto"), ("CPU", "cpu"), ("GPU", "gpu")]}, section=section),
        "rebasin_default_precision": shared.OptionInfo(
            OPTIONS["precision"].default, "Default save precision", gr.Radio,
            {"choices": list(OPTIONS["precision"].choices)}, section=section),
        "rebasin_output_dir": shared.OptionInfo(
            "", "Output folder for merges (empty = the WebUI checkpoint folder)", gr.Textbox, section=section),
        ALLOWED_HOSTS_OPTION: shared.OptionInfo(
            "", "HTTP API: extra host names it answers to, comma-separated (a tunnel's or cloud proxy's name; "
                "*.proxy.example for all its names)", gr.Textbox, section=section),
    }
    for key, info in options.items():
        info.category_id = CATEGORY  # set, not passed: OptionInfo takes no category_id on older hosts and SD.Next
        add(key, info)


def on_ui_tabs():
    global TAB
    TAB = build_tab(HOST, SERVICE, title=TAB_TITLE)
    if HOST.checkpoint_dropdown is not None:  # captured earlier (not so in A1111 1.10 or Forge, kept for others)
        with TAB.blocks:
            _wire_checkpoint_dropdown(HOST.checkpoint_dropdown)
    return [(TAB.blocks, TAB_TITLE, TAB_ID)]


def _checkpoint_choices():
    use_short = bool(_opt("sd_checkpoint_dropdown_use_short", False))
    try:
        return sd_models.checkpoint_tiles(use_short)
    except TypeError:
        return sd_models.checkpoint_tiles()


def refresh_checkpoint_dropdown(_path=None):
    """The top-left dropdown after a save: fresh choices, value kept."""
    return gr.update(choices=_checkpoint_choices())


def select_in_checkpoint_dropdown(title):
    """The top-left dropdown after "Load merged model": fresh choices, showing the loaded model."""
    if not title:
        return gr.update()
    return gr.update(choices=_checkpoint_choices(), value=title)


def _wire_checkpoint_dropdown(dropdown):
    if TAB is None or getattr(dropdown, "_rebasin_wired", False):
        return
    TAB["result_path"].change(fn=refresh_checkpoint_dropdown, inputs=[TAB["result_path"]], outputs=[dropdown])
    TAB["loaded_title"].change(fn=select_in_checkpoint_dropdown, inputs=[TAB["loaded_title"]], outputs=[dropdown])
    dropdown._rebasin_wired = True


def _is_checkpoint_dropdown(component, kwargs):
    elem_id = kwargs.get("elem_id") or getattr(component, "elem_id", None)
    if elem_id == "setting_sd_model_checkpoint":
        return True
    classes = kwargs.get("elem_classes") or []
    classes = [classes] if isinstance(classes, str) else list(classes)
    label = str(kwargs.get("label") or "")
    return _is_forge() and "model_selection" in classes and "checkpoint" in label.lower()


def _in_layout(kwargs):
    """Whether a component is being built into the page. gradio 4 also constructs a component, with render=False
    and outside any Blocks, for every property update it sends (Forge's checkpoint dropdown gets one on each page
    load and checkpoint switch), and the host's after_component hook fires for those copies too."""
    if kwargs.get("render") is False:
        return False
    try:
        from gradio.context import Context
    except ImportError:  # pragma: no cover - every supported gradio has it
        return True
    return Context.root_block is not None


def on_after_component(component, **kwargs):
    if not _in_layout(kwargs):
        return
    elem_id = kwargs.get("elem_id") or getattr(component, "elem_id", None)
    gen = _GEN_ID_TO_KEY.get(elem_id)
    if gen is not None:
        HOST.generation_targets[gen] = component
    key = _ID_TO_KEY.get(elem_id)
    if key is not None:
        HOST.targets[key] = component
    elif HOST.checkpoint_dropdown is None and _is_checkpoint_dropdown(component, kwargs):
        HOST.checkpoint_dropdown = component
        try:
            _wire_checkpoint_dropdown(component)
        except Exception:
            traceback.print_exc()


def api_enabled():
    """The host serves its API (modules/api) only with --api, or --nowebui (API only): so do we."""
    opts = shared.cmd_opts
    return bool(getattr(opts, "api", False) or getattr(opts, "nowebui", False))


# The one setting that lets the API answer to another host name (a tunnel, a cloud proxy), three ways: this option
# (read on each request), --rebasin-allowed-hosts (preload.py), and the environment variable.
ALLOWED_HOSTS_OPTION = "rebasin_allowed_hosts"
ALLOW_HINT = (f"Settings > Re-Basin > 'HTTP API: extra host names', --rebasin-allowed-hosts, or {ALLOWED_HOSTS_ENV} "
              "(comma-separated; *.domain for a proxy)")


def api_policy():
    opts = shared.cmd_opts
    return ApiPolicy.from_flags(
        getattr(opts, "api_auth", None), getattr(opts, "cors_allow_origins", None),
        getattr(opts, "cors_allow_origins_regex", None),
        listen=listen_address(getattr(opts, "server_name", None), bool(getattr(opts, "listen", False))),
        allowed_hosts=getattr(opts, "rebasin_allowed_hosts", None), share=bool(getattr(opts, "share", False)),
        ngrok=bool(getattr(opts, "ngrok", None)), live_hosts=lambda: str(_opt(ALLOWED_HOSTS_OPTION, "") or ""),
        allow_hint=ALLOW_HINT)


def on_model_loaded(sd_model):
    HOST.model_loaded(sd_model)


def on_app_started(demo, app):
    if api_enabled():
        register_api(app, SERVICE, api_policy())


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_after_component(on_after_component)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_model_loaded(on_model_loaded)
