"""The benchmark run: train (or reuse) the families, merge them with every method, measure, write the report."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .controls import planted_permutation, same_base_identity
from .export import single_file
from .evaluate import DDIM_STEPS, EvalSet, Model, classifier, eval_set, heldout_loss, samples, skills
from .families import FULL, LR_BY_WIDTH, MATCH_IMAGES, SWEEP_EXTRA_STEPS, Profile, independent_pair, same_base_family, \
    sweep_lengths
from .merging import merge
from .method_lines import METHOD_LIST, SWEEP_METHODS, Method, available
from .train import Trained, cached, load_ldm, train, unet_param_count

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


def _parent(width: int, t: Trained, es: EvalSet, per_class: int, ddim_steps: int = DDIM_STEPS) -> dict:
    model = Model(width, load_ldm(t))
    out = {"config": t.config.describe(), "loss": heldout_loss(model, es), "record": t.record}
    if per_class:
        images, labels = samples(model, per_class, steps=ddim_steps)
        out["skills"] = skills(images, labels)
        out["sample_grid"] = grid(images, labels)
    return out


GRID_PER_CLASS = 4


def grid(images: torch.Tensor, labels: torch.Tensor) -> list[list[list[float]]]:
    """The first GRID_PER_CLASS samples of each class as 8x8 pixel rows in [-1, 1], for the report's picture."""
    pick = torch.cat([torch.nonzero(labels == c).flatten()[:GRID_PER_CLASS] for c in range(10)])
    return images[pick, 0].round(decimals=2).tolist()


def measure_family(width: int, a: Trained, b: Trained, base: Trained | None, methods: list[Method],
                   alphas: tuple[float, ...], es: EvalSet, per_class: int, work: Path, log,
                   match_images: int = 64, cache: "SectionCache | None" = None, part: str = "",
                   ddim_steps: int = DDIM_STEPS, export: bool = True) -> dict:
    """The parents, then each method's curve over alpha (and skills at 0.5), a method's result reused from
    `cache` (under `part`, the section's name) when that method was measured before."""
    family = {"parents": {"A": _parent(width, a, es, per_class, ddim_steps),
                          "B": _parent(width, b, es, per_class, ddim_steps)}, "methods": {}}
    if base is not None:
        family["parents"]["base"] = _parent(width, base, es, per_class, ddim_steps)
    for m in methods:
        if m.needs_base and base is None:
            continue
        if cache is not None and (row := cache.method_get(part, m)) is not None:
            log(f"  {m.label}: reusing its result (barrier {row['barrier']:+.4f})")
            family["methods"][m.label] = row
            continue
        row = {"curve": {}, "merge_seconds": {}}
        for alpha in alphas:
            merged = merge(single_file(a, export), single_file(b, export), m, alpha, work,
                           single_file(base, export) if base else None, match_images)
            model = Model(width, merged.ldm)
            loss = heldout_loss(model, es)
            row["curve"][str(alpha)] = loss["mean"]
            row["merge_seconds"][str(alpha)] = merged.seconds
            if alpha == 0.5:
                row["loss_at_half"] = loss
                row["diagnostics"] = merged.summary
                if per_class:
                    images, labels = samples(model, per_class, steps=ddim_steps)
                    row["skills"] = skills(images, labels)
                    row["sample_grid"] = grid(images, labels)
        c = row["curve"]
        row["barrier"] = c["0.5"] - (c["0.0"] + c["1.0"]) / 2
        log(f"  {m.label}: loss at 0.5 {c['0.5']:.4f}, barrier {row['barrier']:+.4f}")
        family["methods"][m.label] = row
        if cache is not None:
            cache.method_put(part, m, row)
    return family


def at_half(width: int, a: Trained, b: Trained, m: Method, parents_mean: float, es: EvalSet, work: Path,
            match_images: int, export: bool = True) -> dict:
    """One method's merge of an independent pair at alpha 0.5: held-out loss, barrier over the parents' mean
    loss, merge time, and (for an aligning method) how much it moved."""
    merged = merge(single_file(a, export), single_file(b, export), m, 0.5, work, match_images=match_images)
    loss = heldout_loss(Model(width, merged.ldm), es)["mean"]
    one = {"loss": loss, "barrier": loss - parents_mean, "merge_seconds": merged.seconds}
    if merged.moved:
        one.update(units_moved=merged.moved, similarity=merged.similarity)
    return one


class NotTrained(Exception):
    pass


