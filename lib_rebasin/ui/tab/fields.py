"""An event's inputs by name.

gradio passes a handler one dict {component: value} when an event's inputs are a set of components (3.41 and
4.x alike). `Fields` keeps the one ordered mapping name -> component an event reads, gives gradio that set, and
turns what the handler receives back into {name: value}: no handler decodes its arguments by position.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Component = Any  # a gradio component (gradio is imported only where the tab is built)


class Fields:
    def __init__(self, components: Mapping[str, Component], names: Iterable[str]) -> None:
        self.by_name: dict[str, Component] = {name: components[name] for name in names}

    @property
    def inputs(self) -> set[Component]:
        """What the event is given as `inputs=`: the handler then receives {component: value}."""
        return set(self.by_name.values())

    def read(self, values: Mapping[Component, Any]) -> dict[str, Any]:
        return {name: values[component] for name, component in self.by_name.items()}

    def position(self, name: str) -> int:
        """Where `name` sits among the values a client-side hook of the event receives: gradio orders a set of
        inputs by component id (both lines; tests/test_ui_smoke.py checks it against the event's config)."""
        ordered = sorted(self.by_name.values(), key=lambda component: component._id)
        return ordered.index(self.by_name[name])
