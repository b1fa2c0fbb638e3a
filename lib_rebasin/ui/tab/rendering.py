"""What the tab shows about a job: the error box, the progress bar, the result card (plain functions returning
HTML or Markdown, unit-tested without a browser)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from ...links import MERGE_QUALITY

# The tab's CSS, in the extension's root where the WebUI loads it; the standalone app passes the same file.
STYLE_CSS = Path(__file__).resolve().parents[3] / "style.css"


def tab_css() -> str:
    return STYLE_CSS.read_text(encoding="utf-8")


def quality_pointer() -> str:
    """The result card's pointer to the measured comparison of the methods."""
    return (f"Which method keeps what, measured on trained models: `{MERGE_QUALITY}` in the Re-Basin extension's "
            "folder.")


def error_html(message: str | None, title: str = "Cannot merge") -> str:
    if not message:
        return ""
    return f'<div class="rebasin-error" role="alert"><b>{html.escape(title)}:</b> {html.escape(message)}</div>'


def progress_html(fraction: float, line: str, state: str = "running") -> str:
    pct = max(0.0, min(1.0, fraction)) * 100
    return (f'<div class="rebasin-progress rebasin-{state}" data-state="{state}">'
            f'<div class="rebasin-bar"><div class="rebasin-bar-fill" style="width:{pct:.1f}%"></div></div>'
            f'<div class="rebasin-status-line">{html.escape(line)}</div></div>')


def md_escape(text: str) -> str:
    """Plain text for a gr.Markdown: `(1-alpha)*A + alpha*B` must not turn into italics."""
    return "".join("\\" + ch if ch in "\\`*_{}[]<>#|~" else ch for ch in str(text))


def result_markdown(job_dict: dict[str, Any]) -> str:
    if job_dict.get("status") != "done":
        return ""
    lines = [f"### Merged: `{job_dict.get('output_name')}`",
             f"Saved to `{job_dict.get('output')}` in {job_dict.get('seconds') or 0:.1f} s.", ""]
    summary = job_dict.get("summary") or []
    if summary:
        lines.append("**What the merge did**")
        lines.extend(f"- {md_escape(s)}" for s in summary)
        lines += ["", quality_pointer()]
    return "\n".join(lines)


def job_inputs(request: dict[str, Any]) -> str:
    """What a job merges, for a page that did not start it (reloaded: its Model A / B fields are empty)."""
    if "recipe" in request:
        models = list(dict.fromkeys((request.get("models") or {}).values()))
        return f"Recipe {request.get('recipe')}" + (f" ({', '.join(models)})" if models else "")
    names = [f"{k} {request.get(f'model_{k.lower()}')}" for k in "ABC" if request.get(f"model_{k.lower()}")]
    return ", ".join(names)
