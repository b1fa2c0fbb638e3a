"""What a model (a parent or a merge, given as an LDM state dict) is measured by.

- held-out epsilon loss on one fixed set of (test image, t, noise) triples at several t, conditioned on the
  image's class: every model sees exactly the same inputs;
- skills kept: class-conditional DDIM samples from fixed seeds, judged by a digit classifier trained on the
  training split, as per-class accuracy.
The model's own (possibly merged) text encoder makes its class contexts, so a merge is evaluated end to end.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from . import data, diffusion
from .layout import NULL_CLASS, class_contexts, load_unet, sd_config, text_encoder_from_ldm

EVAL_TIMESTEPS = (50, 250, 500, 750, 950)
SAMPLE_SEED = 2024
DDIM_STEPS = 25
GUIDANCE = 2.0


class Model:
    def __init__(self, width: int, ldm: dict[str, torch.Tensor]) -> None:
        c = sd_config(width)
        self.unet = load_unet(c, ldm)
        self.contexts = class_contexts(c, text_encoder_from_ldm(c, ldm))

    @torch.no_grad()
    def eps(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=self.contexts[labels]).sample


@dataclass(frozen=True)
class EvalSet:
    x_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    labels: torch.Tensor


@lru_cache(maxsize=4)
def eval_set(n_images: int, seed: int = 0) -> EvalSet:
    d = data.digits()
    x0 = data.encode(d.test_x[:n_images])
    g = torch.Generator().manual_seed(seed)
    xs, ts, ns, ys = [], [], [], []
    for t in EVAL_TIMESTEPS:
        noise = torch.randn(x0.shape, generator=g)
        tt = torch.full((len(x0),), t, dtype=torch.long)
        xs.append(diffusion.noisy(x0, tt, noise))
        ts.append(tt)
        ns.append(noise)
        ys.append(d.test_y[:n_images])
    return EvalSet(torch.cat(xs), torch.cat(ts), torch.cat(ns), torch.cat(ys))


@torch.no_grad()
def heldout_loss(model: Model, es: EvalSet, batch: int = 250) -> dict[str, float]:
    """{"mean": ..., "t=50": ..., ...}: mean squared epsilon error."""
    err = torch.cat([(model.eps(es.x_t[i:i + batch], es.t[i:i + batch], es.labels[i:i + batch])
                      - es.noise[i:i + batch]).pow(2).mean((1, 2, 3)) for i in range(0, len(es.t), batch)])
    out = {"mean": float(err.mean())}
    for t in EVAL_TIMESTEPS:
        out[f"t={t}"] = float(err[es.t == t].mean())
    return out


@lru_cache(maxsize=1)
def classifier():
    """An RBF SVM on the 64 pixels of the training split; returns (model, test accuracy)."""
    from sklearn.svm import SVC

    d = data.digits()
    clf = SVC(gamma=0.001, C=10.0).fit(data.to_sklearn(d.train_x), d.train_y.numpy())
    acc = float((clf.predict(data.to_sklearn(d.test_x)) == d.test_y.numpy()).mean())
    return clf, acc


@torch.no_grad()
def samples(model: Model, per_class: int, batch: int = 100,
            steps: int = DDIM_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (10*per_class, 1, 8, 8), labels); the same seeds for every model."""
    labels = torch.arange(10).repeat_interleave(per_class)
    out = []
    for i in range(0, len(labels), batch):
        lat = diffusion.ddim_sample(model.eps, labels[i:i + batch], NULL_CLASS, seed=SAMPLE_SEED + i,
                                    steps=steps, guidance=GUIDANCE)
        out.append(data.decode(lat))
    return torch.cat(out), labels


def skills(images: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Per-class accuracy (fraction of class-c samples the classifier calls c)."""
    clf, _ = classifier()
    pred = torch.tensor(clf.predict(data.to_sklearn(images)))
    return [float((pred[labels == c] == c).float().mean()) for c in range(10)]
