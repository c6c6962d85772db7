"""``experiments/time_study.py``: a sweep of runs in time, each an ordinary run directory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "time_study.py"


def study(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
def test_a_delay_sweep_trains_each_run_once_and_reports_the_learning_strength(tmp_path):
    out = tmp_path / "study"
    args = ["delay", "--rules", "fa", "--duration", "2", "--values", "0,2", "--epochs", "1", "--out", str(out)]
    done = study(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    fa = results["rules"]["fa"]
    assert set(fa["top1"]) == {"0", "2"} and all(len(v) == 1 for v in fa["top1"].values())
    # A delay as long as the stimulus: the hidden synapses integrate nothing of the undelayed update.
    assert fa["strength"]["0"]["x->h1"] == 1.0 and fa["strength"]["2"]["x->h1"] == 0.0
    assert fa["strength"]["2"]["h2->y"] == pytest.approx(1.0)
    for run in ("fa-delay0-seed0", "fa-delay2-seed0"):
        cfg = json.loads((out / run / "config.json").read_text())
        assert (cfg["dynamics"], cfg["bias"], cfg["duration"]) == ("time", False, 2.0)
    assert "| fa | 2 |" in (out / "report.md").read_text() and (out / "delay.png").stat().st_size > 0
    before = (out / "fa-delay2-seed0" / "metrics.jsonl").read_text()
    again = study(*args, cwd=tmp_path)  # finished runs are read, not trained again
    assert again.returncode == 0 and (out / "fa-delay2-seed0" / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("args, message", [
    (["delay", "--values", "1.5"], "delays are whole numbers of steps"),
    (["plasticity", "--values", "0,1"], "give values above 0"),
    (["delay", "--values", "x"], "expected numbers"),
    (["delay", "--values", "1", "--rules", "nope"], "unknown rules"),
    (["delay", "--values", "1", "--settle", "-1"], "--settle is a whole number"),
    (["plasticity", "--values", "1", "--plasticity", "continuous"], "give --momentum 0"),
    (["plasticity", "--values", "1", "--batch-size", "0"], "--batch-size at least 1"),
])
def test_bad_settings_exit_2_before_anything_runs(tmp_path, args, message):
    done = study(*args, "--out", str(tmp_path / "s"), cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "s").exists()


def test_a_study_directory_holding_runs_of_other_settings_is_refused_before_anything_trains(tmp_path):
    """Finished runs are reused by name: one started with other settings would be reported as
    this study's. The study names the setting that differs and trains nothing."""
    out = tmp_path / "s"
    (out / "fa-plasticity1-seed0").mkdir(parents=True)
    (out / "fa-plasticity1-seed0" / "config.json").write_text(json.dumps({"plasticity": "presentation", "lr": 0.05}))
    done = study("plasticity", "--rules", "fa", "--values", "1,3", "--plasticity", "continuous", "--momentum", "0",
                 "--lr", "1", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"error: {out / 'fa-plasticity1-seed0'} holds a run with other settings "
                                   f"(plasticity presentation there, continuous here, lr 0.05 there, 1.0 here); give the study "
                                   f"another --out")
    assert sorted(p.name for p in out.iterdir()) == ["fa-plasticity1-seed0"]
