"""Figures of a run, drawn from its files with matplotlib (no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    """The per-epoch records of ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def depth_colours(n: int):
    """One colour per synapse, shallow to deep along a sequential map (readable at ResNet depth)."""
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _depth_legend(fig, ax, names, colours):
    if len(names) <= 12:
        ax.legend(fontsize=7, ncol=1 if len(names) <= 6 else 2)
        return
    sm = matplotlib.cm.ScalarMappable(cmap="viridis", norm=matplotlib.colors.Normalize(0, len(names) - 1))
    bar = fig.colorbar(sm, ax=ax)
    bar.set_label(f"synapse depth (0 = {names[0]}, {len(names) - 1} = {names[-1]})")


def plot_epoch_angles(run_dir: Path, out: Path | None = None) -> Path:
    """Per-synapse angle between W and Bᵀ (degrees) at the end of every epoch."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    names = list(records[0]["angles"])
    colours = depth_colours(len(names))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    epochs = [r["epoch"] for r in records]
    for name, colour in zip(names, colours):
        ax.plot(epochs, [r["angles"][name] for r in records], color=colour, label=name, marker=".")
    ax.set_xlabel("epoch")
    ax.set_ylabel("angle between W and Bᵀ (degrees)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{_title(run_dir)}: forward/feedback alignment per synapse")
    ax.grid(alpha=0.3)
    _depth_legend(fig, ax, names, colours)
    out = out or run_dir / "angles_by_epoch.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_accuracy(run_dir: Path, out: Path | None = None) -> Path:
    """Train and test top-1 accuracy (percent) per epoch."""
    run_dir = Path(run_dir)
    records = [r for r in read_metrics(run_dir)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["epoch"] for r in records], [r["test_acc"] for r in records], marker=".", label="test top-1")
    tr = [r for r in records if "train_acc" in r]
    ax.plot([r["epoch"] for r in tr], [r["train_acc"] for r in tr], marker=".", label="train top-1 (running)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{_title(run_dir)}: accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    out = out or run_dir / "accuracy.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _title(run_dir: Path) -> str:
    cfg = Path(run_dir) / "config.json"
    if cfg.exists():
        return json.loads(cfg.read_text()).get("preset", run_dir.name)
    return run_dir.name


def plot_run(run_dir: Path) -> list[Path]:
    """Every figure of one run; returns the files written."""
    return [plot_epoch_angles(run_dir), plot_accuracy(run_dir)]
