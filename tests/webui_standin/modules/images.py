"""Stand-in for modules.images.save_image: the picture under `path` (created), its infotext in the PNG's
"parameters" text, "<number>-<seed>-<basename>.<extension>"; returns (file, None) as the host does."""

import os

from . import record


def save_image(image, path, basename, seed=None, prompt=None, extension="png", info=None, short_filename=False,
               no_prompt=False, grid=False, pnginfo_section_name="parameters", p=None, existing_info=None,
               forced_filename=None, suffix="", save_to_dirs=None):
    from PIL import PngImagePlugin

    os.makedirs(path, exist_ok=True)
    number = len([f for f in os.listdir(path) if not f.startswith(".")])
    fullfn = os.path.join(path, f"{number:05d}-{seed}-{basename}.{extension}")
    pnginfo = PngImagePlugin.PngInfo()
    if info is not None:
        pnginfo.add_text(pnginfo_section_name, info)
    image.save(fullfn, pnginfo=pnginfo)
    record("images.save_image", fullfn, grid, p is not None)
    return fullfn, None
