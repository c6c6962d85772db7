"""compare_rules.py --combine: studies that differ only in their seed, combined into one report whose
numbers are the seeds' own (means, ranges, gaps to bp paired seed by seed, angles averaged); studies
that differ in more than the seed are refused with one message."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from neurosim.observe.monitor_files import load_monitor
from neurosim.tools.cli import main
from neurosim.tools.study import compare_rules
from neurosim.training.run_log import metrics_records

# Two epochs, so that a run's best epoch may differ from its last.
TINY = ["--data", "synthetic", "--synthetic-train", "64", "--synthetic-test", "32", "--hidden", "16",
        "--epochs", "2", "--monitor-every", "1", "--device", "cpu"]


def table(text: str, heading: str) -> dict[str, dict[str, str]]:
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    return {cells[0].strip("*`"): dict(zip(head, cells))
            for cells in ([c.strip() for c in line.strip("|").split("|")] for line in rows[2:])}


def number(text: str) -> float:
    return float(text.replace("−", "-"))


def spread(cell: str) -> tuple[float, float, float]:
    """``mean (min–max)`` → the three numbers."""
    mean, rest = cell.split(" (")
    low, high = rest.rstrip(")").split("–")
    return float(mean), float(low), float(high)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Three studies of mlp_digits: seeds 0 and 1 with bp, fa and kp; seed 2 with bp only."""
    root = tmp_path_factory.mktemp("seeds")
    for seed, rules in ((0, "bp,fa,kp"), (1, "bp,fa,kp"), (2, "bp")):
        assert compare_rules(["mlp_digits", *TINY, "--seed", str(seed), "--rules", rules,
                              "--out", str(root / f"s{seed}"), "--quiet", "--in-process"]) == 0
    return root


def run(*args, capsys):
    with pytest.raises(SystemExit) as done:
        main(compare_rules, list(args))
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def test_the_combined_report_holds_the_seeds_own_numbers(seeds, capsys):
    out = seeds / "combined.md"
    code, _, err = run("--combine", str(seeds / "s0"), str(seeds / "s1"), "--out", str(out), capsys=capsys)
    assert code == 0, err
    text = out.read_text()
    rows = table(text, "Results over the seeds")
    per_seed = table(text, "Final top-1 per seed")
    angles = table(text, "W–Bᵀ angle per synapse")
    deltas = table(text, "Delta angle per synapse")
    assert list(rows) == ["bp", "fa", "kp"]
    records = {(rule, s): metrics_records(seeds / f"s{s}" / rule / "metrics.jsonl") for rule in ("bp", "fa", "kp")
               for s in (0, 1)}
    for rule in ("bp", "fa", "kp"):
        finals = [records[rule, s][-1] for s in (0, 1)]
        row = rows[rule]
        assert row["seeds finished"] == "2/2"
        for column, key in (("final top-1", "test_acc"), ("final top-5", "test_top5")):
            values = [f[key] for f in finals]
            mean, low, high = spread(row[column])
            assert mean == pytest.approx(sum(values) / 2, abs=0.006)
            assert (low, high) == pytest.approx((min(values), max(values)), abs=0.006)
        best = [max(r["test_acc"] for r in records[rule, s][1:]) for s in (0, 1)]
        assert spread(row["best top-1"])[0] == pytest.approx(sum(best) / 2, abs=0.006)
        for s in (0, 1):
            assert per_seed[rule][f"seed {s}"] == f"{finals[s]['test_acc']:.2f}"
        if rule != "bp":  # paired: each seed's rule minus the same seed's bp
            gaps = [records[rule, s][-1]["test_acc"] - records["bp", s][-1]["test_acc"] for s in (0, 1)]
            mean, rest = row["vs BP (points)"].split(" (")
            low, high = rest.rstrip(")").split(" to ")
            assert number(mean) == pytest.approx(sum(gaps) / 2, abs=0.006)
            assert (number(low), number(high)) == pytest.approx((min(gaps), max(gaps)), abs=0.006)
            for synapse in finals[0]["angles"]:
                want = sum(f["angles"][synapse] for f in finals) / 2
                assert float(angles[synapse][rule]) == pytest.approx(want, abs=0.051)
            assert float(row["mean W–Bᵀ angle (°)"]) == pytest.approx(sum(f["mean_angle"] for f in finals) / 2,
                                                                      abs=0.051)
    for rule in ("fa", "kp"):  # from each seed's monitor file, at its last probed step
        monitors = [load_monitor(seeds / f"s{s}" / rule) for s in (0, 1)]
        for i, synapse in enumerate(monitors[0].synapses):
            last = [float(m.delta_angle[-1, i]) for m in monitors]
            assert float(deltas[synapse][rule]) == pytest.approx(sum(last) / 2, abs=0.051), (rule, synapse)
    assert "Not counted" not in text
    png = seeds / "combined_accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "(combined_accuracy.png)" in text


def test_a_rule_a_seed_did_not_finish_is_named_and_left_out(seeds, capsys):
    code, out, err = run("--combine", str(seeds / "s0"), str(seeds / "s2"), capsys=capsys)
    assert code == 0, err
    rows = table(out, "Results over the seeds")
    assert rows["bp"]["seeds finished"] == "2/2" and rows["fa"]["seeds finished"] == "1/2"
    fa0 = metrics_records(seeds / "s0" / "fa" / "metrics.jsonl")[-1]["test_acc"]
    assert rows["fa"]["final top-1"] == f"{fa0:.2f}"  # the one seed that finished: its value alone
    assert "fa seed 2 (not in the study)" in out and "kp seed 2 (not in the study)" in out
    assert table(out, "Final top-1 per seed")["fa"]["seed 2"] == "—"


