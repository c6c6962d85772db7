"""Traces within a presentation (``neurosim.observe.time_traces``): a monitor given time settings
keeps, at each scatter snapshot, what a direct presentation in time hands over at its traced
pairs, leaves the run's circuit alone, resumes exactly, is drawn by the figures and the
dashboard, and ordinary monitors write none of it."""

import copy
import io
import json

import attrs
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neurosim.common.errors import UserError
from neurosim.core.circuit import Circuit
from neurosim.core.dynamics import TimeSettings, time_backward
from neurosim.observe.monitors import Monitor, MonitorConfig, estimate_nbytes, load_monitor
from neurosim.observe.time_traces import noise_seed
from tests.test_dynamics import circuit
from neurosim.rules import FeedbackAlignment, KolenPollack

TIME = ("time_steps", "time_pre", "time_error", "time_update", "time_update_b", "time_w", "time_b")


def mlp(rule, dtype=torch.float64):
    """``tests/test_dynamics.py``'s dense circuit (a skip from x to y) in ``dtype``."""
    return circuit(rule, "dense").to(dtype)


def convnet(rule):
    """Grouped and strided convolutions, then a dense synapse reading a flattened spatial population."""
    c = Circuit(rule=rule, seed=0)
    c.input("x", (2, 6, 6))
    c.population("c1", (4, 3, 3), activation="relu")
    c.conv("x", "c1", 3, stride=2, padding=1)
    c.population("c2", (4, 3, 3), activation="tanh")
    c.conv("c1", "c2", 3, padding=1, groups=2)
    c.population("y", 3)
    c.dense("c2", "y")
    return c.double()


