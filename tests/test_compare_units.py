"""The compare grid's parts without a host: the axis values, txt2img's settings (from JSON and from the WebUI's
components), the grid's size checks and its picture."""

from __future__ import annotations

import pytest

from lib_rebasin.errors import FieldError
from lib_rebasin.ui.compare import axis_values
from lib_rebasin.ui.compare_grid import MAX_GRID_PIXELS, check_grid, grid_size, label_height, labelled_grid
from lib_rebasin.ui.generation import GenerationSettings


def test_axis_values_take_lists_and_text_and_name_the_bad_item():
    assert axis_values("alpha", "0.2, 0.35,0.5") == ("alpha", [0.2, 0.35, 0.5])
    assert axis_values("alpha", [0.2, 1]) == ("alpha", [0.2, 1.0])
    assert axis_values("method", ["Weighted sum", "rebasin"])[1] == ["weighted_sum", "rebasin"]
    with pytest.raises(FieldError, match="value 2 of 2: True is not a number"):
        axis_values("alpha", [0.1, True])
    with pytest.raises(FieldError, match="'nope' is not a method"):
        axis_values("method", "rebasin, nope")
    with pytest.raises(FieldError, match="is not a preset"):
        axis_values("blocks", "NOT_A_PRESET")
    with pytest.raises(FieldError, match="Give the alpha values"):
        axis_values("alpha", " , ")


def test_generation_settings_from_json_and_their_size():
    s = GenerationSettings.from_dict({"prompt": "p", "seed": 5, "width": 512, "height": 768, "enable_hr": True,
                                      "hr_scale": 1.5, "cfg_scale": 6})
    assert s.seed == 5 and s.cfg_scale == 6.0 and s.output_size() == (768, 1152)
    assert GenerationSettings.from_dict(None) == GenerationSettings()
    for bad, field in (({"seed": 1.5}, "generation.seed"), ({"prompt": 3}, "generation.prompt"),
                       ({"enable_hr": 1}, "generation.enable_hr"), ({"cfg_scale": float("nan")},
                                                                        "generation.cfg_scale")):
        with pytest.raises(FieldError) as e:
            GenerationSettings.from_dict(bad)
        assert e.value.field == field


def test_the_tabs_component_values_become_settings():
    pytest.importorskip("gradio")
    from lib_rebasin.ui.tab.compare_events import generation_values

    values = generation_values({"txt2img_seed": " 42 ", "txt2img_width": 512.0, "txt2img_steps": 20.0,
                                "txt2img_hr_upscaler": "None", "txt2img_prompt": "a cat", "model_a": "x",
                                "txt2img_cfg_scale": 7.5, "txt2img_scheduler": None})
    s = GenerationSettings.from_dict(values)
    assert (s.seed, s.width, s.steps, s.hr_upscaler, s.prompt, s.cfg_scale) == (42, 512, 20, "", "a cat", 7.5)


def test_grid_limits_refuse_before_any_work():
    huge = GenerationSettings(width=2048, height=2048, enable_hr=True, hr_scale=4.0)
    with pytest.raises(FieldError, match="million"):
        check_grid(huge, 2)
    w, h = grid_size(GenerationSettings(width=512, height=512), 5)
    assert w * h < MAX_GRID_PIXELS
    with pytest.raises(FieldError, match="GiB of memory is free"):
        check_grid(GenerationSettings(width=512, height=512), 5, available=10_000_000)
    check_grid(GenerationSettings(width=512, height=512), 5, available=8 * 2**30)


def test_labelled_grid_rows_and_labels():
    from PIL import Image

    colours = ["red", "green", "blue", "yellow", "white", "black", "gray"]
    images = [Image.new("RGB", (64, 48), c) for c in colours]
    grid = labelled_grid(images, [f"alpha 0.{i}" for i in range(7)])
    band = label_height(64)
    assert grid.size == (3 * 64, 3 * (48 + band))  # 7 cells: 3 columns, 3 rows
    assert grid.getpixel((32, band + 24)) == (255, 0, 0) and grid.getpixel((64 + 32, band + 24))[1] > 100
    label_area = grid.crop((0, 0, 64, band)).convert("L")
    assert label_area.getextrema()[0] < 128  # the label is drawn (dark text on white)
    one_row = labelled_grid(images[:5], ["a very long label that cannot fit in a cell of 64 pixels"] * 5)
    assert one_row.size == (5 * 64, 48 + band)


def test_labelled_grid_with_the_bitmap_font_of_an_old_pillow(monkeypatch):
    """AUTOMATIC1111 pins a Pillow before 10.1: one Latin-1 bitmap font, which raises on other characters."""
    from PIL import Image, ImageFont

    real = ImageFont.load_default

    def old_pillow(*args, **kw):
        if args or kw:
            raise TypeError("load_default() takes no arguments")
        return real()

    monkeypatch.setattr(ImageFont, "load_default", old_pillow)
    images = [Image.new("RGB", (64, 48), c) for c in ("red", "blue")]
    grid = labelled_grid(images, ["a long label \u2192 that cannot fit in 64 pixels", "alpha 0.5"])
    band = label_height(64)
    assert grid.size == (2 * 64, 48 + band)
    for x in (0, 64):
        assert grid.crop((x, 0, x + 64, band)).convert("L").getextrema()[0] < 128  # both labels drawn
