"""Checkpoints written in the background: training is not held up, and nothing of the commit
point's promises is lost (order, errors, a consistent state, the file format)."""

import hashlib
import io
import threading
import time
from collections import Counter

import pytest
import torch

import neurosim.common.files
import neurosim.training.checkpoint
from neurosim.common.errors import UserError
from neurosim.training.checkpoint import CheckpointWriter, load_checkpoint, state_digest
from neurosim.training.config import preset
from neurosim.training.run import RunDiverged
from neurosim.training.run_dir import open_run
from tests.full_disk import FullDisk

CFG = preset("kp_mlp_digits", epochs=2, device="cpu", train_limit=320, monitor_every=5)


def metrics_line(epoch: int) -> dict:
    return {"epoch": epoch, "test_acc": 0.0, "angles": {}}


def one_step(run) -> None:
    x, y = next(iter(run.train_stream.epoch(run.epoch, start=run.batch)))
    run.engaged_step(x, y)
    run.batch += 1


@pytest.fixture
def gate(monkeypatch):
    """Holds every checkpoint file's write until the test sets the event (at most 5 s)."""
    release = threading.Event()
    real = neurosim.training.checkpoint.write_atomic

    def held(path, data, what="file"):
        release.wait(5)
        real(path, data, what)

    monkeypatch.setattr(neurosim.training.checkpoint, "write_atomic", held)
    yield release
    release.set()


def full_disk(monkeypatch, name="last.pt.tmp"):
    """Every later write of ``name`` runs out of space a third of the way in."""
    real_open = open

    def opener(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return FullDisk(f) if str(path).endswith(name) else f

    monkeypatch.setattr(neurosim.common.files, "open", opener, raising=False)


def test_save_returns_before_the_files_are_written_and_they_hold_the_state_saved(tmp_path, gate):
    run = open_run(tmp_path / "r", CFG, quiet=True)
    one_step(run)
    before = {k: v.clone() for k, v in run.circuit.state_dict().items()}
    t0 = time.perf_counter()
    run.save(best=True, metrics=metrics_line(0))
    blocked = time.perf_counter() - t0
    assert not (tmp_path / "r" / "last.pt").exists() and not (tmp_path / "r" / "best.pt").exists()
    assert blocked < 4 and run.checkpoint_writer.busy  # the writes are held for 5 s
    for _ in range(3):  # training goes on while the commit waits
        one_step(run)
    gate.set()
    run.flush()
    assert not run.checkpoint_writer.busy
    for name in ("last.pt", "best.pt"):
        saved = load_checkpoint(tmp_path / "r" / name)
        assert (saved["step"], saved["batch"]) == (1, 1)
        for k, v in before.items():
            assert torch.equal(saved["circuit"][k], v), (name, k)
    assert (tmp_path / "r" / "metrics.jsonl").read_text().count('"epoch": 0') == 1


@pytest.mark.parametrize("surfaces_at", ["flush", "save"])
def test_a_failed_background_write_surfaces_once_and_keeps_the_previous_last_pt(tmp_path, monkeypatch, surfaces_at):
    run = open_run(tmp_path / "r", CFG, quiet=True)
    run.save()
    run.close()  # waits for this first commit
    one_step(run)
    full_disk(monkeypatch)
    run.save()  # returns: the disk fills up in the writer's thread
    with pytest.raises(UserError, match=r"cannot write checkpoint .*last\.pt: disk full; the previous last\.pt is kept"):
        run.flush() if surfaces_at == "flush" else run.save()
    monkeypatch.undo()
    run.flush()  # said once
    assert load_checkpoint(tmp_path / "r" / "last.pt")["step"] == 0
    assert not list((tmp_path / "r").glob("*.tmp"))
    run.save()  # the disk has room again: the next commit goes through
    run.flush()
    assert load_checkpoint(tmp_path / "r" / "last.pt")["step"] == 1


def test_an_interrupt_after_a_failed_write_reports_the_failure_not_a_saved_checkpoint(tmp_path, monkeypatch):
    run = open_run(tmp_path / "r", CFG, quiet=True)
    full_disk(monkeypatch)
    with pytest.raises(UserError) as e:
        run.train(on_step=lambda r: setattr(r, "stop_requested", r.step == len(r.train_stream) + 2))
    assert "disk full" in str(e.value) and "checkpoint saved" not in str(e.value)
    assert not (tmp_path / "r" / "last.pt").exists()


def test_a_finished_run_has_every_file_and_best_pt_is_a_copy_of_its_own(tmp_path):
    run = open_run(tmp_path / "r", CFG, quiet=True)
    run.train()
    assert not run.checkpoint_writer.busy  # train() returns with its files on disk
    last, best = tmp_path / "r" / "last.pt", tmp_path / "r" / "best.pt"
    assert load_checkpoint(last)["epoch"] == 2 and len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 3
    run.save(best=True)
    run.close()  # waits for the commit
    assert best.read_bytes() == last.read_bytes()  # one serialisation, written twice
    assert best.stat().st_ino != last.stat().st_ino  # not a hard link: damage to one spares the other


def test_divergence_waits_for_the_commit_being_written_and_names_it(tmp_path, monkeypatch):
    real = neurosim.training.checkpoint.write_atomic

    def slow(path, data, what="file"):
        time.sleep(1.0)  # longer than the 32 steps to the divergence check
        real(path, data, what)

    monkeypatch.setattr(neurosim.training.checkpoint, "write_atomic", slow)
    run = open_run(tmp_path / "r", CFG, quiet=True)
    epoch = len(run.train_stream)

    def poison(r):
        if r.step == epoch + 1:
            with torch.no_grad():
                r.circuit.synapses["h1->h2"].weight[0, 0] = float("inf")

    with pytest.raises(RunDiverged, match=r"last\.pt, epoch 1\) is kept; nothing after it was saved"):
        run.train(on_step=poison)
    assert load_checkpoint(tmp_path / "r" / "last.pt")["epoch"] == 1


def test_divergence_after_a_failed_write_says_both(tmp_path, monkeypatch):
    full_disk(monkeypatch)
    run = open_run(tmp_path / "r", CFG, quiet=True)
    epoch = len(run.train_stream)

    def poison(r):
        if r.step == epoch + 1:
            with torch.no_grad():
                r.circuit.synapses["h1->h2"].weight[0, 0] = float("inf")

    with pytest.raises(RunDiverged) as e:
        run.train(on_step=poison)
    assert "No checkpoint had been written yet" in str(e.value)
    assert "Writing the next checkpoint failed: cannot write checkpoint" in str(e.value)
    assert "disk full" in str(e.value)


def test_snapshots_reuse_their_buffers_and_keep_types_and_layouts():
    writer = CheckpointWriter()
    conv = torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last)
    state = {"w": conv, "milestones": Counter({60: 1, 120: 1}), "l": [torch.arange(3), 1.5, None, "x"],
             "t": (torch.zeros(2, dtype=torch.bfloat16),), "empty": torch.empty(0)}
    first = writer.snapshot(state)
    kept = conv.clone()
    conv.add_(1)
    assert torch.equal(first["w"], kept) and first["w"].stride() == conv.stride()
    assert type(first["milestones"]) is Counter and first["milestones"] == state["milestones"]
    assert first["milestones"] is not state["milestones"]
    assert type(first["t"]) is tuple and first["l"][1:] == [1.5, None, "x"]
    second = writer.snapshot(state)
    assert second["w"].data_ptr() == first["w"].data_ptr()  # the same buffer, refilled
    assert torch.equal(second["w"], conv)