def data(shape=(6,), n=8, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


SETTINGS = TimeSettings(dt=0.5, duration=2.0, tau=1.0, delay=0.5, tau_plasticity=3.0, tau_decay=50.0)
CFG = MonitorConfig(every=1, probe=8, traces=4, scatter=6, snapshots=2)


def expected(circuit, names, trace_index, x, y, settings):
    """What a direct ``time_backward`` on a copy hands over at each traced pair, in float64:
    per step, the batch mean of the pre signal at unit i and of the drive error at unit j (per
    channel, over positions too, for a convolution), and the running ΔW_ji; then the copy's
    .grad of W and B (the whole presentation's updates)."""
    model = copy.deepcopy(circuit)
    for p in model.parameters():
        p.grad = None
    got = {"pre": [], "error": [], "update": []}

    def units(syn, flat):
        idx = np.unravel_index(flat, tuple(syn.weight.shape))
        post, pre = int(idx[0]), int(idx[1])
        if syn.weight.dim() == 4:  # (out, in/groups, kh, kw): the output channel's group of inputs
            per_out = syn.weight.shape[0] // syn.kind.groups
            pre += (post // per_out) * syn.weight.shape[1]
        return pre, post

    def per_unit(signal, conv):
        return signal.mean(dim=(0, 2, 3)) if conv else signal.reshape(len(signal), -1).mean(0)

    def keep(step, state):
        for q in got.values():
            q.append([])
        for n, row in zip(names, trace_index):
            syn = model.synapses[n]
            conv = syn.weight.dim() == 4
            pre_means = per_unit(state["pre"][syn.pre], conv)
            err_means = per_unit(state["drive_error"][syn.post], conv)
            flat_update = state["update"][n].reshape(-1)
            pre, err, upd = [], [], []
            for f in row.tolist():
                if f < 0:
                    pre.append(np.nan), err.append(np.nan), upd.append(np.nan)
                    continue
                i, j = units(syn, f)
                pre.append(float(pre_means[i])), err.append(float(err_means[j])), upd.append(float(flat_update[f]))
            got["pre"][-1].append(pre), got["error"][-1].append(err), got["update"][-1].append(upd)

    time_backward(model, x, lambda out: F.cross_entropy(out, y), settings, trace=keep)
    series = {k: np.moveaxis(np.array(v), 0, -1) for k, v in got.items()}  # [synapse, trace, time]
    grads = {n: (model.synapses[n].weight.grad.reshape(-1), None if model.synapses[n].feedback is None
                 or model.synapses[n].feedback.grad is None else model.synapses[n].feedback.grad.reshape(-1))
             for n in names}
    return series, grads


@pytest.mark.parametrize("rule, build, shape", [(KolenPollack(decay=0.1), mlp, (6,)),
                                                (FeedbackAlignment(), mlp, (6,)),
                                                (KolenPollack(), convnet, (2, 6, 6))])
def test_recorded_traces_are_what_a_direct_presentation_in_time_hands_over(rule, build, shape):
    """float64 circuit: the monitor's float32 values are the direct call's float64 values rounded,
    exactly; the last running update is the presentation's .grad (W, and B where KP learns it)."""
    c = build(rule)
    x, y = data(shape)
    m = Monitor(c, CFG, 4, (x, y), F.cross_entropy, seed=3, time_settings=SETTINGS)
    a = m.arrays()
    assert m.snapshot_steps == [0] and a["time_pre"].shape == (1, len(m.names), 4, 7)
    # 2/0.5 = 4 steps on, then the settle: 3 feedback hops (y→h2→h1→x) of one delay step each.
    np.testing.assert_array_equal(a["time_steps"], np.arange(1, 8, dtype=np.float32) * 0.5)
    series, grads = expected(c, m.names, m.trace_index, x, y, SETTINGS)
    for key in ("pre", "error", "update"):
        np.testing.assert_array_equal(a[f"time_{key}"][0], series[key].astype(np.float32), err_msg=key)
    assert np.isfinite(a["time_pre"]).sum() > 0 and np.abs(a["time_error"][np.isfinite(a["time_error"])]).max() > 0
    for i, n in enumerate(m.names):
        idx = m.trace_index[i]
        real = idx >= 0
        w, b = c.synapses[n].weight.detach().reshape(-1), c.synapses[n].feedback_matrix().detach().reshape(-1)
        np.testing.assert_array_equal(a["time_w"][0, i, real], w[idx[real]].float().numpy())
        np.testing.assert_array_equal(a["time_b"][0, i, real], b[idx[real]].float().numpy())
        gw, gb = grads[n]
        np.testing.assert_array_equal(a["time_update"][0, i, real, -1], gw[idx[real]].float().numpy())
        if isinstance(rule, KolenPollack):
            np.testing.assert_array_equal(a["time_update_b"][0, i, real, -1], gb[idx[real]].float().numpy())
            assert np.isfinite(a["time_update_b"][0, i, real]).all()
        else:
            assert gb is None and np.isnan(a["time_update_b"]).all()
        assert np.isnan(a["time_pre"][0, i, ~real]).all()


def test_the_feedback_update_is_formed_by_the_rule_where_the_presentation_hands_over_none(monkeypatch):
    """A ``time_backward`` whose trace holds no running ΔB: the monitor forms KP's from the
    synapse's rule on the step's signals, the same values (float64, rounded to float32)."""
    import neurosim.observe.time_traces as time_traces

    c = mlp(KolenPollack(decay=0.1))
    x, y = data()
    handed = Monitor(c, CFG, 4, (x, y), F.cross_entropy, seed=3, time_settings=SETTINGS).arrays()["time_update_b"]
    direct = time_traces.time_backward

    def without(*args, trace, **kw):
        return direct(*args, trace=lambda step, state: trace(step, {k: v for k, v in state.items()
                                                                     if k != "feedback_update"}), **kw)

    monkeypatch.setattr(time_traces, "time_backward", without)
    formed = Monitor(c, CFG, 4, (x, y), F.cross_entropy, seed=3, time_settings=SETTINGS).arrays()["time_update_b"]
    assert np.isfinite(formed).any()
    np.testing.assert_array_equal(formed, handed)


def test_the_run_s_circuit_its_grads_and_random_streams_are_untouched():
    c = mlp(KolenPollack(decay=0.1), torch.float32)
    x, y = data(dtype=torch.float32)
    F.cross_entropy(c(x), y).backward()
    before = {n: (p.detach().clone(), p.grad, p.grad.clone()) for n, p in c.named_parameters()}
    rng = torch.get_rng_state()
    m = Monitor(c, CFG, 4, (x, y), F.cross_entropy, time_settings=TimeSettings(duration=3, tau=2.0))
    assert np.isfinite(m.arrays()["time_update"]).any()
    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in c.named_parameters():
        w, grad, values = before[n]
        assert torch.equal(p.detach(), w) and p.grad is grad and torch.equal(p.grad, values), n


@pytest.mark.skipif("noise" not in attrs.fields_dict(TimeSettings), reason="this dynamics has no intrinsic noise")
def test_intrinsic_noise_comes_from_the_monitor_s_own_seeded_stream():
    """Presentations with noise draw from a generator of the monitor's own (seed, snapshot): the
    same whatever the process-wide random state, which they leave as it was."""
    c = mlp(KolenPollack(decay=0.1), torch.float32)
    x, y = data(dtype=torch.float32)
    noisy = TimeSettings(duration=3, noise=0.2)

    def pre(seed, settings=noisy):
        torch.manual_seed(seed)  # the process-wide stream, differently placed each time
        rng = torch.get_rng_state()
        a = Monitor(c, CFG, 2, (x, y), F.cross_entropy, seed=7, time_settings=settings).arrays()["time_error"]
        assert torch.equal(torch.get_rng_state(), rng)
        return a

    first = pre(0)
    np.testing.assert_array_equal(pre(1), first)
    assert not np.array_equal(pre(0, attrs.evolve(noisy, noise=0.0)), first)


def test_a_feedback_weight_that_learns_in_time_has_its_running_update():
    """Phaseless alignment learning (PAL) learns B from the intrinsic noise during the
    presentation: the last running ΔB_ij is that presentation's B.grad, drawn with the monitor's
    generator (float64, rounded to float32)."""
    from neurosim.rules import RULES

    c = mlp(RULES["pal"].example())
    x, y = data()
    noisy = TimeSettings(duration=3, tau=2.0, noise=0.3)
    m = Monitor(c, CFG, 4, (x, y), F.cross_entropy, seed=2, time_settings=noisy)
    model = copy.deepcopy(c)
    time_backward(model, x, lambda out: F.cross_entropy(out, y), noisy,
                  generator=torch.Generator().manual_seed(noise_seed(2, 0)))  # the monitor's, at snapshot 0
    got = m.arrays()["time_update_b"][0, :, :, -1]
    for i, n in enumerate(m.names):
        idx = m.trace_index[i]
        want = model.synapses[n].feedback.grad.reshape(-1)[idx[idx >= 0]].float().numpy()
        np.testing.assert_array_equal(got[i, idx >= 0], want, err_msg=n)
        assert np.abs(want).max() > 0


def _sgd(circuit, monitor, steps, x, y):
    opt = torch.optim.SGD(circuit.engaged_parameters(), lr=0.2)
    for step in steps:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(circuit(x), y).backward()
        opt.step()
        monitor.after_step(step)


def test_a_resumed_monitor_continues_the_arrays_bit_for_bit():
    cfg = attrs.evolve(CFG, snapshots=3)
    c = mlp(KolenPollack(decay=0.1), torch.float32)
    x, y = data(dtype=torch.float32)
    m = Monitor(c, cfg, 4, (x, y), F.cross_entropy, seed=5, time_settings=SETTINGS)
    _sgd(c, m, range(1, 3), x, y)  # snapshots at 0 and 2
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    c2 = copy.deepcopy(c)
    _sgd(c, m, range(3, 5), x, y)  # and at 4
    m2 = Monitor(c2, cfg, 4, (x, y), F.cross_entropy, seed=5, time_settings=SETTINGS)
    m2.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    _sgd(c2, m2, range(3, 5), x, y)
    a, b = m.arrays(), m2.arrays()
    assert m.snapshot_steps == m2.snapshot_steps == [0, 2, 4]
    for k in TIME:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    assert not np.array_equal(a["time_update"][0], a["time_update"][2])  # the weights did change in between

    # A checkpoint from before these records loads: its snapshots stay NaN, later ones are taken.
    old = {k: v for k, v in torch.load(io.BytesIO(buf.getvalue())).items() if k != "time"}
    m3 = Monitor(copy.deepcopy(c2), cfg, 4, (x, y), F.cross_entropy, seed=5, time_settings=SETTINGS)
    m3.load_state_dict(old)
    m3.after_step(4)
    assert np.isnan(m3.arrays()["time_pre"][:2]).all() and np.isfinite(m3.arrays()["time_pre"][2]).any()
    # One that has them refuses a monitor that would make them otherwise, or not at all.
    for other in (None, attrs.evolve(SETTINGS, tau=2.0)):
        m4 = Monitor(copy.deepcopy(c2), cfg, 4, (x, y), F.cross_entropy, seed=5, time_settings=other)
        with pytest.raises(UserError, match="time settings"):
            m4.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))


