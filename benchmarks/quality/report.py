"""The report: a Markdown file and matplotlib PNGs (barrier curves per method, skills per class, ratio against
width and training length), all written into one results folder next to `results.json`."""

from __future__ import annotations

import json
from pathlib import Path

FAMILY_TITLES = {"independent": "Independent pair", "same_base": "Same-base family (fine-tunes on 0-4 and 5-9)"}


def _plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for key, fam in results["families"].items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, row in fam["methods"].items():
            alphas = [float(a) for a in row["curve"]]
            ax.plot(alphas, list(row["curve"].values()), marker="o", label=label)
        ax.set_xlabel("alpha (weight of B)")
        ax.set_ylabel("held-out epsilon loss")
        ax.set_title(f"{FAMILY_TITLES[key]}, width {fam['width']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"barrier_{key}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)

        rows = {f"parent {k}": v["skills"] for k, v in fam["parents"].items() if "skills" in v}
        rows.update({k: v["skills"] for k, v in fam["methods"].items() if "skills" in v})
        if rows:
            fig, ax = plt.subplots(figsize=(7, 4))
            width = 0.8 / len(rows)
            for i, (label, acc) in enumerate(rows.items()):
                ax.bar([c + (i - len(rows) / 2) * width + width / 2 for c in range(10)], acc, width, label=label)
            ax.set_xticks(range(10))
            ax.set_xlabel("digit class")
            ax.set_ylabel("samples classified as their class")
            ax.set_ylim(0, 1.05)
            ax.set_title(f"Skills kept: {FAMILY_TITLES[key]} (alpha 0.5)")
            ax.legend(fontsize=6, ncol=2)
            fig.tight_layout()
            name = f"skills_{key}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            files.append(name)

        grids = {f"parent {k}": v["sample_grid"] for k, v in fam["parents"].items() if "sample_grid" in v}
        grids.update({k: v["sample_grid"] for k, v in fam["methods"].items() if "sample_grid" in v})
        if grids:
            cols = min(3, len(grids))
            rows_n = -(-len(grids) // cols)
            fig, axes = plt.subplots(rows_n, cols, figsize=(3.4 * cols, 1.75 * rows_n + 0.4), squeeze=False)
            for ax in axes.flat:
                ax.axis("off")
            for ax, (label, g) in zip(axes.flat, grids.items()):
                ax.imshow(_mosaic(g), cmap="gray", vmin=-1, vmax=1)
                ax.set_title(label, fontsize=7)
            fig.suptitle(f"Samples (columns: digits 0-9, fixed seeds): {FAMILY_TITLES[key]}", fontsize=8)
            fig.tight_layout(rect=(0, 0, 1, 0.96))
            name = f"samples_{key}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            files.append(name)

    if results["sweep"]:
        # One panel per width, one colour per method in every panel (the legend is shared): with a line per
        # (method, width) in one axes the colours repeat and the trend of a method cannot be followed.
        widths = sorted({r["width"] for r in results["sweep"]})
        labels = sorted({m for r in results["sweep"] for m in r["ratio"]})
        colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(labels)}
        fig, axes = plt.subplots(1, len(widths), figsize=(3.2 * len(widths) + 2.6, 3.6), sharey=True,
                                 squeeze=False)
        for ax, width in zip(axes[0], widths):
            rs = sorted((r for r in results["sweep"] if r["width"] == width), key=lambda r: r["steps"])
            for m in labels:
                pts = [(r["steps"], r["ratio"][m]) for r in rs if m in r["ratio"]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=colours[m], label=m)
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="target 0.5")
            ax.set_xscale("log", base=2)
            ax.set_xticks([r["steps"] for r in rs], [str(r["steps"]) for r in rs])
            ax.minorticks_off()
            ax.set_title(f"width {width}", fontsize=9)
            ax.set_xlabel("training steps", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0][0].set_ylabel("barrier ratio (method / weighted sum)\nat alpha 0.5", fontsize=8)
        handles, names = axes[0][-1].get_legend_handles_labels()
        fig.legend(handles, names, fontsize=7, loc="center right")
        fig.tight_layout(rect=(0, 0, 1 - 2.5 / (3.2 * len(widths) + 2.6), 1))
        fig.savefig(out / "ratio.png", dpi=110)
        plt.close(fig)
        files.append("ratio.png")
    return files


def _mosaic(grid: list) -> "np.ndarray":
    """Samples listed class by class (the same count per class) -> one image: a column per class."""
    import numpy as np

    g = np.asarray(grid)
    per = len(g) // 10
    return np.concatenate([np.concatenate(list(g[c * per:(c + 1) * per]), axis=0) for c in range(10)], axis=1)


def _skills_cell(acc: list[float], classes: range) -> str:
    return f"{sum(acc[c] for c in classes) / len(classes):.2f}"


