"""Figures of a run, drawn from its files with matplotlib (no display needed).

Per epoch (``metrics.jsonl``): ``accuracy.png``, ``loss_lr.png``, ``angles_by_epoch.png``. From the monitor files
when the run has them (``neurosim.observe.monitors``): ``angle_w_bt_by_step.png``,
``norm_ratio_by_step.png``, ``delta_angle_by_step.png``, ``synapse_traces.png``,
``w_vs_bt_scatter.png``, for runs that sleep ``sleep_effect.png`` and, for runs in time,
``within_presentation.png``. Across runs:
``plot_compare`` → ``compare_accuracy_angle.png``.

Every function that draws takes ``fmt``: ``"png"`` (the default), ``"pdf"`` or ``"svg"``, the
files' format and suffix (``plot_compare`` takes it from its ``out``'s suffix). Every by-epoch
axis has integer ticks; a by-step figure of a single record says so on the figure.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from neurosim.common.errors import UserError  # noqa: E402
from neurosim.common.files import describe_os_error  # noqa: E402
from neurosim.observe.monitors import MonitorRecord, load_monitor  # noqa: E402
from neurosim.training.config import preset  # noqa: E402
from neurosim.training.run_log import epoch_list, merged_records, metrics_records, nan_for_null  # noqa: E402


FORMATS = ("png", "pdf", "svg")


def check_format(fmt: str) -> str:
    """``fmt`` if it is one of ``FORMATS``, else a ``ValueError`` naming them."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown figure format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def _epoch_axis(ax) -> None:
    """An axis of epochs: whole numbers only (no epoch 0.5)."""
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def read_metrics(run_dir: Path) -> list[dict]:
    """The per-epoch records of ``metrics.jsonl`` (a ``UserError`` if there are none), undefined
    values (an angle where a rule has no feedback matrix) as NaN, which the figures leave out.

    A last line without its newline is what a run killed while writing leaves: it is ignored
    when it is not a whole record. Any other bad line is named by its (1-based) number.

    The run's ``last.pt`` keeps a copy of the records of the epochs it committed: those the
    file lost (or holds changed) are taken from it, with a warning that says so."""
    from neurosim.training.checkpoint import committed_records

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise UserError(f"no run directory {run_dir}")
    # The checkpoint first: a running run writes the file before it, so the file read after
    # holds at least the epochs the checkpoint committed.
    committed = committed_records(run_dir / "last.pt")
    if not path.exists() and not committed:
        raise UserError(f"{run_dir} has no metrics.jsonl; give the directory of a run (made by run_circuit.py)")
    found = metrics_records(path) if path.exists() else []
    records = found
    if committed:
        records, lost, altered = merged_records(committed, found)
        records += [r for r in found if r["epoch"] > committed[-1]["epoch"]]  # written, not yet committed
        if lost or altered:
            warnings.warn(f"{path} {'lacks' if not altered else 'lacks or holds other values for'} the records "
                          f"of {epoch_list(sorted(lost + altered))}; they are drawn from the copy in "
                          f"{run_dir / 'last.pt'} (--resume {run_dir} rewrites the file)", stacklevel=1)
    records = [nan_for_null(r) for r in records]
    if not records:
        raise UserError(f"{path} holds no epochs yet")
    return records


def _depth_cmap():
    # viridis without its palest yellows, which vanish on a white background.
    return matplotlib.colors.ListedColormap(plt.get_cmap("viridis")(np.linspace(0.0, 0.88, 256)), "depth")


def depth_colours(n: int):
    """One colour per synapse, shallow to deep along a sequential map (readable at ResNet depth)."""
    cmap = _depth_cmap()
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _depth_legend(fig, axes, names, colours):
    """A legend for a few synapses; for many, a depth colourbar beside ``axes`` (one or several)."""
    axes = list(np.atleast_1d(axes))
    if len(names) <= 12:
        axes[0].legend(fontsize=7, ncol=1 if len(names) <= 6 else 2)
        return
    sm = matplotlib.cm.ScalarMappable(cmap=_depth_cmap(), norm=matplotlib.colors.Normalize(0, len(names) - 1))
    bar = fig.colorbar(sm, ax=axes, fraction=0.04, pad=0.02)
    bar.locator = matplotlib.ticker.MaxNLocator(integer=True)
    bar.update_ticks()
    bar.set_label(f"synapse depth (0 = {names[0]}, {len(names) - 1} = {names[-1]})", fontsize=8)


