"""The match of B onto A itself, shared by merges that differ only in alpha (a sweep, `merge/sweep.py`).

Weight matching and activation matching compare A with B; neither reads alpha, so every candidate of a sweep
gets the same permutation from its first (or only) match. Later steps of the iterations form match against the
running merge, which depends on alpha: those run per candidate.
"""

from __future__ import annotations

from collections.abc import Callable

from ..align.weight_matching import MatchResult


class FirstMatch:
    """Computes the first match once and hands the same result to every later plan; `runs` counts computations."""

    def __init__(self) -> None:
        self.result: MatchResult | None = None
        self.runs = 0

    def __call__(self, compute: Callable[[], MatchResult]) -> MatchResult:
        if self.result is None:
            self.result = compute()
            self.runs += 1
        return self.result


def first_match(first: FirstMatch | None, compute: Callable[[], MatchResult]) -> MatchResult:
    """`compute()`, or the result `first` already holds."""
    return compute() if first is None else first(compute)
