"""Figures of runs: every expected file is a real PNG; the plotting CLI fails with one message."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from neurosim.config import preset
from neurosim.errors import UserError
from neurosim.models import build_resnet
from neurosim.monitors import Monitor, MonitorConfig, load_monitor
from neurosim.plots import plot_compare, plot_monitor, plot_run
from neurosim.rules import WeightMirror
from neurosim.train import open_run

ROOT = Path(__file__).resolve().parents[1]
MONITOR_FIGURES = {"angle_w_bt_by_step.png", "norm_ratio_by_step.png", "delta_angle_by_step.png",
                   "synapse_traces.png", "w_vs_bt_scatter.png"}


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two one-epoch digits runs: WM with a monitor, KP without."""
    root = tmp_path_factory.mktemp("runs")
    wm = open_run(root / "wm", preset("wm_mlp_digits", epochs=1, device="cpu", monitor_every=5, monitor_probe=64),
                  quiet=True)
    wm.train()
    kp = open_run(root / "kp", preset("kp_mlp_digits", epochs=1, device="cpu", monitor_every=0), quiet=True)
    kp.train()
    return root / "wm", root / "kp"


def test_monitored_run_writes_files_and_every_figure(runs):
    wm, _ = runs
    rec = load_monitor(wm)
    assert rec.steps[0] == 0 and rec.steps[-1] == rec.total_steps - rec.total_steps % 5
    assert rec.has_probe and rec.has_sleep
    written = plot_run(wm)
    names = {p.name for p in written}
    assert names == {"angles_by_epoch.png", "accuracy.png", "sleep_effect.png"} | MONITOR_FIGURES
    assert all(p.parent == wm and is_png(p) for p in written)


def test_run_without_monitor_keeps_the_epoch_figures(runs):
    _, kp = runs
    assert {p.name for p in plot_run(kp)} == {"angles_by_epoch.png", "accuracy.png"}


def test_deep_circuit_figures_without_sleep(tmp_path):
    c = build_resnet("resnet18", WeightMirror(), 10, (3, 8, 8), width=0.0625)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    m = Monitor(c, MonitorConfig(every=1, probe=16, snapshots=2), 2, (x, y), F.cross_entropy)
    opt = torch.optim.SGD(c.engaged_parameters(), lr=0.05)
    for step in (1, 2):
        opt.zero_grad()
        F.cross_entropy(c(x), y).backward()
        opt.step()
        m.after_step(step)
    m.flush(tmp_path)
    written = plot_monitor(tmp_path)  # no sleep recorded: no sleep figure
    assert {p.name for p in written} == MONITOR_FIGURES and all(is_png(p) for p in written)


def test_compare_runs(runs, tmp_path):
    out = plot_compare(runs, tmp_path / "figs")
    assert out == tmp_path / "figs" / "compare_accuracy_angle.png" and is_png(out)
    with pytest.raises(UserError, match="has no metrics.jsonl"):
        plot_compare([runs[0], tmp_path], tmp_path)


def plot_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "plot_run.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_plot_cli_draws_runs_and_comparison(runs, tmp_path):
    r = plot_cli(*runs, "--out", tmp_path / "cmp", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert is_png(tmp_path / "cmp" / "compare_accuracy_angle.png")
    assert f"wrote {runs[0] / 'sleep_effect.png'}" in r.stderr


@pytest.mark.parametrize("args, message", [
    ([], "usage: plot_run.py"),
    (["/no/such/run"], "no run directory /no/such/run"),
    (["."], "has no metrics.jsonl"),
    (["--colour", "red"], "unknown option --colour"),
])
def test_plot_cli_bad_input_gives_one_message_and_exit_2(args, message, tmp_path):
    r = plot_cli(*args, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
