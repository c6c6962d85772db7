"""Nothing lost, nothing silent: kills at any moment, two writers, a full disk, divergence, damage.

The kill test trains a real process, SIGKILLs it at chosen moments (mid-epoch, while a
checkpoint is being written, right after one is replaced, between the files of one epoch's
commit, while training goes on past a commit still being written), resumes it from the command line and compares the whole run directory with an
uninterrupted run's.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import neurosim.common.files
from neurosim.common.errors import UserError
from neurosim.common.files import DirectoryLock
from neurosim.training.checkpoint import load_checkpoint, save_checkpoint
from neurosim.training.config import preset
from neurosim.training.run import RunDiverged, RunInterrupted
from neurosim.training.run_dir import open_run, resume_run
from tests.full_disk import FullDisk

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["wm_mlp_digits", "--epochs", "2", "--hidden", "24,16", "--monitor-every", "10", "--device", "cpu",
        "--wm-sleep-before", "2", "--quiet"]

# Runs the command line in a process that SIGKILLs itself at the moment KILL names.
DRIVER = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, sys.argv[1])
    import neurosim.common.files as files
    import neurosim.tools.figures as plots
    import neurosim.training.run as train
    from neurosim.tools.cli import main, run_circuit

    what, n = os.environ.get("KILL", ":0").split(":")
    n = int(n)
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    counts = {}
    real_replace, real_log, real_step = files.os.replace, train.Run._log_metrics, train.Run.engaged_step

    def replace(src, dst):
        name = os.path.basename(dst)
        counts[name] = counts.get(name, 0) + 1
        if what == "step_during_commit" and name == "last.pt":
            time.sleep(10)  # the commit is still being written when training reaches step n
        if what == "writing_last" and name == "last.pt" and counts[name] == n:
            size = os.path.getsize(src)
            with open(src, "r+b") as f:
                f.truncate(size // 2)  # the process dies half-way through writing the checkpoint
            die()
        real_replace(src, dst)
        if what == "after_" + name.replace(".", "_") and counts[name] == n:
            die()

    def log_metrics(self, path, m, *earlier):
        real_log(self, path, m, *earlier)
        if what == "after_metrics" and m["epoch"] == n:
            die()

    def engaged_step(self, x, y):
        real_step(self, x, y)
        if what in ("step", "step_during_commit") and self.step == n:
            die()

    plots.plot_run = lambda run_dir: []  # figures are not what is compared; they cost seconds
    files.os.replace = replace
    train.Run._log_metrics = log_metrics
    train.Run.engaged_step = engaged_step
    main(run_circuit, sys.argv[2:])
""")


def run_cli(tmp_path, args, kill=None):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, KILL=kill or ":0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(driver), str(ROOT), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)


def directory_contents(run_dir: Path) -> dict:
    """What a run directory says, with timing fields and file-format noise set aside."""
    out = {}
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(run_dir / name)
        out[name] = {k: v for k, v in state.items()}
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    out["metrics"] = [{k: v for k, v in json.loads(x).items() if k not in ("time_s", "images_per_s")} for x in lines]
    with np.load(run_dir / "monitor.npz") as z:
        out["monitor"] = {k: z[k] for k in z.files}
    out["monitor.json"] = json.loads((run_dir / "monitor.json").read_text())
    out["config"] = json.loads((run_dir / "config.json").read_text())
    return out


def assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        same = a == b if not a.is_floating_point() else (a == b) | (a.isnan() & b.isnan())
        assert bool(same.all()), where  # bit for bit, NaN placeholders included
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), where
    else:
        assert a == b or (a != a and b != b), where


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    r = run_cli(tmp, [*ARGS, "--out", "run"])
    assert r.returncode == 0, r.stderr
    return directory_contents(tmp / "run")


# Epoch 1 ends at step 45 (1,437 images, batch 32); the first checkpoint is then written.
@pytest.mark.slow
@pytest.mark.parametrize("kill", [
    "step:10",            # in the first epoch: no checkpoint yet
    "step:60",            # mid-epoch 2
    "writing_last:2",     # while epoch 2's checkpoint is being written
    "after_last_pt:1",    # right after epoch 1's checkpoint replaced the last one
    "after_best_pt:1",    # epoch 1's best.pt written, its last.pt not yet: the run goes on from best.pt
    "after_best_pt:2",    # epoch 2's best.pt written, its last.pt not yet
    "after_metrics:2",    # epoch 2's metrics line written, its last.pt not yet
    "step_during_commit:50",  # epoch 2 under way while epoch 1's commit is still being written
])
def test_killed_run_resumes_to_the_uninterrupted_directory(tmp_path, uninterrupted, kill):
    first = run_cli(tmp_path, [*ARGS, "--out", "run"], kill=kill)
    assert first.returncode == -signal.SIGKILL, (first.returncode, first.stderr)
    resumed = run_cli(tmp_path, ["wm_mlp_digits", "--resume", "run", "--quiet"])
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert_same(directory_contents(tmp_path / "run"), uninterrupted)
    assert not list((tmp_path / "run").glob("*.tmp"))


