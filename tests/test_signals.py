"""Nothing lost, nothing silent, whatever signal comes and whenever.

- A stop request (Ctrl-C, SIGTERM, SIGHUP) is honoured between mirror batches of a sleep, not
  only between engaged steps; the checkpoint records the mirror batches still to do, and the
  resumed run does them first, ending bit for bit where an unbroken run ends. Under torchrun
  the ranks agree on the mirror batch to stop at.
- Sleep counts no run could get through are refused, naming the option.
- Ctrl-C anywhere after training (drawing figures, in a finaliser, joining threads or running
  atexit hooks as the process exits) ends the command with status 130 and one line.
- SIGHUP (the terminal closed) stops a run the way SIGTERM does: a checkpoint, status 130, and a
  resume that ends as an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from neurosim.common.errors import UserError
from neurosim.training.checkpoint import load_checkpoint
from neurosim.training.config import preset
from neurosim.training.run import RunInterrupted, build_circuit
from neurosim.training.run_dir import open_run, resume_run
from neurosim.training.step import sleep_steps
from tests.test_reliability import assert_same, directory_contents

ROOT = Path(__file__).resolve().parents[1]
# A small WM run whose records include the monitor's sleep columns at every step.
SMALL = dict(epochs=2, train_limit=64, batch_size=16, hidden=(24, 16), monitor_every=1, wm_sleep_batch_size=32,
             device="cpu")


def _stop_after_mirror_batch(run, n: int) -> None:
    """Ask ``run`` to stop once its circuit has made ``n`` mirror batches (counted from now)."""
    real, made = run.circuit.sleep, 0

    def sleep(*args, **kwargs):
        nonlocal made
        real(*args, **kwargs)
        made += 1
        if made == n:
            run.stop_requested = True

    run.circuit.sleep = sleep


def _train_whole_and_broken(tmp_path, cfg, stop_at: int):
    """An unbroken run and one stopped after mirror batch ``stop_at``; the stopped run's error."""
    open_run(tmp_path / "whole", cfg, quiet=True).train()
    part = open_run(tmp_path / "part", cfg, quiet=True)
    _stop_after_mirror_batch(part, stop_at)
    with pytest.raises(RunInterrupted) as stopped:
        part.train()
    return str(stopped.value)


def _resume_and_compare(tmp_path):
    resume_run(tmp_path / "part", quiet=True).train()
    assert_same(directory_contents(tmp_path / "part"), directory_contents(tmp_path / "whole"))


# -- stops inside a sleep --------------------------------------------------------------------------

def test_sleep_steps_stop_between_mirror_batches_and_go_on_exactly():
    def make():
        circuit = build_circuit(preset("wm_mlp_digits", **SMALL), (1, 8, 8), 10)
        opt = torch.optim.SGD(circuit.sleep_parameters(), lr=0.1)
        return circuit, opt, torch.Generator().manual_seed(3)

    a, opt_a, gen_a = make()
    assert sleep_steps(a, opt_a, 7, 4, gen_a) == 7
    b, opt_b, gen_b = make()
    asked = []
    assert sleep_steps(b, opt_b, 7, 4, gen_b, stop=lambda done: asked.append(done) or done == 3) == 3
    assert asked == [1, 2, 3]
    assert sleep_steps(b, opt_b, 4, 4, gen_b, stop=lambda done: False) == 4  # never asked after the last
    for sa, sb in zip(a.sleep_parameters(), b.sleep_parameters()):
        assert torch.equal(sa, sb)


def test_a_stop_inside_the_sleep_before_training_resumes_bit_for_bit(tmp_path):
    cfg = preset("wm_mlp_digits", wm_sleep_before=40, **{**SMALL, "epochs": 1})
    said = _train_whole_and_broken(tmp_path, cfg, stop_at=17)
    assert said == (f"interrupted in the sleep before training (23 of its mirror batches still to do); "
                    f"checkpoint saved. Continue with --resume {tmp_path / 'part'}")
    saved = load_checkpoint(tmp_path / "part" / "last.pt")
    assert (saved["step"], saved["slept_before"], saved["sleep_left"]) == (0, False, [23])
    _resume_and_compare(tmp_path)


