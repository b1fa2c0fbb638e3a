"""Stand-in for modules.sd_models: the checkpoint registry, list_models, loading, and the model movers."""

import os
import re
from types import SimpleNamespace

from . import hashes, record, shared

model_path = os.path.abspath("models/Stable-diffusion")  # tests point this at a tmp folder
checkpoints_list: dict = {}
checkpoint_aliases: dict = {}
# Forge's variant of this module (tests switch it with the `forge` fixture, which also puts ../../forge, the
# stand-in `modules_forge`, on sys.path and defines `forge_model_reload` here, as Forge's sd_models has it).
FORGE = False


class CheckpointInfo:
    """Like the host's: titled "name [shorthash]" once the sha256 is in the hash cache (modules/sd_models.py)."""

    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        root = shared.cmd_opts.ckpt_dir or model_path
        if abspath.startswith(os.path.abspath(root) + os.sep):
            name = abspath[len(os.path.abspath(root)) + 1:]
        else:
            name = os.path.basename(filename)
        self.name = name.replace("\\", "/")
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(self.name.replace("/", "_"))[0]
        self.sha256 = hashes.sha256_from_cache(self.filename, f"checkpoint/{self.name}")
        self.shorthash = self.sha256[0:10] if self.sha256 else None
        self.title = self.name if self.shorthash is None else f"{self.name} [{self.shorthash}]"
        self.short_title = (self.name_for_extra if self.shorthash is None
                            else f"{self.name_for_extra} [{self.shorthash}]")
        self.ids = [self.title, self.name, self.model_name, self.name_for_extra]
        if self.shorthash:
            self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]"]

    def register(self):
        checkpoints_list[self.title] = self
        for i in self.ids:
            checkpoint_aliases[i] = self

    def calculate_shorthash(self):
        self.sha256 = hashes.sha256(self.filename, f"checkpoint/{self.name}")
        if self.sha256 is None:
            return None
        if self.shorthash != self.sha256[0:10]:
            self.shorthash = self.sha256[0:10]
            checkpoints_list.pop(self.title, None)
            self.title = f"{self.name} [{self.shorthash}]"
            self.ids += [self.shorthash, self.sha256, self.title]
            self.register()
        return self.shorthash


def list_models():
    record("sd_models.list_models")
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    for root, _dirs, files in os.walk(model_path):
        for f in sorted(files):
            if f.endswith((".ckpt", ".safetensors")) and ".vae." not in f and not f.startswith("."):
                CheckpointInfo(os.path.join(root, f)).register()


def checkpoint_tiles(use_short=False):
    """The checkpoint dropdowns' choices: titles "name [hash]" in A1111, bare names in Forge."""
    if FORGE:
        return [x.short_title if use_short else x.name for x in checkpoints_list.values()]
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


def get_closet_checkpoint_match(search_string):
    """An alias, else the shortest title containing the string (then without its " [hash]")."""
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string)
    if info is not None:
        return info
    for s in (search_string, re.sub(re_strip_checksum, "", search_string)):
        found = sorted([i for i in checkpoints_list.values() if s in i.title], key=lambda x: len(x.title))
        if found:
            return found[0]
    return None


def match_checkpoint_to_name(name):
    """Forge only (what the page's selectCheckpoint ends in): the FIRST registered title that contains the name or
    is contained in it, as the dropdown's entry; so "fcore_F1F2.safetensors" gives "F2.safetensors" when that one
    was registered first."""
    name = name.split(" [")[0]
    for info in checkpoints_list.values():
        title = info.title.split(" [")[0]
        if name in title or title in name:
            return info.short_title if shared.opts.data.get("sd_checkpoint_dropdown_use_short") else info.name.split(" [")[0]
    return name


class FakeModel:
    def __init__(self, info):
        self.sd_checkpoint_info = info
        self.sd_model_checkpoint = info.filename
        self.lowvram = False
        self.device = "cpu"


model_data = SimpleNamespace(sd_model=None, loaded_sd_models=[])
checkpoints_loaded: dict = {}  # the RAM cache of state dicts (sd_checkpoint_cache > 0)
LOAD_FAILS = []  # tests put an exception here: the next load_model raises it after trashing the current model


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    """Like the host's: the current model goes to the meta device (send_model_to_trash) and stays in
    loaded_sd_models; the new one is built from the dict (LoadStateDictOnMeta pops its keys), hashed through
    calculate_shorthash, its title written to sd_model_checkpoint; then the model_loaded callbacks."""
    from . import script_callbacks

    info = checkpoint_info or select_checkpoint()
    record("sd_models.load_model", info.title, already_loaded_state_dict is not None)
    if model_data.sd_model is not None:
        model_data.sd_model.device = "meta"
        model_data.sd_model = None
    if LOAD_FAILS:
        raise LOAD_FAILS.pop()
    if already_loaded_state_dict is None:
        from safetensors.torch import load_file

        already_loaded_state_dict = load_file(info.filename)
    model = FakeModel(info)
    model.sd_model_hash = info.calculate_shorthash()
    shared.opts.data["sd_model_checkpoint"] = info.title
    model.weights = {k: already_loaded_state_dict.pop(k).clone() for k in list(already_loaded_state_dict)}
    model_data.sd_model = model
    model_data.loaded_sd_models.insert(0, model)
    script_callbacks.model_loaded_callback(model)
    return model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    info = info or select_checkpoint()
    loaded = model_data.sd_model
    if loaded is not None and loaded.sd_model_checkpoint == info.filename:
        return loaded  # the host returns early when that file is loaded already
    record("sd_models.reload_model_weights", info.title if info else None)
    info.calculate_shorthash()  # the host hashes what it loads (get_checkpoint_state_dict)
    model_data.sd_model = FakeModel(info)
    if os.path.isfile(info.filename):  # the weights, as the host reads them (processing draws from them)
        from safetensors.torch import load_file

        model_data.sd_model.weights = load_file(info.filename)
    from . import script_callbacks

    script_callbacks.model_loaded_callback(model_data.sd_model)
    return model_data.sd_model


def select_checkpoint():
    """The option through the aliases only, else the first checkpoint (the host prints "loading fallback")."""
    return checkpoint_aliases.get(shared.opts.data.get("sd_model_checkpoint")) or next(iter(checkpoints_list.values()))


def send_model_to_cpu(m):
    record("sd_models.send_model_to_cpu", m.sd_checkpoint_info.title)
    m.device = "cpu"


def send_model_to_device(m):
    record("sd_models.send_model_to_device", m.sd_checkpoint_info.title)
    m.device = "cuda"


def unload_model_weights(sd_model=None, info=None):
    record("sd_models.unload_model_weights")
