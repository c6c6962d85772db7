"""The command line as a user runs it: files written, and one clear message for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None, script="run_circuit.py"):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=600)


def test_digits_run_writes_run_directory(tmp_path):
    out = tmp_path / "run"
    r = cli("kp_mlp_digits", "--epochs", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "final: test top-1" in r.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rule"] == "kp" and cfg["epochs"] == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1, 2]
    for m in lines[1:]:
        assert {"train_loss", "train_acc", "test_acc", "angles"} <= set(m)
        assert set(m["angles"]) == {"x->h1", "h1->h2", "h2->y"}
    assert (out / "angles_by_epoch.png").stat().st_size > 1000
    assert (out / "last.pt").exists() and (out / "best.pt").exists()


def test_default_run_directory_is_never_reused(tmp_path):
    for _ in range(2):
        assert cli("bp_mlp_digits", "--epochs", "1", "--quiet", cwd=tmp_path).returncode == 0
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_existing_out_is_refused(tmp_path):
    out = tmp_path / "run"
    assert cli("bp_mlp_digits", "--epochs", "1", "--out", str(out), "--quiet").returncode == 0
    before = (out / "last.pt").read_bytes()
    r = cli("bp_mlp_digits", "--epochs", "1", "--out", str(out))
    assert r.returncode == 2 and "already holds a run" in r.stderr and "Traceback" not in r.stderr
    assert (out / "last.pt").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["kp_mlp_digit"], "unknown preset 'kp_mlp_digit'"),
    (["kp_mlp_digits", "--lrate", "1"], "unknown option --lrate"),
    (["kp_mlp_digits", "--lr", "fast"], "bad value 'fast' for --lr"),
    (["kp_mlp_digits", "--lr", "-1"], "lr must be positive"),
    (["kp_mlp_digits", "--epochs"], "needs a value"),
    (["kp_mlp_digits", "--data", "/no/such/folder"], "digits, cifar10, cifar100, synthetic"),
    (["kp_mlp_digits", "--resume", "/no/such/run"], "no checkpoint"),
])
def test_bad_input_gives_one_message_and_exit_2(args, message, tmp_path):
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_unknown_preset_lists_presets(tmp_path):
    r = cli("nope", cwd=tmp_path)
    assert "kp_mlp_digits" in r.stderr and "wm_resnet18" in r.stderr