def study_with(seeds: Path, path: Path, *changes):
    """A copy of study.json of ``seeds``' seed 0 in ``path`` with its options changed (the runs are not needed
    for the refusal, which comes before any run is read)."""
    path.mkdir()
    data = json.loads((seeds / "s0" / "study.json").read_text())
    for key, value in changes:
        data["options"][key] = value
    (path / "study.json").write_text(json.dumps(data))
    return path


def test_studies_that_differ_in_more_than_the_seed_are_refused(seeds, tmp_path, capsys):
    other_lr = study_with(seeds, tmp_path / "lr", ("seed", "5"), ("lr", "0.5"))
    other_model = tmp_path / "model"
    other_model.mkdir()
    data = json.loads((seeds / "s0" / "study.json").read_text())
    data["model"] = "resnet18"
    (other_model / "study.json").write_text(json.dumps(data))
    s0, s1 = str(seeds / "s0"), str(seeds / "s1")
    cases = [
        ([s0], "--combine needs two or more study directories"),
        ([s0, s0], "names one study directory twice"),
        ([s0, str(other_lr)], "the studies differ in more than the seed (--lr the preset's in"),
        ([s0, str(other_model)], "the studies are of different models"),
        ([s0, str(seeds / "s0" / "bp")], "holds no study (study.json)"),
        ([s0, str(tmp_path / "none")], "no study directory"),
        ([s0, s1, "--out", str(tmp_path)], "is a directory"),
        ([s0, s1, "--out", str(tmp_path / "r.txt")], "give a file ending in .md"),
        ([s0, s1, "--out", str(tmp_path / "no" / "r.md")], "does not exist; make it first"),
        ([s0, s1, "--out"], "option --out needs a value"),
        ([s0, s1, "--lr", "1"], "unknown option --lr with --combine"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in cases:
        code, out, err = run("--combine", *args, capsys=capsys)
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, (args, err)
        assert out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_a_machine_setting_may_differ_and_is_not_said_to_be_shared(seeds, tmp_path, capsys):
    elsewhere = study_with(seeds, tmp_path / "elsewhere", ("seed", "7"), ("device", "auto"))
    code, out, err = run("--combine", str(seeds / "s0"), str(elsewhere), capsys=capsys)
    assert code == 0, err
    header = out.split("## Results", 1)[0]
    assert "Seeds 0, 7" in header and "--hidden 16" in header
    assert "--device" not in header and "--seed" not in header
    assert "bp seed 7 (pending, 0/2)" in out  # a study whose runs have not started: counted out
    from neurosim.tools.study.seeds import draw_accuracy, read_studies

    other = study_with(seeds, tmp_path / "other", ("seed", "8"))
    model, _, studies = read_studies([elsewhere, other])
    assert not draw_accuracy(tmp_path / "a.png", model, studies) and not (tmp_path / "a.png").exists()


def test_a_run_training_now_is_said_to_be_running_and_one_whose_process_died_interrupted(seeds, tmp_path, capsys):
    """Studies may be combined while they train: a run whose study says it is running is running while
    the process its lock file names lives on this host, and interrupted once that process is gone."""
    study = tmp_path / "s0"
    shutil.copytree(seeds / "s0", study)
    data = json.loads((study / "study.json").read_text())
    data["runs"]["kp"]["state"] = "running"
    (study / "study.json").write_text(json.dumps(data))
    metrics = (study / "kp" / "metrics.jsonl").read_text().splitlines(keepends=True)
    (study / "kp" / "metrics.jsonl").write_text("".join(metrics[:-1]))  # epoch 1 of 2 written
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for pid, said in ((os.getpid(), "running"), (gone.pid, "interrupted")):
        (study / "kp" / ".lock").write_text(f"process {pid} on {socket.gethostname()}\n")
        code, out, err = run("--combine", str(study), str(seeds / "s1"), capsys=capsys)
        epoch1 = json.loads(metrics[-2])["test_acc"]  # where the unfinished run stands: its last epoch
        assert code == 0 and f"kp seed 0 ({said}, 1/2; at its last epoch top-1 {epoch1:.2f}," in out, (said, out)
        assert table(out, "Results over the seeds")["kp"]["seeds finished"] == "1/2"
    (study / "kp" / ".lock").write_text(f"process {os.getpid()} on another-host\n")
    code, out, _ = run("--combine", str(study), str(seeds / "s1"), capsys=capsys)
    assert "kp seed 0 (interrupted, 1/2;" in out  # cannot be told from here


def test_two_studies_of_one_seed_are_refused(seeds, tmp_path, capsys):
    again = tmp_path / "again"
    assert compare_rules(["mlp_digits", *TINY, "--seed", "2", "--rules", "bp", "--out", str(again), "--quiet",
                          "--in-process"]) == 0
    code, _, err = run("--combine", str(seeds / "s2"), str(again), capsys=capsys)
    assert code == 2 and "the studies share seed 2" in err, err


def test_help_says_how(capsys):
    code, out, _ = run("--combine", "--help", capsys=capsys)
    assert code == 0 and out.startswith("usage: compare_rules.py --combine STUDY_DIR STUDY_DIR")
    code, out, _ = run("--help", capsys=capsys)
    assert code == 0 and "--combine STUDY_DIR STUDY_DIR" in out


def test_mean_angles_is_undefined_where_a_seed_has_no_angle():
    from neurosim.tools.study.seeds import _mean_angles

    got = _mean_angles([{"a": 10.0, "b": 1.0}, {"a": 20.0, "b": math.nan}])
    assert got["a"] == 15.0 and math.isnan(got["b"])