def test_files_size_and_ordinary_runs(tmp_path):
    c = mlp(KolenPollack(decay=0.1), torch.float32)
    x, y = data(dtype=torch.float32)
    m = Monitor(c, CFG, 2, (x, y), F.cross_entropy, time_settings=SETTINGS)
    _sgd(c, m, range(1, 3), x, y)
    written = m.flush(tmp_path / "timed")
    assert sum(v.nbytes for v in written.values()) == m.nbytes()
    numels = [s.weight.numel() for s in m.synapses]
    assert m.nbytes() - estimate_nbytes(CFG, numels, 2, False) == 2 * 4 * 4 * 4 * (4 * 7 + 2) + 4 * 7
    rec = load_monitor(tmp_path / "timed")
    for k in TIME:
        np.testing.assert_array_equal(getattr(rec, k), written[k], err_msg=k)
    assert rec.time_settings == attrs.asdict(SETTINGS)

    plain = Monitor(mlp(KolenPollack(), torch.float32), CFG, 2, (x, y), F.cross_entropy)
    assert plain.time is None and not [k for k in plain.flush(tmp_path / "plain") if k.startswith("time")]
    rec = load_monitor(tmp_path / "plain")
    assert rec.time_pre is None and rec.time_settings is None
    assert "time_settings" not in json.loads((tmp_path / "plain" / "monitor.json").read_text())
    assert plain.nbytes() == estimate_nbytes(CFG, numels, 2, False)


