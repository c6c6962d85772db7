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
    assert names == {"angles_by_epoch.png", "accuracy.png", "loss_lr.png", "sleep_effect.png"} | MONITOR_FIGURES
    assert all(p.parent == wm and is_png(p) for p in written)


def test_run_without_monitor_keeps_the_epoch_figures(runs):
    _, kp = runs
    assert {p.name for p in plot_run(kp)} == {"angles_by_epoch.png", "accuracy.png", "loss_lr.png"}


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
    assert {p.name for p in plot_run(run)} == {"angles_by_epoch.png", "accuracy.png", "loss_lr.png"}


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


# -- figures that never mislead -------------------------------------------------------------------

@pytest.fixture
def drawn(monkeypatch):
    """What each figure saved shows: per file, its axes' x labels, x tick labels, texts and lines."""
    from neurosim.tools import figures

    seen = {}
    real = figures.save_figure

    def save(fig, out, *args, **kwargs):
        fig.canvas.draw()
        seen[Path(out).name] = [
            {"xlabel": ax.get_xlabel(), "xticks": [t.get_text() for t in ax.get_xticklabels() if t.get_text()],
             "texts": [t.get_text() for t in ax.texts], "lines": list(ax.get_lines()), "patches": list(ax.patches)}
            for ax in fig.axes]
        return real(fig, out, *args, **kwargs)

    monkeypatch.setattr(figures, "save_figure", save)
    return seen


def test_every_epoch_axis_has_integer_ticks(runs, tmp_path, drawn):
    plot_run(runs[0], tmp_path)
    plot_compare(runs, tmp_path / "cmp.png")
    epoch_axes = {name: [ax for ax in axes if ax["xlabel"] == "epoch"] for name, axes in drawn.items()}
    for name in ("accuracy.png", "angles_by_epoch.png", "loss_lr.png", "cmp.png"):
        assert epoch_axes[name], name
        for ax in epoch_axes[name]:
            labels = ax["xticks"]
            assert labels and all(t.lstrip("−-").isdigit() for t in labels), (name, labels)  # not 0.2, 0.4, …
    assert len(epoch_axes["cmp.png"]) == 2


def test_loss_and_learning_rate_figure(runs, tmp_path, drawn):
    written = plot_run(runs[1], tmp_path)
    assert tmp_path / "loss_lr.png" in written and is_png(tmp_path / "loss_lr.png")
    loss, lr = drawn["loss_lr.png"]
    records = read_metrics(runs[1])
    test_line, train_line = loss["lines"]
    assert list(test_line.get_ydata()) == [r["test_loss"] for r in records]
    assert list(train_line.get_ydata()) == [r["train_loss"] for r in records if "train_loss" in r]
    (rates,) = [p for p in lr["patches"] if hasattr(p, "get_data")]  # the rate of each epoch, over it
    assert list(rates.get_data().values) == [records[0]["lr"]] and list(rates.get_data().edges) == [0, 1]


def one_record_monitor(tmp_path, every=10):
    from neurosim.training.run import build_circuit

    c = build_circuit(preset("kp_mlp_digits", hidden=(16,), device="cpu"), (1, 8, 8), 10)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    m = Monitor(c, MonitorConfig(every=every, probe=16, snapshots=1), 5, (x, y), F.cross_entropy)
    m.flush(tmp_path)  # step 0 only
    return load_monitor(tmp_path)


