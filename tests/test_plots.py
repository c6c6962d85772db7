"""Figures of runs: every expected file is a real PNG; the plotting CLI fails with one message."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neurosim.common.errors import UserError
from neurosim.models import build_resnet
from neurosim.observe.monitors import Monitor, MonitorConfig, load_monitor
from neurosim.rules import WeightMirror
from neurosim.tools.cli import main
from neurosim.tools.cli.plot import plot_run as plot_cli_entry
from neurosim.tools.figures import plot_compare, plot_monitor, plot_run, read_metrics
from neurosim.training.config import preset
from neurosim.training.run_dir import open_run

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


@pytest.mark.slow
def test_plot_cli_draws_runs_and_comparison(runs, tmp_path):
    r = plot_cli(*runs, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert is_png(tmp_path / "compare_accuracy_angle.png")
    assert f"wrote {runs[0] / 'sleep_effect.png'}" in r.stderr
    r = plot_cli(*runs, "--out", tmp_path / "cmp", cwd=tmp_path)  # with --out every figure goes there
    assert r.returncode == 0, r.stderr
    assert is_png(tmp_path / "cmp" / "compare_accuracy_angle.png")
    assert is_png(tmp_path / "cmp" / runs[0].name / "sleep_effect.png")
    assert is_png(tmp_path / "cmp" / runs[1].name / "accuracy.png")


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    ([], "usage: plot_run.py"),
    (["/no/such/run"], "no run directory /no/such/run"),
    (["."], "has no metrics.jsonl"),
    (["--colour", "red"], "unknown option --colour"),
    ([".", ".", "--out"], "option --out needs a directory"),
])
def test_plot_cli_bad_input_gives_one_message_and_exit_2(args, message, tmp_path):
    r = plot_cli(*args, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


# -- damaged files and unwritable places ----------------------------------------------------------

def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / run.name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def plot_in_process(*args, capsys):
    with pytest.raises(SystemExit) as done:
        main(plot_cli_entry, [str(a) for a in args])
    return done.value.code, capsys.readouterr().err


def _missing_angle(path: Path):
    arrays = dict(np.load(path))
    del arrays["angle"]
    np.savez(path, **arrays)


def _wrong_shape(path: Path):
    arrays = dict(np.load(path))
    arrays["traces_w"] = arrays["traces_w"][:, :1]
    np.savez(path, **arrays)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b"\x00junk" * 100), "is damaged or not a monitor file"),
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "is damaged or not a monitor file"),
    (lambda p: p.write_bytes(b""), "is damaged or not a monitor file"),
    (_missing_angle, "lacks the arrays angle"),
    (_wrong_shape, "array traces_w has shape"),
    (lambda p: (p.parent / "monitor.json").write_text("{not json"), "monitor.json is damaged: it is not JSON"),
    (lambda p: (p.parent / "monitor.json").unlink(), "has monitor.npz but not monitor.json"),
])
def test_damaged_monitor_gives_one_message_naming_the_file(runs, tmp_path, capsys, damage, message):
    run = copy_run(runs[0], tmp_path)
    damage(run / "monitor.npz")
    with pytest.raises(UserError, match=message) as e:
        load_monitor(run)
    assert str(run / "monitor") in str(e.value) or f"{run} has" in str(e.value)
    assert "allow_pickle" not in str(e.value)
    code, err = plot_in_process(run, capsys=capsys)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_metrics_line_is_named_by_its_number(runs, tmp_path, capsys):
    run = copy_run(runs[1], tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "", "{oops", lines[1]]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl line 3 is not a JSON record"):
        read_metrics(run)
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "[1, 2]", lines[1]]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl line 2 is not an epoch record"):
        read_metrics(run)
    (run / "metrics.jsonl").write_bytes(lines[0].encode() + b"\n\xff\xfe\n")
    with pytest.raises(UserError, match=r"metrics.jsonl line 2 is not text"):
        read_metrics(run)
    code, err = plot_in_process(run, capsys=capsys)
    assert code == 2 and "line 2" in err and err.count("\n") == 1


def test_partial_last_metrics_line_is_ignored(runs, tmp_path):
    run = copy_run(runs[1], tmp_path)
    whole = read_metrics(run)
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + text.splitlines()[-1][:25])  # a killed writer's half line
    assert read_metrics(run) == whole
    (run / "metrics.jsonl").write_text(text.rstrip("\n"))  # a whole last line without its newline counts
    assert read_metrics(run) == whole
    (run / "metrics.jsonl").write_text(text + "{broken\n")  # a finished bad line is an error
    with pytest.raises(UserError, match="line 3"):
        read_metrics(run)


def test_unreadable_config_keeps_the_directory_name_as_title(runs, tmp_path):
    run = copy_run(runs[1], tmp_path)
    (run / "config.json").write_text("{not json")
    assert {p.name for p in plot_run(run)} == {"angles_by_epoch.png", "accuracy.png"}


def test_unwritable_figure_leaves_no_temporary_file(runs, tmp_path, capsys):
    run = copy_run(runs[1], tmp_path)
    (run / "accuracy.png").unlink()
    (run / "accuracy.png").mkdir()  # the figure's path cannot be replaced by a file
    code, err = plot_in_process(run, capsys=capsys)
    assert code == 2 and f"cannot write figure {run / 'accuracy.png'}" in err and err.count("\n") == 1
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_plot_out_problems(runs, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    code, err = plot_in_process(*runs, "--out", blocker, capsys=capsys)
    assert code == 2 and f"--out {blocker} is a file" in err
    code, err = plot_in_process(*runs, "--out", blocker / "figs", capsys=capsys)
    assert code == 2 and err.startswith(f"error: {blocker / 'figs'}: a part of the path is a file")
    code, err = plot_in_process(runs[0], "--help", capsys=capsys)
    assert code == 0 and err == ""


def test_a_rule_without_feedback_matrices_gets_no_empty_w_bt_figures(tmp_path):
    """DFA: no W–Bᵀ angle exists; the delta angles are drawn, the W–Bᵀ figures are not."""
    from neurosim.tools.figures import plot_run
    from neurosim.training.config import preset
    from neurosim.training.run_dir import open_run

    run = open_run(tmp_path / "dfa", preset("dfa_mlp_digits", epochs=1, hidden=(16,), monitor_every=10,
                                            device="cpu"), quiet=True)
    run.train()
    names = {p.name for p in plot_run(tmp_path / "dfa")}
    assert {"accuracy.png", "delta_angle_by_step.png", "synapse_traces.png"} <= names
    assert not names & {"angles_by_epoch.png", "angle_w_bt_by_step.png", "norm_ratio_by_step.png",
                        "w_vs_bt_scatter.png"}


def test_compared_runs_of_one_preset_are_told_apart(tmp_path):
    import json

    from neurosim.tools.figures import compare_labels

    def run(path, preset, params):
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps({"preset": preset, "rule": preset.split("_")[0],
                                                      "rule_params": params}))
        return path

    dirs = [run(tmp_path / "a" / "kp", "kp_resnet18", {}), run(tmp_path / "b" / "kp", "kp_resnet18", {"decay": 0.01}),
            run(tmp_path / "c" / "kp", "kp_resnet18", {"decay": 0.01}), run(tmp_path / "wm", "wm_resnet18", {})]
    assert compare_labels(dirs) == ["kp_resnet18", "kp_resnet18 kp_decay=0.01 (b/kp)", "kp_resnet18 kp_decay=0.01 (c/kp)",
                                    "wm_resnet18"]
    # Only the settings that differ from the preset's own name a run: a sweep's legend stays short.
    own = {"sleep_before": 200, "sleep_every": 4, "sleep_batch_size": 32, "lr": 0.1}
    dirs = [run(tmp_path / "p" / "wm", "wm_resnet18", own), run(tmp_path / "q" / "wm", "wm_resnet18", {**own, "lr": 0.02}),
            run(tmp_path / "r" / "wm", "wm_resnet18", {**own, "noise": "uniform"}),
            run(tmp_path / "s" / "wm", "wm_resnet99", {**own, "lr": 0.02})]
    assert compare_labels(dirs) == ["wm_resnet18", "wm_resnet18 wm_lr=0.02", "wm_resnet18 wm_noise=uniform",
                                    "wm_resnet99"]
