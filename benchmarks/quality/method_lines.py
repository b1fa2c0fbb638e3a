"""The merge methods the benchmark measures, as data: one line per method.

`method` is a name in lib_rebasin's METHODS registry and `options` are extra `MergeOptions` fields, so a method
added to the core (block weights, TIES, DARE, train difference, activation matching...) is benchmarked by adding
one line here. A line whose method the installed core does not have is skipped and listed in the report.
`needs_base` methods get the same-base family's base as model C, so they only run on that family.
"activation matching" is the core's option (`matching = "activations"`: data-free inputs, seeded prompts along A's
own DDIM trajectory). `align="activations"` is the earlier benchmark lever, kept for "then re-basin": B is
permuted (function-preserving) by activation matching on training images before the core merge runs, then weight
matching starts from that alignment.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    label: str
    method: str
    options: dict = field(default_factory=dict, hash=False)
    needs_base: bool = False
    # "activations": B is first aligned to A by activation matching (activations.py), then merged as above.
    align: str | None = None
    # Bump when the core code this method runs changes its result: its cached measurements are redone, every
    # other method's are reused (run.SectionCache keys each method's results by `ident`).
    revision: int = 1

    @property
    def ident(self) -> list:
        return [self.label, self.method, self.options, self.align, self.revision]

    @property
    def slug(self) -> str:
        return "".join(ch if ch.isalnum() else "_" for ch in self.label.lower()).strip("_")


WEIGHTED_SUM = Method("weighted sum", "weighted_sum")
REBASIN = Method("re-basin", "rebasin")
REBASIN_EXACT = Method("re-basin, tolerance 0", "rebasin", {"tolerance": 0.0})
# Revision 2: activation matching correlates residual streams after each writer's addition (forward.Layers'
# streams mode), no longer each writer's own output.
ACTIVATIONS = Method("activation matching", "rebasin", {"matching": "activations", "activation_samples": 16},
                     revision=2)
ACTIVATIONS_THEN_WEIGHTS = Method("activation matching, then re-basin", "rebasin", align="activations")
# The core's REPAIR option on top of each two-model method; its statistics come from the same 16 data-free
# prompts activation matching uses (options.py: REPAIR and activation matching share `activation_samples`).
WEIGHTED_SUM_REPAIR = Method("weighted sum + REPAIR", "weighted_sum", {"repair": True, "activation_samples": 16})
REBASIN_REPAIR = Method("re-basin + REPAIR", "rebasin", {"repair": True, "activation_samples": 16})
ACTIVATIONS_REPAIR = Method("activation matching + REPAIR", "rebasin", {**ACTIVATIONS.options, "repair": True},
                            revision=ACTIVATIONS.revision)

METHOD_LIST: tuple[Method, ...] = (
    WEIGHTED_SUM,
    REBASIN,
    REBASIN_EXACT,
    Method("re-basin, 500 iterations", "rebasin", {"iterations": 500}),
    Method("legacy, 500 iterations", "legacy", {"iterations": 500}),
    Method("add difference (C = base)", "add_difference", needs_base=True),
    Method("train difference (C = base)", "train_difference", needs_base=True),
    Method("TIES (C = base, density 0.2)", "ties", {"ties_density": 0.2}, needs_base=True),
    Method("DARE (C = base, p 0.9)", "dare", {"dare_p": 0.9}, needs_base=True),
    Method("DARE + TIES (C = base)", "dare_ties", needs_base=True),
    ACTIVATIONS,
    ACTIVATIONS_THEN_WEIGHTS,
    WEIGHTED_SUM_REPAIR,
    REBASIN_REPAIR,
    ACTIVATIONS_REPAIR,
)

# Only measured at alpha 0.5 on every width and training length (the ratio against width and training).

SWEEP_METHODS: tuple[Method, ...] = (WEIGHTED_SUM, REBASIN, Method("re-basin, tolerance 0", "rebasin",
                                                                    {"tolerance": 0.0}),
                                     ACTIVATIONS, ACTIVATIONS_THEN_WEIGHTS, WEIGHTED_SUM_REPAIR, REBASIN_REPAIR,
                                     ACTIVATIONS_REPAIR)


def available(methods: tuple[Method, ...]) -> tuple[list[Method], list[Method]]:
    """(methods the installed core provides, methods it does not)."""
    from lib_rebasin.methods import METHODS

    have = [m for m in methods if m.method in METHODS]
    return have, [m for m in methods if m.method not in METHODS]
