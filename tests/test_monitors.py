"""Monitors record the right values, change nothing, never sync, stay bounded and resume exactly."""

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import neurosim.observe.monitors as monitors
from neurosim.common.errors import UserError
from neurosim.core.analysis import angle_deg
from neurosim.core.circuit import Circuit
from neurosim.models import build_mlp, build_resnet
from neurosim.observe.monitors import Monitor, MonitorConfig, load_monitor
from neurosim.rules import Backprop, FeedbackAlignment, KolenPollack, SignSymmetry, WeightMirror


def data(n=32, shape=(8,), classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.randint(0, classes, (n,), generator=g)


def train(circuit, monitor, steps, x, y, lr=0.1):
    """Plain SGD steps (stateless, so a copied circuit continues identically), sleeping after
    each step when the rule sleeps, with the monitor called as the training loop calls it."""
    engaged = torch.optim.SGD(circuit.engaged_parameters(), lr=lr)
    sleepers = circuit.sleep_parameters()
    sleeping = torch.optim.SGD(sleepers, lr=lr) if sleepers else None
    for step in steps:
        engaged.zero_grad(set_to_none=True)
        F.cross_entropy(circuit(x), y).backward()
        engaged.step()
        monitor.after_step(step)
        if sleeping:
            monitor.before_sleep(step)
            sleeping.zero_grad(set_to_none=True)
            circuit.sleep(16, torch.Generator().manual_seed(step))
            sleeping.step()
            monitor.after_sleep(step)


@contextlib.contextmanager
def no_host_sync():
    """Make every way of reading a tensor's value on the host raise."""
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(*args, **kwargs):
        raise AssertionError("host sync while recording")

    try:
        for n in names:
            setattr(torch.Tensor, n, refuse)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


# -- values ------------------------------------------------------------------------------------

def test_angle_norm_ratio_and_traces_of_known_matrices():
    c = Circuit(rule=FeedbackAlignment())
    c.input("x", 6)
    c.population("y", 5)
    c.dense("x", "y")
    syn = c.synapses["x->y"]
    w = syn.weight.detach().flatten().double()
    u = torch.randn(w.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u -= (u @ w) / (w @ w) * w  # orthogonal to W
    theta = math.radians(35.0)
    b = 2 * w.norm() * (math.cos(theta) * w / w.norm() + math.sin(theta) * u / u.norm())
    with torch.no_grad():
        syn.feedback.copy_(b.view_as(syn.feedback))
    m = Monitor(c, MonitorConfig(every=1, traces=7, probe=0), total_steps=1)
    a = m.arrays()
    assert a["angle"][0, 0] == pytest.approx(35.0, abs=1e-4)
    assert a["norm_ratio"][0, 0] == pytest.approx(2.0, rel=1e-6)
    idx = torch.from_numpy(a["trace_index"][0])
    assert (idx >= 0).all() and len(set(idx.tolist())) == 7
    assert np.array_equal(a["traces_w"][0, 0], syn.weight.detach().flatten()[idx].numpy())
    assert np.array_equal(a["traces_b"][0, 0], syn.feedback.detach().flatten()[idx].numpy())
    assert np.isnan(a["delta_angle"]).all()  # probe off


@pytest.mark.parametrize("rule", [SignSymmetry(), KolenPollack()])
def test_conv_traces_follow_flat_positions_even_channels_last(rule):
    c = build_resnet("resnet18", rule, 10, (3, 8, 8), width=0.0625).to(memory_format=torch.channels_last)
    m = Monitor(c, MonitorConfig(every=1, traces=9, probe=0, scatter=20), total_steps=1)
    a = m.arrays()
    assert a["angle"].shape == (1, 21) and a["traces_w"].shape == (1, 21, 9)
    for i, syn in enumerate(c.synapses.values()):
        idx = torch.from_numpy(a["trace_index"][i])
        bt = syn.feedback_matrix().detach()
        assert np.array_equal(a["traces_w"][0, i], syn.weight.detach().flatten()[idx].numpy())
        assert np.array_equal(a["traces_b"][0, i], bt.flatten()[idx].numpy())
        assert a["angle"][0, i] == pytest.approx(float(angle_deg(syn.weight, bt)), abs=1e-4)
        sidx = torch.from_numpy(a["scatter_index"][i])
        assert np.array_equal(a["scatter_w"][0, i], syn.weight.detach().flatten()[sidx].numpy())


def test_synapses_with_fewer_weights_than_traces_are_padded():
    c = build_mlp(Backprop(), 3, (2,), 2)  # 6 and 4 weights
    a = Monitor(c, MonitorConfig(every=1, traces=5, probe=0, scatter=8), total_steps=1).arrays()
    assert a["traces_w"].shape == (1, 2, 5)
    assert (a["trace_index"][1] == -1).sum() == 1 and np.isnan(a["traces_w"][0, 1]).sum() == 1
    assert a["scatter_w"].shape == (1, 2, 6) and np.isnan(a["scatter_w"][0, 1]).sum() == 2


def test_delta_and_update_angles_match_direct_computation():
    c = build_mlp(FeedbackAlignment(), 8, (16,), 4)
    x, y = data()
    m = Monitor(c, MonitorConfig(every=1, probe=32), total_steps=1, probe=(x, y), loss_fn=F.cross_entropy)
    a = m.arrays()
    s1, s2 = c.synapses["x->h1"], c.synapses["h1->y"]
    with torch.no_grad():
        drive = x @ s1.weight.T + s1.bias
        out = (torch.relu(drive) @ s2.weight.T + s2.bias).requires_grad_(True)
    with torch.enable_grad():
        d_out, = torch.autograd.grad(F.cross_entropy(out, y), out)
    err = {name: (d_out @ m_) * (drive > 0) for name, m_ in (("fa", s2.feedback), ("bp", s2.weight))}
    assert a["delta_angle"][0, 0] == pytest.approx(float(angle_deg(err["fa"], err["bp"])), abs=1e-3)
    assert a["grad_angle"][0, 0] == pytest.approx(float(angle_deg(err["fa"].T @ x, err["bp"].T @ x)), abs=1e-3)
    assert 10 < a["delta_angle"][0, 0] < 170
    assert a["delta_angle"][0, 1] == pytest.approx(0.0, abs=1e-3)  # the output's error comes from the loss
    assert a["grad_angle"][0, 1] == pytest.approx(0.0, abs=1e-3)


def test_backprop_has_zero_angles_and_feedback_alignment_does_not():
    x, y = data(shape=(3, 8, 8), classes=10)
    for rule, zero in ((Backprop(), True), (FeedbackAlignment(), False)):
        c = build_resnet("resnet18", rule, 10, (3, 8, 8), width=0.0625)
        a = Monitor(c, MonitorConfig(every=1, probe=16), 1, (x, y), F.cross_entropy).arrays()
        hidden = a["delta_angle"][0, :-1]
        if zero:
            assert np.abs(a["angle"]).max() < 1e-3 and np.abs(a["delta_angle"]).max() < 1e-2
            assert np.abs(a["grad_angle"]).max() < 1e-2 and np.allclose(a["norm_ratio"], 1.0)
        else:
            assert (hidden > 20).all() and a["delta_angle"][0, -1] < 1e-2


def test_recording_changes_nothing_in_the_circuit():
    c = build_resnet("resnet18", KolenPollack(decay=0.01), 10, (3, 8, 8), width=0.0625)
    x, y = data(shape=(3, 8, 8), classes=10)
    F.cross_entropy(c(x), y).backward()  # leave .grad populated, as between steps
    c.synapses["conv1"].weight.grad = None  # and one parameter without a grad
    state = {k: v.clone() for k, v in c.state_dict().items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in c.named_parameters()}
    rules = {n: s.rule for n, s in c.synapses.items()}
    m = Monitor(c, MonitorConfig(every=1, probe=16), 2, (x, y), F.cross_entropy)
    m.after_step(1)
    for k, v in c.state_dict().items():  # weights and batch-norm running statistics
        assert torch.equal(v, state[k]), k
    for n, p in c.named_parameters():
        assert (p.grad is None) == (grads[n] is None) and (p.grad is None or torch.equal(p.grad, grads[n])), n
    assert all(s.rule is rules[n] for n, s in c.synapses.items())
    assert c.mode == "engaged" and np.isfinite(m.arrays()["delta_angle"]).all()


def test_sleep_columns_record_the_effect_of_sleep():
    c = build_mlp(WeightMirror(), 8, (16,), 4)
    x, y = data()
    m = Monitor(c, MonitorConfig(every=2, probe=0), 4, (x, y), F.cross_entropy)
    opt = torch.optim.SGD(c.sleep_parameters(), lr=0.2)
    m.before_sleep(0)
    for i in range(30):
        opt.zero_grad()
        c.sleep(64, torch.Generator().manual_seed(i))
        opt.step()
    m.after_sleep(0)
    train(c, m, range(1, 5), x, y)
    a = m.arrays()
    assert list(a["steps"]) == [0, 2, 4]
    before, after = a["sleep_angle_before"], a["sleep_angle_after"]
    assert np.isfinite(before).all() and np.isfinite(after).all()
    assert (after[0] < before[0] - 30).all()  # thirty mirror batches align B
    assert np.allclose(before[0], a["angle"][0])
    assert "sleep_angle_before" not in Monitor(build_mlp(KolenPollack(), 8, (4,), 2), MonitorConfig(), 1).arrays()


# -- cost and bounds ---------------------------------------------------------------------------

def test_recording_never_reads_values_on_the_host(monkeypatch):
    monkeypatch.setattr(monitors, "CHUNK_ROWS", 3)
    c = build_mlp(WeightMirror(), 8, (16,), 4)
    x, y = data()
    m = Monitor(c, MonitorConfig(every=1, probe=32, snapshots=4), 6, (x, y), F.cross_entropy)
    opt = torch.optim.SGD(c.engaged_parameters(), lr=0.1)
    for step in range(1, 9):  # past two chunk boundaries
        F.cross_entropy(c(x), y).backward()
        opt.step()
        with no_host_sync():
            m.after_step(step)
            m.before_sleep(step)
            m.after_sleep(step)
    a = m.arrays()
    assert list(a["steps"]) == list(range(9)) and np.isfinite(a["delta_angle"]).all()
    assert list(a["scatter_steps"]) == [0, 2, 4, 6]


def test_device_buffer_is_fixed_and_size_estimate_is_exact():
    c = build_mlp(WeightMirror(), 8, (6,), 4)
    cfg = MonitorConfig(every=1, probe=0, traces=4, scatter=10, snapshots=3)
    m = Monitor(c, cfg, total_steps=10**6)
    held = m.buffer_nbytes()
    assert m.chunk_rows == monitors.CHUNK_ROWS
    for step in range(1, monitors.CHUNK_ROWS + 20):
        m.after_step(step)
    assert m.buffer_nbytes() == held and len(m.arrays()["steps"]) == monitors.CHUNK_ROWS + 20

    short = Monitor(c, cfg, total_steps=12)
    train(c, short, range(1, 13), *data())
    assert sum(a.nbytes for a in short.arrays().values()) == short.nbytes()


def test_oversize_configuration_is_refused_with_its_size():
    c = build_mlp(Backprop(), 64, (256,), 10)
    with pytest.raises(UserError, match=r"record [\d.]+ MB over this run.*trace fewer weights.*every"):
        Monitor(c, MonitorConfig(every=1, traces=10**6), total_steps=200 * 391)
    with pytest.raises(UserError, match="matches no synapse; the circuit has x->h1, h1->y"):
        Monitor(c, MonitorConfig(synapses="conv*"), total_steps=1)
    chosen = Monitor(c, MonitorConfig(synapses="x->*, nothing"), total_steps=1, probe=None)
    assert chosen.names == ["x->h1"]


def test_resnet18_default_size_estimate_is_a_few_megabytes():
    numels = [s.weight.numel() for s in build_resnet("resnet18", Backprop(), 100).synapses.values()]
    assert len(numels) == 21
    size = monitors.estimate_nbytes(MonitorConfig(), numels, 200 * 391, sleeps=True)
    assert 1e6 < size < 4e6


# -- files and resuming ------------------------------------------------------------------------

def test_files_round_trip_through_the_loader(tmp_path):
    c = build_mlp(WeightMirror(), 8, (16, 8), 4)
    x, y = data()
    m = Monitor(c, MonitorConfig(every=2, probe=32, traces=3, scatter=5, snapshots=3), 6, (x, y), F.cross_entropy)
    train(c, m, range(1, 7), x, y)
    m.flush(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["monitor.json", "monitor.npz"]
    rec = load_monitor(tmp_path)
    for name, a in m.arrays().items():
        np.testing.assert_array_equal(getattr(rec, name), a, err_msg=name)
    assert rec.synapses == ("x->h1", "h1->h2", "h2->y") and rec.has_probe and rec.has_sleep
    steps, angle = rec.series("angle", "h1->h2")
    assert list(steps) == [0, 2, 4, 6] and np.array_equal(angle, rec.angle[:, 1])
    steps, w, b = rec.trace("h2->y", 2)
    assert np.array_equal(w, rec.traces_w[:, 2, 2])
    out, inp = rec.traced_position("h2->y", 2)
    assert out * 8 + inp == rec.trace_index[2, 2]
    index = json.loads((tmp_path / "monitor.json").read_text())
    assert index["arrays"]["angle"] == {"shape": [4, 3], "unit": "degrees", "meaning": monitors.ARRAYS["angle"][1]}
    assert index["trace_index"]["x->h1"] == rec.trace_index[0].tolist()
    with pytest.raises(KeyError, match="not monitored"):
        rec.series("angle", "nope")
    with pytest.raises(UserError, match="no monitor files"):
        load_monitor(tmp_path / "elsewhere")


def test_resumed_monitor_writes_the_same_files(tmp_path, monkeypatch):
    monkeypatch.setattr(monitors, "CHUNK_ROWS", 2)  # resume after chunks went to the host
    x, y = data()
    cfg = MonitorConfig(every=2, probe=32, traces=3, scatter=6, snapshots=4)

    def fresh():
        c = build_mlp(WeightMirror(), 8, (16,), 4, seed=1)
        return c, Monitor(c, cfg, 12, (x, y), F.cross_entropy, seed=5)

    c, whole = fresh()
    train(c, whole, range(1, 13), x, y)
    whole.flush(tmp_path / "whole")

    c, part = fresh()
    train(c, part, range(1, 8), x, y)
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    c = copy.deepcopy(c)
    resumed = Monitor(c, cfg, 12, (x, y), F.cross_entropy, seed=5)
    resumed.load_state_dict(state)
    train(c, resumed, range(8, 13), x, y)
    resumed.flush(tmp_path / "resumed")

    a, b = load_monitor(tmp_path / "whole"), load_monitor(tmp_path / "resumed")
    for name in monitors.ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (tmp_path / "whole" / "monitor.json").read_text() == (tmp_path / "resumed" / "monitor.json").read_text()

    other = Monitor(c, attrs.evolve(cfg, traces=4), 12)
    with pytest.raises(UserError, match=r"traces per synapse 3 \(this configuration: 4\)"):
        other.load_state_dict(state)


# -- the quantities, declared once -----------------------------------------------------------------

OLD_FILES = Path(__file__).parent / "data" / "monitor_written_before_quantities"


def test_docs_table_is_generated_from_the_declared_quantities():
    from neurosim.observe.monitor_files import QUANTITIES, with_quantities

    path = Path(__file__).resolve().parents[1] / "docs" / "monitors.md"
    doc = path.read_text(encoding="utf-8")
    assert doc == with_quantities(doc), "regenerate with: python -m neurosim.observe.monitor_files docs/monitors.md"
    assert all(f"| `{q.name}` | `[{', '.join(q.axes)}]` | {q.unit} |" in doc for q in QUANTITIES)
    # the module docstring points at the table instead of keeping a list of its own
    assert "monitor_files.QUANTITIES" in monitors.__doc__ and "``traces_b``" not in monitors.__doc__


def test_what_a_monitor_writes_is_what_is_declared(tmp_path):
    from neurosim.observe.monitor_files import AXES, QUANTITIES, SCALARS, SLEEP

    declared = {q.name: q for q in QUANTITIES}
    assert SCALARS == ("angle", "norm_ratio", "delta_angle", "grad_angle") and len(SLEEP) == 4
    for rule, sleeps in ((WeightMirror(), True), (KolenPollack(), False)):
        c = build_mlp(rule, 8, (16,), 4)
        x, y = data()
        m = Monitor(c, MonitorConfig(every=2, probe=8, traces=3, scatter=4, snapshots=2), 4, (x, y), F.cross_entropy)
        train(c, m, range(1, 5), x, y)
        arrays = m.arrays()
        assert set(arrays) == {q.name for q in QUANTITIES
                               if q.required or q.group == "probe" or (sleeps and q.group == "sleep")}
        for name, a in arrays.items():
            assert a.ndim == len(declared[name].axes) and set(declared[name].axes) <= set(AXES), name
        m.flush(tmp_path / rule.name)
        index = json.loads((tmp_path / rule.name / "monitor.json").read_text())
        assert {k: (v["unit"], v["meaning"]) for k, v in index["arrays"].items()} == \
            {k: (declared[k].unit, declared[k].meaning) for k in arrays}
        rec = load_monitor(tmp_path / rule.name)
        assert (rec.sleep_angle_before is not None) == sleeps and rec.has_sleep == sleeps


def test_files_written_before_an_optional_quantity_still_load(tmp_path, monkeypatch):
    """A file in the layout of an earlier version (a weight-mirror run's, kept in tests/data) loads;
    a quantity declared later as optional reads as None from it, and from a file that has it, as
    written; one declared required would make such files unreadable, which is why new ones are not."""
    import shutil

    from neurosim.observe import monitor_files
    from neurosim.observe.monitor_files import QUANTITIES, Quantity

    old = load_monitor(OLD_FILES)
    assert old.synapses == ("x->h1", "h1->y") and old.angle.shape == (3, 2) and old.has_sleep and old.has_probe
    assert old.traces_w.shape == (3, 2, 2) and old.rules == {"x->h1": "wm", "h1->y": "wm"}

    added = Quantity("feedback_norm", ("record", "synapse"), "weight", "‖B‖, a quantity declared after the file",
                     required=False)
    monkeypatch.setattr(monitor_files, "QUANTITIES", (*QUANTITIES, added))
    rec = load_monitor(OLD_FILES)
    assert rec.feedback_norm is None and np.array_equal(rec.angle, old.angle, equal_nan=True)
    newer = tmp_path / "newer"
    shutil.copytree(OLD_FILES, newer)
    arrays = dict(np.load(newer / "monitor.npz"))
    np.savez(newer / "monitor.npz", **arrays, feedback_norm=np.ones_like(arrays["angle"]))
    assert np.array_equal(load_monitor(newer).feedback_norm, np.ones((3, 2), np.float32))
    np.savez(newer / "monitor.npz", **arrays, feedback_norm=np.ones((3, 5), np.float32))
    with pytest.raises(UserError, match=r"array feedback_norm has shape \(3, 5\) where \(3, 2\) fits"):
        load_monitor(newer)
    monkeypatch.setattr(monitor_files, "QUANTITIES", (*QUANTITIES, attrs.evolve(added, required=True)))
    with pytest.raises(UserError, match="lacks the arrays feedback_norm"):
        load_monitor(OLD_FILES)


def test_each_record_holds_the_probe_batchs_loss_and_accuracy_and_old_checkpoints_still_load():
    """The loss by step: at every record the loss and top-1 of the fixed probe batch under the
    circuit's own forward (what the dashboard draws by step); a checkpoint written before these
    columns existed continues with them NaN for its earlier rows."""
    c = build_mlp(KolenPollack(), 8, (16,), 4)
    x, y = data()

    def probe_stats():
        with torch.no_grad():
            out = c(x[:8])
        return float(F.cross_entropy(out, y[:8])), float((out.argmax(1) == y[:8]).float().mean() * 100)

    expected = [probe_stats()]  # the record of step 0, made when the monitor starts
    m = Monitor(c, MonitorConfig(every=2, probe=8), 4, (x, y), F.cross_entropy)
    for step in (1, 2, 3, 4):
        train(c, m, [step], x, y)
        if step % 2 == 0:
            expected.append(probe_stats())
    arrays = m.arrays()
    assert list(arrays["steps"]) == [0, 2, 4]
    np.testing.assert_allclose(arrays["probe_loss"], [e[0] for e in expected], rtol=1e-5)
    np.testing.assert_allclose(arrays["probe_top1"], [e[1] for e in expected], rtol=1e-6)
    # A buffer state saved before the per-record columns: its rows are a prefix of today's.
    state = m.state_dict()
    width = m.records.width
    state["rows"] = state["rows"][:, :width - 2]
    state["width"] = width - 2
    again = Monitor(c, MonitorConfig(every=2, probe=8), 4, (x, y), F.cross_entropy)
    again.load_state_dict(state)
    restored = again.arrays()
    assert np.isnan(restored["probe_loss"]).all()
    np.testing.assert_array_equal(restored["angle"], arrays["angle"])