def test_settings_a_monitor_refuses():
    c = mlp(FeedbackAlignment(), torch.float32)
    x, y = data(dtype=torch.float32)
    with pytest.raises(UserError, match="probe batch"):
        Monitor(c, attrs.evolve(CFG, probe=0), 2, (x, y), F.cross_entropy, time_settings=SETTINGS)
    with pytest.raises(ValueError, match="TimeSettings or None, got dict"):
        Monitor(c, CFG, 2, (x, y), F.cross_entropy, time_settings={"dt": 1.0})
    normed = Circuit(rule=FeedbackAlignment(), seed=0)
    normed.input("x", 6)
    normed.population("y", 3, norm="batch")
    normed.dense("x", "y")
    with pytest.raises(UserError, match="batch norm"):
        Monitor(normed, CFG, 2, (x, y), F.cross_entropy, time_settings=SETTINGS)
    # Presentations that would outgrow the limit: the message names their length as the knob.
    long = attrs.evolve(SETTINGS, settle=2000.0)
    with pytest.raises(UserError, match=r"shorten the presentations in time \(4004 steps each"):
        Monitor(c, attrs.evolve(CFG, max_bytes=100_000), 2, (x, y), F.cross_entropy, time_settings=long)


@pytest.fixture(scope="module")
def timed_run(tmp_path_factory):
    """A run directory with a KP monitor in time (three snapshots) and one epoch record."""
    d = tmp_path_factory.mktemp("timed")
    c = mlp(KolenPollack(decay=0.1), torch.float32)
    x, y = data(dtype=torch.float32)
    m = Monitor(c, attrs.evolve(CFG, snapshots=3), 4, (x, y), F.cross_entropy, time_settings=SETTINGS)
    _sgd(c, m, range(1, 5), x, y)
    m.flush(d)
    (d / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "test_acc": 30.0, "angles": {}}) + "\n")
    return d


