"""The model families the benchmark merges, and the profiles (full, quick, smoke) that size them.

- independent pair: two models from different inits and batch orders, trained on every class;
- same-base family: one base trained on every class, then two fine-tunes that each learn something different
  (digits 0-4 and digits 5-9), like community fine-tunes of one base.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .evaluate import DDIM_STEPS
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
    methods: tuple[str, ...] | None = None  # labels from method_lines.METHOD_LIST; None = every method
    ddim_steps: int = DDIM_STEPS            # DDIM steps of each skill sample
    control_prompts: int = 16               # the planted-permutation control's activation matching prompts
    resumable: bool = True                  # keep the state a longer run trains on from (train.py)
    exports: bool = True                    # merge each model's single-file export (export.py, with the VAE);
                                            # False: its trained file (UNet and text encoder, all a merge reads)


# Sized for the 2-core machine at one thread per model (0.65-0.8 s a step at width 32, batch 32; measured
# 2026-12-01): the width-32 pair trains 1,600 steps (22 min each, in parallel), keeping its 200/400/800
# states for the ratio against training length. Its model A is also the same-base family's base (a base must
# draw digits before fine-tunes can keep or lose them), and each fine-tune then trains 400 steps on half of the
# classes. On a GPU, raise the steps: the cache keeps what exists.
# The width-64 pair trains 800 steps (1.5-2.1 s a step): at 1e-3 both of its models diverged between steps 900
# and 1,050 of a 1,600-step run (train loss 0.045-0.05 -> 1.0, measured 2026-12-01), so 800 is its longest stable
# state; its loss had flattened (0.054 at 500, 0.048-0.051 at 800). Width 96 (5e-4, 3.8 s a step with both
# models training at once) trains 1,600 (train loss 0.057 at 400, 0.048 at 800, 0.044 at 1,300: flattening;
# 1,600 steps took 7,000 s per model here, and a longer run resumes from the last milestone, train.py).
FULL = Profile("full", batch=32, widths=(32, 64, 96), independent_steps={32: 1600, 64: 800, 96: 1600},
               milestones=(200, 400, 800), base_steps=1600, finetune_steps=400, skill_width=32,
               samples_per_class=20, eval_images=64)
QUICK = Profile("quick", batch=16, widths=(), independent_steps={32: 16}, milestones=(), base_steps=16,
                finetune_steps=6, skill_width=32, samples_per_class=1, eval_images=8,
                alphas=(0.0, 0.5, 1.0), methods=("weighted sum", "re-basin"))
# The test suite's run of quick mode: the same sections and checks, with skills sampled in a few DDIM steps
# (the controls do not sample) and shorter training; its skills say nothing about the methods. Its planted
# permutation control runs activation matching on the core's default number of prompts: the control asks for the
# exact permutation back, which a permuted copy of A gives on any prompts.
# Its models are never trained longer, so they keep no optimizer state (twice each model's size) to resume from:
# resuming is tested on its own (tests/test_train.py). Its merges read the trained files, not their exports with
# the VAE (1.6 times a trained file), which only legacy mode would read: the smoke profile's methods merge the
# UNet and the text encoder, from the same tensors either way.
SMOKE = replace(QUICK, name="smoke", base_steps=8, finetune_steps=3, independent_steps={32: 8}, ddim_steps=3,
                control_prompts=4, resumable=False, exports=False)
PROFILES = {p.name: p for p in (FULL, QUICK, SMOKE)}
# Activation matching's inputs: this many training images, each at 5 timesteps (16 already recover a planted
# permutation exactly, and so do smoke's 4; quick mode only runs that control).
MATCH_IMAGES = {"full": 64, "quick": 16, "smoke": 4}


# Width 96 at 1e-3 diverged (one parent's held-out loss 0.83 after 100 steps, measured 2026-12-01); 5e-4 trains.
LR_BY_WIDTH = {96: 5e-4}
# More training lengths for the sweep beyond the milestones: the 100-step states of widths 64 and 96 (measured
# by the sessions before, kept so the rows compare), and width 96's 1,200.
SWEEP_EXTRA_STEPS: dict[int, tuple[int, ...]] = {64: (100,), 96: (100, 1200)}


def independent_pair(p: Profile, width: int, steps: int | None = None,
                     seeds: tuple[int, int] = (1, 2)) -> tuple[TrainConfig, TrainConfig]:
    """Two models trained apart: seed s inits with s and orders its data with 100 + s (the benchmark's pair is
    seeds 1 / 2; `seed_check.py` trains others)."""
    n = steps or p.independent_steps[width]
    lr = LR_BY_WIDTH.get(width, 1e-3)
    a, b = (TrainConfig(width, init_seed=s, data_seed=100 + s, steps=n, batch=p.batch, lr=lr) for s in seeds)
    return a, b


def sweep_lengths(p: Profile, width: int, steps: int | None = None) -> tuple[int, ...]:
    """Every training length the sweep measures at `width` up to `steps` (default: the pair's final state,
    which is the last)."""
    extra = SWEEP_EXTRA_STEPS.get(width, ()) if p.name == "full" else ()
    steps = steps or p.independent_steps[width]
    return tuple(sorted({*(m for m in (*p.milestones, *extra) if m < steps), steps}))


# A fine-tune trains at the base's own learning rate: at 3e-4 for 50 steps (2 % of the weights' norm) the
# fine-tunes of 2026-12-01 had not specialised, so every merge of them measured the same.
FINETUNE_LR = 1e-3


def same_base_family(p: Profile, width: int) -> tuple[TrainConfig, TrainConfig, TrainConfig]:
    """(base, fine-tune on 0-4, fine-tune on 5-9); the base is the independent pair's model A after
    `base_steps` (the same cached model when that is the pair's length)."""
    base = independent_pair(p, width, p.base_steps)[0]
    tune = replace(base, steps=p.finetune_steps, lr=FINETUNE_LR, parent=base)
    return base, replace(tune, data_seed=103, classes=LOW), replace(tune, data_seed=104, classes=HIGH)
