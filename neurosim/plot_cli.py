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
"""


def plot_run(argv: list[str]) -> int:
    """``plot_run.py RUN_DIR [RUN_DIR ...] [--out DIR]``; returns the exit status."""
    from neurosim.plots import plot_compare, plot_run as plot_one, read_metrics

    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    dirs, out, i = [], Path("."), 0
    while i < len(argv):
        if argv[i] == "--out":
            if i + 1 >= len(argv):
                raise UserError("option --out needs a directory")
            out, i = Path(argv[i + 1]), i + 2
        elif argv[i].startswith("--"):
            raise UserError(f"unknown option {argv[i]}; options: --out DIR")
        else:
            dirs.append(Path(argv[i]))
            i += 1
    if not dirs:
        raise UserError("give at least one run directory")
    for d in dirs:  # check every run before drawing anything
        read_metrics(d)
    for d in dirs:
        for path in plot_one(d):
            print(f"wrote {path}", file=sys.stderr)
    if len(dirs) > 1:
        print(f"wrote {plot_compare(dirs, out)}", file=sys.stderr)
    return 0