def test_a_single_record_says_so_with_a_visible_marker(tmp_path, drawn):
    rec = one_record_monitor(tmp_path)
    assert rec.steps.tolist() == [0]
    written = plot_monitor(tmp_path)
    assert {"angle_w_bt_by_step.png", "norm_ratio_by_step.png", "delta_angle_by_step.png",
            "synapse_traces.png"} <= {p.name for p in written}
    for name in ("angle_w_bt_by_step.png", "norm_ratio_by_step.png", "delta_angle_by_step.png",
                 "synapse_traces.png"):
        for ax in [a for a in drawn[name] if a["lines"]]:
            texts = [t for t in ax["texts"] if t.startswith("one record (step 0): ")]
            assert texts, (name, ax["texts"])
            shown = [ln for ln in ax["lines"] if len(ln.get_xdata()) == 1]
            assert shown and all(ln.get_marker() == "o" and ln.get_markersize() >= 6 for ln in shown), name
    text = next(t for ax in drawn["angle_w_bt_by_step.png"] for t in ax["texts"])
    assert text == "one record (step 0): " + ", ".join(f"{n} {v:.3g}°" for n, v in zip(rec.synapses, rec.angle[0]))


def test_a_figure_without_records_says_none(tmp_path, drawn):
    from neurosim.tools.figures import plot_delta_angle_by_step

    rec = one_record_monitor(tmp_path)
    arrays = {k: v for k, v in rec.arrays.items()}
    arrays["delta_angle"] = np.full_like(arrays["delta_angle"], np.nan)
    none = attrs_evolve(rec, arrays=arrays)
    plot_delta_angle_by_step(tmp_path, none, tmp_path / "d.png")
    assert "no records with a value" in drawn["d.png"][0]["texts"]


def attrs_evolve(record, **changes):
    import attrs

    return attrs.evolve(record, **changes)


@pytest.mark.parametrize("fmt, header", [("pdf", (b"%PDF",)), ("svg", (b"<?xml", b"<svg"))])
def test_figures_in_pdf_and_svg(runs, tmp_path, fmt, header):
    (tmp_path / fmt).mkdir()
    written = plot_run(runs[0], tmp_path / fmt, fmt=fmt)
    assert {p.name for p in written} == {n.replace(".png", f".{fmt}") for n in (
        "angles_by_epoch.png", "accuracy.png", "loss_lr.png", "sleep_effect.png", *MONITOR_FIGURES)}
    for p in written:
        assert p.suffix == f".{fmt}" and p.read_bytes().startswith(header) and p.stat().st_size > 1000, p
    if fmt == "svg":
        assert all(b"<svg" in p.read_bytes()[:2000] for p in written)
    out = plot_compare(runs, tmp_path / f"compare.{fmt}")
    assert out == tmp_path / f"compare.{fmt}" and out.read_bytes().startswith(header)
    assert not list((tmp_path / fmt).glob("*.png"))


def test_an_unknown_format_is_refused_naming_the_choices(runs, tmp_path):
    from neurosim.tools.figures import plot_accuracy

    for call in (lambda: plot_run(runs[0], tmp_path, fmt="jpg"), lambda: plot_monitor(runs[0], tmp_path, fmt="PNG"),
                 lambda: plot_accuracy(runs[0], fmt="eps")):
        with pytest.raises(ValueError, match="choose one of png, pdf, svg"):
            call()
    assert not list(tmp_path.iterdir())  # refused before anything was drawn


def test_the_command_draws_every_figure_in_the_format_asked(runs, tmp_path, capsys):
    """``--format pdf``: every figure of each run and the side-by-side one as PDF files; a bad or
    repeated value, or --format with --html, is one message and exit 2 with nothing drawn."""
    out = tmp_path / "pdf"
    code, err = plot_in_process(*runs[:2], "--out", out, "--format", "pdf", capsys=capsys)
    drawn = sorted(out.rglob("*.*"))
    assert code == 0 and drawn and all(p.suffix == ".pdf" for p in drawn), drawn
    assert (out / "compare_accuracy_angle.pdf").read_bytes().startswith(b"%PDF")
    for args, said in [(["--format", "jpg"], "choose one of png, pdf, svg"), (["--format"], "choose one of"),
                       (["--format", "svg", "--format", "pdf"], "given twice"),
                       (["--format", "svg", "--html"], "give one of them")]:
        bad = tmp_path / "bad"
        code, err = plot_in_process(runs[0], "--out", bad, *args, capsys=capsys)
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err
        assert not bad.exists()
