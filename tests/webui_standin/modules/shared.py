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

    def add_option(self, key, info):
        record("opts.add_option", key)
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def set(self, key, value):
        record("opts.set", key, value)
        self.data[key] = value
        return True

    def save(self, filename):
        record("opts.save", filename)

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
        record("state.begin", job)
        self.reset()
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


opts = Options()
cmd_opts = SimpleNamespace(ckpt_dir=None, lowvram=False, medvram=False, ckpt=None)
state = State()
config_filename = "config.json"