@pytest.mark.parametrize("stop_at, position", [
    (6 * 2 + 3, (1, 2, 6)),  # the third sleep (after step 6, mid-epoch 2), 3 mirror batches in
    (6 * 1 + 3, (0, 4, 4)),  # the sleep after the last step of epoch 1, before its end is committed
])
def test_a_stop_inside_a_sleep_between_steps_resumes_bit_for_bit(tmp_path, stop_at, position):
    cfg = preset("wm_mlp_digits", wm_sleep_before=0, wm_sleep_every=2, wm_sleep_batches=6, **SMALL)
    said = _train_whole_and_broken(tmp_path, cfg, stop_at)
    epoch, batch, step = position
    assert said.startswith(f"interrupted at epoch {epoch + 1}, batch {batch}/4, in the sleep after it "
                           f"(3 of its mirror batches still to do); checkpoint saved")
    saved = load_checkpoint(tmp_path / "part" / "last.pt")
    assert (saved["epoch"], saved["batch"], saved["step"], saved["sleep_left"]) == (epoch, batch, step, [3])
    _resume_and_compare(tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sleep_stop_worker(out: Path) -> None:
    """One rank of ``test_ranks_agree_on_the_mirror_batch_to_stop_at``."""
    from neurosim.training import distributed
    torch.set_num_threads(1)
    world, _ = distributed.init("cpu")
    cfg = preset("wm_mlp_digits", epochs=1, train_limit=64, batch_size=8, wm_sleep_before=100, monitor_every=0,
                 device="cpu")
    run = open_run(out / "stopped", cfg, quiet=True)
    if world.rank == 1:
        _stop_after_mirror_batch(run, 5)  # asked of rank 1 alone
    try:
        run.train()
        left = None
    except RunInterrupted:
        left = run.sleep_left
    resumed = resume_run(out / "stopped", quiet=True)
    resumed.train()
    straight = open_run(out / "straight", cfg, quiet=True)
    straight.train()
    torch.save({"left": left, "resumed": resumed.circuit.state_dict(), "straight": straight.circuit.state_dict()},
               out / f"rank{world.rank}.pt")
    distributed.finish()


@pytest.mark.slow
def test_ranks_agree_on_the_mirror_batch_to_stop_at(tmp_path):
    """Rank 1 alone is asked to stop, 5 mirror batches into a sleep of 100: every rank stops at
    the same mirror batch (32, where they next agree), and the resumed run is the unbroken one."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.test_signals", "sleep_stop", str(tmp_path)], cwd=ROOT,
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                                       PYTHONPATH=str(ROOT)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["left"] == r1["left"] == [100 - 32]
    assert load_checkpoint(tmp_path / "stopped" / "last.pt")["epoch"] == 1
    for k in r0["straight"]:
        assert torch.equal(r0["resumed"][k], r0["straight"][k]), k
        assert torch.equal(r1["resumed"][k], r0["straight"][k]), k


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_a_long_sleep_before_training(tmp_path, sig):
    """``--wm-sleep-before 100000000`` would sleep for days: a stop comes within a mirror batch."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "run_circuit.py"), "wm_mlp_digits",
                             "--wm-sleep-before", "100000000", "--epochs", "1", "--train-limit", "64", "--device",
                             "cpu", "--quiet", "--out", "run"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "run" / "metrics.jsonl").exists():  # written just before the sleep starts
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert (saved["step"], saved["slept_before"]) == (0, False)
    (left,) = saved["sleep_left"]
    assert 0 < left < 100_000_000
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [f"interrupted in the sleep before training ({left:,} of its mirror batches "
                                        f"still to do); checkpoint saved. Continue with --resume run"], err


