"""Stand-in for modules.shared: opts (data dict, add_option, set), OptionInfo, cmd_opts, state."""

from types import SimpleNamespace

from . import record


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, **kwargs):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.onchange, self.section, self.refresh = onchange, section, refresh


class Options:
    def __init__(self):
        self.data = {"sd_model_checkpoint": None}
        self.data_labels = {}
        self.onchanges = {}

    def add_option(self, key, info):
        record("opts.add_option", key)
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def set(self, key, value, is_api=False, run_callbacks=True):
        """Like the host's: no-op when unchanged, else store and run the option's onchange."""
        record("opts.set", key, value)
        if self.data.get(key) == value:
            return False
        self.data[key] = value
        callback = self.onchanges.get(key)
        if run_callbacks and callback is not None:
            callback()
        return True

    def onchange(self, key, func, call=True):
        self.onchanges[key] = func
        if call:
            func()

    def save(self, filename):
        """Writes the options as JSON, as the host's config.json."""
        record("opts.save", filename)
        import json

        with open(filename, "w", encoding="utf8") as f:
            json.dump(self.data, f, indent=4)

    def __getattr__(self, item):  # like the host: unknown keys raise
        data = self.__dict__.get("data", {})
        if item in data:
            return data[item]
        raise AttributeError(item)


class State:
    def __init__(self):
        self.reset()

    def reset(self):
        self.job = ""
        self.job_count = 0
        self.job_no = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None
        self.interrupted = False
        self.skipped = False
        self.history = []  # (sampling_step, textinfo) as the adapter reports progress

    def begin(self, job="(unknown)"):
        """Like the host's (modules/shared_state.py): clears the step, counters and flags, but not sampling_steps."""
        record("state.begin", job)
        self.sampling_step = 0
        self.job_count = -1
        self.job_no = 0
        self.skipped = False
        self.interrupted = False
        self.textinfo = None
        self.history = []
        self.job = job

    def end(self):
        record("state.end")
        self.job = ""

    def interrupt(self):
        record("state.interrupt")
        self.interrupted = True

    def __setattr__(self, key, value):
        super().__setattr__(key, value)
        if key == "textinfo" and value is not None and "history" in self.__dict__:
            self.history.append((self.__dict__.get("sampling_step"), value))


class UpscalerData:
    """modules/upscaler.py's: a downloadable model keeps its URL in local_data_path until the file is on disk."""

    def __init__(self, name, path):
        self.name, self.data_path, self.local_data_path = name, path, path


# What a fresh, offline install lists (modules/modelloader.load_upscalers: None, Lanczos, Nearest first, then the
# others sorted by name; every one of those is still a download link): hires choices are the latent modes plus these
# names. Tests add a local file path to model an installed model.
latent_upscale_modes = {"Latent": {}, "Latent (nearest)": {}}
_RELEASES = "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/"
sd_upscalers = [UpscalerData("None", None), UpscalerData("Lanczos", None), UpscalerData("Nearest", None),
                *(UpscalerData(name, f"https://example.invalid/{name.replace(' ', '_')}.pth")
                  for name in ("DAT x2", "DAT x3", "DAT x4", "ESRGAN_4x", "LDSR")),
                UpscalerData("R-ESRGAN 4x+", _RELEASES + "RealESRGAN_x4plus.pth"),
                UpscalerData("R-ESRGAN 4x+ Anime6B", _RELEASES + "RealESRGAN_x4plus_anime_6B.pth"),
                *(UpscalerData(name, f"https://example.invalid/{name.replace(' ', '_')}.pth")
                  for name in ("ScuNET", "ScuNET PSNR", "SwinIR 4x"))]

opts = Options()
# The host's flags the extension reads (modules/cmd_args.py): tests and webui.py set them.
cmd_opts = SimpleNamespace(ckpt_dir=None, lowvram=False, medvram=False, ckpt=None, api=False, nowebui=False,
                           api_auth=None, cors_allow_origins=None, cors_allow_origins_regex=None, no_hashing=False,
                           listen=False, server_name=None, share=False, ngrok=None, rebasin_allowed_hosts=None)
state = State()
config_filename = "config.json"
