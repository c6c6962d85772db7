"""The command line as a user runs it: files written, and one clear message for bad input."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import pytest

from neurosim.tools.cli import evaluate, main, run_circuit
from neurosim.training.config import MODEL_FAMILIES, PRESETS, RULE_NAMES, RunConfig, rule_settings

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
    # values that used to end in a traceback
    (["kp_mlp_digits", "--hidden", "0"], "hidden must be positive whole numbers"),
    (["kp_mlp_digits", "--hidden", "-5"], "hidden must be positive whole numbers"),
    (["kp_mlp_digits", "--hidden", "3,,4"], "expected whole numbers separated by commas"),
    (["kp_mlp_digits", "--seed", "-1"], "seed must be a whole number from 0"),
    (["kp_mlp_digits", "--seed", "99999999999999999999"], "seed must be a whole number from 0"),
    (["kp_mlp_digits", "--device", "mps"], "device must be auto, cpu,"),
    (["kp_mlp_digits", "--device", "foo"], "device must be auto, cpu,"),
    (["kp_mlp_digits", "--device", "cuda:99"], "asked for"),
    (["kp_mlp_digits", "--lr", "nan"], "bad value 'nan' for --lr: expected a finite number"),
    (["kp_mlp_digits", "--lr", "inf"], "bad value 'inf' for --lr: expected a finite number"),
    (["kp_mlp_digits", "--kp-decay", "inf"], "bad value 'inf' for --kp-decay: expected a finite number"),
    (["wm_mlp_digits", "--wm-sigma", "nan"], "bad value 'nan' for --wm-sigma: expected a finite number"),
    (["kp_resnet18", "--width", "nan"], "bad value 'nan' for --width: expected a finite number"),
    (["kp_mlp_digits", "--momentum", "-inf"], "expected a finite number"),
    (["kp_mlp_digits", "--milestones", "-3"], "milestones must be positive"),
    (["kp_mlp_digits", "--milestones", "20,10"], "milestones must be increasing"),
    (["kp_mlp_digits", "--batch-size", "0"], "batch_size must be positive"),
    (["kp_mlp_digits", "--epochs", "0"], "epochs must be positive"),
    (["kp_mlp_digits", "--epochs", "1.5"], "bad value '1.5' for --epochs: expected a whole number"),
    (["kp_mlp_digits", "--val-per-class", "-1"], "val_per_class"),
    (["kp_mlp_digits", "--hidden", "8", "--monitor-synapses", "nomatch"], "matches no synapse"),
    # accepted in silence before, and wrong
    (["kp_mlp_digits", "--width", "0.5"], "--width applies to ResNets only"),
    (["kp_mlp_digits", "--rule", "fa"], "use the preset fa_mlp_digits instead"),
    (["kp_mlp_digits", "--model", "resnet18"], "use the preset kp_resnet18 instead"),
    (["kp_resnet18", "--hidden", "64"], "--hidden applies to MLPs only"),
    (["kp_mlp_digits", "--wm-sleep-every", "2"], "--wm-sleep-every applies to the wm rule only"),
    (["kp_mlp_digits", "--sleep-every", "2"], "unknown option --sleep-every"),
    (["bp_mlp_digits", "--kp-decay", "0.1"], "--kp-decay applies to the kp rule only"),
    (["kp_mlp_digits", "--out", "a", "--resume", "b"], "--out and --resume cannot go together"),
    (["--epochs", "3", "kp_mlp_digits"], "the first argument is the preset"),
])
def test_bad_input_gives_one_message_and_exit_2(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = in_process(*args, capsys=capsys)
    assert code == 2, err
    assert message in err and err.startswith("error: ")
    assert err.count("error: ") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_bad_input_as_a_process_has_no_traceback(tmp_path):
    r = cli("nope", cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "kp_mlp_digits" in r.stderr and "wm_resnet18" in r.stderr  # lists what exists


# Runs several command lines through main() in one process (one interpreter start), each after a
# marker line, so stderr shows whether any of them escaped main() as a traceback.
DRIVER = textwrap.dedent("""
    import json, os, signal, sys, time
    sys.path.insert(0, sys.argv[1])
    import neurosim.training.config as config
    from neurosim.tools.cli import evaluate, main, run_circuit
    from neurosim.tools.cli.plot import plot_run

    entries = {"run_circuit": run_circuit, "evaluate": evaluate, "plot_run": plot_run}
    for entry, *args in json.loads(sys.argv[2]):
        print(f"=== {entry} {args}", file=sys.stderr, flush=True)
        if args == ["interrupt"]:  # a real SIGINT while the run is starting (its configuration being built)
            def slow_preset(*a, **k):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(30)
            config.preset, args = slow_preset, ["kp_mlp_digits", "--quiet"]
        try:
            main(entries[entry], args)
        except SystemExit as e:
            print(f"=== status {e.code}", file=sys.stderr, flush=True)
