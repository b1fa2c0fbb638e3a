"""The merge result card points to the README section with the quality benchmark's numbers, and that section
exists under the heading the card names (renaming one without the other would leave a dead pointer)."""

from __future__ import annotations

import re

from lib_rebasin.ui.tab import QUALITY_SECTION, README, result_markdown


def test_result_card_points_to_the_quality_section_of_the_readme() -> None:
    card = result_markdown({"status": "done", "output_name": "m.safetensors", "output": "/tmp/m.safetensors",
                            "seconds": 1.0, "summary": ["B already lines up with A."]})
    assert f"*{QUALITY_SECTION}* of the Re-Basin extension's README" in card
    # not the README's path on the server (nothing to click, and it shows the server's folders)
    assert str(README.parent) not in card and "README.md" not in card
    headings = re.findall(r"^#+ (.+)$", README.read_text(encoding="utf-8"), flags=re.M)
    assert QUALITY_SECTION in headings
