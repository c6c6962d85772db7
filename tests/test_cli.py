"""The command line as a user runs it: files written, and one clear message for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from neurosim.cli import main, run_circuit

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


def in_process(*args, capsys):
    """The command as ``main`` runs it, in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        main(run_circuit, list(args))
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def test_default_run_directory_is_never_reused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert in_process("bp_mlp_digits", "--epochs", "1", "--quiet", "--monitor-every", "0", capsys=capsys)[0] == 0
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_existing_out_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert in_process("bp_mlp_digits", "--epochs", "1", "--out", str(out), "--quiet", capsys=capsys)[0] == 0
    before = (out / "last.pt").read_bytes()
    code, _, err = in_process("bp_mlp_digits", "--epochs", "1", "--out", str(out), capsys=capsys)
    assert code == 2 and "already holds a run" in err
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
def test_bad_input_gives_one_message_and_exit_2(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = in_process(*args, capsys=capsys)
    assert code == 2, err
    assert message in err and err.startswith("error: ")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_bad_input_as_a_process_has_no_traceback(tmp_path):
    r = cli("nope", cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "kp_mlp_digits" in r.stderr and "wm_resnet18" in r.stderr  # lists what exists