# -- two writers ---------------------------------------------------------------------------------

def test_second_writer_is_refused_and_a_dead_holders_lock_is_not(tmp_path):
    cfg = preset("kp_mlp_digits", epochs=1, device="cpu", monitor_every=0)
    first = open_run(tmp_path / "r", cfg, quiet=True)  # holds the directory until it has trained
    with pytest.raises(UserError, match="is in use by process"):
        open_run(tmp_path / "r", cfg, quiet=True)
    with pytest.raises(UserError, match="is in use by process"):
        resume_run(tmp_path / "r", quiet=True)
    first.train()
    assert not first.lock.held
    # A holder killed outright: the kernel drops its lock; a resume is not blocked.
    code = (f"import sys, os, signal; sys.path.insert(0, {str(ROOT)!r}); from neurosim.common.files import DirectoryLock;"
            f"l = DirectoryLock({str(tmp_path / 'r')!r}); os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    more = resume_run(tmp_path / "r", overrides={"epochs": 2}, quiet=True)
    more.train()
    assert more.epoch == 2


@pytest.mark.slow
def test_two_processes_on_one_directory(tmp_path):
    long = ["kp_mlp_digits", "--epochs", "200", "--device", "cpu", "--monitor-every", "0", "--quiet", "--out", "run"]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(driver), str(ROOT), *long], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "last.pt").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.2)
        second = run_cli(tmp_path, long)
        assert second.returncode == 2 and "is in use by process" in second.stderr, second.stderr
        resumed = run_cli(tmp_path, ["kp_mlp_digits", "--resume", "run", "--quiet"])
        assert resumed.returncode == 2 and "is in use by process" in resumed.stderr, resumed.stderr
    finally:
        proc.kill()
        proc.wait()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines if x.endswith("}")] == list(range(len(lines)))[:len(lines)]


# -- a full disk ---------------------------------------------------------------------------------

def test_full_disk_keeps_the_last_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    cfg = preset("kp_mlp_digits", epochs=3, device="cpu", monitor_every=10)
    whole = open_run(tmp_path / "whole", cfg, quiet=True)
    whole.train()

    real_open, writes = open, []

    def full_after_epoch_1(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        writes.append(Path(path).name)
        return FullDisk(f) if writes.count("last.pt.tmp") >= 2 else f

    monkeypatch.setattr(neurosim.common.files, "open", full_after_epoch_1, raising=False)
    part = open_run(tmp_path / "part", cfg, quiet=True)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*last\.pt: disk full; the previous last\.pt is kept"):
        part.train()
    monkeypatch.undo()
    assert not list((tmp_path / "part").glob("*.tmp"))
    assert load_checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 1
    resumed = resume_run(tmp_path / "part", quiet=True)
    resumed.train()
    for (k, a), b in zip(whole.circuit.state_dict().items(), resumed.circuit.state_dict().values()):
        assert torch.equal(a, b), k


# -- divergence ----------------------------------------------------------------------------------

def test_exploding_loss_stops_within_the_watch_window_with_no_false_claims(tmp_path):
    run = open_run(tmp_path / "r", preset("bp_mlp_digits", lr=5.0, device="cpu"), quiet=True)
    with pytest.raises(RunDiverged) as e:
        run.train()
    msg = str(e.value)
    assert "training diverged at step" in msg and "No checkpoint had been written yet" in msg
    step = int(msg.split("at step ")[1].split()[0])
    assert run.step - step < 32 and run.epoch == 0
    assert not (tmp_path / "r" / "last.pt").exists()
    # The directory is not a dead end: it starts again from the beginning.
    again = resume_run(tmp_path / "r", quiet=True)
    assert again.step == 0 and again.cfg.lr == 5.0


def test_non_finite_weights_are_named_and_the_last_good_checkpoint_kept(tmp_path):
    run = open_run(tmp_path / "r", preset("kp_mlp_digits", epochs=3, device="cpu"), quiet=True)

    def poison(r):
        if r.step == 50:  # epoch 2
            with torch.no_grad():
                r.circuit.synapses["h1->h2"].weight[0, 0] = float("inf")

    with pytest.raises(RunDiverged) as e:
        run.train(on_step=poison)
    msg = str(e.value)
    assert "at step 51 (epoch 2): the loss became nan; non-finite:" in msg
    assert "weight of synapse 'h1->h2'" in msg  # with what the NaN reached after it
    assert "last.pt, epoch 1) is kept; nothing after it was saved" in msg
    assert load_checkpoint(tmp_path / "r" / "last.pt")["step"] == 45


def test_the_design_notes_lagging_mirror_is_caught(tmp_path):
    """docs/design.md: a mirror that lags W lets training blow up (loss ~2,400) while its angles
    look fine, and used to finish 'normally' at chance."""
    cfg = preset("wm_mlp_digits", wm_lr=0.05, wm_sleep_batches=2, epochs=6, device="cpu", monitor_every=0)
    with pytest.raises(RunDiverged, match="over 100× the first step's"):
        open_run(tmp_path / "r", cfg, quiet=True).train()


# -- damage --------------------------------------------------------------------------------------

def test_flipped_bytes_in_a_checkpoint_are_detected_and_the_other_one_offered(tmp_path):
    run = open_run(tmp_path / "r", preset("kp_mlp_digits", epochs=1, device="cpu"), quiet=True)
    run.train()
    path = tmp_path / "r" / "last.pt"
    data = bytearray(path.read_bytes())
    w = run.circuit.synapses["x->h1"].weight.detach().numpy().tobytes()[:64]
    data[data.find(w) + 40] ^= 0x10  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="is damaged: its contents no longer match") as e:
        resume_run(tmp_path / "r")
    assert "best.pt in the same run (epoch 1) is intact" in str(e.value)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\x00junk" * 50, "is damaged or not a checkpoint"),
])
def test_empty_or_junk_checkpoint_messages(tmp_path, content, message):
    (tmp_path / "last.pt").write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        load_checkpoint(tmp_path / "last.pt")
    assert "weights_only" not in str(e.value) and "EOFError" not in str(e.value)


