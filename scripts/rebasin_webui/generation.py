"""The host's txt2img as the compare grid's generator: the model it uses now, the components the grid reads,
one picture through the host's own processing, the grid saved where txt2img saves grids, the upscalers on disk."""

import os
from pathlib import Path

from modules import sd_models, shared

from lib_rebasin.errors import RebasinError
from rebasin_webui.host_facts import is_forge
from rebasin_webui.unsaved import UNSAVED_SUFFIX


class WebUIGeneration:
    """WebUIHost's generation methods; uses its generation_targets, _last_processing and interrupted()."""

    def loaded_checkpoint(self):
        """The file the generator uses now: the loaded model's (A1111), the selected one (Forge loads it lazily);
        None for an unsaved merge or nothing."""
        info = getattr(getattr(sd_models.model_data, "sd_model", None), "sd_checkpoint_info", None)
        if info is None or is_forge():
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
