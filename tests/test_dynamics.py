"""Circuits in time: today's rules are the limit of the time-stepped circuit, and learning needs
the presynaptic drive and the returning error to overlap in time."""

import copy

import pytest
import torch
import torch.nn.functional as F

from neurosim.core.circuit import Circuit
from neurosim.core.dynamics import TimeSettings, feedback_hops, sleep_in_time, time_backward
from neurosim.core.reference import reference_backward
from neurosim.rules import RULES, LocalSignals, WeightMirror


def circuit(rule, kind, seed=0):
    """A circuit without batch norm: a dense stack with a skip pathway, or convolutions (strided,
    a residual identity, pooling)."""
    c = Circuit(rule=rule, seed=seed)
    if kind == "conv":
        c.input("x", (2, 7, 7))
        c.population("c1", (4, 4, 4), activation="relu")
        c.conv("x", "c1", 3, stride=2, padding=1)
        c.population("c2", (4, 4, 4), activation="tanh")
        c.conv("c1", "c2", 3, padding=1)
        c.identity("c1", "c2")
        c.population("pool", (4,), pool="global_avg")
        c.identity("c2", "pool")
        c.population("y", 3)
        c.dense("pool", "y")
    else:
        c.input("x", 6)
        c.population("h1", 5, activation="sigmoid")
        c.dense("x", "h1")
        c.population("h2", 4, activation="relu")
        c.dense("h1", "h2")
        c.population("y", 3)
        c.dense("h2", "y")
        c.dense("x", "y")
    if rule.direct_feedback:
        c.add_direct_feedback()
    return c.double()


def resting_circuit(rule):
    """A dense circuit of ReLU units without bias: it rests at 0 when the stimulus is off (a
    sigmoid or a bias would keep units active, and a late error would still meet a drive)."""
    c = Circuit(rule=rule, seed=0)
    c.input("x", 6)
    for pre, post, n in (("x", "h1", 5), ("h1", "h2", 4)):
        c.population(post, n, activation="relu")
        c.dense(pre, post, bias=False)
    c.population("y", 3)
    c.dense("h2", "y", bias=False)
    c.dense("x", "y", bias=False)
    if rule.direct_feedback:
        c.add_direct_feedback()
    return c.double()


def _data(kind, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *((2, 7, 7) if kind == "conv" else (6,)), dtype=torch.float64, generator=g)
    return x, torch.randint(0, 3, (n,), generator=g)


def _grads(c):
    return {n: p.grad.clone() for n, p in c.named_parameters() if p.grad is not None}


LIMIT_RULES = ["bp", "fa", "dfa", "kp", "usf", "sa", "ia"]


