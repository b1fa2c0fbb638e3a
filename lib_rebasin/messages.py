"""How a value or a text appears inside a one-line message: short and on one line, so a message never echoes a
large or deeply nested input back."""

from __future__ import annotations

import reprlib
from typing import Any

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 38, 38, 6, 6, 4


def shown(value: Any, limit: int | None = None) -> str:
    """The value in a few characters for a message: long or deeply nested values are elided, never recursed into;
    with `limit`, also `clipped` to that many characters."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an integer of thousands of digits
        text = "a number far out of range"
    return text if limit is None else clipped(text, limit)


def clipped(text: str, limit: int) -> str:
    """`text` on one line, shortened to at most `limit` characters at a word boundary, with an ellipsis when cut."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit - 1]
    if " " in cut[limit // 2:]:
        cut = cut[:cut.rindex(" ")]
    return cut.rstrip(" ,.;:") + "…"
