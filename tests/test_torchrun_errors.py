"""User errors under torchrun: said once, by rank 0, and torchrun's summary names rank 0 alone.

torchrun reports every child that exits non-zero with a traceback of its own frames and exits 1;
no child can prevent that (``neurosim.training.distributed``'s docstring). What the children control, and
these tests check: one ``error:`` line, no traceback from neurosim's code, rank 0 the only failed
rank in the summary (exit code 2, the message as its ``traceback``), the other ranks stopping
with status 0 once rank 0 reports the error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def said(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def failed_ranks(stderr: str) -> dict[int, str]:
    """Rank → exit code of each failure in torchrun's summary."""
    found = re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\n\s+exitcode\s+: (-?\d+)", stderr)
    return {int(rank): code for rank, code in found}


def assert_no_traceback_of_ours(stderr: str):
    frames = [line for line in stderr.splitlines() if line.lstrip().startswith('File "')]
    ours = [f for f in frames if "neurosim" in f or "experiments" in f or "dist_worker" in f]
    assert not ours, stderr[-3000:]


def hold_lock(run: Path) -> subprocess.Popen:
    """Another process holding the run's lock, as a run still training does; it lets go when its
    stdin is closed."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from neurosim.common.files import DirectoryLock
        lock = DirectoryLock(Path({str(run)!r}))
        print("held", flush=True)
        sys.stdin.read()
        """)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow
def test_an_invalid_setting_is_said_once_by_rank_0(tmp_path):
    """Every rank parses the same command line and meets the error before joining the process group."""
    done = torchrun(ROOT / "experiments" / "run_circuit.py", "kp_mlp_digits", "--epochs", "1", "--lr", "-1",
                    "--out", str(tmp_path / "run"))
    assert done.returncode != 0
    assert said(done.stderr) == ["error: invalid setting: lr must be positive, got -1.0"], done.stderr[-3000:]
    assert "(rank 1)" not in done.stderr
    assert failed_ranks(done.stderr) == {0: "2"}, done.stderr[-3000:]
    assert "traceback : error: invalid setting: lr must be positive" in done.stderr
    assert_no_traceback_of_ours(done.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("args", [["fa_mlp_digits", "--dynamics", "time"], ["pal_mlp_digits"]])
def test_a_run_in_time_is_refused_once_by_rank_0(tmp_path, args):
    """A circuit in time runs in one process (its presentations are not split across ranks)."""
    done = torchrun(ROOT / "experiments" / "run_circuit.py", *args, "--epochs", "1", "--out", str(tmp_path / "run"))
    assert said(done.stderr) == ["error: --execution reference and --dynamics time run in one process; under torchrun "
                                 "use the compiled execution (the default) with instant dynamics"], done.stderr[-3000:]
    assert failed_ranks(done.stderr) == {0: "2"}, done.stderr[-3000:]
    assert_no_traceback_of_ours(done.stderr)
    assert not (tmp_path / "run").exists()


SLOW_RANK_0 = """
import os, sys, time
sys.path.insert(0, {root!r})
from neurosim.training import distributed, run
from neurosim.tools.cli import main, run_circuit

# Rank 0 reaches the refusal seconds after rank 1 (a loaded machine), longer than rank 1 would
# wait for its word; the refusal is still said once, by rank 0.
distributed.RANK0_VERDICT_S = 0.5
if os.environ["RANK"] == "0":
    resolve = run.resolve_device
    run.resolve_device = lambda name: (time.sleep(3), resolve(name))[1]
main(run_circuit)
"""


@pytest.mark.slow
def test_a_refusal_every_rank_meets_waits_for_a_slow_rank_0(tmp_path):
    script = tmp_path / "slow_rank_0.py"
    script.write_text(SLOW_RANK_0.format(root=str(ROOT)))
    done = torchrun(script, "fa_mlp_digits", "--dynamics", "time", "--epochs", "1", "--out", str(tmp_path / "run"))
    assert said(done.stderr) == ["error: --execution reference and --dynamics time run in one process; under torchrun "
                                 "use the compiled execution (the default) with instant dynamics"], done.stderr[-3000:]
    assert failed_ranks(done.stderr) == {0: "2"}, done.stderr[-3000:]
    assert not (tmp_path / "run").exists()

@pytest.mark.slow
def test_resuming_a_run_that_is_still_training_is_refused_once(tmp_path):
    """The directory lock refuses it: rank 0 decides, says it, and the other rank stops with 0."""
    run = tmp_path / "run"
    subprocess.run([sys.executable, str(ROOT / "experiments" / "run_circuit.py"), "kp_mlp_digits", "--epochs", "1",
                    "--train-limit", "64", "--device", "cpu", "--quiet", "--out", str(run)],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    before = _files(run)
    holder = hold_lock(run)
    try:
        done = torchrun(ROOT / "experiments" / "run_circuit.py", "--resume", str(run))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert done.returncode != 0
    assert said(done.stderr) == [f"error: run directory {run} is in use by process {holder.pid} on "
                                 f"{os.uname().nodename}; wait for it to finish or stop it (its checkpoint is "
                                 f"kept), or choose another --out"], done.stderr[-3000:]
    assert failed_ranks(done.stderr) == {0: "2"}, done.stderr[-3000:]
    assert_no_traceback_of_ours(done.stderr)
    assert _files(run) == before  # untouched


@pytest.mark.slow
def test_an_error_rank_0_meets_while_the_others_wait_for_it_is_said_once(tmp_path):
    """Rank 0 decodes a folder while the other ranks wait at a barrier; an unreadable image stops
    it, and its leaving the process group fails their barrier, which once ended in a traceback."""
    import numpy as np
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "tree" / name / f"{i}.png")
    (tmp_path / "tree" / "a" / "bad.png").write_bytes(b"junk")
    done = torchrun(ROOT / "experiments" / "run_circuit.py", "kp_resnet18", "--data", str(tmp_path / "tree"),
                    "--stream", "off", "--width", "0.0625", "--epochs", "1", "--device", "cpu",
                    "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"))
    assert said(done.stderr) == [f"error: 1 image in {tmp_path / 'tree'} cannot be read: "
                                 f"{os.path.join('a', 'bad.png')} (cannot identify image file); remove or "
                                 f"replace it"], done.stderr[-3000:]
    assert "[rank1]" not in done.stderr and "Connection closed" not in done.stderr
    assert failed_ranks(done.stderr) == {0: "2"}, done.stderr[-3000:]
    assert_no_traceback_of_ours(done.stderr)


