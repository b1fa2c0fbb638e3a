"""The compare grid's picture: one cell per candidate, its axis value written above it, and the checks that a grid
fits in memory before anything is merged."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..errors import FieldError
from .generation import GenerationSettings

# PIL refuses to open pictures above ~89 million pixels (its decompression-bomb guard): a saved grid stays below.
MAX_GRID_PIXELS = 80_000_000


def label_height(width: int) -> int:
    return max(20, min(64, width // 10))


def columns_for(n: int) -> int:
    """One row up to 6 candidates (an axis reads left to right), else a near-square block."""
    return n if n <= 6 else math.ceil(math.sqrt(n))


def grid_size(settings: GenerationSettings, n: int) -> tuple[int, int]:
    w, h = settings.output_size()
    cols = columns_for(n)
    rows = math.ceil(n / cols)
    return cols * w, rows * (h + label_height(w))


def check_grid(settings: GenerationSettings, n: int, available: int | None = None) -> None:
    """A FieldError on `generation` when the grid of `n` pictures is too large to hold (each picture and the
    grid, 3 bytes a pixel, twice over while it is drawn), before any work."""
    gw, gh = grid_size(settings, n)
    if gw * gh > MAX_GRID_PIXELS:
        raise FieldError("generation", f"The grid of {n} pictures would be {gw}x{gh} pixels, more than "
                                       f"{MAX_GRID_PIXELS // 1_000_000} million; use fewer values, a smaller size "
                                       "or a lower hires-fix scale.")
    need = 2 * 3 * gw * gh * 2
    if available is not None and need > available // 2:
        raise FieldError("generation", f"The grid of {n} pictures ({gw}x{gh} pixels) needs about "
                                       f"{need / 2**30:.1f} GiB and only {available / 2**30:.1f} GiB of memory is "
                                       "free; use fewer values or a smaller size.")


def available_memory() -> int | None:
    try:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.virtual_memory().available)
    except Exception:  # no psutil: the pixel limit alone
        return None


def labelled_grid(images: list[Any], labels: list[str]) -> Any:
    """The pictures side by side (rows of `columns_for`), each under a white band with its label."""
    from PIL import Image, ImageDraw, ImageFont

    w = max(im.width for im in images)
    h = max(im.height for im in images)
    band = label_height(w)
    cols = columns_for(len(images))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w, rows * (h + band)), "white")
    draw = ImageDraw.Draw(grid)
    try:
        font: Any = ImageFont.load_default(size=max(10, band * 2 // 3))
        ellipsis = "\u2026"
        legible: Callable[[str], str] = str
    except TypeError:  # Pillow before 10.1 (AUTOMATIC1111's): one bitmap font, Latin-1 only
        font = ImageFont.load_default()
        ellipsis, legible = "...", _latin1
    for i, (im, text) in enumerate(zip(images, labels, strict=True)):
        x, y = (i % cols) * w, (i // cols) * (h + band)
        grid.paste(im.convert("RGB"), (x, y + band))
        body = shown_text = legible(text)
        while body and draw.textlength(shown_text, font=font) > w - 4:
            body = body[:-1]
            shown_text = body + ellipsis if body else ""
        tw = draw.textlength(shown_text, font=font)
        draw.text((x + (w - tw) / 2, y + band / 6), shown_text, fill="black", font=font)
    return grid


def _latin1(text: str) -> str:
    """What a Latin-1 bitmap font can draw: other characters become '?' (drawing them would raise)."""
    return text.encode("latin-1", "replace").decode("latin-1")
