"""Command-line entry for drawing the figures of finished (or running) runs."""

from __future__ import annotations

import sys
from pathlib import Path

from neurosim.common.errors import UserError

USAGE = """usage: plot_run.py RUN_DIR [RUN_DIR ...] [--out DIR] [--format png|pdf|svg] [--html]

Draw the figures of each run into its own directory (accuracy and W–Bᵀ angle per epoch; with
monitor files also per-step angles, delta angles, synapse traces, W-vs-Bᵀ scatter and sleep
effect). With several runs, also draw them side by side (compare_accuracy_angle.png) into
the current directory.

  --out DIR    draw every figure into DIR instead, and nothing into the runs' directories
               (a read-only run, say): one run's into DIR, several runs' each into
               DIR/RUN_NAME/ beside the side-by-side figure
  --format F   the figures' file format: png (default), pdf or svg (for papers)
  --html       instead of the figures, write one self-contained HTML dashboard
               (dashboard.html: epoch curves, per-synapse heat-maps, a synapse picker
               with its curves, traced pairs and W-vs-Bᵀ scatter, the runs' facts) into
               the run's directory, or into DIR; several runs, or a study directory,
               are overlaid in one page (in the study's directory, or in the current one)
  -h, --help   this help
"""


def plot_run(argv: list[str], prog: str = "plot_run.py") -> int:
    """``plot_run.py RUN_DIR [RUN_DIR ...] [--out DIR]``; returns the exit status.

    Run it through ``neurosim.tools.cli.main`` (as ``experiments/plot_run.py`` does), which turns user
    and I/O errors into one message and exit status 2."""
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE.replace("plot_run.py", prog), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    from neurosim.tools.figures import plot_compare, read_metrics
    from neurosim.tools.figures import plot_run as plot_one
    from neurosim.tools.figures import FORMATS

    dirs, out, html, fmt, i = [], None, False, None, 0
    while i < len(argv):
        if argv[i] == "--html":
            html, i = True, i + 1
        elif argv[i] == "--format":
            if i + 1 >= len(argv) or argv[i + 1] not in FORMATS:
                got = f" {argv[i + 1]!r}" if i + 1 < len(argv) else ""
                raise UserError(f"option --format{got}: choose one of {', '.join(FORMATS)}")
            if fmt is not None:
                raise UserError("option --format is given twice; give it once")
            fmt, i = argv[i + 1], i + 2
        elif argv[i] == "--out":
            if i + 1 >= len(argv) or not argv[i + 1]:
                raise UserError("option --out needs a directory")
            out, i = Path(argv[i + 1]), i + 2
        elif argv[i].startswith("--"):
            raise UserError(f"unknown option {argv[i]}; options: --out DIR, --format png|pdf|svg, --html")
        else:
            dirs.append(Path(argv[i]))
            i += 1
    if not dirs:
        raise UserError("give at least one run directory")
    if html:
        if fmt is not None:
            raise UserError("--format sets the figures' format; --html writes a page instead: give one of them")
        print(f"wrote {write_html(dirs, out)}", file=sys.stderr)
        return 0
    for d in dirs:  # check every run before drawing anything
        read_metrics(d)
    places = [None] * len(dirs)  # where each run's figures go: None, its own directory
    if out is not None or len(dirs) > 1:  # and the folder the figures go to
        given, out = out is not None, out or Path(".")
        named = out.suffix.lstrip(".") in FORMATS and len(dirs) > 1  # a .png (.pdf, .svg) names the comparison
        if named and fmt is not None and out.suffix.lstrip(".") != fmt:
            raise UserError(f"--out {out} names a .{out.suffix.lstrip('.')} file but --format is {fmt}")
        folder = out.parent if named else out
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--out {folder} is a file; give a directory for the figures")
        folder.mkdir(parents=True, exist_ok=True)
        if given:  # every figure under --out: into it for one run, a folder each for several
            places = [folder] if len(dirs) == 1 else [folder / name for name in _folder_names(dirs)]
    for d, place in zip(dirs, places):
        try:
            if place is not None:
                place.mkdir(exist_ok=True)
            written = plot_one(d, place, fmt=fmt or "png")
        except UserError as e:
            if place is not None or "cannot write figure" not in str(e):
                raise
            raise UserError(f"{e}; --out DIR draws the figures there instead of into {d}") from None
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    if len(dirs) > 1:
        if fmt is not None and out.suffix.lstrip(".") not in FORMATS:
            out = out / f"compare_accuracy_angle.{fmt}"
        print(f"wrote {plot_compare(dirs, out)}", file=sys.stderr)
    return 0


def write_html(dirs: list[Path], out: Path | None) -> Path:
    """The dashboard of ``dirs`` (runs, or one study directory) written into ``out``, the run's
    or study's own directory, or (several runs) the current directory; returns its path."""
    from neurosim.tools.dashboard import FILE, study_runs, write_dashboard
    from neurosim.tools.figures import read_metrics

    title = None
    if len(dirs) == 1 and not (dirs[0] / "metrics.jsonl").exists():
        found = study_runs(dirs[0]) if dirs[0].is_dir() else None
        if found is not None:
            out, (dirs, title) = out or dirs[0], found
    for d in dirs:  # every run checked before anything is written
        read_metrics(d)
    if out is None:
        out = dirs[0] if len(dirs) == 1 else Path(".")
    folder = out.parent if out.suffix == ".html" else out
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file; give a directory for {FILE}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make {folder}: {e.strerror or e}") from None
    return write_dashboard(dirs, out, title=title)


def _folder_names(dirs: list[Path]) -> list[str]:
    """A folder name per run for its figures under --out: the run directory's name, with its
    parent's in front where two runs share a name, and a number where that is not enough."""
    names = [d.resolve().name for d in dirs]
    names = [f"{d.resolve().parent.name}-{n}" if names.count(n) > 1 else n for d, n in zip(dirs, names)]
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if names.count(n) == 1 else f"{n}-{seen[n]}")
    return unique