ENTRY = """
import os, signal, sys
sys.path.insert(0, {root!r})
from neurosim.tools.cli.entry import main
from neurosim.common.errors import UserError

def entry(argv):
    rank = int(os.environ["RANK"])
    if argv[0] == "rank 1 alone" and rank == 1:
        raise UserError("only rank 1 has this problem")
    if argv[0] == "each its own":
        raise UserError(f"rank {{rank}} has a problem of its own")
    from neurosim.training import distributed
    # Blocked in joining the process group, this rank runs no Python signal handler: let
    # torchrun's SIGTERM end it at once rather than its SIGKILL 30 s later.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    distributed.init("cpu")
    distributed.barrier()
    return 0

main(entry)
"""


@pytest.mark.slow
def test_an_error_rank_0_does_not_share_is_said_by_the_rank_that_meets_it(tmp_path):
    """Rank 1 waits to hear from rank 0: rank 0 joining the process group, or failing with
    another message, makes rank 1 say its own error rather than leave it unsaid. When rank 0
    fails too, rank 1 still stops with status 0 and the summary names rank 0 alone."""
    script = tmp_path / "entry.py"
    script.write_text(ENTRY.format(root=str(ROOT)))
    alone = torchrun(script, "rank 1 alone")
    assert alone.returncode != 0
    assert said(alone.stderr) == ["error: (rank 1) only rank 1 has this problem"], alone.stderr[-3000:]
    assert failed_ranks(alone.stderr)[1] == "2"
    assert_no_traceback_of_ours(alone.stderr)

    each = torchrun(script, "each its own")
    assert sorted(said(each.stderr)) == ["error: (rank 1) rank 1 has a problem of its own",
                                         "error: rank 0 has a problem of its own"], each.stderr[-3000:]
    assert failed_ranks(each.stderr) == {0: "2"}, each.stderr[-3000:]
    assert_no_traceback_of_ours(each.stderr)


def test_the_error_file_torchrun_reads_holds_the_message(tmp_path, monkeypatch, capsys):
    """A lone process under torchrun (or rank 0 of several): torchrun's summary shows the message
    where it would point to how to record a traceback."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from neurosim.common.errors import UserError
    from neurosim.tools.cli.entry import main

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def entry(argv):
        raise UserError("the data folder is missing; give --data-dir")

    with pytest.raises(SystemExit) as stop:
        main(entry, [])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: the data folder is missing; give --data-dir\n"
    json.loads(error_file.read_text())  # torchrun's agent parses it
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    summary = ChildFailedError("run_circuit.py", {0: failure}).format_msg()
    assert "traceback : error: the data folder is missing; give --data-dir" in summary


@pytest.mark.slow
def test_nproc_per_node_ends_as_a_command_should(tmp_path):
    """``neurosim run --nproc-per-node 2``: the processes start as under torchrun, and a mistake
    met in them (the lock of a run still training) is one line and status 2, with no traceback of
    torchrun's either; a mistake in the settings is refused before any process starts; a run
    that works trains on two processes."""
    run = tmp_path / "run"
    neurosim = [sys.executable, "-m", "neurosim", "run"]
    done = subprocess.run([*neurosim, "kp_mlp_digits", "--epochs", "1", "--train-limit", "128", "--device", "cpu",
                           "--nproc-per-node", "2", "--out", str(run)], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes on cpu" in done.stderr and "Traceback" not in done.stderr
    holder = hold_lock(run)
    try:
        refused = subprocess.run([*neurosim, "--resume", str(run), "--epochs", "2", "--nproc-per-node", "2"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=180)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines() == [
        f"error: run directory {run} is in use by process {holder.pid} on {os.uname().nodename}; wait for it to "
        f"finish or stop it (its checkpoint is kept), or choose another --out"], refused.stderr[-3000:]
    bad = subprocess.run([*neurosim, "kp_mlp_digits", "--lr", "-1", "--nproc-per-node", "2", "--out",
                          str(tmp_path / "bad")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (bad.returncode, bad.stderr.strip()) == (2, "error: invalid setting: lr must be positive, got -1.0")
    assert not (tmp_path / "bad").exists()


def _files(run: Path) -> dict:
    """Every file under a run directory (its TensorBoard folder too) and its bytes, the lock aside."""
    return {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file() and f.name != ".lock"}