@pytest.mark.parametrize("duration", [1, 3, 4])
@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("name", LIMIT_RULES)
def test_the_discrete_rules_are_the_limit_of_the_circuit_in_time(name, kind, duration):
    """τ = dt, ordered propagation, no delay, τ_w = the stimulus duration: one presentation
    writes the discrete step's updates, every parameter, in float64."""
    discrete = circuit(RULES[name].example(), kind)
    timed = copy.deepcopy(discrete)
    x, y = _data(kind)
    reference_backward(discrete, x, lambda out: F.cross_entropy(out, y))
    time_backward(timed, x, lambda out: F.cross_entropy(out, y), TimeSettings(dt=1.0, duration=duration))
    expected, got = _grads(discrete), _grads(timed)
    assert expected.keys() == got.keys() and expected
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-12, atol=1e-14, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("name", LIMIT_RULES)
def test_no_noise_is_the_noiseless_execution_bit_for_bit(name):
    """``noise = 0`` draws nothing and changes nothing, whatever its correlation time and
    generator: every gradient equals the run without the noise settings exactly."""
    base = circuit(RULES[name].example(), "dense")
    x, y = _data("dense")
    runs = []
    for settings, gen in ((TimeSettings(duration=3, tau=2.0), None),
                          (TimeSettings(duration=3, tau=2.0, noise=0.0, tau_noise=4.0), torch.Generator().manual_seed(0))):
        c = copy.deepcopy(base)
        time_backward(c, x, lambda out: F.cross_entropy(out, y), settings, generator=gen)
        runs.append(_grads(c))
    assert runs[0].keys() == runs[1].keys() and runs[0]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_intrinsic_noise_enters_every_non_input_drive():
    """With noise, each population's activity is ``f(u + ξ)`` with ``ξ`` drawn per population and
    step in the circuit's order; the input population has none."""
    c = resting_circuit(RULES["fa"].example())
    x, y = _data("dense")
    seen = {}
    time_backward(c, x, lambda out: F.cross_entropy(out, y), TimeSettings(duration=1, noise=0.5),
                  trace=lambda step, state: seen.update({k: v.clone() for k, v in state["noise"].items()}),
                  generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    assert list(seen) == ["h1", "h2", "y"]
    for name in ("h1", "h2", "y"):
        torch.testing.assert_close(seen[name], 0.5 * torch.randn(5, *c.populations[name].shape, dtype=torch.float64,
                                                                 generator=g), rtol=0, atol=0)


def test_the_weight_mirrors_sleep_in_time_is_its_discrete_sleep_in_the_limit():
    wm = WeightMirror(sigma=0.5, decay=0.7)
    c = circuit(wm, "dense")
    g = torch.Generator().manual_seed(3)
    noise = {n: 0.5 * torch.randn(8, *c.populations[s.pre].shape, dtype=torch.float64, generator=g)
             for n, s in c.synapses.items()}
    sleep_in_time(c, noise, TimeSettings(dt=0.5, duration=2.0))
    for n, s in c.synapses.items():
        xi = noise[n]
        r = wm.respond(s.kind.ref_forward(xi, s.weight.detach(), None))
        expected = wm.sleep_update(LocalSignals(s.kind, xi, r, s.feedback.detach(), literal=True))
        torch.testing.assert_close(s.feedback.grad, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["bp", "fa", "kp", "dfa"])
def test_learning_strength_falls_linearly_as_the_error_is_delayed(name):
    """With the stimulus on for T and every feedback hop taking d, a hidden synapse whose error
    comes back k hops from the output learns (T − k·d)/T of the undelayed update: the drive and
    the error overlap for T − k·d (Bacvanski, Ziyin & Poggio's finding). The output synapses are
    not delayed. DFA's direct pathway is one hop for every layer. (ReLU units without bias.)"""
    rule = RULES[name].example() if name != "kp" else RULES["kp"]()  # KP without decay: only the product
    base = resting_circuit(rule)
    x, y = _data("dense")
    loss = lambda out: F.cross_entropy(out, y)  # noqa: E731
    T = 8
    undelayed = copy.deepcopy(base)
    time_backward(undelayed, x, loss, TimeSettings(duration=T))
    ref = {n: s.weight.grad.clone() for n, s in undelayed.synapses.items()}
    hops = {"h1->h2": 1, "x->h1": 1 if name == "dfa" else 2, "h2->y": 0, "x->y": 0}
    for d in range(0, T + 2):
        c = copy.deepcopy(base)
        time_backward(c, x, loss, TimeSettings(duration=T, delay=d))
        for n, s in c.synapses.items():
            strength = float((s.weight.grad * ref[n]).sum() / (ref[n] * ref[n]).sum())
            assert strength == pytest.approx(max(0.0, (T - hops[n] * d) / T), abs=1e-12), (n, d)


def test_errors_need_as_many_steps_as_hops_when_every_hop_takes_a_step():
    """Synchronous updates: a signal crosses one synapse per step, forward and back, so the
    deepest synapse's drive and error meet later than the output's, and a stimulus shorter than
    the round trip teaches it nothing."""
    c = resting_circuit(RULES["fa"].example())
    assert feedback_hops(c) == 3
    x, y = _data("dense")
    first = {}

    def seen(step, state):
        for n, u in state["update"].items():
            if u is not None and n not in first and u.abs().sum() > 0:
                first[n] = step

    time_backward(copy.deepcopy(c), x, lambda out: F.cross_entropy(out, y),
                  TimeSettings(duration=6, update="synchronous"), trace=seen)
    # The teaching signal is on from step 0, so x→y learns at once; h1 is active from step 1 and
    # h2 from step 2, when h2→y and h1→h2 (its error one hop back) start; x→h1's error is two
    # hops back: step 3.
    assert first == {"x->y": 0, "h2->y": 2, "h1->h2": 2, "x->h1": 3}
    short = copy.deepcopy(c)
    time_backward(short, x, lambda out: F.cross_entropy(out, y), TimeSettings(duration=2, update="synchronous"))
    assert float(short.synapses["x->h1"].weight.grad.abs().sum()) == 0.0
    assert float(short.synapses["h1->h2"].weight.grad.abs().sum()) > 0  # one hop back: still in time


def test_slow_populations_approach_the_discrete_update_as_the_stimulus_lengthens():
    """τ = 2 dt: activities and errors lag the stimulus; the integrated update's distance to the
    discrete one shrinks as the presentation lengthens (transients weigh less)."""
    base = circuit(RULES["fa"].example(), "dense")
    x, y = _data("dense")
    loss = lambda out: F.cross_entropy(out, y)  # noqa: E731
    discrete = copy.deepcopy(base)
    reference_backward(discrete, x, loss)
    ref = discrete.synapses["x->h1"].weight.grad
    gaps = []
    for T in (8, 32, 128):
        c = copy.deepcopy(base)
        time_backward(c, x, loss, TimeSettings(duration=T, tau=2.0, settle=0.0))
        gaps.append(float((c.synapses["x->h1"].weight.grad - ref).norm() / ref.norm()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.1


def test_settings_and_circuits_a_time_run_refuses():
    with pytest.raises(ValueError, match="whole number of steps"):
        TimeSettings(dt=0.3, duration=1.0)
    with pytest.raises(ValueError, match="shorter than dt"):
        TimeSettings(dt=1.0, tau=0.5)
    with pytest.raises(ValueError, match="update"):
        TimeSettings(update="jacobi")
    c = Circuit(rule=RULES["fa"](), seed=0)
    c.input("x", 3)
    c.population("y", 2, norm="batch")
    c.dense("x", "y")
    with pytest.raises(ValueError, match="batch norm"):
        time_backward(c, torch.zeros(4, 3), lambda out: out.sum(), TimeSettings())


def test_an_eligibility_trace_is_its_populations_and_advances_once_per_step():
    # x feeds x->h1 and x->y (a skip): its trace still leaks once per step, 0.5·x after the first
    # step with tau_eligibility = 2·dt, 0.75·x after the second, and both synapses read it.
    c = circuit(RULES["fa"](), "dense")
    assert sum(s.pre == "x" for s in c.synapses.values()) == 2
    x, y = _data("dense")
    seen = []
    time_backward(c, x, lambda out: F.cross_entropy(out, y), TimeSettings(duration=2, tau_eligibility=2.0),
                  trace=lambda step, state: seen.append(state["pre"]["x"].clone()))
    torch.testing.assert_close(seen[0], 0.5 * x, rtol=0, atol=0)
    torch.testing.assert_close(seen[1], 0.75 * x, rtol=0, atol=0)
