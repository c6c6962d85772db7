"""compare_rules.py: every rule trained on one model and compared in a report; a study continues
where it stopped, records the runs that fail, and refuses bad input with one message."""

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from neurosim.observe.monitor_files import load_monitor
from neurosim.tools.cli import main
from neurosim.tools.study import MACHINE_SETTINGS, RuleResult, compare_rules, epochs_done
from neurosim.training.config import RULE_NAMES
from neurosim.training.run_dir import CHANGEABLE_ON_RESUME
from neurosim.training.run_log import metrics_records

ROOT = Path(__file__).resolve().parents[1]
# The smallest study that still trains, evaluates and monitors every rule: 2 steps per run.
TINY = ["--data", "synthetic", "--synthetic-train", "64", "--synthetic-test", "32", "--hidden", "16",
        "--epochs", "1", "--monitor-every", "1", "--device", "cpu"]


def every_rule() -> list[str]:
    return ["bp", *[r for r in RULE_NAMES if r != "bp"]]


def files_and_mtimes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def table(text: str, heading: str) -> dict[str, dict[str, str]]:
    """The markdown table under ``## heading``: first cell (bold and code marks removed) -> {column: cell}."""
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    out = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0].strip("*`")] = dict(zip(head, cells))
    return out


def same_angle(cell: str, value: float | None) -> bool:
    if value is None or value != value:  # undefined (DFA): null in metrics.jsonl, NaN in older files
        return cell == "n/a"
    return cell != "n/a" and abs(float(cell) - value) <= 0.051


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A study of mlp_digits over every registered rule, made in two commands: bp and fa first, then
    the full command, which must leave those two alone. Returns (study dir, bp and fa files with
    their modification times before the second command). Its runs go inside the study's process,
    which spares each the seconds of start-up (the test below runs them in processes of their own)."""
    out = tmp_path_factory.mktemp("study") / "digits"
    assert compare_rules(["mlp_digits", *TINY, "--rules", "bp,fa", "--out", str(out), "--quiet", "--in-process"]) == 0
    before = {rule: files_and_mtimes(out / rule) for rule in ("bp", "fa")}
    assert compare_rules(["mlp_digits", *TINY, "--out", str(out), "--quiet", "--in-process"]) == 0
    return out, before


@pytest.mark.slow
def test_every_rule_trained_and_reported_with_its_runs_numbers(study):
    out, _ = study
    state = json.loads((out / "study.json").read_text())
    assert state["model"] == "mlp_digits" and state["rules"] == every_rule()
    assert {r: e["state"] for r, e in state["runs"].items()} == {r: "done" for r in every_rule()}
    report = (out / "report.md").read_text()
    results = table(report, "Results")
    angles = table(report, "W–Bᵀ angle per synapse")
    deltas = table(report, "Delta angle per synapse")
    assert list(results) == every_rule()
    bp_top1 = metrics_records(out / "bp" / "metrics.jsonl")[-1]["test_acc"]
    for rule in every_rule():
        records = metrics_records(out / rule / "metrics.jsonl")
        final, row = records[-1], results[rule]
        assert final["epoch"] == 1 and row["state"] == "done" and row["epochs"] == "1/1"
        assert row["top-1"] == f"{final['test_acc']:.2f}" and row["top-5"] == f"{final['test_top5']:.2f}"
        tail = records[1:][-3:]
        assert row["top-1 last 3"] == f"{sum(m['test_acc'] for m in tail) / len(tail):.2f}"
        best = max(records[1:], key=lambda m: m["test_acc"])
        assert row["best top-1"] == f"{best['test_acc']:.2f} ({best['epoch']})"
        if rule != "bp":
            assert float(row["vs BP"].replace("−", "-")) == pytest.approx(final["test_acc"] - bp_top1, abs=0.006)
        assert same_angle(row["mean W–Bᵀ angle (°)"], final["mean_angle"]), (rule, row)
        for synapse, angle in final["angles"].items():  # per synapse, from the last metrics record
            assert same_angle(angles[synapse][rule], angle), (rule, synapse)
        monitor = load_monitor(out / rule)  # the delta angles, from the run's monitor files
        last = max(i for i in range(len(monitor.steps)) if any(v == v for v in monitor.delta_angle[i]))
        for i, synapse in enumerate(monitor.synapses):
            assert same_angle(deltas[synapse][rule], float(monitor.delta_angle[last, i])), (rule, synapse)
        assert f"{rule}_mlp_digits --out {out / rule}" in report  # its exact command
    # rules without a feedback matrix: n/a, not a crash or a number
    assert results["dfa"]["mean W–Bᵀ angle (°)"] == "n/a"
    assert all(v == "n/a" for v in (angles[s]["dfa"] for s in angles))
    for name in ("accuracy_by_epoch", "angle_by_epoch", "angle_per_synapse", "delta_angle"):
        png = out / "figures" / f"{name}.png"
        assert f"(figures/{name}.png)" in report
        width, height = png_size(png)
        assert 400 < width <= 1300 and 300 < height <= 600, (name, width, height)  # about 100 dpi


@pytest.mark.slow
def test_finished_rules_are_not_trained_again(study):
    out, before = study
    state = json.loads((out / "study.json").read_text())
    for rule in ("bp", "fa"):
        assert files_and_mtimes(out / rule) == before[rule]  # the second command left them alone
    for rule in every_rule():
        attempts = state["runs"][rule]["attempts"]
        assert len(attempts) == 1 and attempts[0]["exit"] == 0 and "--out" in attempts[0]["command"]
        assert attempts[0]["in_process"]
        assert (out / "logs" / f"{rule}.log").read_text().count("\n$ ") == 1
    # Once more, continued by its directory on a named device (a machine setting may change):
    # nothing trains, the report is rewritten.
    everything = {rule: files_and_mtimes(out / rule) for rule in every_rule()}
    t0 = time.monotonic()
    assert compare_rules(["--resume", str(out), "--device", "cpu", "--quiet"]) == 0
    assert time.monotonic() - t0 < 30
    assert {rule: files_and_mtimes(out / rule) for rule in every_rule()} == everything
    assert json.loads((out / "study.json").read_text())["runs"] == state["runs"]


def test_machine_settings_are_ones_a_run_may_change_on_resume():
    assert set(MACHINE_SETTINGS) == set(CHANGEABLE_ON_RESUME) - {"epochs"}


@pytest.mark.slow
def test_interrupted_study_continues_its_run_and_records_a_failing_rule(tmp_path, monkeypatch, capsys):
    """Ctrl-C inside kp's run (a process of its own, as every run here): kp saves its checkpoint and
    the study stops, saying how to go on. Going on continues kp from that checkpoint; wm, given a
    sleep rate that blows up, fails, and the report says so while kp's results are there."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny runs: one thread each is as fast, and steady on a busy machine
    out = tmp_path / "study"
    args = ["mlp_digits", "--data", "synthetic", "--synthetic-train", "512", "--synthetic-test", "32",
            "--hidden", "16", "--batch-size", "8", "--lr", "0.01", "--epochs", "8", "--monitor-every", "0",
            "--device", "cpu", "--rules", "kp,wm", "--wm-lr", "1e9", "--out", str(out), "--quiet"]
    checkpoint = out / "kp" / "last.pt"
    sent, finished = threading.Event(), threading.Event()

    def interrupt():  # as a Ctrl-C at the terminal would: to the study, once kp has a checkpoint
        while not checkpoint.exists() and not finished.is_set():
            time.sleep(0.005)
        if not finished.is_set():
            os.kill(os.getpid(), signal.SIGINT)
            sent.set()

    previous = signal.signal(signal.SIGINT, lambda *_: None)  # a signal that comes too late is lost
    thread = threading.Thread(target=interrupt, daemon=True)
    try:
        thread.start()
        code = compare_rules(args)
    finally:
        finished.set()
        thread.join()
        time.sleep(0.05)
        signal.signal(signal.SIGINT, previous)
    assert sent.is_set() and code == 130
    err = capsys.readouterr().err
    assert "study interrupted: kp's run stopped with its checkpoint saved, and continues from there" in err
    assert f"Continue it with: python experiments/compare_rules.py --resume {out}" in err
    state = json.loads((out / "study.json").read_text())
    assert state["runs"]["kp"]["state"] == "interrupted" and state["runs"]["kp"]["attempts"][0]["exit"] == 130
    assert state["runs"]["wm"]["state"] == "pending" and not state["runs"]["wm"]["attempts"]  # never started
    assert checkpoint.exists() and 1 <= epochs_done(out / "kp") < 8
    kept = (out / "kp" / "metrics.jsonl").read_bytes()
    assert "interrupted" in (out / "report.md").read_text()

    assert compare_rules(["--resume", str(out), "--quiet"]) == 1  # a run failed
    state = json.loads((out / "study.json").read_text())
    kp, wm = state["runs"]["kp"], state["runs"]["wm"]
    assert kp["state"] == "done" and len(kp["attempts"]) == 2
    command = kp["attempts"][1]["command"]
    assert command[command.index("kp_mlp_digits") + 1:][:2] == ["--resume", str(out / "kp")]
    assert "--wm-lr" not in command and "--wm-lr" in wm["attempts"][0]["command"]  # a rule's own option
    assert "starting it again" not in (out / "logs" / "kp.log").read_text()
    metrics = (out / "kp" / "metrics.jsonl").read_bytes()
    assert metrics.startswith(kept) and [m["epoch"] for m in metrics_records(out / "kp" / "metrics.jsonl")] == \
        list(range(9))
    assert wm["state"] == "failed" and wm["attempts"][0]["exit"] == 2
    report = (out / "report.md").read_text()
    rows = table(report, "Results")
    final = metrics_records(out / "kp" / "metrics.jsonl")[-1]
    assert rows["kp"]["state"] == "done" and rows["kp"]["top-1"] == f"{final['test_acc']:.2f}"
    assert rows["wm"]["state"] == "failed" and rows["wm"]["top-1"] == "—"
    failures = report.split("## Failures", 1)[1].split("\n## ", 1)[0]
    assert "**wm** (exit status 2)" in failures and "training diverged" in failures and "logs/wm.log" in failures


