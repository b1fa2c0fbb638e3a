"""What the tab's event modules share: the host, the service, the built components, the first values, and the
translation between the labels the controls show and the keys the core takes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ...methods import METHODS, MethodInfo
from ...options import MATCHINGS, OPTIONS
from ...parts import PART_NAMES
from ..host import Host
from ..recipe_builder import NO_VAE
from ..service import MergeService

# The Parts checkboxes show the parts' names, capitalised as labels are.
PART_LABELS = {part: name[0].upper() + name[1:] for part, name in PART_NAMES.items()}


def method_label(key: str) -> str:
    return METHODS[key].label if key in METHODS else key


def method_key(label: str | None) -> str:
    """The method a Radio value names (its label; a key is taken as it is)."""
    return next((key for key, m in METHODS.items() if m.label == label), str(label))


def part_labels(keys: Iterable[str] | None = None) -> list[str]:
    """The Parts checkboxes' labels (of every part the table offers, by default)."""
    return [PART_LABELS[p] for p in (OPTIONS["parts"].choices if keys is None else keys)]


def part_keys(labels: Iterable[str] | None) -> tuple[str, ...]:
    by_label = {v: k for k, v in PART_LABELS.items()}
    return tuple(by_label.get(p, p) for p in labels or [])


def method_of(label: str | None) -> MethodInfo:
    """The MethodInfo a method Radio value names; what a method uses is read from its flags."""
    return METHODS[method_key(label)]


@dataclass(frozen=True)
class Defaults:
    """The controls' first values: the host's (Settings -> Re-Basin in the WebUI) where they are valid."""

    method: str
    devices: list[str]
    device: str
    precision: str
    iterations: int
    alpha: float
    tolerance_percent: float
    matching: str = MATCHINGS[0]

    @classmethod
    def of(cls, host: Host) -> Defaults:
        given = host.defaults()
        devices = host.device_choices()
        return cls(method=given["method"] if given.get("method") in METHODS else next(iter(METHODS)),
                   devices=devices,
                   device=given["device"] if given.get("device") in devices else host.default_device(),
                   precision=(given["precision"] if given.get("precision") in OPTIONS["precision"].choices
                              else OPTIONS["precision"].default),
                   iterations=int(given.get("iterations") or 1), alpha=float(given.get("alpha", 0.5)),
                   tolerance_percent=100 * float(given.get("tolerance", OPTIONS["tolerance"].default)))


@dataclass
class TabContext:
    host: Host
    service: MergeService
    c: dict[str, Any]  # the components by name (TabUI.components)

    def titles(self) -> list[str]:
        return self.service.titles()

    def vae_choices(self) -> list[str]:
        """The bake-in-VAE choices: none, the host's VAE files, the checkpoints (a checkpoint's VAE)."""
        return [NO_VAE, *self.service.vae_titles(), *self.service.titles()]
