"""Phaseless alignment learning in time: the feedback weight learns from the circuit's intrinsic
noise and the high-passed response it drives, during the task, with no sleep."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from neurosim.core.circuit import Circuit
from neurosim.core.dynamics import TimeSettings, time_backward
from neurosim.core.reference import reference_backward
from neurosim.rules import RULES
from neurosim.rules.phaseless import PhaselessAlignment


def linear_circuit(rule, sizes=(3, 4, 2), seed=0):
    """``x → h → y``, both linear with bias: every signal can be written out by hand."""
    c = Circuit(rule=rule, seed=seed)
    c.input("x", sizes[0])
    c.population("h", sizes[1])
    c.dense("x", "h")
    c.population("y", sizes[2])
    c.dense("h", "y")
    return c.double()


def angle(a, b) -> float:
    a, b = a.detach().flatten(), b.detach().flatten()
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm()))))))


def test_the_feedback_update_is_the_literal_formula():
    """Every step: Ornstein–Uhlenbeck noise in each population's drive, the output's activity
    high-passed, and ``B ← rate·(−⟨r̂_y ξ_hᵀ⟩/σ² + decay·B)`` integrated with ``dt/τ_w`` — written
    out here from the same draws, in float64. The synapse from the input (no noise there) only
    decays."""
    rule = PhaselessAlignment(rate=0.7, decay=0.3, tau_hp=2.0)
    c = linear_circuit(rule)
    n, T, sigma, tau_xi = 5, 6, 0.4, 3.0
    x = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    time_backward(c, x, lambda out: 0.5 * out.pow(2).sum() / n,
                  TimeSettings(duration=T, noise=sigma, tau_noise=tau_xi), generator=torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)
    a = math.exp(-1.0 / tau_xi)
    w1, b1 = c.synapses["x->h"].weight.detach(), c.synapses["x->h"].bias.detach()
    w2, b2 = c.synapses["h->y"].weight.detach(), c.synapses["h->y"].bias.detach()
    B1, B2 = c.synapses["x->h"].feedback.detach(), c.synapses["h->y"].feedback.detach()
    xi_h = xi_y = y_last = hp = None
    expected = torch.zeros_like(B2)
    for t in range(T):
        w_h = torch.randn(n, 4, dtype=torch.float64, generator=g)  # in the circuit's order: h, then y
        w_y = torch.randn(n, 2, dtype=torch.float64, generator=g)
        if t == 0:
            xi_h, xi_y = sigma * w_h, sigma * w_y
        else:
            xi_h = a * xi_h + sigma * math.sqrt(1 - a * a) * w_h
            xi_y = a * xi_y + sigma * math.sqrt(1 - a * a) * w_y
        h = x @ w1.T + b1 + xi_h
        y = h @ w2.T + b2 + xi_y
        hp = torch.zeros_like(y) if t == 0 else (1 - 1.0 / 2.0) * hp + (y - y_last)
        y_last = y
        hebb = sum(torch.outer(hp[i], xi_h[i]) for i in range(n)) / (n * sigma**2)
        expected += (1.0 / T) * 0.7 * (-hebb + 0.3 * B2)
    torch.testing.assert_close(c.synapses["h->y"].feedback.grad, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(c.synapses["x->h"].feedback.grad, 0.7 * 0.3 * B1, rtol=1e-12, atol=1e-14)
    assert float(expected.abs().max()) > 0.1  # the Hebbian term is there, not only the decay


@pytest.mark.parametrize("tau_noise", [None, 3.0])
def test_the_expected_update_turns_B_toward_W(tau_noise):
    """A linear synapse over many noisy steps (decay 0): the update's direction is ``W``'s
    (``E[r̂ ξᵀ]/σ² = W``; 16,000 co-activations leave a sampling error of a few degrees). White
    noise: its size is ``W``'s too. Noise correlated over 3 steps: the one-step high-pass keeps
    only its fast part, so the update is smaller, along ``W`` still."""
    c = linear_circuit(PhaselessAlignment(decay=0.0, tau_hp=1.0), sizes=(6, 5, 3))
    x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    time_backward(c, x, lambda out: 0 * out.sum(), TimeSettings(duration=2000, noise=0.3, tau_noise=tau_noise),
                  generator=torch.Generator().manual_seed(1))
    s = c.synapses["h->y"]
    update, w = -s.feedback.grad, s.weight.detach()
    assert angle(update, w) < 6.0
    ratio = float(update.norm() / w.norm())
    if tau_noise is None:
        assert ratio == pytest.approx(1.0, abs=0.1)
    else:
        # One-step high-pass of an AR(1) process (a = e^{-1/3}): E[(ξ_t − ξ_{t−1}) ξ_t]/σ² = 1 − a.
        assert ratio == pytest.approx(1 - math.exp(-1 / 3), rel=0.15)


def test_a_convolutions_update_counts_every_position_as_a_co_activation():
    """Convolutions share a kernel over positions: ``⟨·⟩`` averages over images and output
    positions, so the expected update is ``W`` itself where every position sees the kernel
    entry and ``W × 5/6`` per axis on the zero-padded border (a 6×6 map, padding 1). 14,400
    co-activations per weight: a sampling error of ~8° and a few percent in size."""
    c = Circuit(rule=PhaselessAlignment(decay=0.0), seed=0)
    c.input("x", (2, 6, 6))
    c.population("c1", (3, 6, 6))
    c.conv("x", "c1", 3, padding=1)
    c.population("c2", (4, 6, 6))
    c.conv("c1", "c2", 3, padding=1)
    c.population("pool", (4,), pool="global_avg")
    c.identity("c2", "pool")
    c.population("y", 2)
    c.dense("pool", "y")
    c = c.double()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    time_backward(c, x, lambda out: 0 * out.sum(), TimeSettings(duration=100, noise=0.3),
                  generator=torch.Generator().manual_seed(1))
    s = c.synapses["c1->c2"]
    edge = torch.tensor([5 / 6, 1.0, 5 / 6], dtype=torch.float64)
    target = s.weight.detach() * (edge[:, None] * edge[None, :])
    assert angle(-s.feedback.grad, target) < 15.0
    assert float(s.feedback.grad.norm() / target.norm()) == pytest.approx(1.0, abs=0.1)


def test_without_noise_B_only_decays():
    rule = PhaselessAlignment(rate=2.0, decay=0.25)
    c = linear_circuit(rule)
    x = torch.randn(4, 3, dtype=torch.float64)
    time_backward(c, x, lambda out: out.pow(2).sum(), TimeSettings(duration=4))
    for s in c.synapses.values():
        torch.testing.assert_close(s.feedback.grad, 2.0 * 0.25 * s.feedback.detach(), rtol=1e-12, atol=0)


def test_the_noise_is_drawn_from_the_generator_and_none_is_drawn_without_noise():
    base = linear_circuit(PhaselessAlignment())
    x = torch.randn(4, 3, dtype=torch.float64)

    def grads(settings, generator):
        c = copy.deepcopy(base)
        time_backward(c, x, lambda out: out.pow(2).sum(), settings, generator=generator)
        return [p.grad for p in c.parameters()]

    noisy = TimeSettings(duration=3, noise=0.5, tau_noise=2.0)
    first, again = grads(noisy, torch.Generator().manual_seed(4)), grads(noisy, torch.Generator().manual_seed(4))
    other = grads(noisy, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    g = torch.Generator().manual_seed(4)
    state = g.get_state()
    quiet = grads(TimeSettings(duration=3, noise=0.0, tau_noise=2.0), g)
    assert torch.equal(g.get_state(), state)  # noise 0: nothing drawn
    assert all(torch.equal(a, b) for a, b in zip(quiet, grads(TimeSettings(duration=3), None)))


def test_the_discrete_executions_leave_B_alone_but_the_optimizer_holds_it():
    """Outside time ``B`` carries errors and learns nothing (feedback alignment), in the
    compiled and the reference execution; its feedback weight is an engaged parameter, so the
    training loop's optimizer applies what a run in time integrates."""
    assert PhaselessAlignment.needs_time and not RULES["fa"].needs_time and not RULES["wm"].needs_time
    c = linear_circuit(PhaselessAlignment())
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    F.cross_entropy(c(x), y).backward()
    ref = copy.deepcopy(c)
    ref.zero_grad(set_to_none=True)
    reference_backward(ref, x, lambda out: F.cross_entropy(out, y))
    for circuit in (c, ref):
        for s in circuit.synapses.values():
            assert s.feedback.grad is None and s.weight.grad is not None
    engaged = {id(p) for p in c.engaged_parameters()}
    assert all(id(s.feedback) in engaged for s in c.synapses.values())
    assert not c.sleep_parameters()


