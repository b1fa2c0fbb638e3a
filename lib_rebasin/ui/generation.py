"""What a compare grid generates with: txt2img's settings as the user has them (the tab reads them from the
txt2img components, the API from the request), and one generated picture with the infotext the host wrote for it.

One declaration of the fields (`GENERATION_FIELDS`) serves the API's parsing, the tab's reading of txt2img's
components (by their elem_id in AUTOMATIC1111 and Forge) and the defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from ..errors import FieldError
from ..messages import shown


@dataclass(frozen=True)
class GenerationField:
    name: str
    kind: type
    elem_id: str  # txt2img's component in the WebUI ("" = none)
    low: float | None = None
    high: float | None = None


GENERATION_FIELDS: tuple[GenerationField, ...] = (
    GenerationField("prompt", str, "txt2img_prompt"),
    GenerationField("negative_prompt", str, "txt2img_neg_prompt"),
    GenerationField("seed", int, "txt2img_seed", -1, 2**32 - 1),
    GenerationField("width", int, "txt2img_width", 64, 2048),
    GenerationField("height", int, "txt2img_height", 64, 2048),
    GenerationField("steps", int, "txt2img_steps", 1, 150),
    GenerationField("sampler_name", str, "txt2img_sampling"),
    GenerationField("scheduler", str, "txt2img_scheduler"),
    GenerationField("cfg_scale", float, "txt2img_cfg_scale", 1.0, 30.0),
    GenerationField("enable_hr", bool, "txt2img_hr-checkbox"),
    GenerationField("hr_scale", float, "txt2img_hr_scale", 1.0, 4.0),
    GenerationField("hr_upscaler", str, "txt2img_hr_upscaler"),
    GenerationField("denoising_strength", float, "txt2img_denoising_strength", 0.0, 1.0),
    GenerationField("hr_second_pass_steps", int, "txt2img_hires_steps", 0, 150),
)
BY_NAME = {f.name: f for f in GENERATION_FIELDS}
MAX_PROMPT = 10_000


@dataclass(frozen=True)
class GenerationSettings:
    """One txt2img generation; "" for the sampler, scheduler or upscaler = the host's default."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1  # -1: one random seed, drawn once and used for every candidate
    width: int = 512
    height: int = 512
    steps: int = 20
    sampler_name: str = ""
    scheduler: str = ""
    cfg_scale: float = 7.0
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = ""
    denoising_strength: float = 0.55
    hr_second_pass_steps: int = 0

    @classmethod
    def from_dict(cls, d: Any, field: str = "generation") -> GenerationSettings:
        """From JSON (the API) or the txt2img components' values (the tab): unknown names, wrong types and values
        out of txt2img's own bounds are a FieldError naming `generation.<name>`."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise FieldError(field, f"'{field}' must be an object of txt2img settings (prompt, seed, width, ...).")
        unknown = sorted(set(d) - set(BY_NAME), key=str)
        if unknown:
            raise FieldError(f"{field}.{str(unknown[0])[:40]}", f"Unknown txt2img setting {shown(unknown[0], 40)}; "
                                                                 f"allowed: {', '.join(BY_NAME)}.")
        values = {k: _value(BY_NAME[k], v, f"{field}.{k}") for k, v in d.items() if v is not None}
        return cls(**values)

    def output_size(self) -> tuple[int, int]:
        """The picture's size: hires fix scales the first pass's."""
        if not self.enable_hr:
            return self.width, self.height
        return int(self.width * self.hr_scale) // 8 * 8, int(self.height * self.hr_scale) // 8 * 8

    def with_seed(self, seed: int) -> GenerationSettings:
        return replace(self, seed=int(seed))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _value(f: GenerationField, v: Any, name: str) -> Any:
    if f.kind is str:
        if not isinstance(v, str) or len(v) > MAX_PROMPT:
            raise FieldError(name, f"'{name}' must be text of at most {MAX_PROMPT} characters, got {shown(v, 40)}.")
        return v
    if f.kind is bool:
        if not isinstance(v, bool):
            raise FieldError(name, f"'{name}' must be true or false, got {shown(v, 40)}.")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise FieldError(name, f"'{name}' must be a number, got {shown(v, 40)}.")
    if f.kind is int:
        if float(v) != int(v):
            raise FieldError(name, f"'{name}' must be a whole number, got {shown(v, 40)}.")
        v = int(v)
    else:
        v = float(v)
    if (f.low is not None and v < f.low) or (f.high is not None and v > f.high):
        raise FieldError(name, f"'{name}' must be between {f.low:g} and {f.high:g}, got {v:g}.")
    return v


@dataclass
class GeneratedImage:
    """One picture (a PIL image) and the infotext the host wrote for it (its "parameters")."""

    image: Any
    infotext: str
