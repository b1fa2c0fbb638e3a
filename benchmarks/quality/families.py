"""The model families the benchmark merges, and the two profiles (full, quick) that size them.

- independent pair: two models from different inits and batch orders, trained on every class;
- same-base family: one base trained on every class, then two fine-tunes that each learn something different
  (digits 0-4 and digits 5-9), like community fine-tunes of one base.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .train import TrainConfig

LOW, HIGH = tuple(range(5)), tuple(range(5, 10))


@dataclass(frozen=True)
class Profile:
    name: str
    batch: int
    widths: tuple[int, ...]                 # the independent pairs' widths (ratio against width); () = none
    independent_steps: dict[int, int]       # width -> training steps of the pair
    milestones: tuple[int, ...]             # earlier states of each pair (ratio against training length)
    base_steps: int
    finetune_steps: int
    skill_width: int                        # the families every method and the skills are measured on
    samples_per_class: int
    eval_images: int
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    methods: tuple[str, ...] | None = None  # labels from methods.METHOD_LIST; None = every method


# Sized for the shared 2-core machine as it was on 2026-12-01 (load average 10-13 from other work): about an hour
# of training at one thread per model. On a quiet machine or a GPU, raise the steps: the cache keeps what exists.
FULL = Profile("full", batch=32, widths=(32, 64, 96), independent_steps={32: 200, 64: 100, 96: 100},
               milestones=(100,), base_steps=100, finetune_steps=50, skill_width=32,
               samples_per_class=5, eval_images=64)
QUICK = Profile("quick", batch=16, widths=(), independent_steps={32: 16}, milestones=(), base_steps=16,
                finetune_steps=6, skill_width=32, samples_per_class=1, eval_images=8,
                alphas=(0.0, 0.5, 1.0), methods=("weighted sum", "re-basin"))
PROFILES = {p.name: p for p in (FULL, QUICK)}
# Activation matching's inputs: this many training images, each at 5 timesteps (16 already recover a planted
# permutation exactly; quick mode only runs that control).
MATCH_IMAGES = {"full": 64, "quick": 16}


# Width 96 at 1e-3 diverged (one parent's held-out loss 0.83 after 100 steps, measured 2026-12-01); 5e-4 trains.
LR_BY_WIDTH = {96: 5e-4}
# Longer runs of the width-32 pair, for the ratio against training length (trained when the machine was quiet).
SWEEP_EXTRA_STEPS = {32: (400,)}


def independent_pair(p: Profile, width: int, steps: int | None = None) -> tuple[TrainConfig, TrainConfig]:
    s = steps or p.independent_steps[width]
    lr = LR_BY_WIDTH.get(width, 1e-3)
    return (TrainConfig(width, init_seed=1, data_seed=101, steps=s, batch=p.batch, lr=lr),
            TrainConfig(width, init_seed=2, data_seed=102, steps=s, batch=p.batch, lr=lr))


def sweep_lengths(p: Profile, width: int) -> tuple[int, ...]:
    """Every training length the sweep measures at `width` (the last is the pair's final state)."""
    extra = SWEEP_EXTRA_STEPS.get(width, ()) if p.name == "full" else ()
    return tuple(sorted({*p.milestones, p.independent_steps[width], *extra}))


def same_base_family(p: Profile, width: int) -> tuple[TrainConfig, TrainConfig, TrainConfig]:
    """(base, fine-tune on 0-4, fine-tune on 5-9)."""
    base = TrainConfig(width, init_seed=0, data_seed=100, steps=p.base_steps, batch=p.batch)
    tune = replace(base, steps=p.finetune_steps, lr=3e-4, parent=base)
    return base, replace(tune, data_seed=103, classes=LOW), replace(tune, data_seed=104, classes=HIGH)