def save_figure(fig, out: Path, dpi: int = 120) -> Path:
    """Write the figure to ``out`` through a temporary file: a failure or Ctrl-C leaves no half image."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=dpi, format=out.suffix.lstrip(".") or "png")
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write figure {out}: {describe_os_error(e)}") from None
    finally:
        plt.close(fig)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only place says so even for a file that is not there: none was made
            pass
    return out


def plot_epoch_angles(run_dir: Path, out: Path | None = None, fmt: str = "png") -> Path:
    """Per-synapse angle between W and Bᵀ (degrees) at the end of every epoch."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    names = list(records[0]["angles"])
    colours = depth_colours(len(names))
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    epochs = [r["epoch"] for r in records]
    for name, colour in zip(names, colours):
        ax.plot(epochs, [r["angles"][name] for r in records], color=colour, label=name, marker=".")
    _epoch_axis(ax)
    ax.set_ylabel("angle between W and Bᵀ (degrees)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{_title(run_dir)}: forward/feedback alignment per synapse")
    ax.grid(alpha=0.3)
    _depth_legend(fig, ax, names, colours)
    return save_figure(fig, out or run_dir / f"angles_by_epoch.{check_format(fmt)}")


def plot_accuracy(run_dir: Path, out: Path | None = None, fmt: str = "png") -> Path:
    """Train and test top-1 accuracy (percent) per epoch."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.plot([r["epoch"] for r in records], [r["test_acc"] for r in records], marker=".", label="test top-1")
    tr = [r for r in records if "train_acc" in r]
    ax.plot([r["epoch"] for r in tr], [r["train_acc"] for r in tr], marker=".", label="train top-1 (running)")
    _epoch_axis(ax)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{_title(run_dir)}: accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out or run_dir / f"accuracy.{check_format(fmt)}")


def plot_loss_lr(run_dir: Path, out: Path | None = None, fmt: str = "png") -> Path:
    """Train (running) and test loss per epoch (top) and the learning rate of each epoch (bottom)."""
    run_dir = Path(run_dir)
    check_format(fmt)
    records = read_metrics(run_dir)
    fig, (loss, lr) = plt.subplots(2, 1, figsize=(6, 5.6), sharex=True, height_ratios=(2, 1), layout="constrained")
    tr = [r for r in records if "train_loss" in r]
    loss.plot([r["epoch"] for r in records], [r.get("test_loss", np.nan) for r in records], marker=".",
              label="test loss")
    loss.plot([r["epoch"] for r in tr], [r["train_loss"] for r in tr], marker=".", label="train loss (running)")
    loss.set_ylabel("loss")
    loss.set_title(f"{_title(run_dir)}: loss and learning rate")
    loss.grid(alpha=0.3)
    loss.legend()
    # The rate epoch e trained with (from epoch e − 1 to e on the axis) is the one recorded at
    # the end of the epoch before it; the last record's is for an epoch not trained yet.
    rates = [(r["epoch"], float(r["lr"])) for r in records if isinstance(r.get("lr"), (int, float))]
    if len(rates) > 1:
        lr.stairs([v for _, v in rates[:-1]], [e for e, _ in rates], color="tab:green", lw=1.5, baseline=None)
        lr.set_ylabel("learning rate of each epoch")
    elif rates:
        lr.plot([rates[0][0]], [rates[0][1]], marker="o", ms=7, color="tab:green")
        lr.set_ylabel("learning rate (for epoch 1)")
    lr.grid(alpha=0.3)
    _plain_log_axis(lr, np.asarray([v for _, v in rates[:-1] or rates], dtype=float))
    _epoch_axis(lr)  # the loss panel shares its axis
    return save_figure(fig, out or run_dir / f"loss_lr.{fmt}")


def _title(run_dir: Path) -> str:
    """The run's preset (from ``config.json``), or the directory's name where that cannot be read."""
    run_dir = Path(run_dir)
    try:
        preset = json.loads((run_dir / "config.json").read_text(encoding="utf-8")).get("preset")
    except (OSError, ValueError, AttributeError):
        preset = None
    return preset if isinstance(preset, str) and preset else run_dir.name


def compare_labels(run_dirs) -> list[str]:
    """One legend label per run: its preset; runs of one preset told apart by their rule's own
    settings (``kp_resnet18 kp_decay=0.01``), then by their folders."""
    run_dirs = [Path(d) for d in run_dirs]
    labels = [_title(d) for d in run_dirs]
    labels = [f"{lab} {_rule_settings(d)}".rstrip() if labels.count(lab) > 1 else lab
              for lab, d in zip(labels, run_dirs)]
    return [f"{lab} ({d.parent.name}/{d.name})" if labels.count(lab) > 1 else lab for lab, d in zip(labels, run_dirs)]


def _rule_settings(run_dir: Path) -> str:
    """The rule's own settings of a run where they differ from its preset's, as ``kp_decay=0.01``
    (all of them when the preset is unknown; empty when none differ or none are readable)."""
    try:
        cfg = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
        params, rule = cfg.get("rule_params", {}), cfg["rule"]
        try:
            base = preset(cfg["preset"]).rule_params
        except (UserError, KeyError, TypeError):  # a preset this version does not have
            base = {}
        return " ".join(f"{rule}_{k}={v}" for k, v in sorted(params.items()) if k not in base or base[k] != v)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return ""


def plot_run(run_dir: Path, out_dir: Path | None = None, fmt: str = "png") -> list[Path]:
    """Every figure of one run, written into ``out_dir`` (default: the run's own directory,
    which is then the only place written to) as ``fmt`` files (png, pdf or svg); returns the
    files written."""
    check_format(fmt)
    run_dir = Path(run_dir)
    folder = Path(out_dir) if out_dir is not None else run_dir
    written = [plot_accuracy(run_dir, folder / f"accuracy.{fmt}")]
    angles = [a for r in read_metrics(run_dir) for a in r["angles"].values()]
    if any(a == a for a in angles):  # a rule without feedback matrices (DFA) has no W–Bᵀ angle
        written.insert(0, plot_epoch_angles(run_dir, folder / f"angles_by_epoch.{fmt}"))
    written.append(plot_loss_lr(run_dir, folder / f"loss_lr.{fmt}"))
    if (run_dir / "monitor.npz").exists():
        written += plot_monitor(run_dir, folder, fmt)
    return written


# -- monitor figures ------------------------------------------------------------------------------

def _marker(n_points: int) -> str:
    return "." if n_points <= 40 else ""


def _chosen(record: MonitorRecord, most: int = 3) -> list[int]:
    """Columns of the first, middle and last monitored synapses (fewer if fewer are monitored)."""
    n = len(record.synapses)
    return sorted({0, (n - 1) // 2, n - 1})[:most]


def _per_synapse(ax, steps, values, colours, names, unit: str = ""):
    marker, ms = ("o", 7) if len(steps) == 1 else (_marker(len(steps)), 3)
    for i, (name, colour) in enumerate(zip(names, colours)):
        v = values[:, i]
        keep = np.isfinite(v)
        ax.plot(steps[keep], v[keep], color=colour, label=name, marker=marker, lw=1.2, ms=ms, clip_on=False)
    _step_axis(ax, steps)
    ax.grid(alpha=0.3)
    _say_how_many(ax, steps, values, names, unit)


def _step_axis(ax, steps) -> None:
    """An axis of engaged steps: whole numbers, and around a single record a span of ±1 step."""
    ax.set_xlabel("training step (engaged optimizer steps)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if len(steps) == 1:
        ax.set_xlim(int(steps[0]) - 1, int(steps[0]) + 1)


def _say_how_many(ax, steps, values, names, unit: str = "") -> None:
    """A figure of a single record says so, with its values; one of none says that: a lone dot
    on an empty axis, or an empty axis, would read as a plot that failed."""
    rows = [r for r in range(len(steps)) if np.isfinite(values[r]).any()]
    if len(rows) > 1:
        return
    if not rows:
        text = "no records" + (" with a value" if len(steps) else "")
    else:
        r = rows[0]
        defined = [(n, float(v)) for n, v in zip(names, values[r]) if np.isfinite(v)]
        if len(defined) <= 4:
            what = ", ".join(f"{n} {v:.3g}{unit}" for n, v in defined)
        else:
            low, high = min(v for _, v in defined), max(v for _, v in defined)
            what = f"{low:.3g}{unit} to {high:.3g}{unit} over {len(defined)} synapses"
        text = f"one record (step {int(steps[r])}): {what}"
    ax.text(0.02, 0.03, text, transform=ax.transAxes, ha="left", va="bottom", fontsize=9,
            bbox=dict(facecolor="white", edgecolor="grey", alpha=0.9))


def _angle_limits(ax, values):
    top = np.nanmax(values) if np.isfinite(values).any() else 90.0
    ax.set_ylim(0, max(top * 1.08, 1.0))


def _per_synapse_figure(run_dir: Path, rec: MonitorRecord, values, ylabel: str, title: str, name: str,
                        scale_axis, out: Path | None, unit: str = "") -> Path:
    """One line per synapse of ``values[record, synapse]`` over recorded steps, depth as colour."""
    colours = depth_colours(len(rec.synapses))
    fig, ax = plt.subplots(figsize=(8, 4.8), layout="constrained")
    _per_synapse(ax, rec.steps, values, colours, rec.synapses, unit)
    ax.set_ylabel(ylabel)
    scale_axis(ax, values)
    ax.set_title(f"{_title(run_dir)}: {title}")
    _depth_legend(fig, ax, rec.synapses, colours)
    return save_figure(fig, out or run_dir / name)


def plot_angle_by_step(run_dir: Path, record: MonitorRecord | None = None, out: Path | None = None,
                       fmt: str = "png") -> Path:
    """Per-synapse angle between W and Bᵀ (degrees) at every recorded step."""
    run_dir = Path(run_dir)
    rec = record or load_monitor(run_dir)
    return _per_synapse_figure(run_dir, rec, rec.angle, "angle between W and Bᵀ (degrees)",
                               "forward/feedback weight alignment per synapse",
                               f"angle_w_bt_by_step.{check_format(fmt)}", _angle_limits, out, "°")


def plot_norm_ratio_by_step(run_dir: Path, record: MonitorRecord | None = None, out: Path | None = None,
                            fmt: str = "png") -> Path:
    """Per-synapse ‖Bᵀ‖/‖W‖ at every recorded step (log scale; 1 = same size)."""
    run_dir = Path(run_dir)
    rec = record or load_monitor(run_dir)

    def scale(ax, values):
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        _plain_log_axis(ax, values)

    return _per_synapse_figure(run_dir, rec, rec.norm_ratio, "‖Bᵀ‖ / ‖W‖ (ratio, log scale)",
                               "size of feedback relative to forward weights",
                               f"norm_ratio_by_step.{check_format(fmt)}", scale, out)


def _plain_log_axis(ax, values):
    """Log-scaled y axis labelled with plain numbers (0.7, 1, 2), as densely as its range allows;
    a range within a factor of two stays linear, where a log axis would show one tick."""
    v = values[np.isfinite(values) & (values > 0)]
    decades = np.log10(v.max() / v.min()) if v.size else 0.0
    if decades < 0.3:
        ax.set_ylabel(ax.get_ylabel().replace(", log scale", ""))
        return
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}")
    ax.yaxis.set_major_formatter(plain)
    if decades < 1.5:
        subs, minor = np.arange(2, 10), plain
    elif decades < 4:
        subs, minor = (2, 5), plain
    else:
        subs, minor = (2, 5), matplotlib.ticker.NullFormatter()
    ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=subs))
    ax.yaxis.set_minor_formatter(minor)


def plot_delta_angle_by_step(run_dir: Path, record: MonitorRecord | None = None, out: Path | None = None,
                             fmt: str = "png") -> Path:
    """Per-synapse delta angle (error vs backprop's error) and ΔW-vs-gradient angle, on the probe."""
    run_dir = Path(run_dir)
    rec = record or load_monitor(run_dir)
    colours = depth_colours(len(rec.synapses))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True, layout="constrained")
    _per_synapse(axes[0], rec.steps, rec.delta_angle, colours, rec.synapses, "°")
    axes[0].set_ylabel("angle to backprop's error δ (degrees)")
    axes[0].set_title("error reaching each synapse (delta angle)", fontsize=10)
    _per_synapse(axes[1], rec.steps, rec.grad_angle, colours, rec.synapses, "°")
    axes[1].set_ylabel("angle between ΔW and the true gradient (degrees)")
    axes[1].set_title("weight update of each synapse", fontsize=10)
    _angle_limits(axes[0], rec.delta_angle)
    _angle_limits(axes[1], rec.grad_angle)
    fig.suptitle(f"{_title(run_dir)}: feedback signal vs backprop on a fixed probe batch")
    _depth_legend(fig, axes, rec.synapses, colours)
    return save_figure(fig, out or run_dir / f"delta_angle_by_step.{check_format(fmt)}")


