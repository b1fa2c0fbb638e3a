"""Stand-in for modules.processing: txt2img through `process_images` (modules/processing.py).

Like the host's: the picture comes from the model loaded now (here a colour drawn from its weights and the seed,
so two models or two seeds give different pictures and the same ones the same picture), hires fix scales the size,
each sampling step updates `shared.state` and an interrupt ends the sampling early (the host then still decodes
what it has: a picture comes back). The infotext names the model's title and the extra generation parameters.
"""

import time

from . import record, sd_models, shared

STEP_SECONDS = [0.0]  # tests slow the sampling down to press Stop inside a picture


class StableDiffusionProcessingTxt2Img:
    def __init__(self, sd_model=None, outpath_samples=None, outpath_grids=None, prompt="", negative_prompt="",
                 seed=-1, sampler_name=None, steps=20, cfg_scale=7.0, width=512, height=512, batch_size=1,
                 n_iter=1, enable_hr=False, hr_scale=2.0, hr_upscaler=None, denoising_strength=None,
                 hr_second_pass_steps=0, do_not_save_samples=False, do_not_save_grid=False, **kwargs):
        self.__dict__.update({k: v for k, v in locals().items() if k not in ("self", "kwargs")})
        self.__dict__.update(kwargs)
        self.scheduler = None
        self.extra_generation_params = {}
        self.closed = False

    def close(self):
        self.closed = True


class Processed:
    def __init__(self, images, infotexts):
        self.images, self.infotexts = images, infotexts


def _colour(model, seed):
    total = 0.0
    for key in sorted(model.weights)[:8]:
        total += float(model.weights[key].float().sum())
    base = int(abs(total) * 1e6) ^ (seed * 2654435761)
    return tuple((base >> shift) & 255 for shift in (0, 8, 16))


def process_images(p):
    from PIL import Image

    model = sd_models.model_data.sd_model
    record("processing.process_images", model.sd_checkpoint_info.title if model else None, p.seed)
    if model is None or not getattr(model, "weights", None):
        raise RuntimeError("no model loaded")
    shared.state.sampling_steps = p.steps
    for step in range(p.steps):
        if shared.state.interrupted:
            break
        shared.state.sampling_step = step
        time.sleep(STEP_SECONDS[0])
    colour = _colour(model, int(p.seed))
    w, h = p.width, p.height
    if p.enable_hr:
        w, h = int(w * p.hr_scale) // 8 * 8, int(h * p.hr_scale) // 8 * 8
    image = Image.new("RGB", (w, h), colour)
    extra = ", ".join(f"{k}: {v}" for k, v in p.extra_generation_params.items())
    hires = f", Hires upscale: {p.hr_scale}, Denoising strength: {p.denoising_strength}" if p.enable_hr else ""
    sampler = p.sampler_name or 'Euler a'
    info = (f"{p.prompt}\nNegative prompt: {p.negative_prompt}\nSteps: {p.steps}, Sampler: {sampler}, "
            f"CFG scale: {p.cfg_scale}, Seed: {p.seed}, Size: {p.width}x{p.height}, "
            f"Model: {model.sd_checkpoint_info.title}{hires}" + (f", {extra}" if extra else ""))
    return Processed([image], [info])
