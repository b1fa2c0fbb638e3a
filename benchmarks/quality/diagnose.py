"""python -m benchmarks.quality.diagnose [MODEL.safetensors ...]: is "skills kept" able to rank anything?

Checks the pipeline that judges samples, independently of how well a model is trained:
- the classifier on real test digits pushed through encode -> decode (the latent round trip);
- the DDIM sampler and guidance, driven by the exact denoiser of the training set (the posterior mean over the
  training digits of the class): if the sampler is right its samples are digits of their class;
- how distinct the 11 class contexts of the shared text encoder are (cosine similarity).
Then, per trained model: whether it uses its class at all (held-out loss with the true class, a wrong class and
the null class) and its per-class skills.
"""

from __future__ import annotations

import sys

import torch

from . import data, diffusion
from .evaluate import Model, classifier, eval_set, heldout_loss, samples, skills, EvalSet
from .layout import NULL_CLASS, class_contexts, sd_config, te_ldm, text_encoder_from_ldm

ORACLE_PER_CLASS = 5


def exact_denoiser() -> diffusion.EpsFn:
    """epsilon of the training set's own posterior mean E[x0 | x_t, class] (the optimum of the training loss)."""
    d = data.digits()
    x0 = data.encode(d.train_x).reshape(len(d.train_y), -1)
    ac = diffusion.alphas_cumprod()

    def eps(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = []
        for xi, ti, li in zip(x, t, labels):
            a = ac[ti]
            pool = x0 if li == NULL_CLASS else x0[d.train_y == li]
            w = torch.softmax(-((xi.reshape(1, -1) - a.sqrt() * pool) ** 2).sum(1) / (2 * (1 - a)), 0)
            out.append((xi - a.sqrt() * (w @ pool).reshape(xi.shape)) / (1 - a).sqrt())
        return torch.stack(out)

    return eps


def main(paths: list[str]) -> None:
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    clf, acc = classifier()
    d = data.digits()
    rt = data.decode(data.encode(d.test_x))
    rt_acc = float((clf.predict(data.to_sklearn(rt)) == d.test_y.numpy()).mean())
    print(f"classifier: test accuracy {acc:.4f}; after encode -> decode {rt_acc:.4f}")
    labels = torch.arange(10).repeat_interleave(ORACLE_PER_CLASS)
    lat = diffusion.ddim_sample(exact_denoiser(), labels, NULL_CLASS, seed=2024)
    print("DDIM + guidance with the exact denoiser, per-class skills:",
          " ".join(f"{s:.2f}" for s in skills(data.decode(lat), labels)))
    c = sd_config(32)
    ctx = class_contexts(c, text_encoder_from_ldm(c, te_ldm(c))).reshape(NULL_CLASS + 1, -1)
    cos = torch.nn.functional.cosine_similarity(ctx[:, None], ctx[None], dim=-1)
    off = cos[~torch.eye(len(cos), dtype=torch.bool)]
    print(f"class contexts: cosine similarity {float(off.min()):.3f}-{float(off.max()):.3f} "
          f"(mean {float(off.mean()):.3f}) between the 11 contexts")
    es = eval_set(64)
    for path in paths:
        model = Model(32, load_file(path))
        losses = {name: heldout_loss(model, EvalSet(es.x_t, es.t, es.noise, lab))["mean"] for name, lab in
                  (("true class", es.labels), ("wrong class", (es.labels + 3) % 10),
                   ("null class", torch.full_like(es.labels, NULL_CLASS)))}
        print(f"{path}: held-out loss " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        print("  per-class skills (20 samples each):", " ".join(f"{s:.2f}" for s in skills(*samples(model, 20))))


if __name__ == "__main__":
    main(sys.argv[1:])