""")


@pytest.mark.slow
def test_bad_input_in_a_process_has_no_traceback(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cases = [
        ["run_circuit", "kp_mlp_digits", "--hidden", "0"],
        ["run_circuit", "kp_mlp_digits", "--lr", "nan"],
        ["run_circuit", "kp_mlp_digits", "--device", "mps"],
        ["run_circuit", "kp_mlp_digits", "--seed", "-1"],
        ["run_circuit", "kp_mlp_digits", "--out", str(blocker / "run")],
        ["run_circuit", "kp_mlp_digits", "--out", "/proc/neurosim-test/run"],
        ["evaluate", str(tmp_path / "no_run")],
        ["plot_run", str(tmp_path), str(tmp_path)],
        ["run_circuit", "interrupt"],
    ]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    r = subprocess.run([sys.executable, str(driver), str(ROOT), json.dumps(cases)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    blocks = r.stderr.split("=== ")[1:]
    outcomes = [(blocks[i], blocks[i + 1]) for i in range(0, len(blocks), 2)]
    assert len(outcomes) == len(cases), r.stderr
    for (case, status), args in zip(outcomes, cases):
        lines = case.strip().splitlines()[1:]
        if args[-1] == "interrupt":
            assert status.strip() == "status 130" and lines == ["", "interrupted; nothing was lost"], case
        else:
            assert status.strip() == "status 2", case
            assert len(lines) == 1 and lines[0].startswith("error: "), case
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_help_lists_every_option(capsys):
    code, out, _ = in_process("--help", capsys=capsys)  # no preset: every rule's settings
    assert code == 0
    for key in rule_settings():  # every registered rule's own settings: --kp-decay, --wm-lr, ...
        assert f"--{key.replace('_', '-')} " in out
    code, out, _ = in_process("kp_mlp_digits", "--help", capsys=capsys)
    assert code == 0
    for f in attrs.fields(RunConfig):
        if f.name not in ("preset", "rule_params"):
            assert f"--{f.name.replace('_', '-')} " in out
    # the preset's rule's settings; another rule's apply to that rule's presets only
    assert "--kp-decay " in out and "--wm-sigma " not in out
    for word in ("--out DIR", "--resume RUN_DIR", "--config FILE", "--quiet", "--verbose", *RULE_NAMES,
                 *MODEL_FAMILIES, *PRESETS):
        assert word in out
    assert f"--rule {'|'.join(RULE_NAMES)}" in out and "--device auto|cpu|cuda|cuda:N" in out
    code, _, err = in_process(capsys=capsys)  # no arguments: the usage, as an error
    assert code == 2 and "usage: run_circuit.py PRESET" in err


# -- where a run goes ----------------------------------------------------------------------------

TINY = ["--epochs", "1", "--hidden", "8", "--train-limit", "96", "--monitor-every", "0", "--quiet"]


def test_out_must_be_a_new_or_empty_directory(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    code, _, err = in_process("bp_mlp_digits", *TINY, "--out", str(a_file), capsys=capsys)
    assert code == 2 and f"--out {a_file} is a file" in err
    code, _, err = in_process("bp_mlp_digits", *TINY, "--out", str(a_file / "run"), capsys=capsys)
    assert code == 2 and f"{a_file} is a file, not a directory" in err
    assert a_file.read_text() == "keep me"

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    code, _, err = in_process("bp_mlp_digits", *TINY, "--out", str(busy), capsys=capsys)
    assert code == 2 and f"{busy} exists and holds other files (notes.txt); choose a new or empty directory" in err
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = in_process("bp_mlp_digits", *TINY, "--out", str(empty), capsys=capsys)
    assert code == 0, err
    assert (empty / "config.json").exists() and (empty / "last.pt").exists()


def test_unwritable_out_gives_one_message(tmp_path, capsys, monkeypatch):
    code, _, err = in_process("bp_mlp_digits", *TINY, "--out", "/proc/neurosim-test/run", capsys=capsys)
    assert code == 2 and err.startswith("error: ") and "/proc/neurosim-test" in err and err.count("\n") == 1
    # A read-only place (tests may run as root, whom permissions do not stop: ask access() instead).
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    code, _, err = in_process("bp_mlp_digits", *TINY, "--out", str(tmp_path / "new" / "run"), capsys=capsys)
    assert code == 2 and f"{tmp_path} is not writable" in err
    assert not (tmp_path / "new").exists()


# -- what main() turns into one line --------------------------------------------------------------

@pytest.mark.parametrize("number, cause", [
    (errno.ENOSPC, "disk full"),
    (errno.EROFS, "read-only file system"),
    (errno.EACCES, "permission denied"),
    (errno.ENOENT, "no such file or directory"),
])
def test_os_errors_name_the_path_and_the_cause(number, cause, capsys):
    def entry(argv):
        raise OSError(number, os.strerror(number), "/data/run/x.tmp")

    with pytest.raises(SystemExit) as done:
        main(entry, [])
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert err.startswith(f"error: /data/run/x.tmp: {cause}") and err.count("\n") == 1


def test_ctrl_c_during_start_up_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    import neurosim.training.run_dir

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(neurosim.training.run_dir, "open_run", interrupted)
    code, _, err = in_process("bp_mlp_digits", *TINY, capsys=capsys)
    assert code == 130 and err.strip() == "interrupted; nothing was lost"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# -- evaluate.py -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A one-epoch digits run of a tiny MLP (best.pt and last.pt)."""
    from neurosim.training.config import preset
    from neurosim.training.run_dir import open_run

    root = tmp_path_factory.mktemp("eval")
    run = open_run(root / "run", preset("bp_mlp_digits", epochs=1, hidden=(8,), train_limit=96, device="cpu",
                                        monitor_every=0), quiet=True)
    run.train()
    return root / "run"


