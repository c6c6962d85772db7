"""Command-line entry for drawing the figures of finished (or running) runs."""

from __future__ import annotations

import sys
from pathlib import Path

from neurosim.errors import UserError

USAGE = """usage: plot_run.py RUN_DIR [RUN_DIR ...] [--out DIR]

Draw the figures of each run into its own directory (accuracy and W–Bᵀ angle per epoch; with
monitor files also per-step angles, delta angles, synapse traces, W-vs-Bᵀ scatter and sleep
effect). With several runs, also draw them side by side (compare_accuracy_angle.png) into
--out DIR (default: the current directory).

  --out DIR    where the side-by-side figure of several runs goes
  -h, --help   this help
"""


def plot_run(argv: list[str], prog: str = "plot_run.py") -> int:
    """``plot_run.py RUN_DIR [RUN_DIR ...] [--out DIR]``; returns the exit status.

    Run it through ``neurosim.cli.main`` (as ``experiments/plot_run.py`` does), which turns user
    and I/O errors into one message and exit status 2."""
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE.replace("plot_run.py", prog), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    from neurosim.plots import plot_compare, plot_run as plot_one, read_metrics
    dirs, out, i = [], None, 0
    while i < len(argv):
        if argv[i] == "--out":
            if i + 1 >= len(argv) or not argv[i + 1]:
                raise UserError("option --out needs a directory")
            out, i = Path(argv[i + 1]), i + 2
        elif argv[i].startswith("--"):
            raise UserError(f"unknown option {argv[i]}; options: --out DIR")
        else:
            dirs.append(Path(argv[i]))
            i += 1
    if not dirs:
        raise UserError("give at least one run directory")
    if out is not None and len(dirs) == 1:
        raise UserError(f"--out is where the side-by-side figure of several runs goes; the figures of one run "
                        f"are written into its own directory ({dirs[0]}). Give more runs, or leave out --out")
    for d in dirs:  # check every run before drawing anything
        read_metrics(d)
    if len(dirs) > 1:  # and the comparison's folder
        out = out or Path(".")
        folder = out.parent if out.suffix == ".png" else out  # a .png path names the figure itself
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--out {folder} is a file; give a directory for compare_accuracy_angle.png")
        folder.mkdir(parents=True, exist_ok=True)
    for d in dirs:
        for path in plot_one(d):
            print(f"wrote {path}", file=sys.stderr)
    if len(dirs) > 1:
        print(f"wrote {plot_compare(dirs, out)}", file=sys.stderr)
    return 0