def in_process(*args, capsys):
    with pytest.raises(SystemExit) as done:
        main(compare_rules, list(args))
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


@pytest.mark.parametrize("args, message", [
    (["resnet99"], "unknown model 'resnet99'; MODEL is one of mlp_digits"),
    (["kp_mlp_digits"], "kp_mlp_digits is a preset; a study's MODEL is a model family, here mlp_digits"),
    (["mlp_digits", "--rules", "bp,nope"], "unknown rule 'nope' in --rules; registered rules: bp, fa"),
    (["mlp_digits", "--rules", ","], "--rules names no rule"),
    (["mlp_digits", "--lrate", "1"], "unknown option --lrate"),
    (["mlp_digits", "--lr", "fast"], "bad value 'fast' for --lr"),
    (["mlp_digits", "--lr", "-1"], "lr must be positive"),
    (["mlp_digits", "--epochs"], "option --epochs needs a value"),
    (["mlp_digits", "--width", "0.5"], "--width applies to ResNets only"),
    (["mlp_digits", "--rules", "bp,fa", "--kp-decay", "0.1"], "--kp-decay applies to the kp rule only, which this "
                                                               "study does not train"),
    (["mlp_digits", "--rule", "kp"], "--rule is not for a study"),
    (["mlp_digits", "--data", "/no/such/folder"], "--data /no/such/folder: not one of digits"),
    (["mlp_digits", "--device", "mps"], "device must be auto, cpu"),
    (["mlp_digits", "extra"], "unexpected argument 'extra'"),
    (["--epochs", "3"], "give the MODEL first"),
    (["mlp_digits", "--out", "a", "--resume", "b"], "--out and --resume cannot go together"),
    (["mlp_digits", "--lr", "1", "--lr", "2"], "option --lr is given twice; give it once"),
    (["mlp_digits", "--rules", "bp", "--rules", "fa"], "option --rules is given twice; give it once"),
])
def test_bad_input_is_one_message_and_status_2(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = in_process(*args, capsys=capsys)
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []  # nothing made


def test_unusable_study_directories_are_refused(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    run = busy / "kp"
    run.mkdir()
    (run / "config.json").write_text("{}")
    cases = [(["mlp_digits", "--out", str(a_file)], "is a file"),
             (["mlp_digits", "--out", str(a_file / "sub")], "is a file, not a directory"),
             (["mlp_digits", "--out", str(busy)], "holds other files (kp, notes.txt) but no study"),
             (["--resume", str(tmp_path / "none")], "no study directory"),
             (["--resume", str(busy)], "holds no study (study.json)"),
             (["--resume", str(run)], "is a run, not a study: run_circuit.py PRESET --resume")]
    if os.geteuid() != 0:  # permissions do not bind root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((["mlp_digits", "--out", str(locked / "s")], "is not writable"))
    for args, message in cases:
        code, _, err = in_process(*args, capsys=capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["file", "busy"] + (["locked"] if os.geteuid() else []))


@pytest.mark.slow
def test_a_study_of_another_model_or_options_is_refused(study, capsys):
    out, _ = study
    kept = (out / "study.json").read_bytes()
    epochs2 = [a if a != "1" or TINY[i - 1] != "--epochs" else "2" for i, a in enumerate(TINY)]
    for args, message in [
        (["resnet18", "--out", str(out)], f"{out} holds a study of mlp_digits, not resnet18"),
        (["mlp_digits", *epochs2, "--out", str(out)], "other options: this command has --epochs 2 (the study has 1)"),
        (["mlp_digits", "--out", str(out)], "no --hidden (the study has 16)"),
        (["--resume", str(out), "--lr", "0.5"], "--lr 0.5 (the study has the preset's)"),
        (["--resume", str(out), "--kp-decay", "0.5"], "--kp-decay 0.5"),
    ]:
        code, _, err = in_process(*args, capsys=capsys)
        assert code == 2 and message in err and "--resume" in err and "Traceback" not in err, err
    assert (out / "study.json").read_bytes() == kept


def test_script_refuses_bad_input_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "compare_rules.py"), "mlp_digits", "--rules", "bp,x",
                        "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown rule 'x'") and r.stderr.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_help(capsys):
    code, out, _ = in_process("--help", capsys=capsys)
    assert code == 0 and out.startswith("usage: compare_rules.py MODEL")
    assert ",".join(every_rule()) in out.replace("\n", "").replace(" ", "")


