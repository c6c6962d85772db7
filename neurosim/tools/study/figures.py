"""A study's figures: the rules' curves side by side, drawn from the results its report collects.

``draw_figures`` writes PNGs into ``STUDY/figures/`` (test accuracy by epoch; the W–Bᵀ angle by
epoch and per synapse; the delta angle by step and per synapse) and returns each one's caption and
path for ``report.md``. It reads the ``RuleResult``s of ``neurosim.tools.study.report`` and imports
nothing of the study's own.
"""

from __future__ import annotations

import math
from pathlib import Path

from neurosim.common.errors import UserError
from neurosim.common.files import describe_os_error

FIGURES = "figures"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_figures(study_dir: Path, model: str, results: list) -> list[tuple[str, str]]:
    """The comparison figures (PNG, 100 dpi) in ``STUDY/figures/``: (caption, path relative to STUDY).
    ``results``: one ``neurosim.tools.study.report.RuleResult`` per rule, in the report's order."""
    from neurosim.tools.figures import save_figure

    plt = _pyplot()
    runs = [r for r in results if r.trained]
    if not runs:
        return []
    folder = study_dir / FIGURES
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make {folder}: {describe_os_error(e)}") from None
    palette = plt.get_cmap("tab10")
    index = {r.rule: i for i, r in enumerate(results)}

    def style(rule):
        i = index[rule]
        return {"color": palette(i % 10), "ls": "-" if i < 10 else "--"}

    def marker(n):
        return "." if n <= 40 else ""

    written = []

    def save(fig, name, caption):
        save_figure(fig, folder / name, dpi=100)
        written.append((caption, f"{FIGURES}/{name}"))

    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    for r in runs:
        ax.plot([m["epoch"] for m in r.records], [m["test_acc"] for m in r.records], label=r.rule,
                marker=marker(len(r.records)), **style(r.rule))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(f"{model}: test accuracy by epoch", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(runs) > 5 else 1)
    save(fig, "accuracy_by_epoch.png", "Test top-1 accuracy by epoch, one line per rule")

    angled = [r for r in runs if r.has_angles]
    without = [r.rule for r in runs if not r.has_angles]
    note = f" (n/a: {', '.join(without)})" if without else ""
    if angled:
        fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
        for r in angled:
            pts = [(m["epoch"], m["mean_angle"]) for m in r.records if _finite(m.get("mean_angle"))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=r.rule, marker=marker(len(pts)), **style(r.rule))
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean angle between W and Bᵀ (degrees)")
        _angle_axis(ax)
        ax.set_title(f"{model}: forward/feedback alignment by epoch{note}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2 if len(angled) > 5 else 1)
        save(fig, "angle_by_epoch.png", f"Mean W–Bᵀ angle over synapses by epoch, one line per rule{note}")

        names = list(dict.fromkeys(s for r in angled for s in r.final["angles"]))
        fig, ax = plt.subplots(figsize=(max(7, 0.3 * len(names) + 3), 4.4), layout="constrained")
        for r in angled:
            a = r.final["angles"]
            ys = [a.get(s, math.nan) for s in names]
            ax.plot(range(len(names)), [y if _finite(y) else math.nan for y in ys], label=r.rule, marker="o", ms=3,
                    **style(r.rule))
        _synapse_axis(ax, names)
        ax.set_ylabel("angle between W and Bᵀ (degrees)")
        _angle_axis(ax)
        ax.set_title(f"{model}: W–Bᵀ angle per synapse at the final epoch{note}", fontsize=10)
        ax.legend(fontsize=8, ncol=2 if len(angled) > 5 else 1)
        save(fig, "angle_per_synapse.png", f"W–Bᵀ angle per synapse at the final epoch, input to output{note}")

    probed = [r for r in results if r.delta_curve is not None]
    if probed:
        names = list(dict.fromkeys(s for r in probed for s in r.delta))
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained")
        for r in probed:
            steps, means = r.delta_curve
            axes[0].plot(steps, means, label=r.rule, marker=marker(len(steps)), **style(r.rule))
            axes[1].plot(range(len(names)), [r.delta.get(s, math.nan) for s in names], label=r.rule, marker="o",
                         ms=3, **style(r.rule))
        axes[0].set_xlabel("training step (engaged optimizer steps)")
        axes[0].set_ylabel("mean delta angle over synapses (degrees)")
        axes[0].set_title("error delivered vs backprop's, by step", fontsize=10)
        axes[0].grid(alpha=0.3)
        _synapse_axis(axes[1], names)
        axes[1].set_ylabel("delta angle (degrees)")
        axes[1].set_title("per synapse, at the last recorded step", fontsize=10)
        for ax in axes:
            _angle_axis(ax)
        axes[0].legend(fontsize=8, ncol=2 if len(probed) > 5 else 1)
        fig.suptitle(f"{model}: delta angle (the error each synapse receives vs backprop's, on the probe batch)",
                     fontsize=11)
        save(fig, "delta_angle.png", "Delta angle: mean over synapses by step, and per synapse at the end")
    return written


def _angle_axis(ax) -> None:
    """From 0° to a little above the largest angle drawn, and never narrower than 1° (backprop's
    angles are zero up to rounding; a narrower axis would magnify the rounding)."""
    import numpy as np

    values = [y for line in ax.get_lines() for y in np.asarray(line.get_ydata(), dtype=float) if np.isfinite(y)]
    ax.set_ylim(0, max(1.0, 1.08 * max(values, default=0.0)))


def _synapse_axis(ax, names: list[str]) -> None:
    ax.set_xticks(range(len(names)))
    if len(names) <= 40:
        ax.set_xticklabels(names, rotation=90 if len(names) > 6 else 0, fontsize=7 if len(names) > 12 else 8)
    ax.set_xlabel("synapse (input to output)")
    ax.grid(alpha=0.3)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
