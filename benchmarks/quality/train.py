"""Training the benchmark's models (class-conditional DDPM epsilon prediction), cached by configuration.

The learning rate is constant after a short warm-up, so the state after S steps of a longer run is exactly the
model trained for S steps: one run saves every milestone, each cached under its own key. A fine-tune's key
includes its parent's key, so changing the base retrains everything built on it.

A run also keeps what it needs to go on (optimizer, schedule, batch generator, loss window) beside its last
milestone, so training the same configuration longer resumes there instead of starting again: the resumed steps
draw the same batches and take the same optimizer steps as one uninterrupted run (tests/test_train.py).
Only the last milestone of a run keeps this state (AdamW's two moments are twice the model's size).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import data, diffusion
from .layout import NULL_CLASS, class_contexts, load_unet, new_unet, sd_config, te_ldm, text_encoder_from_ldm, \
    unet_from_ldm, unet_to_ldm

# Bump when training changes in a way that changes the weights: every cached model is then retrained.
TRAINING_VERSION = 2             # 2: the class context is [BOS, class, EOS] (layout.PROMPT_LENGTH)
WARMUP_STEPS = 20
LABEL_DROP = 0.1       # classifier-free guidance: this fraction of each batch trains the null class
CURVE_EVERY = 25       # the loss curve's points: mean train loss over each 25 steps


@dataclass(frozen=True)
class TrainConfig:
    width: int
    init_seed: int                 # diffusers' init (ignored for a fine-tune: it starts from its parent)
    data_seed: int                 # batch order, timesteps and noise
    steps: int
    classes: tuple[int, ...] = tuple(range(10))
    lr: float = 1e-3
    batch: int = 32
    parent: "TrainConfig | None" = None

    def key(self) -> str:
        d = asdict(self)
        d["parent"] = self.parent.key() if self.parent else None
        d["version"] = TRAINING_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        base = f"from {self.parent.describe()}, " if self.parent else f"init {self.init_seed}, "
        cls = "all classes" if self.classes == tuple(range(10)) else f"classes {self.classes[0]}-{self.classes[-1]}"
        return f"w{self.width} {base}{cls}, {self.steps} steps (data {self.data_seed})"


@dataclass
class Trained:
    config: TrainConfig
    path: Path                     # LDM layout, UNet + the shared text encoder, fp32 (export.py adds the VAE)
    record: dict                   # loss curve, distance from init, wall time


def cache_dir(root: Path) -> Path:
    d = root / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _paths(root: Path, cfg: TrainConfig) -> tuple[Path, Path]:
    d = cache_dir(root)
    return d / f"{cfg.key()}.safetensors", d / f"{cfg.key()}.json"


def _resume_path(root: Path, cfg: TrainConfig) -> Path:
    return cache_dir(root) / f"{cfg.key()}.resume.pt"


def cached(root: Path, cfg: TrainConfig) -> Trained | None:
    ckpt, rec = _paths(root, cfg)
    if ckpt.exists() and rec.exists():
        return Trained(cfg, ckpt, json.loads(rec.read_text()))
    return None


def _save(root: Path, cfg: TrainConfig, ldm: dict[str, torch.Tensor], record: dict) -> Trained:
    ckpt, rec = _paths(root, cfg)
    tmp = ckpt.with_suffix(".tmp")
    save_file(ldm, str(tmp), metadata={"benchmark": "quality", "config": cfg.describe()})
    os.replace(tmp, ckpt)
    rec.write_text(json.dumps(record, indent=1))
    return Trained(cfg, ckpt, record)


def _flat(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1).float() for _, v in sorted(sd.items())])


def _save_resume(root: Path, cfg: TrainConfig, state: dict, previous: Path | None) -> Path:
    path = _resume_path(root, cfg)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    if previous is not None and previous != path:
        previous.unlink(missing_ok=True)
    return path


def _resume_point(root: Path, cfg: TrainConfig, missing: list[int]) -> tuple[int, Trained, Path] | None:
    """The latest cached state of this run, before its first missing milestone, that can be trained on."""
    for s in range(min(missing) - 1, 0, -1):
        done = cached(root, replace(cfg, steps=s))
        state = _resume_path(root, replace(cfg, steps=s))
        if done is not None and state.exists():
            return s, done, state
    return None


def train(root: Path, cfg: TrainConfig, milestones: tuple[int, ...] = (), log=print,
          resumable: bool = True) -> dict[int, Trained]:
    """Train `cfg` (and save every milestone <= cfg.steps); returns {steps: Trained}, reusing the cache.
    `resumable=False` keeps no state to train on from (a run that is never trained longer: the test suite's)."""
    wanted = sorted({s for s in milestones if s < cfg.steps} | {cfg.steps})
    out = {s: t for s in wanted if (t := cached(root, replace(cfg, steps=s))) is not None}
    if len(out) == len(wanted):
        return out
    c = sd_config(cfg.width)
    if cfg.parent is not None:
        parent = train(root, cfg.parent, log=log, resumable=resumable)[cfg.parent.steps]
        unet = load_unet(c, load_file(str(parent.path))).requires_grad_(True).train()
        init_record = parent.record
    else:
        unet = new_unet(c, cfg.init_seed).train()
        init_record = None
    init_flat = _flat(unet.state_dict())
    te_sd = te_ldm(c)
    contexts = class_contexts(c, text_encoder_from_ldm(c, te_sd))

    d = data.digits()
    keep = torch.isin(d.train_y, torch.tensor(cfg.classes))
    x0_all, y_all = data.encode(d.train_x[keep]), d.train_y[keep]
    g = torch.Generator().manual_seed(cfg.data_seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP_STEPS))
    curve: list[tuple[int, float]] = []
    window: list[float] = []
    first, earlier_seconds, resume_file = 1, 0.0, None
    point = _resume_point(root, cfg, [s for s in wanted if s not in out])
    if point is not None:
        done_steps, done, resume_file = point
        state = torch.load(resume_file, weights_only=True)
        unet.load_state_dict(unet_from_ldm(c, load_ldm(done)))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        g.set_state(state["generator"])
        # A run's record ends with its partial window's mean; the window itself goes on.
        curve = [tuple(p) for p in done.record["loss_curve"] if p[0] % CURVE_EVERY == 0]
        window = state["window"]
        first, earlier_seconds = done_steps + 1, done.record["train_seconds"]
        log(f"  {cfg.describe()}: resuming after step {done_steps}")
    start = time.perf_counter() - earlier_seconds
    for step in range(first, cfg.steps + 1):
        idx = torch.randint(0, len(y_all), (cfg.batch,), generator=g)
        x0, y = x0_all[idx], y_all[idx].clone()
        y[torch.rand(cfg.batch, generator=g) < LABEL_DROP] = NULL_CLASS
        t = torch.randint(0, diffusion.TIMESTEPS, (cfg.batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        pred = unet(diffusion.noisy(x0, t, noise), t, encoder_hidden_states=contexts[y]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(loss.item())
        if step % CURVE_EVERY == 0:
            curve.append((step, sum(window) / len(window)))
            window = []
        if step % CURVE_EVERY == 0 or step == cfg.steps:
            recent = sum(window) / len(window) if window else curve[-1][1]
            log(f"  {cfg.describe()}: step {step}, train loss {recent:.4f} ({time.perf_counter() - start:.0f} s)")
        if step in wanted and step not in out:
            sd = unet.state_dict()
            flat = _flat(sd)
            # ||theta - theta_start|| / ||theta_start||: from the random init, or a fine-tune's from its parent.
            moved = float((flat - init_flat).norm() / init_flat.norm())
            upto = curve + ([(step, sum(window) / len(window))] if window else [])
            record = {"config": cfg.describe(), "steps": step, "loss_curve": upto,
                      "distance": moved, "train_seconds": time.perf_counter() - start,
                      "threads": torch.get_num_threads(), "parent_record": init_record}
            if point is not None:
                record["resumed_after"] = point[0]
            ldm = unet_to_ldm(c, sd)
            ldm.update(te_sd)
            here = replace(cfg, steps=step)
            out[step] = _save(root, here, ldm, record)
            if resumable:
                resume_file = _save_resume(root, here, {"optimizer": opt.state_dict(),
                                                        "scheduler": sched.state_dict(),
                                                        "generator": g.get_state(), "window": list(window)},
                                           resume_file)
    return out


def load_ldm(t: Trained) -> dict[str, torch.Tensor]:
    return load_file(str(t.path))


def unet_param_count(width: int) -> int:
    return sum(p.numel() for p in new_unet(sd_config(width), 0).parameters())
