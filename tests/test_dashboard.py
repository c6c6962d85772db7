"""The HTML dashboard of runs (``neurosim.tools.dashboard``): one self-contained file that names
every synapse and holds the synapse picker, says so where a monitor has one record, overlays
several runs labelled by the settings that differ, is written atomically, and is written by a
run after each epoch and at its end; ``plot_run.py --html`` fails with one line."""

import html
import json
import os
import re
import shutil

import numpy as np
import pytest

from neurosim.common.errors import UserError
from neurosim.observe.monitors import load_monitor
from neurosim.tools import dashboard
from neurosim.tools.cli import main
from neurosim.tools.cli.plot import plot_run as plot_cli_entry
from neurosim.tools.cli.run import run_circuit
from neurosim.tools.dashboard import FILE, RunData, run_labels, write_dashboard, write_study_dashboard
from neurosim.training.config import preset
from neurosim.training.run_dir import open_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three one-epoch digits runs: WM with a monitor (sleep columns), and two KP runs that differ
    in their learning rate, one of whose monitor holds a single record (step 0)."""
    root = tmp_path_factory.mktemp("dash")
    made = {}
    for name, cfg in (("wm", preset("wm_mlp_digits", epochs=1, device="cpu", monitor_every=2, monitor_probe=32,
                                    train_limit=128)),
                      ("kp1", preset("kp_mlp_digits", epochs=1, device="cpu", monitor_every=1000, monitor_probe=32,
                                     train_limit=64)),
                      ("kp2", preset("kp_mlp_digits", epochs=1, device="cpu", lr=0.1, monitor_every=1,
                                     monitor_probe=32, train_limit=64))):
        open_run(root / name, cfg, quiet=True).train()
        made[name] = root / name
    return made


def document(text: str) -> dict:
    """The Bokeh document embedded in a page (its JSON, as the page's script holds it)."""
    found = re.findall(r'<script type="application/json" id="[^"]*">\s*(.*?)\s*</script>', text, re.S)
    assert len(found) == 1
    return next(iter(json.loads(html.unescape(found[0])).values()))


def models_named(doc, name: str) -> list[dict]:
    out = []

    def walk(v):
        if isinstance(v, dict):
            if v.get("type") == "object" and v.get("attributes", {}).get("name") == name:
                out.append(v)
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
    walk(doc)
    return out


def test_page_is_self_contained_names_every_synapse_and_has_the_picker(runs):
    path = write_dashboard([runs["wm"]])
    assert path == runs["wm"] / FILE
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc=", text), "a script loaded from elsewhere"
    assert not re.search(r"<link[^>]*\bhref=", text), "a stylesheet loaded from elsewhere"
    assert "Bokeh" in text and len(text) < 4_000_000
    doc = document(text)
    picker = models_named(doc, "synapse_picker")
    assert len(picker) == 1 and picker[0]["name"] == "Select"
    names = list(load_monitor(runs["wm"]).synapses)
    assert picker[0]["attributes"]["options"] == names
    shown_text = json.dumps(doc, ensure_ascii=False)
    for name in names:  # in the heat-map's axis and the per-synapse data too
        assert shown_text.count(json.dumps(name)[1:-1]) >= 3
    tickers = [m for m in models_named(doc, None) if m.get("name") == "BasicTicker"
               and m.get("attributes", {}).get("min_interval") == 1]
    assert len(tickers) == 4  # the by-epoch plots: integer epochs only
    for shown in ("W–Bᵀ angle", "delta angle", "before", "traced pairs", "snapshot_slider", "wm_mlp_digits",
                  "preset", "epoch"):
        assert shown in shown_text, shown


def test_one_record_monitor_is_said_not_drawn_as_a_dot(runs):
    rec = load_monitor(runs["kp1"])
    assert len(rec.steps) == 1
    text = json.dumps(document(write_dashboard([runs["kp1"]]).read_text(encoding="utf-8")), ensure_ascii=False)
    assert "one record so far" in text and "not a trend" in text
    assert "one record so far" not in write_dashboard([runs["kp2"]]).read_text(encoding="utf-8")


def test_several_runs_overlay_labelled_by_the_settings_that_differ(runs, tmp_path):
    dirs = [runs["kp1"], runs["kp2"], runs["wm"]]
    labels = run_labels([RunData(d) for d in dirs])
    assert labels[2] == "wm_mlp_digits"
    assert "lr=0.05" in labels[0] and "lr=0.1" in labels[1] and labels[0].startswith("kp_mlp_digits")
    path = write_dashboard(dirs, tmp_path)
    text = path.read_text(encoding="utf-8")
    doc = document(text)
    toggle = models_named(doc, "run_toggle")
    assert len(toggle) == 1 and toggle[0]["attributes"]["labels"] == labels
    for n in range(3):  # each run's picked curve is in the page
        assert models_named(doc, f"picked_curve_{n}")


def test_written_atomically_a_failure_keeps_the_previous_page(runs, tmp_path, monkeypatch):
    run = tmp_path / "wm"
    shutil.copytree(runs["wm"], run, ignore=shutil.ignore_patterns(".lock", "*.pt", "*.png"))
    old = write_dashboard([run]).read_bytes()
    (run / "metrics.jsonl").write_text((runs["kp2"] / "metrics.jsonl").read_text())  # a change to draw

    def broken(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(UserError, match="disk full"):
        write_dashboard([run])
    assert (run / FILE).read_bytes() == old
    assert sorted(p.name for p in run.iterdir() if FILE in p.name) == [FILE]  # no temporary file left
    monkeypatch.undo()

    def fails(*a, **k):
        raise RuntimeError("drawing failed")
    monkeypatch.setattr(dashboard, "build", fails)
    with pytest.raises(RuntimeError):
        write_dashboard([run])
    assert (run / FILE).read_bytes() == old


def plot_in_process(*args, capsys):
    with pytest.raises(SystemExit) as done:
        main(plot_cli_entry, [str(a) for a in args])
    return done.value.code, capsys.readouterr()


def test_plot_html_writes_one_page_for_a_run_several_runs_and_a_study(runs, tmp_path, capsys):
    code, out = plot_in_process(runs["kp2"], "--html", "--out", tmp_path / "one", capsys=capsys)
    assert code in (0, None) and (tmp_path / "one" / FILE).exists() and f"wrote {tmp_path / 'one' / FILE}" in out.err
    assert not any(p.suffix == ".png" for p in (tmp_path / "one").iterdir())
    code, out = plot_in_process(runs["kp1"], runs["kp2"], "--html", "--out", tmp_path / "two", capsys=capsys)
    assert code in (0, None) and (tmp_path / "two" / FILE).exists()
    study = tmp_path / "study"
    for rule, d in (("kp", runs["kp2"]), ("wm", runs["wm"])):
        shutil.copytree(d, study / rule, ignore=shutil.ignore_patterns(".lock", "*.pt", "*.png", "*.html"))
    (study / "study.json").write_text(json.dumps({"format": 1, "model": "mlp_digits", "rules": ["kp", "wm", "fa"],
                                                  "options": {}, "runs": {}}))
    code, out = plot_in_process(study, "--html", capsys=capsys)
    assert code in (0, None), out.err
    labels = models_named(document((study / FILE).read_text(encoding="utf-8")), "run_toggle")[0]["attributes"]["labels"]
    assert labels == ["kp_mlp_digits", "wm_mlp_digits"]  # fa has not run yet: left out
    assert write_study_dashboard(study) == study / FILE
    # As a study writes it at its end: a failure is one line, and no error.
    from neurosim.tools.study.runner import study_dashboard

    (study / FILE).unlink()
    assert study_dashboard(study) == study / FILE and (study / FILE).exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "study.json").write_text((study / "study.json").read_text())
    capsys.readouterr()
    assert study_dashboard(empty) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: dashboard not written:") and "no run with metrics" in err


@pytest.mark.parametrize("args, message", [
    (["/no/such/run", "--html"], "no run directory /no/such/run"),
    ([".", "--html"], "has no metrics.jsonl"),
    (["RUN", "--html", "--out", "FILE"], "is a file; give a directory for dashboard.html"),
    (["RUN", "--html", "--colour"], "unknown option --colour"),
    (["STUDY", "--html"], "has no run with metrics yet"),
])
def test_plot_html_bad_input_exits_2_with_one_line(runs, args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "STUDY").mkdir()
    (tmp_path / "STUDY" / "study.json").write_text(json.dumps({"format": 1, "model": "mlp_digits", "rules": ["kp"],
                                                               "options": {}, "runs": {}}))
    args = [str(runs["kp2"]) if a == "RUN" else a for a in args]
    code, out = plot_in_process(*args, capsys=capsys)
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in out.err


@pytest.mark.parametrize("failing, drawn", [
    (1, [[0, 1], [0, 1, 2]]),  # the page of the last checkpoint is the finished run's: not drawn again
    (2, [[0, 1], [0, 1, 2], None]),  # the last checkpoint's failed: drawn at the end
])
def test_a_run_writes_its_dashboard_after_each_epoch_and_at_its_end(tmp_path, monkeypatch, capsys, failing, drawn):
    """Through the command line, in this process: the page at each checkpoint holds the epoch just
    finished; one that cannot be drawn is one line, and the run goes on and succeeds; at the end
    the page is drawn unless the last checkpoint's is the finished run's."""
    calls = []
    real = dashboard.write_dashboard

    def spy(run_dirs, out=None, *, records=None, title=None):
        calls.append(None if records is None else [r["epoch"] for r in records])
        if len(calls) == failing:
            raise UserError("cannot write dashboard: disk full\nsecond line")
        path = real(run_dirs, out, records=records, title=title)
        if records is not None:  # the page holds the epoch just finished, before metrics.jsonl does
            assert json.dumps(records[-1]["test_acc"]) in path.read_text(encoding="utf-8")
        return path
    monkeypatch.setattr(dashboard, "write_dashboard", spy)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        main(run_circuit, ["kp_mlp_digits", "--epochs", "2", "--train-limit", "64", "--monitor-every", "2",
                           "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert done.value.code in (0, None), err
    assert calls == drawn  # after epoch 1, after epoch 2, at the end where needed
    assert f"wrote {out / FILE}" in err
    assert err.count("note: dashboard not written: cannot write dashboard: disk full") == 1
    assert "second line" not in err
    page = json.dumps(document((out / FILE).read_text(encoding="utf-8")), ensure_ascii=False)
    assert "synapse_picker" in page and "kp_mlp_digits" in page and "--train-limit 64" in page


def test_the_page_draws_loss_accuracy_and_learning_rate_by_step(tmp_path):
    """From the monitor's probe records: the probe batch's loss and top-1 at every record step,
    and the learning rate each step trained with."""
    from neurosim.observe.monitors import load_monitor
    from neurosim.tools.dashboard import write_dashboard
    from neurosim.training.config import preset
    from neurosim.training.run_dir import open_run

    run = open_run(tmp_path / "r", preset("kp_mlp_digits", epochs=2, train_limit=128, monitor_every=2,
                                          monitor_probe=16, device="cpu", milestones=(1,), lr_gamma=0.5), quiet=True)
    run.train()
    rec = load_monitor(tmp_path / "r")
    assert np.isfinite(rec.probe_loss).all() and len(rec.probe_loss) == len(rec.steps) > 2
    page = write_dashboard([tmp_path / "r"], tmp_path / "r").read_text()
    assert "By step" in page and "probe loss" in page and "probe top-1" in page
    # The rates of both epochs are in the page's data (0.05, then halved at the milestone).
    assert "0.025" in page