def test_the_figure_draws_each_snapshot_s_traces_and_marks_the_offset(timed_run, tmp_path, monkeypatch):
    import neurosim.tools.figures as figures

    drawn = []
    real_save = figures.save_figure
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, **kw: (drawn.append(fig), real_save(fig, out))[1])
    written = figures.plot_monitor(timed_run, tmp_path)
    assert tmp_path / "within_presentation.png" in written and (tmp_path / "within_presentation.png").stat().st_size
    fig = drawn[[p.name for p in written].index("within_presentation.png")]
    rec = load_monitor(timed_run)
    axes = np.array(fig.axes[:9]).reshape(3, 3)  # first, middle, last synapse × pre, error, ΔW
    j = int(np.flatnonzero(rec.trace_index[0] >= 0)[0])
    for c, key in enumerate(("time_pre", "time_error", "time_update")):
        lines = [ln for ln in axes[0, c].get_lines() if len(ln.get_xdata()) == len(rec.time_steps)]
        assert len(lines) == 3 + 3 * (key == "time_update")  # one per snapshot (and ΔB, dashed)
        np.testing.assert_array_equal(lines[0].get_ydata(), rec.arrays[key][0, 0, j])
        offset = [ln for ln in axes[0, c].get_lines() if list(ln.get_xdata()) == [2.0, 2.0]]
        assert len(offset) == 1  # the stimulus's offset, at its duration
    d = tmp_path / "plain"  # an ordinary run's figures: none within a presentation
    Monitor(mlp(KolenPollack(), torch.float32), CFG, 2, data(dtype=torch.float32), F.cross_entropy).flush(d)
    names = [p.name for p in figures.plot_monitor(d)]
    assert "synapse_traces.png" in names and "within_presentation.png" not in names


def test_the_dashboard_shows_the_picked_synapse_within_a_presentation(timed_run, tmp_path):
    from neurosim.tools.dashboard import RunData, build, write_dashboard

    layout = build([RunData(timed_run)])
    rec = load_monitor(timed_run)
    slider = layout.select_one({"name": "time_snapshot_slider"})
    assert slider.end == 2 and slider.value == 2
    for q in ("time_pre", "time_error", "time_update", "time_update_b"):
        shown = layout.select_one({"name": f"time_view_{q}_0"}).data  # the first synapse, last snapshot
        real = np.flatnonzero(rec.trace_index[0] >= 0)
        assert len(shown["ys"]) == len(real)
        for line, j in zip(shown["ys"], real):
            np.testing.assert_array_equal(line, rec.arrays[q][2, 0, j])
        assert shown["xs"][0] == [float(v) for v in rec.time_steps]
        assert shown["pair"][0] == f"W[{','.join(map(str, rec.traced_position(rec.synapses[0], int(real[0]))))}]"
    assert {s.location for s in layout.select({"name": "stimulus_offset_0"})} == {2.0}
    page = write_dashboard([timed_run], tmp_path / "page.html").read_text(encoding="utf-8")
    for text in ("Within a presentation", "time_snapshot_slider", "time_store_0", "stimulus on up to 2"):
        assert text in page, text

    d = tmp_path / "plain"
    Monitor(mlp(KolenPollack(), torch.float32), CFG, 2, data(dtype=torch.float32), F.cross_entropy).flush(d)
    (d / "metrics.jsonl").write_text((timed_run / "metrics.jsonl").read_text())
    plain = build([RunData(d)])
    assert plain.select_one({"name": "time_snapshot_slider"}) is None
    assert plain.select_one({"name": "within_presentation"}) is None
    # Overlaid with an ordinary run: the panel holds the run in time's lines only.
    both = build([RunData(d), RunData(timed_run)])
    assert both.select_one({"name": "time_store_0"}) is not None and both.select_one({"name": "time_store_1"}) is None
    shown = both.select_one({"name": "time_view_time_pre_0"}).data
    assert len(shown["ys"]) == int((rec.trace_index[0] >= 0).sum()) and len(set(shown["colour"])) == 1