def test_the_serialised_file_buffer_is_reused_and_cut_to_each_checkpoint(tmp_path):
    writer = CheckpointWriter()
    big = {"format": 1, "config": {}, "epoch": 1, "w": torch.randn(1000)}
    small = {"format": 1, "config": {}, "epoch": 2, "w": torch.randn(10)}
    with writer.serialised(big) as data:
        size = len(data)
    with writer.serialised(small) as data:  # written over the first: no stale bytes after its end
        assert len(data) < size
        (tmp_path / "c.pt").write_bytes(data)
    back = load_checkpoint(tmp_path / "c.pt")
    assert back["epoch"] == 2 and torch.equal(back["w"], small["w"])


def _digest_as_first_written(state) -> str:
    """``state_digest`` as checkpoints of format 1 were first written (bytes copied out)."""
    h = hashlib.blake2b(digest_size=16)

    def walk(v):
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            h.update(f"D{len(v)}".encode())
            for k in sorted(v, key=repr):
                h.update(repr(k).encode())
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(f"L{len(v)}".encode())
            for x in v:
                walk(x)
        else:
            h.update(f"V{v!r}".encode())

    walk(state)
    return h.hexdigest()


def test_the_digest_and_the_file_format_stay_those_of_earlier_checkpoints(tmp_path):
    state = {"format": 1, "config": {"a": 1}, "epoch": 3,
             "w": torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last),
             "h": torch.randn(5).to(torch.bfloat16), "b": torch.tensor([True, False]), "e": torch.empty(0, 3),
             "s": torch.tensor(2.5), "v": torch.arange(10)[::2], "nested": {"l": [torch.ones(2), None, 1.5]}}
    assert state_digest(state) == _digest_as_first_written(state)
    buf = io.BytesIO()
    torch.save({**state, "digest": _digest_as_first_written(state)}, buf)  # an earlier checkpoint
    (tmp_path / "old.pt").write_bytes(buf.getvalue())
    assert load_checkpoint(tmp_path / "old.pt")["epoch"] == 3


@pytest.mark.cuda
def test_cuda_state_is_copied_to_pinned_buffers_once_synchronised():
    writer = CheckpointWriter(pinned=True)
    w = torch.randn(256, 256, device="cuda")
    first = writer.snapshot({"w": w, "host": torch.ones(3)})
    w.add_(1)  # queued after the copy: the snapshot keeps the value before it
    assert first["w"].device.type == "cpu" and first["w"].is_pinned()
    assert torch.equal(first["w"] + 1, w.cpu())
    second = writer.snapshot({"w": w, "host": torch.ones(3)})
    assert second["w"].data_ptr() == first["w"].data_ptr() and torch.equal(second["w"], w.cpu())
