"""An unsaved merge held in the host's model ("Merge & load (no file)"): its checkpoint info that names no file,
the host's own loaders given its state dict (A1111's load_model, Forge's reader), the wrappers that keep it listed
and let it go when Forge selects another checkpoint, and the way back after a failed load."""

import os
import traceback

from modules import sd_models, shared

from rebasin_webui.host_facts import is_forge


class HeldMerge:
    """The unsaved merge the host's model was built from: its checkpoint info, its tensors (Forge's reader and a
    failed load's way back need them) and the service's callback for when another model takes its place."""

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


def unsaved_info(label):
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


def unregister(info):
    if sd_models.checkpoints_list.get(info.title) is info:
        del sd_models.checkpoints_list[info.title]
    for key, value in list(sd_models.checkpoint_aliases.items()):
        if value is info:
            del sd_models.checkpoint_aliases[key]


def install_once(owner, name, make_wrapper):
    """Replace `owner.name` by make_wrapper(original), once: a wrapper already installed (by an earlier load of the
    adapter) is kept, so the host's function is never wrapped twice."""
    original = getattr(owner, name)
    if getattr(original, "_rebasin_wrapper", False):
        return
    wrapper = make_wrapper(original)
    wrapper._rebasin_wrapper = True
    setattr(owner, name, wrapper)


def keep_unsaved_listed(host):
    """The host's list_models() clears the registry (any refresh button, a save): register the loaded unsaved
    merge again afterwards, or the next generation would fall back to a file. A no-op while nothing unsaved is
    loaded."""

    def wrap(original):
        def list_models(*args, **kwargs):
            result = original(*args, **kwargs)
            held = host._unsaved
            if held is not None:
                held.info.register()
            return result

        return list_models

    install_once(sd_models, "list_models", wrap)


def a1111_load(info, state_dict):
    """sd_models.load_model sends the current model to the meta device and builds the new one from the dict."""
    current = getattr(sd_models.model_data, "sd_model", None)
    loaded = getattr(sd_models.model_data, "loaded_sd_models", None)
    if current is not None and loaded is not None and current in loaded:
        # left in that list on the meta device, it would be "reused" by the next checkpoint switch (sd_models
        # reuse_model_from_already_loaded) and fail with "Cannot copy out of meta tensor"
        loaded.remove(current)
    sd_models.load_model(checkpoint_info=info, already_loaded_state_dict=dict(state_dict))


def forge_load(host, info):
    """Forge loads what sd_model_checkpoint selects, through its reader, which gives the unsaved dict for its name."""
    from modules_forge import main_entry

    forge_reads_unsaved(host)
    forge_drops_unsaved_when_another_is_picked(host)
    shared.opts.data["sd_model_checkpoint"] = info.title  # not saved to config.json: no file stands behind it
    main_entry.refresh_model_loading_parameters()
    sd_models.forge_model_reload()  # now, in our job, so a failure is reported here and not at the next generation


def forge_reads_unsaved(host):
    import backend.loader as loader

    def wrap(original):
        def load_torch_file(ckpt, *args, **kwargs):
            held = host._unsaved
            if held is not None and held.state_dict is not None and isinstance(ckpt, str) \
                    and ckpt == held.info.filename:
                return dict(held.state_dict)  # a copy: the loader pops and renames keys
            return original(ckpt, *args, **kwargs)

        return load_torch_file

    install_once(loader, "load_torch_file", wrap)


def forge_drops_unsaved_when_another_is_picked(host):
    """Forge loads lazily: picking a checkpoint (its dropdown, /sdapi/v1/options) only refreshes the loading
    parameters, and on_model_loaded comes at the next generation. Until then the unsaved merge would still count as
    loaded: a compare would take it for the model before and put it back after Stop, undoing the user's pick. So
    it is let go as soon as the loading parameters select anything else."""
    from modules_forge import main_entry

    def wrap(original):
        def refresh_model_loading_parameters(*args, **kwargs):
            result = original(*args, **kwargs)
            held = host._unsaved
            params = getattr(sd_models.model_data, "forge_loading_parameters", None) or {}
            if held is not None and params.get("checkpoint_info") is not held.info:
                host._unsaved = None
                unregister(held.info)
                held.forget()
            return result

        return refresh_model_loading_parameters

    install_once(main_entry, "refresh_model_loading_parameters", wrap)


def restore_after_failed_load(host, previous):
    """After a failed load: the model that was loaded before (A1111 moved it to the meta device; Forge reloads it
    at the next generation): the previous unsaved merge while its tensors are still held, else the last checkpoint
    file loaded. Returns what the user is told."""
    try:
        if previous is not None and previous.state_dict:
            info = previous.info
            host._unsaved = previous
            info.register()
        else:
            if previous is not None:
                unregister(previous.info)
                host._unsaved = None
            info = host.last_file_info or sd_models.select_checkpoint()
        shared.opts.data["sd_model_checkpoint"] = info.title
        if is_forge():
            from modules_forge import main_entry

            main_entry.refresh_model_loading_parameters()
            sd_models.model_data.forge_hash = ""
            return f"{info.title} is loaded again at the next generation."
        model = getattr(sd_models.model_data, "sd_model", None)
        if model is None or getattr(model, "sd_checkpoint_info", None) is not info:
            sd_models.model_data.sd_model = None
            state_dict = dict(previous.state_dict) if host._unsaved is previous and previous else None
            sd_models.load_model(checkpoint_info=info, already_loaded_state_dict=state_dict)
        return f"{info.title} is loaded again."
    except Exception as e:
        traceback.print_exc()
        return f"reloading the model before failed too ({type(e).__name__}); pick a checkpoint."