def test_recent_mean_averages_the_last_three_trained_epochs():
    records = [{"epoch": e, "test_acc": a} for e, a in enumerate([1.0, 10.0, 20.0, 30.0, 50.0])]
    r = RuleResult(rule="kp", state="done", epochs=4, records=records, wall_s=1.0)
    assert r.recent_mean("test_acc") == pytest.approx((20 + 30 + 50) / 3)  # epoch 0 (untrained) never counts
    assert RuleResult(rule="kp", state="done", epochs=4, records=records[:3], wall_s=1.0).recent_mean(
        "test_acc") == pytest.approx(15.0)
    assert RuleResult(rule="kp", state="pending", epochs=4, records=records[:1], wall_s=None).recent_mean(
        "test_acc") is None


def test_two_names_of_one_rule_train_one_run(tmp_path, capsys):
    """``ss`` is an alias of ``usf``: a study given both trains the rule once, under the first name
    (a study holding it already keeps the name it holds); the default study names it once."""
    from neurosim.tools.study import one_name_per_rule

    assert one_name_per_rule(RULE_NAMES) == (tuple(RULE_NAMES), []) and "ss" not in every_rule()
    out = tmp_path / "study"
    assert compare_rules(["mlp_digits", *TINY, "--rules", "bp,ss,usf", "--out", str(out), "--quiet",
                          "--in-process"]) == 0
    assert "note: ss and usf name one rule (usf): the study trains it once, as ss" in capsys.readouterr().err
    state = json.loads((out / "study.json").read_text())
    assert state["rules"] == ["bp", "ss"] and set(state["runs"]) == {"bp", "ss"} and not (out / "usf").exists()
    saved = json.loads((out / "ss" / "config.json").read_text())
    assert saved["preset"] == "ss_mlp_digits" and saved["rule"] == "usf"
    kept = files_and_mtimes(out / "ss")
    assert compare_rules(["mlp_digits", *TINY, "--rules", "usf", "--out", str(out), "--quiet", "--in-process"]) == 0
    err = capsys.readouterr().err
    assert "note: this study holds the rule usf as ss: usf trains there, as ss" in err
    assert not (out / "usf").exists() and files_and_mtimes(out / "ss") == kept  # done earlier: not trained again
    assert set(table((out / "report.md").read_text(), "Results")) == {"bp", "ss"}