# -- sleep counts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("wm_sleep_before", 10**23), ("wm_sleep_before", 2**31), ("wm_sleep_batches", 10**12),
    ("wm_sleep_every", 2**40), ("wm_sleep_batch_size", 2**31), ("wm_sleep_events", 2**33),
])
def test_sleep_counts_no_run_could_get_through_are_refused(field, value):
    with pytest.raises(UserError, match=f"--{field.replace('_', '-')} .*at most|--{field.replace('_', '-')} .*64-bit"):
        preset("wm_mlp_digits", **{field: value})
    preset("wm_mlp_digits", **{field: 2**31 - 1})  # the bound itself is a valid setting


def test_an_absurd_sleep_count_on_the_command_line_is_one_message(tmp_path, capsys, monkeypatch):
    import neurosim.tools.cli.run as run_command
    from neurosim.tools.cli import main, run_circuit

    def started(*args):  # such a count used to start a run that slept for ever, saying nothing
        raise AssertionError("the run started")

    monkeypatch.setattr(run_command, "_run", started)
    with pytest.raises(SystemExit) as done:
        main(run_circuit, ["wm_mlp_digits", "--wm-sleep-before", "100000000000000000000000",
                           "--out", str(tmp_path / "run")])
    assert done.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid setting: --wm-sleep-before"), lines
    assert not (tmp_path / "run").exists()


# -- Ctrl-C after training -------------------------------------------------------------------------

class _Finaliser:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(2)  # the signal lands in here, where Python drops the exception it raises


def test_an_interrupt_a_finaliser_dropped_still_ends_the_command(capsys):
    from neurosim.tools.cli import main

    def entry(argv):
        _Finaliser()  # freed at once: the interrupt comes inside its __del__
        time.sleep(2)  # where the interrupt is delivered again
        return 0

    with pytest.raises(SystemExit) as done:
        main(entry, [])
    assert done.value.code == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["interrupted; nothing was lost"], err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # main() put back what it found


# Runs the command line with a hook at the moment AT names (``plotting`` waits for the test's
# signal; the others send SIGINT to the process themselves).
DRIVER = textwrap.dedent("""
    import atexit, os, signal, sys, threading, time
    sys.path.insert(0, sys.argv[1])
    import neurosim.tools.figures as plots
    import neurosim.training.run as train
    from neurosim.tools.cli import main, run_circuit

    what, _, n = os.environ.get("AT", "").partition(":")
    me = os.getpid()
    real_plot_run, real_step = plots.plot_run, train.Run.engaged_step

    class Finaliser:
        def __del__(self):
            os.kill(me, signal.SIGINT)
            time.sleep(2)

    def late():
        while threading.main_thread().is_alive():  # until the interpreter waits for this thread to end
            time.sleep(0.02)
        os.kill(me, signal.SIGINT)
        time.sleep(2)

    def plot_run(run_dir, *args, **kwargs):
        if what == "sighup":
            return []  # the figures are not what is compared; they cost seconds
        if what == "plotting":
            print("drawing figures", file=sys.stderr, flush=True)
            time.sleep(30)
        elif what == "finaliser":
            Finaliser()
        elif what == "thread_join":
            threading.Thread(target=late).start()
        return real_plot_run(run_dir, *args, **kwargs)

    def engaged_step(self, x, y):
        real_step(self, x, y)
        if what == "sighup" and self.step == int(n):
            os.kill(me, signal.SIGHUP)

    def at_exit():
        if what == "atexit":
            os.kill(me, signal.SIGINT)
            time.sleep(2)

    atexit.register(at_exit)
    plots.plot_run = plot_run
    train.Run.engaged_step = engaged_step
    sys.argv[1:] = sys.argv[2:]
    main(run_circuit)  # as the program itself, as experiments/run_circuit.py calls it
""")


def _start(tmp_path, args, at=""):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return subprocess.Popen([sys.executable, str(driver), str(ROOT), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, AT=at, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))


TINY = ["kp_mlp_digits", "--epochs", "1", "--train-limit", "64", "--monitor-every", "1", "--device", "cpu", "--quiet"]


