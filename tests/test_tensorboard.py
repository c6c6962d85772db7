"""The monitor's records in a run's TensorBoard event files: every per-synapse scalar at its
record step, histograms of W, B and W − Bᵀ, the sleep angles, once each, also across a resume."""

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from neurosim.observe.monitor_files import SCALARS, SLEEP, load_monitor  # noqa: E402
from neurosim.training.config import preset  # noqa: E402
from neurosim.training.run import RunInterrupted  # noqa: E402
from neurosim.training.run_dir import open_run, resume_run  # noqa: E402
from tests.test_signals import _stop_after_mirror_batch  # noqa: E402

TINY = dict(epochs=1, train_limit=128, monitor_every=2, device="cpu")


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def points(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny digits run each of WM (sleeps), KP and DFA (no feedback matrix), with monitors."""
    root = tmp_path_factory.mktemp("tb")
    out = {}
    for name in ("wm_mlp_digits", "kp_mlp_digits", "dfa_mlp_digits"):
        run = open_run(root / name, preset(name, **TINY), quiet=True)
        run.train()
        run.close()
        out[name] = run
    return out


@pytest.mark.parametrize("name", ["wm_mlp_digits", "kp_mlp_digits", "dfa_mlp_digits"])
def test_every_monitor_record_is_a_scalar_at_its_step(runs, name):
    run = runs[name]
    rec, acc = load_monitor(run.run_dir), events(run.run_dir)
    tags = set(acc.Tags()["scalars"])
    assert {"test_acc", "train_loss", "lr"} <= tags  # the epoch scalars are still there
    assert len(rec.steps) == 3 and list(rec.steps) == [0, 2, 4]
    quantities = [q for q in (*SCALARS, *SLEEP) if getattr(rec, q) is not None]
    expected = set()
    for q in quantities:
        for name_ in rec.synapses:
            steps, values = rec.series(q, name_)
            tag = f"synapse/{name_}/{q}"
            if not len(steps):
                assert tag not in tags  # never recorded (DFA's W–Bᵀ angle): no empty chart
                continue
            expected.add(tag)
            got = points(acc, tag)
            assert [s for s, _ in got] == steps.tolist(), tag
            np.testing.assert_array_equal(np.float32([v for _, v in got]), values.astype(np.float32), err_msg=tag)
    assert expected == {t for t in tags if t.startswith("synapse/")}
    for q in ("angle", "norm_ratio", "delta_angle", "grad_angle"):
        assert (f"synapse/{rec.synapses[0]}/{q}" in tags) == (name != "dfa_mlp_digits" or q.startswith(("delta",
                                                                                                         "grad")))
    for q in ("probe_loss", "probe_top1"):  # the probe batch's loss and accuracy, by step
        got = points(acc, f"probe/{q.removeprefix('probe_')}")
        assert [s for s, _ in got] == rec.steps.tolist()
        np.testing.assert_array_equal(np.float32([v for _, v in got]), getattr(rec, q).astype(np.float32))
    sleeping = name == "wm_mlp_digits"
    assert (f"synapse/{rec.synapses[0]}/sleep_angle_before" in tags) == sleeping
    assert (f"synapse/{rec.synapses[0]}/sleep_angle_after" in tags) == sleeping
    if sleeping:  # the sleep before training and the sleeps after recorded steps
        steps, _ = rec.series("sleep_angle_after", rec.synapses[0])
        assert 0 in steps.tolist() and len(steps) >= 2


@pytest.mark.parametrize("name", ["wm_mlp_digits", "kp_mlp_digits", "dfa_mlp_digits"])
def test_histograms_of_w_b_and_their_difference_at_every_record(runs, name):
    run = runs[name]
    rec, acc = load_monitor(run.run_dir), events(run.run_dir)
    feedback = name != "dfa_mlp_digits"
    expected = {f"hist/{s}/{w}" for s in rec.synapses for w in (("W", "B", "W-B") if feedback else ("W",))}
    assert set(acc.Tags()["histograms"]) == expected
    assert rec.steps[-1] == run.step  # the last record is of the weights as the run ended
    for s in rec.synapses:
        syn = run.circuit.synapses[s]
        w = syn.weight.detach().double()
        tensors = {"W": w}
        if feedback:
            b = syn.feedback_matrix().detach().double()
            tensors.update({"B": b, "W-B": (syn.weight.detach() - syn.feedback_matrix().detach()).double()})
        for what, t in tensors.items():
            hist = acc.Histograms(f"hist/{s}/{what}")
            assert [h.step for h in hist] == rec.steps.tolist()
            h = hist[-1].histogram_value
            assert h.num == t.numel() and sum(h.bucket) == t.numel()
            if what != "W" and name == "wm_mlp_digits":
                continue  # the sleep after the last recorded step moved B since
            assert h.min == pytest.approx(float(t.min()), abs=1e-7) and h.max == pytest.approx(float(t.max()), abs=1e-7)
            assert h.sum == pytest.approx(float(t.sum()), abs=1e-6)
            assert h.sum_squares == pytest.approx(float(t.square().sum()), rel=1e-9)
            assert h.bucket_limit[-1] == pytest.approx(float(t.max()), abs=1e-7)
        first = acc.Histograms(f"hist/{s}/W")[0].histogram_value  # step 0: the circuit as built
        trace = rec.traces_w[0, rec.column(s)]
        assert first.min <= np.nanmin(trace) and np.nanmax(trace) <= first.max


def test_a_resumed_run_writes_each_point_once(tmp_path):
    """Stopped inside a sleep that follows a recorded step: the angles before it were written by
    the stopped run, those after it by the resumed one; no point twice, all as in an unbroken run."""
    cfg = preset("wm_mlp_digits", epochs=2, train_limit=64, batch_size=16, hidden=(24, 16), monitor_every=2,
                 wm_sleep_before=0, wm_sleep_every=2, wm_sleep_batches=6, wm_sleep_batch_size=32, device="cpu")
    open_run(tmp_path / "whole", cfg, quiet=True).train()
    part = open_run(tmp_path / "part", cfg, quiet=True)
    _stop_after_mirror_batch(part, 6 * 2 + 3)  # inside the sleep after step 6 (recorded: every 2)
    with pytest.raises(RunInterrupted):
        part.train()
    stopped = events(tmp_path / "part")
    name = load_monitor(tmp_path / "part").synapses[0]
    before = [s for s, _ in points(stopped, f"synapse/{name}/sleep_angle_before")]
    after = [s for s, _ in points(stopped, f"synapse/{name}/sleep_angle_after")]
    assert before[-2:] == [4, 6] and after[-1] == 4  # the sleep after step 6 was cut short
    resume_run(tmp_path / "part", quiet=True).train()
    whole, part = events(tmp_path / "whole"), events(tmp_path / "part")
    tags = [t for t in whole.Tags()["scalars"] if t.startswith("synapse/")]
    assert sorted(tags) == sorted(t for t in part.Tags()["scalars"] if t.startswith("synapse/"))
    for tag in tags:
        assert points(part, tag) == points(whole, tag), tag
    for tag in whole.Tags()["histograms"]:
        a, b = whole.Histograms(tag), part.Histograms(tag)
        assert [h.step for h in b] == [h.step for h in a] == [0, 2, 4, 6, 8], tag
        assert [h.histogram_value for h in b] == [h.histogram_value for h in a], tag


def test_without_tensorboard_nothing_is_written_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it fails
    run = open_run(tmp_path / "r", preset("kp_mlp_digits", **TINY), quiet=True)
    assert run.callbacks[0].tensorboard is None
    run.train()
    assert not (tmp_path / "r" / "tensorboard").exists() and (tmp_path / "r" / "monitor.npz").exists()


def test_a_failing_writer_is_said_once_and_the_run_goes_on(tmp_path):
    run = open_run(tmp_path / "r", preset("kp_mlp_digits", **{**TINY, "epochs": 2}), quiet=True)
    writer = run.log.tensorboard()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    writer.add_histogram_raw = full
    run.train()
    log = (tmp_path / "r" / "log.txt").read_text()
    assert log.count("cannot write TensorBoard records") == 1
    assert "No space left on device" in log and "the run goes on without them" in log
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 3