def test_a_partial_last_metrics_line_does_not_block_resume(tmp_path):
    cfg = preset("kp_mlp_digits", epochs=2, device="cpu", monitor_every=0)
    run = open_run(tmp_path / "r", cfg, quiet=True)
    with pytest.raises(RunInterrupted):
        run.train(on_step=lambda r: setattr(r, "stop_requested", r.step == 50))
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "step": 9')  # what a kill during the write leaves
    resumed = resume_run(tmp_path / "r", quiet=True)
    resumed.train()
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_a_damaged_metrics_line_elsewhere_is_reported_with_its_line_number(tmp_path):
    run = open_run(tmp_path / "r", preset("kp_mlp_digits", epochs=1, device="cpu", monitor_every=0), quiet=True)
    run.train()
    path = tmp_path / "r" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + "garbage\n" + lines[1] + "\n")
    with pytest.raises(UserError, match="metrics.jsonl line 2 is not a JSON record"):
        resume_run(tmp_path / "r", overrides={"epochs": 2}, quiet=True).train()


# -- resume options ------------------------------------------------------------------------------

def test_resume_epochs_below_done_is_refused_and_above_updates_config(tmp_path):
    run = open_run(tmp_path / "r", preset("kp_mlp_digits", epochs=2, device="cpu", monitor_every=0), quiet=True)
    run.train()
    with pytest.raises(UserError, match="has finished 2 epochs; --epochs 1 would train none"):
        resume_run(tmp_path / "r", overrides={"epochs": 1})
    more = resume_run(tmp_path / "r", overrides={"epochs": 3}, quiet=True)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["epochs"] == 3
    more.train()
    assert more.epoch == 3


def test_a_run_killed_before_its_first_checkpoint_can_be_reused_as_out(tmp_path):
    cfg = preset("kp_mlp_digits", epochs=1, device="cpu", monitor_every=5)
    run = open_run(tmp_path / "r", cfg, quiet=True)
    with pytest.raises(RunInterrupted):
        run.train(on_step=lambda r: setattr(r, "stop_requested", r.step == 10))
    os.remove(tmp_path / "r" / "last.pt")  # as if killed: the interrupt's checkpoint never came
    again = open_run(tmp_path / "r", cfg, quiet=True)
    again.train()
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]


def test_a_failed_start_leaves_no_directory(tmp_path):
    with pytest.raises(UserError):
        open_run(tmp_path / "new", preset("kp_mlp_digits", data=str(tmp_path / "nowhere")), quiet=True)
    assert not (tmp_path / "new").exists()


def test_directory_lock_names_its_holder(tmp_path):
    a = DirectoryLock(tmp_path)
    with pytest.raises(UserError, match=f"in use by process {os.getpid()} on "):
        DirectoryLock(tmp_path)
    a.release()
    DirectoryLock(tmp_path).release()


def test_checkpoint_round_trip_keeps_every_value(tmp_path):
    state = {"format": 1, "config": {"a": 1}, "epoch": 3, "x": torch.arange(5), "s": torch.tensor(2.5),
             "nested": {"l": [torch.ones(2, 2), None, 1.5]}}
    save_checkpoint(state, tmp_path / "c.pt")
    back = load_checkpoint(tmp_path / "c.pt")
    assert_same(back, state)


def test_a_failed_start_in_an_existing_empty_folder_leaves_it_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):
        open_run(tmp_path / "empty", preset("kp_mlp_digits", data=str(tmp_path / "nowhere")), quiet=True)
    assert list((tmp_path / "empty").iterdir()) == []


def test_ctrl_c_while_importing_is_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "run_circuit.py"), "kp_mlp_digits"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.8)  # inside the imports (torch alone takes seconds)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("interrupted"), err