def run_copy(small_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(small_run, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def evaluate_in_process(*args, capsys):
    with pytest.raises(SystemExit) as done:
        main(evaluate, [str(a) for a in args])
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def test_evaluate_writes_json(small_run, tmp_path, capsys):
    run = run_copy(small_run, tmp_path)
    code, out, err = evaluate_in_process(run, "--json", tmp_path / "e.json", capsys=capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["checkpoint"] == "best"
    assert not list(tmp_path.glob("*.tmp"))


def test_evaluate_without_best_points_to_last(small_run, tmp_path, capsys):
    run = run_copy(small_run, tmp_path)
    (run / "best.pt").unlink()
    code, _, err = evaluate_in_process(run, capsys=capsys)
    assert code == 2 and "has no best.pt" in err and "--last evaluates its last checkpoint" in err
    assert evaluate_in_process(run, "--last", capsys=capsys)[0] == 0


@pytest.mark.parametrize("contents", [b"", b"\x00junk" * 40, b"PK\x03\x04truncated"])
def test_evaluate_damaged_checkpoint_gives_one_message(small_run, tmp_path, capsys, contents):
    run = run_copy(small_run, tmp_path)
    (run / "best.pt").write_bytes(contents)
    code, _, err = evaluate_in_process(run, capsys=capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(run / "best.pt") in err and "--last" in err
    for noise in ("EOFError", "weights_only", "file an issue", "Traceback"):
        assert noise not in err


@pytest.mark.parametrize("args, message", [
    (["--json", "{blocker}/e.json"], "is a file; give --json a path in an existing folder"),
    (["--json", "{tmp}/missing/e.json"], "does not exist; give --json a path in an existing folder"),
    (["--json", "{tmp}"], "is a directory; give the path of a file"),
    (["--json"], "option --json needs a value"),
    (["--device", "mps"], "device must be auto, cpu,"),
    (["--split", "half"], "--split must be test or all"),
])
def test_evaluate_bad_options(small_run, tmp_path, capsys, args, message):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    args = [a.format(blocker=blocker, tmp=tmp_path) for a in args]
    code, _, err = evaluate_in_process(small_run, *args, capsys=capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_evaluate_json_write_failure_leaves_no_temporary_file(small_run, tmp_path, capsys, monkeypatch):
    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    code, _, err = evaluate_in_process(small_run, "--json", tmp_path / "e.json", capsys=capsys)
    assert code == 2 and f"{tmp_path / 'e.json'}" in err and "disk full" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_evaluate_help_lists_options(capsys):
    code, out, _ = evaluate_in_process("--help", capsys=capsys)
    assert code == 0
    for option in ("--data", "--last", "--split", "--data-dir", "--val-per-class", "--device", "--json"):
        assert option in out
