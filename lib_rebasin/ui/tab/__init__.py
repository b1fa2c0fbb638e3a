"""The Re-Basin tab as a gradio Blocks, built against a `Host`.

layout.py builds the components, merge_events.py / unsaved_events.py / compare_events.py / recipe_events.py /
hires.py wire them, rendering.py draws what a job shows; an event with several inputs reads them by name
(fields.py). Only the gradio subset that runs on both 3.41 and 4.x is used (compat.py); gradio is imported inside
`build_tab` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..host import Host
from ..service import MergeService
from .compare_events import wire_compare_events
from .compat import NOT_IN_UI_CONFIG
from .context import Defaults, TabContext
from .hires import wire_hires_presets
from .layout import build_layout
from .merge_events import wire_merge_events
from .recipe_events import wire_recipe_events
from .unsaved_events import wire_unsaved_events

# Components that start from Settings -> Re-Basin (see NOT_IN_UI_CONFIG).
FROM_SETTINGS = ("method", "iterations", "device", "precision", "tolerance", "recipe_method", "recipe_iterations",
                 "recipe_device", "recipe_precision")


@dataclass
class TabUI:
    """The built tab plus the components a host adapter may wire to its own UI later."""

    blocks: Any
    components: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.components[key]

    def values(self, **named: Any) -> dict[Any, Any]:
        """What the page sends an event whose inputs are named (fields.Fields): `named` by component name, every
        other component as it is now."""
        unknown = set(named) - set(self.components)
        if unknown:
            raise KeyError(f"no component named {', '.join(sorted(unknown))}")
        return {comp: named.get(name, comp.value) for name, comp in self.components.items()
                if getattr(comp, "_id", None) in self.blocks.blocks}


def build_tab(host: Host, service: MergeService | None = None, *, title: str = "Re-Basin",
              css: str | None = None) -> TabUI:
    import gradio as gr

    service = service or MergeService(host)
    blocks_kw = {"css": css} if css else {}
    with gr.Blocks(analytics_enabled=False, title=title, **blocks_kw) as blocks:
        ctx = TabContext(host, service, {})
        ctx.c.update(build_layout(gr, Defaults.of(host), title, ctx.titles(), ctx.vae_choices(),
                                  in_memory=host.loads_in_memory))
        wire_merge_events(ctx, blocks)
        wire_unsaved_events(ctx, blocks)
        wire_compare_events(ctx)
        wire_recipe_events(ctx)
        wire_hires_presets(ctx.c, host)
    for key in FROM_SETTINGS:
        setattr(ctx.c[key], NOT_IN_UI_CONFIG, True)
    return TabUI(blocks, ctx.c)