@pytest.mark.slow
@pytest.mark.parametrize("at", ["plotting", "finaliser", "thread_join", "atexit"])
def test_ctrl_c_after_training_is_status_130_and_one_line(tmp_path, at):
    proc = _start(tmp_path, [*TINY, "--out", "run"], at)
    try:
        before = ""
        if at == "plotting":
            while not before.endswith("drawing figures\n"):
                line = proc.stderr.readline()
                assert line, before
                before += line
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "Exception ignored" not in err and "Traceback" not in err, before + err
    assert proc.returncode == 130, before + err
    assert err.strip().splitlines() == ["interrupted; nothing was lost"], before + err
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1  # the run itself is complete
    assert not list((tmp_path / "run").glob("*.tmp"))


# -- SIGHUP ----------------------------------------------------------------------------------------

SMALL_CLI = ["wm_mlp_digits", "--epochs", "2", "--train-limit", "256", "--hidden", "24,16", "--monitor-every", "3",
             "--device", "cpu", "--wm-sleep-before", "2", "--quiet"]


@pytest.mark.slow
def test_sighup_mid_epoch_saves_a_checkpoint_and_resumes_to_the_uninterrupted_run(tmp_path, one_thread):
    hup = _start(tmp_path, [*SMALL_CLI, "--out", "run"], at="sighup:11")  # epoch 2 of 8 steps each
    try:
        # Meanwhile the uninterrupted run, in this process (one thread, as the command's).
        open_run(tmp_path / "whole", preset("wm_mlp_digits", epochs=2, train_limit=256, hidden=(24, 16),
                                            monitor_every=3, device="cpu", wm_sleep_before=2), quiet=True).train()
        _, err = hup.communicate(timeout=120)
    finally:
        hup.kill()
    assert hup.returncode == 130, err  # as for SIGTERM or Ctrl-C
    assert err.strip().splitlines() == ["interrupted at epoch 2, batch 3/8; checkpoint saved. Continue with "
                                        "--resume run"], err
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert (saved["epoch"], saved["batch"], saved["step"]) == (1, 3, 11)
    resumed = _start(tmp_path, ["wm_mlp_digits", "--resume", "run", "--quiet"])
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert_same(directory_contents(tmp_path / "run"), directory_contents(tmp_path / "whole"))


@pytest.mark.slow
def test_a_run_started_to_ignore_sighup_goes_on(tmp_path):
    """``nohup`` starts a command with SIGHUP ignored: the run keeps it so, and trains to the end."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    done = subprocess.run([sys.executable, str(driver), str(ROOT), *TINY, "--out", "run"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
                          env=dict(os.environ, AT="sighup:1", OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


@pytest.mark.slow
def test_a_closed_terminal_stops_the_run_with_a_checkpoint_and_says_so_in_its_log(tmp_path):
    """The run's terminal is a pseudo-terminal that the test closes mid-training: the kernel sends
    SIGHUP and every later write to the terminal fails (EIO). The run stops at the next step with
    its checkpoint, status 130, and the message it could no longer print is in log.txt."""
    import fcntl
    import termios

    master, terminal = os.openpty()

    def own_terminal():  # in the child, a session of its own: the pseudo-terminal becomes its terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "run_circuit.py"), "wm_mlp_digits",
                             "--epochs", "50", "--hidden", "24,16", "--device", "cpu", "--out", "run"],
                            cwd=tmp_path, stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True,
                            preexec_fn=own_terminal, env=dict(os.environ, OMP_NUM_THREADS="1"))
    os.close(terminal)
    try:
        shown = b""
        while b"epoch 1/50" not in shown:  # training has begun (its progress line is drawn)
            try:
                chunk = os.read(master, 4096)
            except OSError:
                chunk = b""
            assert chunk, shown
            shown += chunk
        os.close(master)  # the terminal is closed
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert code == 130
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    last = (tmp_path / "run" / "log.txt").read_text().strip().splitlines()[-1]
    assert last == (f"interrupted at epoch {saved['epoch'] + 1}, batch {saved['batch']}/45; checkpoint saved. "
                    f"Continue with --resume run"), last


if __name__ == "__main__":  # one rank of a distributed test: python -m tests.test_signals MODE OUT_DIR
    if sys.argv[1] == "sleep_stop":
        _sleep_stop_worker(Path(sys.argv[2]))
