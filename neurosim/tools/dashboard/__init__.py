"""One run's (or several runs') dashboard: a single self-contained HTML page, ``dashboard.html``.

Drawn with Bokeh, its JavaScript inlined (``bokeh.resources.INLINE``): the file opens offline,
with no server. It holds the epoch curves of ``metrics.jsonl`` (loss, accuracy, learning rate,
mean W–Bᵀ angle), and from the monitor files a synapse × step heat-map of every recorded
per-synapse quantity, a synapse picker (``Select`` named ``synapse_picker``) that shows the
chosen synapse's curves, its traced pairs ``(W_ji, B_ij)`` and its W-vs-Bᵀ scatter snapshots (a
``Slider`` through time), for runs in time the same pairs within a presentation of the probe
batch (``time_panel``), and the facts of each run (preset, overrides, device, versions, wall
time, command). Several runs are overlaid, toggled by name and labelled by the settings that
differ. ``write_dashboard`` writes the file atomically.
"""

from __future__ import annotations

from pathlib import Path

from neurosim.common.errors import UserError
from neurosim.common.files import describe_os_error, write_atomic
from neurosim.tools.dashboard.page import HEATMAPS, SCALARS, build
from neurosim.tools.dashboard.runs import RunData, run_labels
from neurosim.training.callbacks import Callback

FILE = "dashboard.html"
__all__ = ["FILE", "HEATMAPS", "SCALARS", "DashboardCallback", "RunData", "build", "dashboard_html",
           "draw_dashboard", "run_labels", "study_runs", "write_dashboard", "write_study_dashboard"]


def dashboard_html(runs: list[RunData], title: str | None = None) -> str:
    """The page, one self-contained HTML document (Bokeh's JavaScript inlined)."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    runs = list(runs)
    if not runs:
        raise UserError("no runs to draw")
    page_title = title or ", ".join(run_labels(runs))
    return file_html(build(runs, title), INLINE, title=f"dashboard: {page_title}"[:200])


def write_dashboard(run_dirs, out: Path | None = None, *, records: list[dict] | None = None,
                    title: str | None = None) -> Path:
    """Write the dashboard of ``run_dirs`` atomically to ``out`` (a directory, which gets
    ``dashboard.html``, or an ``.html`` path; default: the one run's directory). ``records``:
    the metrics of a single run as a running run holds them (else read from ``metrics.jsonl``)."""
    run_dirs = [Path(d) for d in run_dirs]
    runs = [RunData(d, records if len(run_dirs) == 1 else None) for d in run_dirs]
    if out is None:
        if len(run_dirs) != 1:
            raise UserError("several runs need a place for their dashboard")
        out = run_dirs[0]
    out = Path(out)
    path = out if out.suffix == ".html" else out / FILE
    text = dashboard_html(runs, title)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write dashboard {path}: {describe_os_error(e)}") from None
    write_atomic(path, text.encode("utf-8"), what="dashboard")
    return path


def study_runs(study_dir: Path) -> tuple[list[Path], str] | None:
    """The run directories of a study (``STUDY/<rule>/`` of those that have metrics) and its
    title; None when ``study_dir`` holds no study."""
    from neurosim.tools.study.report import read_study

    data = read_study(Path(study_dir))
    if data is None:
        return None
    dirs = [Path(study_dir) / r for r in data["rules"] if (Path(study_dir) / r / "metrics.jsonl").exists()]
    if not dirs:
        raise UserError(f"study {study_dir} has no run with metrics yet")
    return dirs, f"study of {data['model']}: {', '.join(d.name for d in dirs)}"


def write_study_dashboard(study_dir: Path, out: Path | None = None) -> Path:
    """The dashboard of every run of a study, overlaid: ``STUDY/dashboard.html`` (or ``out``)."""
    found = study_runs(study_dir)
    if found is None:
        raise UserError(f"{study_dir} holds no study (study.json)")
    dirs, title = found
    return write_dashboard(dirs, out if out is not None else Path(study_dir), title=title)


# -- written while a run trains --------------------------------------------------------------------

def draw_dashboard(run_dir: Path, say, records: list[dict] | None = None) -> Path | None:
    """Write a run's dashboard; a failure is told to ``say`` in one line, and never raised: a page
    that cannot be drawn is no reason to stop (or fail) a run."""
    try:
        return write_dashboard([run_dir], records=records)
    except Exception as e:  # noqa: BLE001
        text = str(e).strip().splitlines()
        say(f"note: dashboard not written: {text[0][:300] if text and text[0] else type(e).__name__}")
        return None


class DashboardCallback(Callback):
    """Rewrites a run's ``dashboard.html`` at every checkpoint, with the epoch just finished: its
    metrics from the run itself (``metrics.jsonl`` gets that epoch's line only as the checkpoint
    is committed, in the background), its monitor files as the monitor's callback, called before
    this one, has just written them."""

    def __init__(self, run, say):
        self.run, self.say = run, say
        self.drawn_at = None  # the run's (epoch, batch, step) when the page was last written

    def on_checkpoint(self, run_dir: Path) -> None:
        records = self.run.records
        page = draw_dashboard(run_dir, self.say, records=list(records) if records else None)
        self.drawn_at = self.position() if page is not None else None

    def position(self) -> tuple[int, int, int]:
        return self.run.epoch, self.run.batch, self.run.step

    def current(self) -> bool:
        """Whether the page shows the run as it stands (written at its last checkpoint, nothing
        trained since): drawing it again would write the same page."""
        return self.drawn_at is not None and self.drawn_at == self.position()