def markdown(results: dict, plots: list[str]) -> str:
    m = results["machine"]
    lines = [f"# Merge quality ({results['profile']} profile)", "",
             f"Measured {results['date']} on {m['cpu']} ({m['cores']} cores, torch {m['torch']}, "
             f"{m['threads']} thread(s), GPU: {m['gpu'] or 'none'}; 1-min load average {m['load_average_start']:.1f}"
             f" at start, {m['load_average_end']:.1f} at end of this invocation, {results['wall_seconds'] / 60:.1f} min). "
             "Each section is measured once and cached; its own wall time when it was measured: " + ", ".join(
                 f"{k} {v / 60:.1f} min" for k, v in results.get("section_seconds", {}).items())
             + f"; sweep rows: {sum(r.get('seconds', 0) for r in results['sweep']) / 60:.1f} min"
             " (rows measured before row timing existed count 0). Training time is in each model's record.",
             "", f"Digit classifier (judges the samples): test accuracy {results['classifier_test_accuracy']:.3f}.",
             ""]
    if results["skipped_methods"]:
        lines += [f"Not in the installed core, skipped: {', '.join(results['skipped_methods'])}.", ""]
    c = results["controls"]
    pp, sb = (c["planted_permutation"], c["same_base_identity"]) if c else ({}, {})
    lines += [] if not c else ["## Controls", "",
              f"- Planted permutation ({pp['units_permuted']:,} units moved): B's held-out loss {pp['loss_b']:.6f} "
              f"vs A's {pp['loss_a']:.6f}; re-basin barrier {pp['rebasin_barrier']:+.2e} (merge differs from A by "
              f"at most {pp['rebasin_merge_max_abs_diff_from_a']:.1e}; activation matching's by "
              f"{pp['activation_matching_max_abs_diff_from_a']:.1e}), weighted-sum barrier "
              f"{pp['weighted_sum_barrier']:+.4f}.",
              f"- Same base: re-basin moved {sb['units_moved']} units; its merge is "
              + ("bit-identical to the weighted sum" if sb["bit_identical"]
                 else f"NOT identical to the weighted sum ({sb['keys_differing']} keys differ)")
              + f" ({sb['keys']} tensors).", ""]
    for key, fam in results["families"].items():
        lines += [f"## {FAMILY_TITLES[key]}, width {fam['width']}", ""]
        for name, par in fam["parents"].items():
            r = par["record"]
            lines.append(f"- parent {name}: {par['config']}; held-out loss {par['loss']['mean']:.4f}; "
                         f"weights moved {100 * r['distance']:.0f} % of their norm from "
                         f"{'the parent' if r.get('parent_record') else 'init'}; trained in {r['train_seconds']:.0f} s")
        alphas = list(next(iter(fam["methods"].values()))["curve"])
        lines += ["", "| method | " + " | ".join(f"loss a={a}" for a in alphas)
                  + " | barrier at 0.5 | skills 0-4 | skills 5-9 | merge s (a=0.5) |",
                  "| --- |" + " ---: |" * (len(alphas) + 4)]
        half = alphas.index("0.5")
        for name, par in fam["parents"].items():
            if "skills" in par:
                cells = ["" if i != half else f"{par['loss']['mean']:.4f}" for i in range(len(alphas))]
                lines.append(f"| parent {name} | " + " | ".join(cells) + " | | "
                             f"{_skills_cell(par['skills'], range(5))} | {_skills_cell(par['skills'], range(5, 10))}"
                             " | |")
        for label, row in fam["methods"].items():
            cv = row["curve"]
            sk = row.get("skills")
            lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" for v in cv.values())
                         + f" | {row['barrier']:+.4f} | "
                         + (f"{_skills_cell(sk, range(5))} | {_skills_cell(sk, range(5, 10))}" if sk else " | ")
                         + f" | {row['merge_seconds']['0.5']:.1f} |")
        lines += ["", "Held-out loss at alpha 0.5 by timestep:", "",
                  "| method | " + " | ".join(k for k in next(iter(fam["methods"].values()))["loss_at_half"]
                                            if k != "mean") + " |",
                  "| --- |" + " ---: |" * 5]
        for label, row in fam["methods"].items():
            lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" for k, v in row["loss_at_half"].items()
                                                     if k != "mean") + " |")
        skilled = {f"parent {k}": v["skills"] for k, v in fam["parents"].items() if "skills" in v}
        skilled.update({k: v["skills"] for k, v in fam["methods"].items() if "skills" in v})
        if skilled:
            lines += ["", "Skills kept at alpha 0.5, per class (fraction of the class's samples the classifier calls "
                      "that class):", "",
                      "| model | " + " | ".join(str(c) for c in range(10)) + " | mean |",
                      "| --- |" + " ---: |" * 11]
            for label, acc in skilled.items():
                lines.append(f"| {label} | " + " | ".join(f"{a:.2f}" for a in acc) + f" | {sum(acc) / 10:.3f} |")
        lines.append("")
    if results["sweep"]:
        labels = list(results["sweep"][0]["barrier"])
        lines += ["## Barrier against width and training length (independent pairs, alpha 0.5)", "",
                  "| width | UNet params | steps | loss A / B | moved from init A / B | "
                  + " | ".join(f"barrier: {m}" for m in labels) + " | "
                  + " | ".join(f"ratio: {m}" for m in labels[1:]) + " |",
                  "| ---: | ---: | ---: | --- | --- |" + " ---: |" * (2 * len(labels) - 1)]
        for r in results["sweep"]:
            lines.append(f"| {r['width']} | {r['params'] / 1e6:.1f} M | {r['steps']} | {r['loss_a']:.4f} / "
                         f"{r['loss_b']:.4f} | {100 * r['distance_a']:.0f} % / {100 * r['distance_b']:.0f} % | "
                         + " | ".join(f"{r['barrier'][m]:+.4f}" for m in labels) + " | "
                         + " | ".join(f"{r['ratio'][m]:.3f}" if m in r["ratio"] else "n/a" for m in labels[1:])
                         + " |")
        lines.append("")
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _without(value, key: str):
    if isinstance(value, dict):
        return {k: _without(v, key) for k, v in value.items() if k != key}
    if isinstance(value, list):
        return [_without(v, key) for v in value]
    return value


def write(results: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    # The sample pictures' pixels (about 1.5 MB as indented JSON) stay in the section cache and the PNGs.
    (out / "results.json").write_text(json.dumps(_without(results, "sample_grid"), indent=1))
    plots = _plots(results, out)
    path = out / "results.md"
    path.write_text(markdown(results, plots))
    return path
