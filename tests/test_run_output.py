"""What a run says: one header line, the circuit behind --verbose, progress on a terminal and in
a log, nothing with --quiet, one-line warnings, and the record of how it was made (run.json,
log.txt)."""

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import neurosim.common.console
import neurosim.training.run_log
from neurosim.common.console import Console
from neurosim.tools.cli import main, run_circuit
from neurosim.training.run_log import RunLog

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--hidden", "8", "--train-limit", "96", "--monitor-every", "0", "--device", "cpu"]


def in_process(*args, capsys, entry=run_circuit):
    with pytest.raises(SystemExit) as done:
        main(entry, [str(a) for a in args])
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


class Clock:
    """``time.perf_counter`` for the console and the run log, moved by hand."""

    def __init__(self, monkeypatch, now=0.0):
        self.now = now
        for module in (neurosim.common.console, neurosim.training.run_log):
            monkeypatch.setattr(module.time, "perf_counter", lambda: self.now)


class Terminal(io.StringIO):
    def isatty(self):
        return True


# -- what a run prints -----------------------------------------------------------------------------

def test_a_run_starts_with_one_header_line(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = in_process("kp_mlp_digits", *TINY, "--out", out, capsys=capsys)
    assert code == 0, err
    header = err.splitlines()[0]
    assert re.fullmatch(r"kp_mlp_digits on cpu \(\d+ threads?\): [\d,]+ weights \+ [\d,]+ feedback, digits \(96 "
                        r"training \+ 360 test images, 1×8×8, 10 classes\), 1 epoch of 3 steps -> " + re.escape(str(out)),
                        header), header
    assert "Circuit(" not in err and "synapses:" not in err
    assert stdout.startswith("final: test top-1")


def test_verbose_shows_the_circuit(tmp_path, capsys):
    code, _, err = in_process("kp_mlp_digits", *TINY, "--verbose", "--out", tmp_path / "run", capsys=capsys)
    assert code == 0 and "Circuit(" in err and "synapses:" in err and "x -> h1, dense 64->8" in err


def test_quiet_prints_nothing_and_the_log_keeps_it_all(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = in_process("kp_mlp_digits", *TINY, "--log-every", "1", "--quiet", "--out", out, capsys=capsys)
    assert code == 0 and stdout == "" and err == ""
    lines = (out / "log.txt").read_text().splitlines()
    assert lines[0].startswith("kp_mlp_digits on cpu")
    progress = [line for line in lines if line.startswith("epoch 1/1 [")]
    assert [line.split("]")[0] for line in progress] == ["epoch 1/1 [1/3", "epoch 1/1 [2/3", "epoch 1/1 [3/3"]
    assert all(re.search(r"img/s  ETA epoch \d+:\d\d:\d\d, run \d+:\d\d:\d\d$", line) for line in progress)
    assert any(line.startswith("epoch 1/1  train loss") for line in lines)
    assert lines[-1].startswith("final: test top-1")


def test_progress_lines_in_a_file_are_whole_lines(tmp_path, capsys):
    code, _, err = in_process("kp_mlp_digits", *TINY, "--log-every", "1", "--out", tmp_path / "run", capsys=capsys)
    assert code == 0 and "\r" not in err
    assert len([line for line in err.splitlines() if line.startswith("epoch 1/1 [")]) == 3


def test_a_failed_start_leaves_an_empty_out_empty(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = in_process("kp_mlp_digits", *TINY, "--data", tmp_path / "no_such_folder", "--out", empty,
                              capsys=capsys)
    assert code == 2 and list(empty.iterdir()) == []


# -- the record of the run -------------------------------------------------------------------------

def test_the_run_records_how_it_was_made(tmp_path, capsys):
    out = tmp_path / "run"
    assert in_process("kp_mlp_digits", *TINY, "--quiet", "--out", out, capsys=capsys)[0] == 0
    code, stdout, err = in_process("--resume", out, "--epochs", "2", capsys=capsys)
    assert code == 0, err
    first, second = json.loads((out / "run.json").read_text())["starts"]
    assert first["arguments"] == ["kp_mlp_digits", *TINY, "--quiet", "--out", str(out)]
    assert second["arguments"] == ["--resume", str(out), "--epochs", "2"]
    assert first["at"] == {"epoch": 0, "batch": 0} and second["at"] == {"epoch": 1, "batch": 0}
    for start in (first, second):
        assert start["command"].startswith(sys.executable) and start["cwd"]
        assert start["versions"]["torch"] == torch.__version__ and start["versions"]["python"] == \
            ".".join(map(str, sys.version_info[:3]))
        assert start["versions"]["neurosim"]
        assert start["threads"] == torch.get_num_threads() and start["device"] == "cpu" and start["device_name"]
        assert start["processes"] == 1
        commit = start["git"]["commit"]
        assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    if (ROOT / ".git").exists() and subprocess.run(["git", "--version"], capture_output=True).returncode == 0:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert first["git"]["commit"] == head.stdout.strip()
    # the log: what both starts printed, the second after the first
    log = (out / "log.txt").read_text().splitlines()
    headers = [i for i, line in enumerate(log) if line.startswith("kp_mlp_digits on cpu")]
    assert len(headers) == 2 and "2 epochs of 3 steps, from epoch 2 ->" in log[headers[1]]
    assert [line.split("  ")[0] for line in log if "  train loss" in line] == ["epoch 1/1", "epoch 2/2"]
    assert all(line in err or line in stdout for line in log[headers[1]:])  # the log holds what was printed


def test_git_absent_is_no_commit(monkeypatch, tmp_path):
    from neurosim.training import run_record
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(run_record.subprocess, "run", no_git)
    assert run_record.git_state() == {"commit": None, "modified": None}
    assert run_record.git_state(tmp_path) == {"commit": None, "modified": None}


# -- progress --------------------------------------------------------------------------------------

def test_a_terminal_gets_one_line_redrawn_and_the_log_periodic_lines(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")  # the directory holds a run: its log is written
    clock = Clock(monkeypatch)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    console = Console(tmp_path / "log.txt")
    for t, done in [(0, 0), (0.2, 10), (0.6, 100), (6, 500), (7, 600), (20, 700), (40, 900), (41, 1000)]:
        clock.now = t
        console.report("decoding 1,000 images of x", done, 1000, " images")
    log = (tmp_path / "log.txt").read_text().splitlines()
    assert log == ["decoding 1,000 images of x: 500/1,000 images (50%), ETA 0:00:06",
                   "decoding 1,000 images of x: 900/1,000 images (90%), ETA 0:00:04",
                   "decoding 1,000 images of x: done in 0:00:41"]
    shown = terminal.getvalue()
    assert "\n" not in shown and shown.count("\r") == 5 + 2  # redrawn at 0.6, 6, 7, 20 and 40 s, then cleared
    assert "\r" + " " * len("decoding 1,000 images of x: 900/1,000 images (90%), ETA 0:00:04") + "\r" in shown


def test_a_file_gets_no_line_for_short_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.json").write_text("{}")
    clock = Clock(monkeypatch)
    console = Console(tmp_path / "log.txt")
    for t, done in [(0, 0), (1, 5), (3, 10)]:
        clock.now = t
        console.report("evaluating the test split", done, 10, " batches")
    assert capsys.readouterr().err == "" and not (tmp_path / "log.txt").exists()
    console.report("caching the decoded images in c.npz (150 MB)", 0, 1)  # one step: said as it starts
    assert capsys.readouterr().err == "caching the decoded images in c.npz (150 MB) …\n"


def test_the_eta_counts_the_rest_of_the_run_with_its_evaluations(tmp_path, monkeypatch):
    clock = Clock(monkeypatch)
    log = RunLog(tmp_path, quiet=True)
    log.evaluating(0, 4)
    clock.now = 10.0
    log.evaluating(4, 4)  # an evaluation takes 10 s
    log.start_epoch(0, 100.0)
    clock.now = 110.0  # 10 batches in 10 s
    line, eta = log.progress(0, 3, 10, 20, torch.tensor([20.0, 8.0], dtype=torch.float64), 16, 16)
    assert eta == 10 + 2 * 20 + 3 * 10  # this epoch, two more, and three evaluations
    assert line == "epoch 1/3 [10/20] loss 1.2500 acc 50.00% 16 img/s  ETA epoch 0:00:10, run 0:01:20"


def test_a_run_longer_than_a_day_says_so_once(tmp_path, monkeypatch, capsys):
    clock = Clock(monkeypatch)
    log = RunLog(tmp_path)
    log.slow_hint = "kp_resnet18 at these settings is a job for a GPU"
    log.start_epoch(0, 0.0)
    stats = torch.zeros(2, dtype=torch.float64)
    for batch in range(1, 4):
        clock.now = 10.0 * batch  # a batch every 10 s: 200 epochs of 391 batches take 9 days
        log.after_batch(0, 200, batch, 391, stats, batch * 128, 128, 1)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and re.fullmatch(r"note: at this pace the whole run takes 9d \d:\d\d:\d\d; kp_resnet18 "
                                            r"at these settings is a job for a GPU", notes[0]), notes


def test_evaluation_reports_its_progress(tmp_path):
    from neurosim.training.config import preset
    from neurosim.training.run_dir import open_run

    run = open_run(tmp_path / "run", preset("bp_mlp_digits", hidden=(8,), monitor_every=0, device="cpu"),
                   quiet=True)
    try:
        calls = []
        run.log.evaluating = lambda done, total: calls.append((done, total))
        run.evaluate()
    finally:
        run.lock.release()
    total = len(run.test_stream)
    assert calls == [(i, total) for i in range(total + 1)]


def test_decoding_and_caching_report_progress(tmp_path):
    from neurosim.data import load_dataset
    from tests.test_data import _write_tree

    _write_tree(tmp_path / "tree", {"a": 5, "b": 7})
    calls = []
    load_dataset(str(tmp_path / "tree"), data_dir=tmp_path / "data", progress=lambda *a: calls.append(a))
    decoding = [c for c in calls if c[0].startswith("decoding 12 images of ")]
    assert decoding and decoding[-1][1:] == (12, 12, " images")
    caching = [c for c in calls if c[0].startswith("caching the decoded images in ")]
    assert [c[1:] for c in caching] == [(0, 1, ""), (1, 1, "")] and str(tmp_path / "data" / "cache") in caching[0][0]
    again = []
    load_dataset(str(tmp_path / "tree"), data_dir=tmp_path / "data", progress=lambda *a: again.append(a))
    assert again == []  # read from the cache: nothing to decode


# -- warnings --------------------------------------------------------------------------------------

def test_a_checksum_mismatch_is_one_warning_line(tmp_path):
    from tests.test_cifar import write_cifar

    write_cifar(tmp_path / "data", "cifar10")  # tiny files: their md5 is not the official one
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "run_circuit.py"), "kp_mlp_digits", "--data",
                           "cifar10", "--data-dir", str(tmp_path / "data"), "--hidden", "8", "--epochs", "1",
                           "--batch-size", "8", "--monitor-every", "0", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    said = [line for line in done.stderr.splitlines() if "warning" in line.lower()]
    assert len(said) == 1 and said[0].startswith("warning: cifar10: ") and "md5" in said[0], done.stderr
    assert "UserWarning" not in done.stderr and ".py:" not in done.stderr
    assert said[0] in (out / "log.txt").read_text().splitlines()


def test_main_prints_a_warning_as_one_line():
    code = ("import warnings\n"
            "from neurosim.tools.cli import main\n"
            "def entry(argv):\n"
            "    warnings.warn('something is\\n   odd here')\n"
            "    return 0\n"
            "main(entry, [])\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "warning: something is odd here\n"
