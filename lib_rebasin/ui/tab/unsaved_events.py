"""The tab's "Merge & load (no file)" and "Save this merge": a merge made in memory, loaded into the host's
model for the next generations, and saved (byte for byte the file Merge writes) only if the user wants it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ...errors import RebasinError
from ..unsaved import Unsaved
from .compat import JS_SELECT_CHECKPOINT, js_kwargs, js_start, keep, update
from .context import TabContext
from .fields import Fields
from .merge_events import MERGE_FIELDS, MERGE_OUTPUTS, follow_job, request_from, shows_eta, task_id_of
from .rendering import error_html, md_escape

# after the merge's own outputs: the unsaved merge's status line, the Save button, the title the host shows and the
# name for the page's selectCheckpoint()
EXTRA_OUTPUTS = ("unsaved_status", "save_unsaved", "loaded_title", "page_checkpoint")


def unsaved_markdown(cur: Unsaved | None) -> str:
    if cur is None:
        return ""
    return (f"**Loaded, not saved:** {md_escape(cur.label)}. txt2img and img2img use it now; "
            f"**Save this merge** writes {md_escape(cur.prepared.output.name)} (or the output name you type).")


def wire_unsaved_events(ctx: TabContext, blocks: Any) -> None:
    c, host, service = ctx.c, ctx.host, ctx.service
    form = Fields(c, MERGE_FIELDS)
    outputs = [c[k] for k in (*MERGE_OUTPUTS, *EXTRA_OUTPUTS)]
    kept = [keep(), keep(), keep()]  # the model lists: a load job saves nothing

    def run_load(values: dict[Any, Any]) -> Iterator[tuple[Any, ...]]:
        v = form.read(values)
        tid = task_id_of(v["task_id"])
        try:
            job = service.submit_load(request_from(v), tid)
        except RebasinError as e:
            yield (error_html(str(e)), "", keep(), keep(), keep(), update(interactive=True), *kept,
                   keep(), keep(), keep(), keep())
            return
        last: tuple[Any, ...] = ()
        for frame in follow_job(job, kept, lambda: list(kept), eta=shows_eta(ctx, tid)):
            if last:  # the last frame (a saved merge's card) is replaced below
                # while it runs Save is off: the merge held before is released for the new one
                yield (*last, keep(), update(interactive=False), keep(), keep())
            last = frame
        cur = service.unsaved.current
        if job.status == "done" and cur is not None:
            done = f"### Loaded without saving: {md_escape(cur.label)}\nMerged and loaded in {job.seconds or 0:.1f} s."
            yield (last[0], last[1], done, "", update(interactive=False), update(interactive=True), *kept,
                   unsaved_markdown(cur), update(interactive=True), cur.title, host.page_name_for(cur.title))
        else:
            yield (*last, unsaved_markdown(cur), update(interactive=cur is not None), keep(), keep())

    c["merge_load_event"] = c["merge_load"].click(fn=run_load, inputs=form.inputs, outputs=outputs,
                                                  show_progress=False,
                                                  **js_kwargs(js_start(form.position("task_id"))))
    c["merge_load_event"].then(fn=None, inputs=[c["page_checkpoint"]], outputs=[], **js_kwargs(JS_SELECT_CHECKPOINT))

    def do_save(name: str, overwrite: bool) -> tuple[Any, ...]:
        """(status, unsaved status, Save button, result path, Load button, loaded title, page name)."""
        try:
            path, title = service.save_unsaved(name or "", bool(overwrite))
        except RebasinError as e:
            cur = service.unsaved.current
            return (f"Could not save: {md_escape(str(e))}", unsaved_markdown(cur), update(interactive=cur is not None),
                    keep(), keep(), keep(), "")
        except Exception as e:  # the host's rescan or hash cache; the file itself is written atomically or not at all
            return (f"Could not save the merge ({type(e).__name__}: {md_escape(str(e)[:200])}).", keep(), keep(),
                    keep(), keep(), keep(), "")
        return (f"Saved **{md_escape(path.name)}**; it is the loaded model now ({md_escape(title)}).", "",
                update(interactive=False), str(path), update(interactive=True), title, host.page_name_for(title))

    c["save_unsaved_event"] = c["save_unsaved"].click(
        fn=do_save, inputs=[c["output_name"], c["overwrite"]],
        outputs=[c["load_status"], c["unsaved_status"], c["save_unsaved"], c["result_path"], c["load"],
                 c["loaded_title"], c["page_checkpoint"]])
    c["save_unsaved_event"].then(fn=None, inputs=[c["page_checkpoint"]], outputs=[],
                                 **js_kwargs(JS_SELECT_CHECKPOINT))

    def on_page_load() -> tuple[Any, ...]:
        """A (re)loaded page shows the unsaved merge still loaded, if any (gone once another model replaced it)."""
        cur = service.unsaved.current
        return unsaved_markdown(cur), update(interactive=cur is not None)

    blocks.load(fn=on_page_load, inputs=[], outputs=[c["unsaved_status"], c["save_unsaved"]], show_progress=False)