def plot_synapse_traces(run_dir: Path, record: MonitorRecord | None = None, out: Path | None = None,
                        pairs: int = 4, fmt: str = "png") -> Path:
    """Individual forward weights W_ji (solid) and their feedback partners B_ij (dashed) over
    training, for a few traced pairs of the first, middle and last monitored synapses."""
    run_dir = Path(run_dir)
    rec = record or load_monitor(run_dir)
    cols = _chosen(rec)
    fig, axes = plt.subplots(len(cols), 1, figsize=(8, 2.6 * len(cols) + 0.6), sharex=True, squeeze=False,
                             layout="constrained")
    palette = plt.get_cmap("tab10")
    marker, ms = ("o", 7) if len(rec.steps) == 1 else (_marker(len(rec.steps)), 3)
    for ax, i in zip(axes[:, 0], cols):
        name = rec.synapses[i]
        real = np.flatnonzero(rec.trace_index[i] >= 0)
        # Positions are sorted; spread the chosen pairs over them rather than take one corner of W.
        real = sorted({int(real[round(t)]) for t in np.linspace(0, len(real) - 1, min(pairs, len(real)))})
        for n, j in enumerate(real):
            steps, w, b = rec.trace(name, j)
            pos = ",".join(map(str, rec.traced_position(name, j)))
            ax.plot(steps, w, color=palette(n), lw=1.3, marker=marker, ms=ms, label=f"W[{pos}]")
            ax.plot(steps, b, color=palette(n), lw=1.3, ls="--", marker=marker if len(steps) == 1 else "",
                    ms=ms, mfc="none")
        if len(rec.steps) <= 1:
            _say_how_many(ax, rec.steps, rec.traces_w[:, i, real] if real else rec.traces_w[:, i, :0],
                          [f"W[{','.join(map(str, rec.traced_position(name, j)))}]" for j in real])
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_ylabel("weight value")
        ax.set_title(f"{name} ({rec.rules.get(name, '?')})", fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        if real:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), title="pair", title_fontsize=7)
    _step_axis(axes[-1, 0], rec.steps)
    fig.suptitle(f"{_title(run_dir)}: traced synapses — W_ji solid, its feedback partner B_ij dashed")
    return save_figure(fig, out or run_dir / f"synapse_traces.{check_format(fmt)}")