def test_settings_pal_refuses():
    with pytest.raises(ValueError, match="noise"):
        TimeSettings(noise=-0.1)
    with pytest.raises(ValueError, match="noise"):
        TimeSettings(noise=math.inf)
    with pytest.raises(ValueError, match="tau_noise"):
        TimeSettings(tau_noise=0.0)
    c = linear_circuit(PhaselessAlignment(tau_hp=0.5))
    with pytest.raises(ValueError, match="tau-hp"):
        time_backward(c, torch.zeros(2, 3, dtype=torch.float64), lambda out: out.sum(), TimeSettings(dt=1.0))


def test_pal_in_time_aligns_B_while_the_circuit_learns():
    """A tanh circuit learns a 4-class teacher task in time, with noise in every population:
    ``B`` of the hidden-to-output synapse starts independent of ``W`` (≈ 90°) and PAL turns it
    to within 30° in 60 steps (the sampling error of 160 co-activations per step, averaged over
    the ~5 steps B's rate remembers, holds it at ~15° here), while the loss falls. B of the
    input synapse only decays: the input has no noise."""
    c = Circuit(rule=PhaselessAlignment(), seed=0)
    c.input("x", 8)
    c.population("h", 16, activation="tanh")
    c.dense("x", "h")
    c.population("y", 4)
    c.dense("h", "y")
    c = c.double()
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 8, dtype=torch.float64, generator=g)
    x = torch.randn(512, 8, dtype=torch.float64, generator=g)
    y = (x @ teacher.T).argmax(1)
    opt = torch.optim.SGD(c.engaged_parameters(), lr=0.2)
    s, first = c.synapses["h->y"], c.synapses["x->h"]
    with torch.no_grad():
        start, loss0, b0 = angle(s.feedback, s.weight), float(F.cross_entropy(c(x), y)), first.feedback.norm()
    noise = torch.Generator().manual_seed(1)
    for step in range(60):
        idx = torch.arange(step * 16, step * 16 + 16) % 512
        opt.zero_grad()
        time_backward(c, x[idx], lambda out, t=y[idx]: F.cross_entropy(out, t), TimeSettings(duration=10, noise=0.3),
                      generator=noise)
        opt.step()
    assert start > 80 and angle(s.feedback, s.weight) < 30
    with torch.no_grad():
        assert float(F.cross_entropy(c(x), y)) < 0.7 * loss0
    assert float(first.feedback.detach().norm()) < 0.01 * float(b0)  # (1 − 0.2)^60 ≈ 2e-6
