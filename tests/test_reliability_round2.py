"""Nothing lost, nothing silent, second round: a lost ``last.pt``, a run directory moved or
deleted while training, statistics of an interrupted epoch under torchrun, the RNG state of
streamed runs, damaged ``metrics.jsonl`` and ``config.json``, a lock that was never taken, a
full disk under the metrics file and figures of a read-only run.

docs/reliability.md lists what each test stands for.
"""

import errno
import gc
import json
import os
import pathlib
import shutil
import sys
import threading

import matplotlib.figure
import pytest
import torch

import neurosim.common.files
import neurosim.training.checkpoint
import neurosim.training.run_log
from neurosim.common.errors import UserError
from neurosim.common.files import DirectoryLock
from neurosim.tools.cli import main
from neurosim.tools.cli.plot import plot_run as plot_cli_entry
from neurosim.tools.figures import read_metrics
from neurosim.training.checkpoint import load_checkpoint
from neurosim.training.config import preset
from neurosim.training.run import RunInterrupted
from neurosim.training.run_dir import open_run, resume_run
from neurosim.training.run_log import epoch_list, metrics_records
from tests.full_disk import FullDisk
from tests.test_reliability import assert_same

TIMING = ("time_s", "images_per_s")


def records(path: pathlib.Path) -> list[dict]:
    """The lines of a metrics file, timings aside."""
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in path.read_text().splitlines()]


def copy_run(run: pathlib.Path, where: pathlib.Path) -> pathlib.Path:
    shutil.copytree(run, where, ignore=shutil.ignore_patterns(".lock"))
    return where