def plot_scatter(run_dir: Path, record: MonitorRecord | None = None, out: Path | None = None,
                 fmt: str = "png") -> Path:
    """W against Bᵀ for sampled pairs at each snapshot step (identity line: perfect mirror)."""
    run_dir = Path(run_dir)
    rec = record or load_monitor(run_dir)
    rows, snaps = _chosen(rec), len(rec.scatter_steps)
    fig, axes = plt.subplots(len(rows), snaps, figsize=(2.5 * snaps + 0.8, 2.5 * len(rows) + 0.7),
                             squeeze=False, sharex="row", sharey="row", layout="constrained")
    for r, i in enumerate(rows):
        w_all, b_all = rec.scatter_w[:, i], rec.scatter_b[:, i]
        lim = np.nanmax(np.abs(np.concatenate([w_all.ravel(), b_all.ravel(), [1e-12]]))) * 1.05
        for p in range(snaps):
            ax = axes[r, p]
            w, b = w_all[p], b_all[p]
            keep = np.isfinite(w) & np.isfinite(b)
            w, b = w[keep], b[keep]
            ax.scatter(w, b, s=4, alpha=0.5, color=depth_colours(len(rec.synapses))[i], linewidths=0)
            ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.8, ls="--")
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.tick_params(labelsize=6, labelleft=p == 0)
            ax.text(0.03, 0.97, f"{_sample_angle(w, b):.0f}°", transform=ax.transAxes, va="top", fontsize=8)
            if r == 0:
                ax.set_title(f"step {int(rec.scatter_steps[p])}", fontsize=9)
            if p == 0:
                ax.set_ylabel(f"{rec.synapses[i]}\nBᵀ_ji (weight)", fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("W_ji (weight)", fontsize=8)
    fig.suptitle(f"{_title(run_dir)}: forward vs feedback weight of sampled pairs (angle of the sample)")
    return save_figure(fig, out or run_dir / f"w_vs_bt_scatter.{check_format(fmt)}")


def _sample_angle(w: np.ndarray, b: np.ndarray) -> float:
    den = np.linalg.norm(w) * np.linalg.norm(b)
    if den == 0:
        return float("nan")
    return float(np.degrees(np.arccos(np.clip(np.dot(w.astype(np.float64), b) / den, -1, 1))))


def plot_sleep_effect(run_dir: Path, record: MonitorRecord | None = None, out: Path | None = None,
                      fmt: str = "png") -> Path:
    """How each sleep (mirror) phase changes the W–Bᵀ angle: before vs after, and the change over
    training. The sleep before training (step 0) is reported in the title, not plotted, as its
    large change would flatten the rest."""
    run_dir = Path(run_dir)
    rec = record or load_monitor(run_dir)
    colours = depth_colours(len(rec.synapses))
    before, after = rec.sleep_angle_before, rec.sleep_angle_after
    sleeping = [i for i in range(len(rec.synapses)) if np.isfinite(before[:, i]).any()]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    later = rec.steps > 0
    lo, hi = np.inf, -np.inf
    for i in sleeping:
        keep = np.isfinite(before[:, i]) & np.isfinite(after[:, i]) & later
        axes[0].scatter(before[keep, i], after[keep, i], s=10, color=colours[i], label=rec.synapses[i])
        if keep.any():
            lo = min(lo, before[keep, i].min(), after[keep, i].min())
            hi = max(hi, before[keep, i].max(), after[keep, i].max())
            single = int(keep.sum()) == 1
            axes[1].plot(rec.steps[keep], after[keep, i] - before[keep, i], color=colours[i], lw=1.2,
                         marker="o" if single else _marker(int(keep.sum())), ms=7 if single else 3)
    with np.errstate(invalid="ignore"):
        change = np.where(later[:, None], after - before, np.nan)
    _say_how_many(axes[1], rec.steps, change, rec.synapses, "°")
    if np.isfinite(lo):
        pad = 0.05 * max(hi - lo, 1.0)
        axes[0].plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", lw=0.8, ls="--")
    axes[0].set_xlabel("W–Bᵀ angle before the sleep (degrees)")
    axes[0].set_ylabel("W–Bᵀ angle after the sleep (degrees)")
    axes[0].set_title("each recorded sleep (below the line: sleep aligned B)", fontsize=10)
    axes[0].grid(alpha=0.3)
    axes[1].axhline(0.0, color="grey", lw=0.8)
    _step_axis(axes[1], rec.steps[np.isfinite(change).any(1)])
    axes[1].set_ylabel("angle change by the sleep (degrees)")
    axes[1].set_title("change of angle by each sleep (negative: better aligned)", fontsize=10)
    axes[1].grid(alpha=0.3)
    title = f"{_title(run_dir)}: effect of sleep on forward/feedback alignment"
    first = (rec.steps == 0) & np.isfinite(before).any(1)
    if first.any() and sleeping:
        r = int(np.flatnonzero(first)[0])
        title += (f"\nsleep before training: mean angle {np.nanmean(before[r, sleeping]):.1f}° → "
                  f"{np.nanmean(after[r, sleeping]):.1f}°")
    fig.suptitle(title)
    _depth_legend(fig, axes, [rec.synapses[i] for i in sleeping] if len(sleeping) <= 12 else rec.synapses,
               [colours[i] for i in sleeping] if len(sleeping) <= 12 else colours)
    return save_figure(fig, out or run_dir / f"sleep_effect.{check_format(fmt)}")


def plot_monitor(run_dir: Path, out_dir: Path | None = None, fmt: str = "png") -> list[Path]:
    """The figures drawn from a run's monitor files, written into ``out_dir`` (default: the
    run's directory) as ``fmt`` files (png, pdf or svg); returns the files written."""
    check_format(fmt)
    run_dir = Path(run_dir)
    folder = Path(out_dir) if out_dir is not None else run_dir
    rec = load_monitor(run_dir)
    # W–Bᵀ figures only where some synapse has a feedback matrix (under DFA none has: the
    # delta angles are its measure).
    feedback = bool(np.isfinite(rec.angle).any())
    written = [plot_angle_by_step(run_dir, rec, folder / f"angle_w_bt_by_step.{fmt}"),
               plot_norm_ratio_by_step(run_dir, rec, folder / f"norm_ratio_by_step.{fmt}")] if feedback else []
    if rec.has_probe:
        written.append(plot_delta_angle_by_step(run_dir, rec, folder / f"delta_angle_by_step.{fmt}"))
    if rec.traces_w.shape[2]:
        written.append(plot_synapse_traces(run_dir, rec, folder / f"synapse_traces.{fmt}"))
    if feedback and len(rec.scatter_steps) and rec.scatter_w.shape[2]:
        written.append(plot_scatter(run_dir, rec, folder / f"w_vs_bt_scatter.{fmt}"))
    if rec.has_sleep:
        written.append(plot_sleep_effect(run_dir, rec, folder / f"sleep_effect.{fmt}"))
    if rec.time_steps is not None and len(rec.scatter_steps) and rec.traces_w.shape[2]:
        written.append(plot_within_presentation(run_dir, rec, folder / f"within_presentation.{fmt}"))
    return written


def plot_within_presentation(run_dir: Path, record: MonitorRecord | None = None, out: Path | None = None,
                             fmt: str = "png") -> Path:
    """A run in time: for one traced pair of the first, middle and last monitored synapses, the
    presynaptic signal, the local error and the running update of W_ji (of B_ij dashed, where the
    rule learns it) against time within a presentation of the probe batch, one line per
    snapshot (early pale, late dark); the dotted line marks the stimulus's offset."""
    run_dir = Path(run_dir)
    rec = record or load_monitor(run_dir)
    if rec.time_steps is None:
        raise UserError(f"{run_dir}'s monitor holds no traces within a presentation: the run was not in time")
    cols, t, snaps = _chosen(rec), rec.time_steps, len(rec.scatter_steps)
    offset = (rec.time_settings or {}).get("duration")
    shades = plt.get_cmap("viridis")(np.linspace(0.85, 0.0, snaps)) if snaps > 1 else ["tab:blue"]
    panels = (("time_pre", "presynaptic signal x̄_i"), ("time_error", "local error δ_j"),
              ("time_update", "running ΔW_ji (ΔB_ij dashed)"))
    fig, axes = plt.subplots(len(cols), 3, figsize=(13, 2.7 * len(cols) + 0.8), sharex=True, squeeze=False,
                             layout="constrained")
    marker = "o" if len(t) <= 12 else ""
    for r, i in enumerate(cols):
        name = rec.synapses[i]
        real = np.flatnonzero(rec.trace_index[i] >= 0)
        j = int(real[0]) if len(real) else 0
        pos = ",".join(map(str, rec.traced_position(name, j))) if len(real) else "none"
        for c, (key, what) in enumerate(panels):
            ax = axes[r, c]
            for p in range(snaps):
                ax.plot(t, rec.arrays[key][p, i, j], color=shades[p], lw=1.3, marker=marker, ms=3,
                        label=f"step {int(rec.scatter_steps[p])}")
                if key == "time_update" and np.isfinite(rec.time_update_b[p, i, j]).any():
                    ax.plot(t, rec.time_update_b[p, i, j], color=shades[p], lw=1.3, ls="--")
            if offset is not None:
                ax.axvline(offset, color="grey", ls=":", lw=1.0)
            ax.axhline(0.0, color="grey", lw=0.5)
            ax.grid(alpha=0.3)
            ax.set_ylabel(what, fontsize=8)
        axes[r, 0].set_title(f"{name} ({rec.rules.get(name, '?')}), pair W[{pos}]", fontsize=9, loc="left")
    for ax in axes[-1]:
        ax.set_xlabel("time within the presentation (unit of dt)")
    axes[0, -1].legend(fontsize=7, title="snapshot", title_fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    stim = f"; stimulus off at {offset:g} (dotted)" if offset is not None else ""
    fig.suptitle(f"{_title(run_dir)}: within a presentation of the probe batch, batch means{stim}")
    return save_figure(fig, out or run_dir / f"within_presentation.{check_format(fmt)}")


# -- several runs ---------------------------------------------------------------------------------

def plot_compare(run_dirs, out: Path) -> Path:
    """Several runs side by side: test top-1 accuracy (%) and mean W–Bᵀ angle (degrees) per epoch,
    one line per run labelled by its preset. ``out`` is a directory (the file is
    ``compare_accuracy_angle.png`` in it) or a ``.png``, ``.pdf`` or ``.svg`` path, whose suffix
    is the file's format."""
    run_dirs = [Path(d) for d in run_dirs]
    runs = [(d, read_metrics(d)) for d in run_dirs]
    labels = compare_labels(run_dirs)
    palette = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    for n, ((_, records), label) in enumerate(zip(runs, labels)):
        colour = palette(n % 10)
        ls = "-" if n < 10 else "--"
        epochs = [r["epoch"] for r in records]
        axes[0].plot(epochs, [r["test_acc"] for r in records], color=colour, ls=ls, marker=_marker(len(epochs)),
                     label=label)
        angled = [r for r in records if "mean_angle" in r]
        axes[1].plot([r["epoch"] for r in angled], [r["mean_angle"] for r in angled], color=colour, ls=ls,
                     marker=_marker(len(angled)), label=label)
    axes[0].set_ylabel("test top-1 accuracy (%)")
    axes[0].set_title("accuracy", fontsize=10)
    axes[1].set_ylabel("mean angle between W and Bᵀ over synapses (degrees)")
    axes[1].set_title("forward/feedback alignment", fontsize=10)
    axes[1].set_ylim(bottom=0)
    for ax in axes:
        _epoch_axis(ax)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"comparison of {len(runs)} runs")
    out = Path(out)
    if out.suffix.lstrip(".") not in FORMATS:
        out.mkdir(parents=True, exist_ok=True)
        out = out / "compare_accuracy_angle.png"
    return save_figure(fig, out)