def trained(root: Path, cfg, milestones: tuple[int, ...], may_train: bool, log,
            resumable: bool = True) -> dict[int, Trained]:
    """`train`, or with may_train=False only what the cache holds (NotTrained if the final state is missing)."""
    if may_train:
        return train(root, cfg, milestones, log, resumable)
    out = {s: t for s in sorted(set(milestones) | {cfg.steps}) if s <= cfg.steps
           and (t := cached(root, replace(cfg, steps=s))) is not None}
    if cfg.steps not in out:
        raise NotTrained(cfg.describe())
    return out


def sweep(p: Profile, root: Path, es: EvalSet, work: Path, log, cache: "SectionCache",
          may_train: bool = True) -> list[dict]:
    """Barrier at alpha 0.5 of each sweep method on every width and training length of the independent pairs
    (each row cached on its own, so that a row whose models are still training can be added later)."""
    have, _ = available(SWEEP_METHODS)
    rows = []
    for width in p.widths:
        lengths = sweep_lengths(p, width)
        if may_train:
            for cfg in independent_pair(p, width, lengths[-1]):
                train(root, cfg, lengths, log, p.resumable)
        for steps in lengths:
            pair = [cached(root, cfg) for cfg in independent_pair(p, width, steps)]
            if None in pair:
                log(f"  width {width}, {steps} steps: not trained yet; left out")
                continue
            a, b = pair
            # A row depends on its two models (their keys) and on what every section depends on.
            row_name = f"row-w{width}-s{steps}-{a.config.key()[:6]}{b.config.key()[:6]}"
            if (row := cache.get(row_name)) is not None:
                rows.append(row)
                continue
            la = heldout_loss(Model(width, load_ldm(a)), es)["mean"]
            lb = heldout_loss(Model(width, load_ldm(b)), es)["mean"]
            t0 = time.perf_counter()
            row = {"width": width, "params": unet_param_count(width), "steps": steps, "loss_a": la, "loss_b": lb,
                   "distance_a": a.record["distance"], "distance_b": b.record["distance"], "barrier": {},
                   "loss": {}, "merge_seconds": {}}
            for m in have:
                if (one := cache.method_get(row_name, m)) is None:
                    one = at_half(width, a, b, m, (la + lb) / 2, es, work, MATCH_IMAGES[p.name], p.exports)
                    cache.method_put(row_name, m, one)
                for field in ("loss", "barrier", "merge_seconds", "units_moved", "similarity"):
                    if field in one:
                        row.setdefault(field, {})[m.label] = one[field]
            ws = row["barrier"][have[0].label]
            row["ratio"] = {m.label: row["barrier"][m.label] / ws for m in have[1:]} if ws > 0 else {}
            log(f"  w{width} {steps} steps: barrier " + ", ".join(f"{k} {v:+.4f}" for k, v in row["barrier"].items()))
            row["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            row["seconds"] = time.perf_counter() - t0
            row["load_average_end"] = os.getloadavg()[0]
            cache.put(row_name, row)
            rows.append(row)
    return rows


SECTIONS = ("controls", "independent", "same_base", "sweep")
# Bump when a measurement changes: cached section results are then recomputed.
# 2: spec sd1-walk-2 (whole heads, GroupNorm freedoms) changes every re-basin row; REPAIR's scale without epsilon.
RESULTS_VERSION = 2


class SectionCache:
    """Each section's result, cached in DATA/sections/ by everything it depends on (profile, methods, the
    measurement code's version), so a long run can be done in parts and the report rebuilt from them."""

    def __init__(self, root: Path, p: Profile, methods: list[Method]) -> None:
        self.dir = root / "sections"
        self.dir.mkdir(parents=True, exist_ok=True)
        # The families' sections depend on the skill width's models, not on the other widths' training lengths
        # (those only key the sweep's rows, which are also named by their models' keys).
        # Nor on whether training keeps the state to resume from (the same models either way).
        profile = {k: v for k, v in asdict(p).items()
                   if k not in ("widths", "independent_steps", "milestones", "resumable")}
        profile["skill_steps"] = p.independent_steps.get(p.skill_width)
        if p.ddim_steps == DDIM_STEPS:  # the keys of the profiles measured before it was a field stay valid
            del profile["ddim_steps"]
        if p.control_prompts == FULL.control_prompts:  # likewise
            del profile["control_prompts"]
        if p.exports:  # likewise (merges of the trained files, without the VAE, count fewer keys)
            del profile["exports"]
        self.base = {"profile": profile, "version": RESULTS_VERSION}
        ident = {**self.base, "methods": [m.ident for m in methods], "sweep_methods": [m.ident for m in SWEEP_METHODS]}
        self.key = _digest(ident)
        sweep = {"base": self.key, "lr": LR_BY_WIDTH, "extra": SWEEP_EXTRA_STEPS}
        self.sweep_key = hashlib.sha256(json.dumps(sweep, sort_keys=True).encode()).hexdigest()[:12]

    def path(self, name: str) -> Path:
        return self.dir / f"{name}-{self.sweep_key if name == 'sweep' else self.key}.json"

    def get(self, name: str) -> dict | None:
        return _read(self.path(name))

    def put(self, name: str, value: dict) -> None:
        _write(self.path(name), value)

    # One method's result in one section or sweep row, keyed by the method's own ident: when a method's revision
    # changes, a section is re-measured for that method only.
    def method_path(self, part: str, m: Method) -> Path:
        return self.dir / "methods" / f"{part}-{m.slug}-{_digest({**self.base, 'method': m.ident})}.json"

    def method_get(self, part: str, m: Method) -> dict | None:
        return _read(self.method_path(part, m))

    def method_put(self, part: str, m: Method, value: dict) -> None:
        _write(self.method_path(part, m), value)


def _digest(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _read(f: Path) -> dict | None:
    return json.loads(f.read_text()) if f.exists() else None


def _write(f: Path, value: dict) -> None:
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, f)


def run(p: Profile, root: Path, sections: tuple[str, ...] = SECTIONS, may_train: bool = True, log=print) -> dict:
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
    cache = SectionCache(root, p, methods)

    def independent() -> tuple[Trained, Trained]:
        a_cfg, b_cfg = independent_pair(p, w)
        return (trained(root, a_cfg, p.milestones, may_train, log, p.resumable)[a_cfg.steps],
                trained(root, b_cfg, p.milestones, may_train, log, p.resumable)[b_cfg.steps])

    def same_base() -> tuple[Trained, Trained, Trained]:
        cfgs = same_base_family(p, w)
        return tuple(trained(root, cfg, (), may_train, log, p.resumable)[cfg.steps]  # type: ignore[return-value]
                     for cfg in cfgs)

    def controls() -> dict:
        a, _ = independent()
        _, low, high = same_base()
        return {"planted_permutation": planted_permutation(w, a, es, work, match_images=MATCH_IMAGES[p.name],
                                                           activation_prompts=p.control_prompts, export=p.exports),
                "same_base_identity": same_base_identity(low, high, work, p.exports)}

    def independent_family() -> dict:
        a, b = independent()
        return {"width": w, **measure_family(w, a, b, None, methods, p.alphas, es, p.samples_per_class, work, log,
                                            MATCH_IMAGES[p.name], cache, "independent", p.ddim_steps, p.exports)}

    def same_base_family_() -> dict:
        base, low, high = same_base()
        return {"width": w, **measure_family(w, low, high, base, methods, p.alphas, es, p.samples_per_class,
                                             work, log, MATCH_IMAGES[p.name], cache, "same_base", p.ddim_steps,
                                             p.exports)}

    compute = {"controls": controls, "independent": independent_family, "same_base": same_base_family_,
               "sweep": lambda: {"rows": sweep(p, root, es, work, log, cache, may_train),
                                 "complete": True}}
    measured = {}
    for name in SECTIONS:
        value = cache.get(name)
        if value is None and name in sections:
            log(f"{name}: measuring")
            t0 = time.perf_counter()
            try:
                value = compute[name]()
            except NotTrained as e:
                log(f"{name}: left out, a model is not trained yet ({e})")
                measured[name] = None
                continue
            if name == "sweep" and len(value["rows"]) < sum(len(sweep_lengths(p, w)) for w in p.widths):
                # Some rows are still missing: keep the rows (cached one by one), not the section.
                value["seconds"] = time.perf_counter() - t0
                value["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                value["load_average_end"] = os.getloadavg()[0]
                measured[name] = value
                continue
            value["seconds"] = time.perf_counter() - t0
            value["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            value["load_average_end"] = os.getloadavg()[0]
            cache.put(name, value)
        elif value is not None:
            log(f"{name}: reusing the result measured {value['measured']}")
        measured[name] = value
    results["controls"] = measured["controls"]
    results["families"] = {k: measured[k] for k in ("independent", "same_base") if measured[k] is not None}
    results["sweep"] = (measured["sweep"] or {}).get("rows", [])
    results["section_seconds"] = {k: v["seconds"] for k, v in measured.items() if v is not None}
    results["wall_seconds"] = time.perf_counter() - start
    results["machine"]["load_average_end"] = os.getloadavg()[0]
    return results
