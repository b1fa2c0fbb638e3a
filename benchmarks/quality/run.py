"""The benchmark run: train (or reuse) the families, merge them with every method, measure, write the report."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from .controls import planted_permutation, same_base_identity
from .export import single_file
from .evaluate import EvalSet, Model, classifier, eval_set, heldout_loss, samples, skills
from .families import Profile, independent_pair, same_base_family
from .merging import merge
from .methods import METHOD_LIST, SWEEP_METHODS, Method, available
from .train import Trained, load_ldm, train, unet_param_count

def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_start": os.getloadavg()[0]}


def _parent(width: int, t: Trained, es: EvalSet, per_class: int) -> dict:
    model = Model(width, load_ldm(t))
    out = {"config": t.config.describe(), "loss": heldout_loss(model, es), "record": t.record}
    if per_class:
        out["skills"] = skills(*samples(model, per_class))
    return out


def measure_family(width: int, a: Trained, b: Trained, base: Trained | None, methods: list[Method],
                   alphas: tuple[float, ...], es: EvalSet, per_class: int, work: Path, log) -> dict:
    family = {"parents": {"A": _parent(width, a, es, per_class), "B": _parent(width, b, es, per_class)},
              "methods": {}}
    if base is not None:
        family["parents"]["base"] = _parent(width, base, es, per_class)
    for m in methods:
        if m.needs_base and base is None:
            continue
        row: dict = {"curve": {}, "merge_seconds": {}}
        for alpha in alphas:
            merged = merge(single_file(a), single_file(b), m, alpha, work, single_file(base) if base else None)
            model = Model(width, merged.ldm)
            loss = heldout_loss(model, es)
            row["curve"][str(alpha)] = loss["mean"]
            row["merge_seconds"][str(alpha)] = merged.seconds
            if alpha == 0.5:
                row["loss_at_half"] = loss
                row["diagnostics"] = merged.summary
                if per_class:
                    row["skills"] = skills(*samples(model, per_class))
        c = row["curve"]
        row["barrier"] = c["0.5"] - (c["0.0"] + c["1.0"]) / 2
        log(f"  {m.label}: loss at 0.5 {c['0.5']:.4f}, barrier {row['barrier']:+.4f}")
        family["methods"][m.label] = row
    return family


def sweep(p: Profile, root: Path, es: EvalSet, work: Path, log) -> list[dict]:
    """Barrier at alpha 0.5 of each sweep method on every width and training length of the independent pairs."""
    have, _ = available(SWEEP_METHODS)
    rows = []
    for width in p.widths:
        full = independent_pair(p, width)
        states = [train(root, cfg, p.milestones, log) for cfg in full]
        for steps in sorted(states[0]):
            a, b = states[0][steps], states[1][steps]
            la = heldout_loss(Model(width, load_ldm(a)), es)["mean"]
            lb = heldout_loss(Model(width, load_ldm(b)), es)["mean"]
            row = {"width": width, "params": unet_param_count(width), "steps": steps, "loss_a": la, "loss_b": lb,
                   "distance_a": a.record["distance"], "distance_b": b.record["distance"], "barrier": {},
                   "loss": {}, "merge_seconds": {}}
            for m in have:
                merged = merge(single_file(a), single_file(b), m, 0.5, work)
                loss = heldout_loss(Model(width, merged.ldm), es)["mean"]
                row["loss"][m.label] = loss
                row["barrier"][m.label] = loss - (la + lb) / 2
                row["merge_seconds"][m.label] = merged.seconds
                if merged.moved:
                    row.setdefault("units_moved", {})[m.label] = merged.moved
                    row.setdefault("similarity", {})[m.label] = merged.similarity
            ws = row["barrier"][have[0].label]
            row["ratio"] = {m.label: row["barrier"][m.label] / ws for m in have[1:]} if ws > 0 else {}
            log(f"  w{width} {steps} steps: barrier " + ", ".join(f"{k} {v:+.4f}" for k, v in row["barrier"].items()))
            rows.append(row)
    return rows


def run(p: Profile, root: Path, log=print) -> dict:
    start = time.perf_counter()
    work = root / "work"
    results: dict = {"profile": p.name, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                   time.gmtime())}
    methods, missing = available(tuple(m for m in METHOD_LIST if p.methods is None or m.label in p.methods))
    results["skipped_methods"] = [m.label for m in missing]
    _, acc = classifier()
    results["classifier_test_accuracy"] = acc
    log(f"digit classifier: test accuracy {acc:.3f}")
    w = p.skill_width
    es = eval_set(p.eval_images)

    log("training (or reusing) the models")
    a_cfg, b_cfg = independent_pair(p, w)
    a = train(root, a_cfg, p.milestones, log)[a_cfg.steps]
    b = train(root, b_cfg, p.milestones, log)[b_cfg.steps]
    base_cfg, low_cfg, high_cfg = same_base_family(p, w)
    base = train(root, base_cfg, (), log)[base_cfg.steps]
    low = train(root, low_cfg, (), log)[low_cfg.steps]
    high = train(root, high_cfg, (), log)[high_cfg.steps]

    log("controls")
    results["controls"] = {"planted_permutation": planted_permutation(w, a, es, work),
                           "same_base_identity": same_base_identity(low, high, work)}
    log(f"  {json.dumps(results['controls'])}")

    families = {}
    log(f"independent pair, width {w}")
    families["independent"] = {"width": w, **measure_family(w, a, b, None, methods, p.alphas, es,
                                                            p.samples_per_class, work, log)}
    log(f"same-base family, width {w}")
    families["same_base"] = {"width": w, **measure_family(w, low, high, base, methods, p.alphas, es,
                                                          p.samples_per_class, work, log)}
    results["families"] = families

    log("barrier ratio against width and training length")
    results["sweep"] = sweep(p, root, es, work, log)
    results["wall_seconds"] = time.perf_counter() - start
    results["machine"]["load_average_end"] = os.getloadavg()[0]
    return results
