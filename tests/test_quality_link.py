"""The merge result card points to the documentation page with the benchmarks' numbers (which method keeps what),
by its path inside the extension: the page must exist there, and the card must not show the server's folders."""

from __future__ import annotations

from pathlib import Path

import lib_rebasin
from lib_rebasin.links import DOCS, MERGE_QUALITY
from lib_rebasin.ui.tab.rendering import result_markdown

EXTENSION = Path(lib_rebasin.__file__).resolve().parents[1]


def test_result_card_names_the_benchmarks_page_inside_the_extension() -> None:
    card = result_markdown({"status": "done", "output_name": "m.safetensors", "output": "/tmp/m.safetensors",
                            "seconds": 1.0, "summary": ["B already lines up with A."]})
    assert f"`{MERGE_QUALITY}` in the Re-Basin extension's folder" in card
    # a path relative to the extension, never where the extension sits on the server
    assert not Path(MERGE_QUALITY).is_absolute() and str(EXTENSION) not in card


def test_the_named_pages_exist_in_the_extension() -> None:
    assert (EXTENSION / DOCS / "README.md").is_file()
    page = (EXTENSION / MERGE_QUALITY).read_text(encoding="utf-8")
    assert page.startswith("# Benchmarks: which method keeps what")