CFG = preset("kp_mlp_digits", epochs=3, device="cpu", monitor_every=10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A three-epoch digits run with a monitor (copied by each test that damages it)."""
    root = tmp_path_factory.mktemp("trained")
    run = open_run(root / "run", CFG, quiet=True)
    run.train()
    return root / "run"


# -- 1. a lost last.pt ---------------------------------------------------------------------------

def test_a_lost_last_pt_continues_from_best_pt_when_it_holds_the_latest_epoch(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    os.replace(run / "last.pt", run / "best.pt")  # best.pt holds the last epoch; last.pt is gone
    kept = ("best.pt", "metrics.jsonl", "monitor.npz", "monitor.json")
    before = {name: (run / name).read_bytes() for name in kept}
    resumed = resume_run(run, overrides={"epochs": 4})
    assert "has no last.pt; its best.pt holds the latest epoch it finished (3): continuing" in capsys.readouterr().err
    assert resumed.epoch == 3
    assert {name: (run / name).read_bytes() for name in kept} == before  # nothing deleted or rewritten
    resumed.train()
    assert [r["epoch"] for r in records(run / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    assert records(run / "metrics.jsonl")[:4] == records(trained / "metrics.jsonl")


def test_a_lost_last_pt_with_an_older_best_pt_is_refused_naming_the_choices(tmp_path):
    cfg = preset("kp_mlp_digits", epochs=1, device="cpu", monitor_every=0)
    open_run(tmp_path / "run", cfg, quiet=True).train()
    older = (tmp_path / "run" / "best.pt").read_bytes()  # epoch 1
    resume_run(tmp_path / "run", overrides={"epochs": 3}, quiet=True).train()
    (tmp_path / "run" / "best.pt").write_bytes(older)
    (tmp_path / "run" / "last.pt").unlink()
    with pytest.raises(UserError) as e:
        resume_run(tmp_path / "run", quiet=True)
    msg = str(e.value)
    assert "has no last.pt" in msg and "best.pt (epoch 1) is intact" in msg and "records epochs up to 3" in msg
    assert f"cp {tmp_path / 'run' / 'best.pt'} {tmp_path / 'run' / 'last.pt'}" in msg
    with pytest.raises(UserError, match="already holds a run"):
        open_run(tmp_path / "run", cfg, quiet=True)  # nor is it reused as --out
    assert (tmp_path / "run" / "best.pt").read_bytes() == older
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4


def test_a_run_that_lost_both_checkpoints_is_not_started_again(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    (run / "last.pt").unlink()
    (run / "best.pt").unlink()
    with pytest.raises(UserError, match="has no checkpoint .* records 3 finished epochs; nothing was deleted"):
        resume_run(run, quiet=True)
    assert (run / "metrics.jsonl").read_text() == (trained / "metrics.jsonl").read_text()
    assert (run / "monitor.npz").exists()


# -- 2. the run directory moved or deleted while training ----------------------------------------


@pytest.mark.parametrize("when", ["between checkpoints", "while a checkpoint is written"])
def test_a_run_whose_directory_is_moved_stops_and_says_where_it_went(tmp_path, monkeypatch, capsys, when):
    held = threading.Event()
    if when == "while a checkpoint is written":
        real = neurosim.training.checkpoint.write_atomic
        monkeypatch.setattr(neurosim.training.checkpoint, "write_atomic", lambda *a, **k: (held.wait(10), real(*a, **k)))
    run = open_run(tmp_path / "run", CFG, quiet=True)

    def move(r):
        if r.step == 46:  # the first step of epoch 2
            if when == "between checkpoints":
                r.flush()
            os.rename(tmp_path / "run", tmp_path / "moved")
            held.set()  # epoch 1's commit, if held, now writes into a directory that is gone

    with pytest.raises(UserError) as e:
        run.train(on_step=move)
    msg = str(e.value)
    assert f"run directory {tmp_path / 'run'} was moved to {tmp_path / 'moved'} while the run trained" in msg
    assert f"--resume {tmp_path / 'moved'}" in msg
    assert "error:" not in capsys.readouterr().err  # the commit that failed with it is not said twice
    assert not (tmp_path / "run").exists()  # nothing came back under the old name
    committed = when == "between checkpoints"
    assert (tmp_path / "moved" / "last.pt").exists() == committed
    resumed = resume_run(tmp_path / "moved", quiet=True)
    assert resumed.epoch == (1 if committed else 0)
    resumed.train()
    assert [r["epoch"] for r in records(tmp_path / "moved" / "metrics.jsonl")] == [0, 1, 2, 3]


@pytest.mark.parametrize("what", ["directory", "lock"])
def test_a_run_whose_directory_or_lock_is_deleted_stops_and_recreates_nothing(tmp_path, what):
    run = open_run(tmp_path / "run", CFG, quiet=True)

    def delete(r):
        if r.step == 50:
            r.flush()  # epoch 1's commit is on disk: rmtree does not race its writes
            if what == "directory":
                shutil.rmtree(tmp_path / "run")
            else:
                (tmp_path / "run" / ".lock").unlink()

    with pytest.raises(UserError) as e:
        run.train(on_step=delete)
    if what == "directory":
        assert "was deleted while the run trained" in str(e.value)
        assert not (tmp_path / "run").exists()
    else:
        assert "lost its lock file .lock while the run trained" in str(e.value)
        assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


# -- 3. torchrun: an interrupted epoch's statistics ----------------------------------------------

@pytest.mark.slow
def test_torchrun_resumed_mid_epoch_writes_the_metrics_of_an_uninterrupted_run(tmp_path):
    from tests.test_distributed import launch

    r0, _ = launch("partial_stats", tmp_path, 2)
    assert r0["stopped_at_batch"] == 1  # one batch into the second epoch
    assert records(tmp_path / "stopped" / "metrics.jsonl") == records(tmp_path / "straight" / "metrics.jsonl")


# -- 4. streamed runs: the RNG state ----------------------------------------------------------

@pytest.mark.slow
def test_a_streamed_run_resumed_mid_epoch_writes_the_same_checkpoint(tmp_path):
    from tests.test_stream_run import imagenet_config, make_imagenet

    make_imagenet(tmp_path / "imagenet")
    cfg = imagenet_config(tmp_path)
    straight = open_run(tmp_path / "straight", cfg, quiet=True)
    straight.train()
    straight.close()
    stopped = open_run(tmp_path / "stopped", cfg, quiet=True)
    with pytest.raises(RunInterrupted):
        stopped.train(lambda r: setattr(r, "stop_requested", r.step == 8))  # epoch 2, batch 2 of 6
    stopped.close()
    resumed = resume_run(tmp_path / "stopped", quiet=True)
    resumed.train()
    resumed.close()
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("straight", "stopped"))
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert_same(a, b)


# -- 5. metrics.jsonl and config.json damaged ----------------------------------------------------

def _halve(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_line(path):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:1] + lines[2:]))


@pytest.mark.parametrize("damage", [
    _halve,
    lambda p: p.write_text(p.read_text().splitlines(keepends=True)[0]),  # truncated to its first line
    lambda p: p.write_text(""),
    lambda p: p.unlink(),
    _drop_line,
])
def test_lost_metrics_records_are_rebuilt_from_the_checkpoint_and_said(trained, tmp_path, capsys, damage):
    run = copy_run(trained, tmp_path / "run")
    path = run / "metrics.jsonl"
    damage(path)
    left = {r["epoch"] for r in metrics_records(path)} if path.exists() else set()
    assert left != {0, 1, 2, 3}
    resume_run(run, quiet=False).train()  # --epochs as trained: nothing to train, the files are put right
    err = capsys.readouterr().err
    lost = epoch_list(sorted({0, 1, 2, 3} - left))
    assert f"metrics.jsonl had lost the records of {lost}" in err and "rewritten from its checkpoint" in err
    assert records(run / "metrics.jsonl") == records(trained / "metrics.jsonl")


def test_an_edited_metrics_record_is_restored_and_said(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    text = (run / "metrics.jsonl").read_text()
    lines = text.splitlines(keepends=True)
    edited = json.loads(lines[2])
    edited["test_acc"] = 99.99
    (run / "metrics.jsonl").write_text("".join([*lines[:2], json.dumps(edited) + "\n", *lines[3:]]))
    resume_run(run, quiet=False).train()
    assert "held other values for the records of epoch 2" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text().splitlines()[2] != json.dumps(edited)
    assert records(run / "metrics.jsonl") == records(trained / "metrics.jsonl")
    assert (run / "metrics.jsonl").read_text().splitlines()[1] == text.splitlines()[1]  # kept with its timing


def test_metrics_deleted_while_training_come_back_whole(tmp_path):
    run = open_run(tmp_path / "run", CFG, quiet=True)
    run.train(on_step=lambda r: (tmp_path / "run" / "metrics.jsonl").unlink() if r.step == 50 else None)
    assert [r["epoch"] for r in records(tmp_path / "run" / "metrics.jsonl")] == [0, 1, 2, 3]


def test_figures_of_a_run_whose_metrics_lost_lines_are_drawn_from_the_checkpoint(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    _drop_line(run / "metrics.jsonl")
    with pytest.warns(UserWarning, match=r"lacks the records of epoch 1; they are drawn from the copy in"):
        drawn = read_metrics(run)
    assert [r["epoch"] for r in drawn] == [0, 1, 2, 3]
    (run / "metrics.jsonl").unlink()
    with pytest.warns(UserWarning, match=r"lacks the records of epochs 0–3"):
        assert [r["epoch"] for r in read_metrics(run)] == [0, 1, 2, 3]


@pytest.mark.parametrize("damage", [
    lambda p: p.unlink(),
    lambda p: p.write_text(""),
    lambda p: p.write_text("{not json"),
    lambda p: p.write_text("[]"),
    lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    lambda p: p.write_bytes(b"\xff\xfe\x00junk"),
    lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "lr": 0.5})),  # edited
    lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "colour": "red"})),  # unknown field
    lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "hidden": "wide"})),  # invalid value
])
def test_a_damaged_config_json_is_restored_from_the_checkpoint(trained, tmp_path, capsys, damage):
    run = copy_run(trained, tmp_path / "run")
    whole = (run / "config.json").read_text()
    damage(run / "config.json")
    resume_run(run, quiet=False)
    assert "config.json" in capsys.readouterr().err
    assert (run / "config.json").read_text() == whole


def test_the_command_line_resume_restores_a_damaged_config_json_too(trained, tmp_path, capsys, monkeypatch):
    # the command reads config.json before resume_run: a damaged one must reach resume_run's restore
    run = copy_run(trained, tmp_path / "run")
    whole = (run / "config.json").read_text()
    (run / "config.json").write_text("[")
    monkeypatch.setattr("neurosim.tools.figures.plot_run", lambda *a, **k: [])
    with pytest.raises(SystemExit) as e:
        main(argv=["run", "--resume", str(run)])
    assert e.value.code == 0
    assert "rewritten from the checkpoint" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text()) == json.loads(whole)


def test_a_config_json_that_cannot_be_rewritten_is_one_message(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    (run / "config.json").unlink()
    (run / "config.json").mkdir()
    with pytest.raises(UserError, match=r"cannot write configuration .*config\.json: is a directory"):
        resume_run(run, quiet=True)


# -- 11. a lock that was never taken ---------------------------------------------------------------

def test_a_lock_that_could_not_be_taken_leaves_nothing_for_its_finaliser(tmp_path, monkeypatch):
    said = []
    monkeypatch.setattr(sys, "unraisablehook", said.append)
    with pytest.raises(UserError, match="cannot use run directory"):
        DirectoryLock(tmp_path / "missing")
    gc.collect()
    assert said == []


# -- weaker messages: a full disk names the file, figures of a read-only run -------------------

def test_a_full_disk_under_the_metrics_file_names_it(tmp_path, monkeypatch):
    real_open = open

    def opener(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return FullDisk(f, 0) if pathlib.Path(path).name.startswith("metrics.jsonl") and "r" not in mode else f

    run = open_run(tmp_path / "run", preset("kp_mlp_digits", epochs=1, device="cpu", monitor_every=0), quiet=True)
    for module in (neurosim.common.files, neurosim.training.run_log):
        monkeypatch.setattr(module, "open", opener, raising=False)
    with pytest.raises(UserError, match=rf"{tmp_path / 'run' / 'metrics.jsonl'}: disk full"):
        run.train()


def plot(*args, capsys):
    with pytest.raises(SystemExit) as done:
        main(plot_cli_entry, [str(a) for a in args])
    return done.value.code, capsys.readouterr().err


def test_figures_of_a_read_only_run_name_the_figure_and_go_to_out(trained, tmp_path, monkeypatch, capsys):
    run = copy_run(trained, tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    real_savefig, real_unlink = matplotlib.figure.Figure.savefig, pathlib.Path.unlink

    def savefig(fig, fname, *a, **kw):
        if pathlib.Path(fname).parent == run:
            raise OSError(errno.EROFS, "Read-only file system", str(fname))
        return real_savefig(fig, fname, *a, **kw)

    def unlink(path, missing_ok=False):
        if path.parent == run:  # a read-only file system says so even of a file that is not there
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    code, err = plot(run, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and ".tmp" not in err, err
    assert f"cannot write figure {run / 'accuracy.png'}: read-only file system" in err and "--out" in err
    code, err = plot(run, "--out", tmp_path / "figs", capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "figs" / "accuracy.png").exists() and (tmp_path / "figs" / "angle_w_bt_by_step.png").exists()
    assert sorted(p.name for p in run.iterdir()) == before
