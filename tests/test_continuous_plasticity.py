"""Weights that move during a presentation (``TimeSettings(plasticity="continuous")``): the
synapses' Euler step at every ``dt``, the same in the literal and the batched execution (eager and
compiled), the presentation's integrated update in the limit of a small rate, and a run that
trains with it (or refuses the optimizer state it does not have)."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch
import torch.nn.functional as F

from neurosim.core.circuit import Circuit
from neurosim.core.dynamics import TimeSettings, time_backward
from neurosim.core.time_execution import TimeExecution
from neurosim.rules import RULES
from tests.test_dynamics import _data, _grads, circuit

ROOT = Path(__file__).resolve().parents[1]


def loss_of(y):  # one code object: a compiled step recompiles for a loss of other code
    return lambda out: F.cross_entropy(out, y)


def two_layer(rule):
    c = Circuit(rule=rule, seed=0)
    c.input("x", 6)
    c.population("h", 5, activation="relu")
    c.dense("x", "h")
    c.population("y", 3)
    c.dense("h", "y")
    return c.double()


@pytest.mark.parametrize("rule", ["fa", "kp"])
def test_the_weights_take_the_synapses_euler_step_at_every_dt(rule):
    """Written out by hand for x → h (ReLU) → y: at every step the activities of the moved
    weights, the error through B (FA's fixed, KP's learning with its own decay), and every
    parameter moved by −lr·(dt/τ_w)·its update before the next step."""
    c = two_layer(RULES["fa"]() if rule == "fa" else RULES["kp"](decay=0.1))
    hand = {n: p.detach().clone() for n, p in c.named_parameters()}
    b2 = c.synapses["h->y"].feedback_matrix().detach().clone()
    x, y = _data("dense")
    steps, lr, tau_w = 4, 0.7, 2.0
    k = 1.0 / tau_w
    for _ in range(steps):
        w1, c1 = hand["synapses.x->h.weight"], hand["synapses.x->h.bias"]
        w2, c2 = hand["synapses.h->y.weight"], hand["synapses.h->y.bias"]
        u = x @ w1.T + c1
        h = u.relu()
        out = h @ w2.T + c2
        e = (out.softmax(1) - F.one_hot(y, 3)) / x.shape[0]
        dh = (e @ b2) * (u > 0)
        updates = {"synapses.x->h.weight": dh.T @ x, "synapses.x->h.bias": dh.sum(0),
                   "synapses.h->y.weight": e.T @ h, "synapses.h->y.bias": e.sum(0)}
        if rule == "kp":
            updates["synapses.x->h.weight"] = updates["synapses.x->h.weight"] + 0.1 * w1
            updates["synapses.h->y.weight"] = updates["synapses.h->y.weight"] + 0.1 * w2
            updates["synapses.x->h.feedback"] = dh.T @ x + 0.1 * hand["synapses.x->h.feedback"]
            updates["synapses.h->y.feedback"] = e.T @ h + 0.1 * b2
        for n, g in updates.items():
            hand[n] = hand[n] - lr * k * g
        if rule == "kp":
            b2 = hand["synapses.h->y.feedback"]
    s = TimeSettings(duration=float(steps), tau_plasticity=tau_w, plasticity="continuous")
    time_backward(c, x, lambda o: F.cross_entropy(o, y), s, lr=lr)
    params = dict(c.named_parameters())
    assert set(params) == set(hand)
    for n, p in params.items():
        assert p.grad is None, n  # nothing left for an optimizer to apply again
        torch.testing.assert_close(p.detach(), hand[n], rtol=1e-13, atol=1e-15, msg=n)


RULE_NAMES = ["bp", "fa", "dfa", "kp", "usf", "sa", "ia", "pal"]
# Slow populations, a delay (errors formed as they are sent, then travelling), decay and noise.
MOVING = TimeSettings(duration=4.0, tau=2.0, delay=1.0, tau_decay=10.0, noise=0.3, plasticity="continuous")


def moved(a, b):
    return {n: p.detach().clone() for n, p in a.named_parameters() if not torch.equal(p, dict(b.named_parameters())[n])}


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_the_batched_execution_moves_the_weights_as_the_literal_one(rule_name, kind):
    """A large rate (0.5), so the moved weights change every later step: every parameter after
    the presentation within 1e-12 of the literal's, in float64; the same loss."""
    literal = circuit(RULES[rule_name].example(), kind)
    before, batched = copy.deepcopy(literal), copy.deepcopy(literal)
    x, y = _data(kind)
    expected = time_backward(literal, x, lambda o: F.cross_entropy(o, y), MOVING,
                             generator=torch.Generator().manual_seed(7), lr=0.5)
    loss, _ = TimeExecution(batched, MOVING).backward(x, lambda o: F.cross_entropy(o, y),
                                                      generator=torch.Generator().manual_seed(7), lr=0.5)
    want, got = moved(literal, before), moved(batched, before)
    assert want and want.keys() == got.keys()
    for n in want:
        change = (want[n] - dict(before.named_parameters())[n].detach()).norm()
        assert float((got[n] - want[n]).norm() / change) <= 1e-12, n
    assert not _grads(batched)
    assert abs(float(loss - expected)) <= 1e-12 * abs(float(expected))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_steps_move_the_weights_as_eager_ones_and_compile_once(backend):
    """The parameters move in place between the compiled steps, which read their storage: the
    same weights as eager (float64), and no recompile after the first step."""
    torch._dynamo.reset()
    eager = circuit(RULES["kp"].example(), "conv")
    compiled = copy.deepcopy(eager)
    ex_e, ex_c = TimeExecution(eager, MOVING), TimeExecution(compiled, MOVING, compile=True, backend=backend)
    x, y = _data("conv")
    ex_c.backward(x, loss_of(y), generator=torch.Generator().manual_seed(1), lr=0.5)
    ex_e.backward(x, loss_of(y), generator=torch.Generator().manual_seed(1), lr=0.5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (2, 3):
            x, y = _data("conv", seed=seed)
            ex_e.backward(x, loss_of(y), generator=torch.Generator().manual_seed(seed), lr=0.5)
            ex_c.backward(x, loss_of(y), generator=torch.Generator().manual_seed(seed), lr=0.5)
    for (n, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14, msg=n)
    torch._dynamo.reset()


def test_a_small_rate_gives_the_presentations_integrated_update():
    """(W₀ − W)/lr → the update ``plasticity="presentation"`` writes into ``.grad`` as lr → 0,
    and the difference is first order in lr (the weights moving within the presentation)."""
    base = circuit(RULES["kp"].example(), "dense")
    x, y = _data("dense")
    s = TimeSettings(duration=4.0, tau=2.0, delay=1.0)
    ref = copy.deepcopy(base)
    time_backward(ref, x, lambda o: F.cross_entropy(o, y), s)
    integrated = _grads(ref)
    errors = []
    for lr in (1e-2, 1e-3):
        c = copy.deepcopy(base)
        time_backward(c, x, lambda o: F.cross_entropy(o, y), attrs.evolve(s, plasticity="continuous"), lr=lr)
        now = {n: q.detach() for n, q in c.named_parameters()}
        start = {n: q.detach() for n, q in base.named_parameters()}
        errors.append(max(float(((start[n] - now[n]) / lr - g).norm() / g.norm()) for n, g in integrated.items()))
    assert errors[1] < 1e-3
    assert 5 < errors[0] / errors[1] < 20  # first order: ten times the rate, about ten times the difference


def test_continuous_plasticity_needs_a_rate():
    c = two_layer(RULES["fa"]())
    x, y = _data("dense")
    s = TimeSettings(duration=2.0, plasticity="continuous")
    with pytest.raises(ValueError, match="give lr > 0"):
        time_backward(c, x, lambda o: F.cross_entropy(o, y), s)
    with pytest.raises(ValueError, match="give lr > 0"):
        TimeExecution(c, s).backward(x, lambda o: F.cross_entropy(o, y))


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "run_circuit.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_a_run_with_momentum_or_weight_decay_is_refused(tmp_path):
    """The synapses' dynamics have neither; an optimizer that never steps would ignore them."""
    done = run_cli("fa_mlp_digits", "--dynamics", "time", "--duration", "2", "--plasticity", "continuous",
                   "--momentum", "0.9", "--epochs", "1", "--out", str(tmp_path / "run"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: --plasticity continuous moves the weights by the synapses' own dynamics at every step, which have "
        "no momentum and no weight decay (--momentum 0.9, --weight-decay 0): give --momentum 0 --weight-decay 0 "
        "(decay in time is --tau-decay)"]
    assert not (tmp_path / "run").exists()
    done = run_cli("fa_mlp_digits", "--plasticity", "continuous", "--epochs", "1", "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and "--plasticity" in done.stderr and "--dynamics time" in done.stderr, done.stderr


@pytest.mark.slow
def test_a_run_trains_with_continuous_plasticity_and_resumes_bit_for_bit(tmp_path):
    args = ["fa_mlp_digits", "--dynamics", "time", "--duration", "4", "--plasticity", "continuous", "--momentum", "0",
            "--weight-decay", "0", "--lr", "1", "--train-limit", "256", "--monitor-every", "0", "--device", "cpu",
            "--quiet"]
    whole = run_cli(*args, "--epochs", "2", "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    part = run_cli(*args, "--epochs", "1", "--out", str(tmp_path / "part"))
    assert part.returncode == 0, part.stderr
    resumed = run_cli("--resume", str(tmp_path / "part"), "--epochs", "2", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["plasticity"] == "continuous"
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["test_acc"] > records[0]["test_acc"] + 20  # it learns (epoch 0: before training)
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=False)
    for n, t in a["circuit"].items():
        assert torch.equal(t, b["circuit"][n]), n


def test_the_monitor_presents_its_probe_with_the_weights_moving_at_the_run_s_rate():
    """The traced running update of a continuous presentation, times the rate, is how far the
    presented copy's weights moved; the run's own circuit does not move."""
    import numpy as np

    from neurosim.observe.monitors import Monitor, MonitorConfig

    c = circuit(RULES["kp"](decay=0.1), "dense")
    before = copy.deepcopy(c)
    x, y = _data("dense", n=8)
    s = TimeSettings(duration=3.0, tau=2.0, plasticity="continuous")
    cfg = MonitorConfig(every=1, probe=8, traces=4, scatter=6, snapshots=2)
    with pytest.raises(ValueError, match="learning_rate"):
        Monitor(c, cfg, 4, (x, y), F.cross_entropy, time_settings=s)
    m = Monitor(c, cfg, 4, (x, y), F.cross_entropy, time_settings=s, learning_rate=lambda: 0.5)
    for (n, p), (_, q) in zip(c.named_parameters(), before.named_parameters()):
        assert torch.equal(p, q), n
    copy_ = copy.deepcopy(c)
    time_backward(copy_, x, loss_of(y), s, lr=0.5)
    last = m.arrays()["time_update"][0, :, :, -1]
    for i, name in enumerate(m.names):
        idx = m.trace_index[i]
        real = idx >= 0
        w0 = c.synapses[name].weight.detach().reshape(-1)[idx[real]]
        w1 = copy_.synapses[name].weight.detach().reshape(-1)[idx[real]]
        np.testing.assert_allclose(last[i, real], ((w0 - w1) / 0.5).float().numpy(), rtol=1e-5, atol=1e-7)
        assert np.abs(last[i, real]).max() > 0
