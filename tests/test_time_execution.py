"""The batched execution of a circuit in time (``TimeExecution``) against the literal one
(``time_backward``): the same loss and every ``.grad``, in float64, for every rule and the
settings that change what a step does; compiled steps equal eager ones and compile once."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from neurosim.core.circuit import Circuit
from neurosim.core.dynamics import TimeSettings, time_backward
from neurosim.core.time_execution import TimeExecution
from neurosim.rules import RULES
from tests.test_dynamics import _data, _grads, circuit

# Each entry changes what one step does: the limit (τ = dt, ordered, no delay), slow populations,
# delayed feedback (ring buffers of two slots), synchronous propagation (every hop a step),
# an eligibility trace, weight decay with τ_w ≠ duration, a settle longer than the default, and
# everything at once.
SETTINGS = {
    "limit": TimeSettings(duration=3.0),
    "tau": TimeSettings(duration=4.0, tau=2.0),
    "delay": TimeSettings(duration=8.0, delay=2.0),
    "synchronous": TimeSettings(duration=4.0, update="synchronous"),
    "trace": TimeSettings(duration=5.0, tau_eligibility=3.0),
    "decay": TimeSettings(duration=4.0, tau_plasticity=2.0, tau_decay=10.0),
    "settle": TimeSettings(duration=3.0, tau=1.5, settle=3.0),
    "all": TimeSettings(dt=0.5, duration=3.0, tau=0.75, delay=0.5, update="synchronous", tau_eligibility=1.0,
                        tau_plasticity=2.0, tau_decay=20.0, settle=2.5),
    # Intrinsic noise in every drive but the input's: white, and an Ornstein–Uhlenbeck process with
    # slow populations and a delay.
    "noise": TimeSettings(duration=4.0, noise=0.3),
    "noise_ou": TimeSettings(duration=6.0, tau=2.0, noise=0.3, tau_noise=3.0, delay=1.0),
}
# dfa is DirectFeedbackAlignment(per_unit=True) (its example); "dfa_channel" the per-channel default.
RULE_NAMES = ["bp", "fa", "dfa", "dfa_channel", "kp", "usf", "sa", "ia", "pal"]


def make_rule(name):
    return RULES["dfa"](per_unit=False) if name == "dfa_channel" else RULES[name].example()


def build(rule_name, kind, setting):
    """The dense or conv circuit of ``tests/test_dynamics.py`` under ``rule_name``."""
    return circuit(make_rule(rule_name), kind)


def loss_of(y):
    return lambda out: F.cross_entropy(out, y)


def assert_same(expected: dict, got: dict, rtol=1e-12):
    """Every parameter's ``.grad``: the same set, each within ``rtol`` of the literal's in norm
    (float64 keeps 16 digits; the two executions sum the same terms in different orders)."""
    assert expected and expected.keys() == got.keys(), (sorted(expected), sorted(got))
    for k in expected:
        scale = expected[k].norm()
        assert scale > 0, k
        err = float((got[k] - expected[k]).norm() / scale)
        assert err <= rtol, (k, err)


def run_both(rule_name, kind, setting, compile=False):
    literal = build(rule_name, kind, setting)
    batched = copy.deepcopy(literal)
    x, y = _data(kind)
    s = SETTINGS[setting]
    # The noise from two generators in the same state: the same draws, in the same order.
    expected_loss = time_backward(literal, x, loss_of(y), s, generator=torch.Generator().manual_seed(7))
    loss, out = TimeExecution(batched, s, compile=compile, backend="aot_eager").backward(
        x, loss_of(y), generator=torch.Generator().manual_seed(7))
    return literal, batched, x, y, expected_loss, loss, out


def check(rule_name, kind, setting):
    literal, batched, x, y, expected_loss, loss, out = run_both(rule_name, kind, setting)
    assert_same(_grads(literal), _grads(batched))
    assert abs(float(loss - expected_loss)) <= 1e-12 * abs(float(expected_loss))
    assert out.shape == (x.shape[0], 3) and not out.requires_grad


QUICK = [(r, k, "all") for r in RULE_NAMES for k in ("dense", "conv")]
QUICK += [("kp", k, s) for s in SETTINGS if s != "all" for k in ("dense", "conv")]
QUICK += [("dfa_channel", "conv", s) for s in ("delay", "synchronous", "trace")]
QUICK += [("ia", "conv", s) for s in ("tau", "trace")]
QUICK += [(r, k, s) for r in ("pal", "fa") for k in ("dense", "conv") for s in ("noise", "noise_ou")]
FULL = [(r, k, s) for r in RULE_NAMES for k in ("dense", "conv") for s in SETTINGS if (r, k, s) not in QUICK]
# The other rules of the registry that run in an engaged step: their examples, everything at once and a delay.
FULL += [(r, k, s) for r in ("aa", "frsf", "brsf", "wm") for k in ("dense", "conv") for s in ("all", "delay")]


@pytest.mark.parametrize("rule_name,kind,setting", QUICK)
def test_the_batched_execution_equals_the_literal_one(rule_name, kind, setting):
    check(rule_name, kind, setting)


@pytest.mark.slow
@pytest.mark.parametrize("rule_name,kind,setting", FULL)
def test_the_batched_execution_equals_the_literal_one_everywhere(rule_name, kind, setting):
    check(rule_name, kind, setting)


def test_the_output_and_loss_are_those_of_the_stimuluss_last_step():
    """The returned output is the output population's activity at the last step the stimulus is
    on (the literal's ``trace`` sees it), and the loss is ``loss_fn`` of it."""
    c = circuit(make_rule("fa"), "dense")
    x, y = _data("dense")
    s = SETTINGS["all"]
    seen = {}
    time_backward(copy.deepcopy(c), x, loss_of(y), s,
                  trace=lambda step, st: seen.__setitem__(step, st["activity"]["y"].clone()))
    loss, out = TimeExecution(c, s).backward(x, loss_of(y))
    last_on = s.steps(s.duration) - 1
    torch.testing.assert_close(out, seen[last_on], rtol=1e-13, atol=1e-15)
    assert not torch.equal(seen[last_on], seen[max(seen)])  # the settle moved it on: the step matters
    torch.testing.assert_close(loss, F.cross_entropy(seen[last_on], y), rtol=1e-13, atol=0)


def test_gradients_accumulate_and_feedback_learns_only_where_its_rule_learns_it():
    """Two presentations add up, as two ``time_backward`` calls do; FA's fixed feedback gets no
    ``.grad``, KP's learned one does."""
    for name, learns in (("fa", False), ("kp", True)):
        literal = circuit(make_rule(name), "dense")
        batched = copy.deepcopy(literal)
        ex = TimeExecution(batched, SETTINGS["delay"])
        for seed in (1, 2):
            x, y = _data("dense", seed=seed)
            time_backward(literal, x, loss_of(y), SETTINGS["delay"])
            ex.backward(x, loss_of(y))
        assert_same(_grads(literal), _grads(batched))
        assert all((s.feedback is not None and s.feedback.grad is not None) == learns
                   for s in batched.synapses.values())


def test_a_trace_is_a_populations_own():
    """An eligibility trace belongs to the presynaptic population and advances once per step,
    in both executions, also where a population feeds two synapses (x feeds x->h1 and x->y)."""
    literal = circuit(make_rule("fa"), "dense")  # x feeds h1 and y
    batched = copy.deepcopy(literal)
    x, y = _data("dense")
    time_backward(literal, x, loss_of(y), SETTINGS["trace"])
    TimeExecution(batched, SETTINGS["trace"]).backward(x, loss_of(y))
    assert_same(_grads(literal), _grads(batched))


@pytest.mark.parametrize("kind,rule_name,setting", [("conv", "kp", "all"), ("dense", "dfa", "delay"),
                                                    ("conv", "pal", "noise_ou")])
def test_compiled_steps_equal_eager_steps_and_compile_once(kind, rule_name, setting):
    """``compile=True`` (aot_eager: dynamo's one graph, run without generated kernels): the same
    numbers as eager, float64. The first step compiles the one graph; every later step, and a
    second presentation (another batch of the same shape, a new loss closure of the same code),
    compiles nothing."""
    torch._dynamo.reset()
    base = build(rule_name, kind, setting)
    eager, compiled = copy.deepcopy(base), copy.deepcopy(base)
    s = SETTINGS[setting]
    ex_e, ex_c = TimeExecution(eager, s), TimeExecution(compiled, s, compile=True, backend="aot_eager")
    x, y = _data(kind, seed=1)
    state, weights = ex_c.initial_state(x), ex_c._weights()
    draws = {n: torch.randn(x.shape[0], *p.shape, dtype=x.dtype) for n, p in compiled.populations.items()}
    draws = draws if s.noise else None
    with torch.no_grad():  # as backward steps
        state = ex_c._step(state, x, weights, loss_of(y), draws)  # the first step compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        with torch.no_grad():
            for _ in range(ex_c.plan.total - 1):
                state = ex_c._step(state, x, weights, loss_of(y), draws)
        for seed in (1, 2):
            x, y = _data(kind, seed=seed)
            le, oe = ex_e.backward(x, loss_of(y), generator=torch.Generator().manual_seed(seed))
            lc, oc = ex_c.backward(x, loss_of(y), generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(lc, le, rtol=1e-13, atol=0)
            torch.testing.assert_close(oc, oe, rtol=1e-13, atol=1e-15)
    assert_same(_grads(eager), _grads(compiled), rtol=1e-13)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("kind,rule_name,setting", [("conv", "fa", "decay"), ("dense", "kp", "delay"),
                                                    ("conv", "pal", "noise_ou")])
def test_inductor_steps_equal_eager_steps(kind, rule_name, setting):
    """The real compiler (C++ kernels on the CPU), float64: the same updates as eager to rounding.
    (Accumulating into the step's input tensors in place, inductor gave the convolutions'
    updates 66 % off; the step returns new accumulators.)"""
    torch._dynamo.reset()
    eager = build(rule_name, kind, setting)
    compiled = copy.deepcopy(eager)
    x, y = _data(kind)
    s = SETTINGS[setting]
    TimeExecution(eager, s).backward(x, loss_of(y), generator=torch.Generator().manual_seed(3))
    TimeExecution(compiled, s, compile=True).backward(x, loss_of(y), generator=torch.Generator().manual_seed(3))
    assert_same(_grads(eager), _grads(compiled), rtol=1e-12)
    torch._dynamo.reset()


def test_one_step_is_one_graph_without_breaks():
    """The whole time step traces to one graph: forward, the loss's derivative, every fused
    backward and update, the ring buffers' writes."""
    torch._dynamo.reset()
    c = circuit(make_rule("kp"), "conv")
    ex = TimeExecution(c, SETTINGS["all"])
    x, y = _data("conv")
    state = ex.initial_state(x)
    explained = torch._dynamo.explain(ex.step)(state, x, ex._weights(), loss_of(y))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()


def test_batch_norm_and_an_overshooting_high_pass_are_refused():
    c = Circuit(rule=RULES["fa"](), seed=0)
    c.input("x", 3)
    c.population("y", 2, norm="batch")
    c.dense("x", "y")
    with pytest.raises(ValueError, match="batch norm, which a circuit run in time does not have"):
        TimeExecution(c, TimeSettings())
    with pytest.raises(ValueError, match="batch norm, which a circuit run in time does not have"):
        time_backward(c, torch.zeros(4, 3), lambda out: out.sum(), TimeSettings())  # the same message
    with pytest.raises(ValueError, match="TimeSettings"):
        TimeExecution(circuit(make_rule("fa"), "dense"), {"dt": 1.0})
    pal = circuit(RULES["pal"](tau_hp=0.5), "dense")
    with pytest.raises(ValueError, match="high-pass time constant 0.5 is shorter than dt 1.0"):
        TimeExecution(pal, TimeSettings(noise=0.1))
    with pytest.raises(ValueError, match="high-pass time constant 0.5 is shorter than dt 1.0"):
        time_backward(pal, torch.zeros(4, 6, dtype=torch.float64), lambda out: out.sum(), TimeSettings(noise=0.1))


def test_a_changed_rule_is_planned_anew():
    """The plan holds which synapses send errors back; swapping the rules (``backprop_truth``)
    makes a new one, so the result is backprop's in time."""
    c = circuit(make_rule("dfa"), "dense")
    truth = copy.deepcopy(c)
    x, y = _data("dense")
    ex = TimeExecution(c, SETTINGS["delay"])
    ex.backward(x, loss_of(y))  # planned for DFA
    c.zero_grad(set_to_none=True)
    with c.backprop_truth():
        ex.backward(x, loss_of(y))
    with truth.backprop_truth():
        time_backward(truth, x, loss_of(y), SETTINGS["delay"])
    assert_same(_grads(truth), _grads(c))


def test_the_cost_benchmark_runs_small(tmp_path):
    """``benchmarks/time_cost.py`` on tiny batches and T = 2: a row per circuit and variant, the
    discrete step its own unit, a presentation T steps."""
    from benchmarks.time_cost import main

    out = tmp_path / "cost.json"
    main(["--circuits", "mlp,conv", "--steps", "2", "--reps", "1", "--literal-reps", "1", "--warmup", "0",
          "--backend", "eager", "--mlp-batch", "4", "--conv-batch", "2", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {(r["circuit"], r["variant"]) for r in rows} == {
        (c, v) for c in ("mlp", "conv") for v in ("discrete", "time_eager", "time_compiled", "literal",
                                                   "continuous_eager", "continuous_compiled")}
    for r in rows:
        assert r["T"] == 2 and r["ms"] > 0 and r["cpu_ms"] >= 0
        if r["variant"] == "discrete":
            assert r["ratio_to_discrete"] == 1.0
        else:
            assert r["steps_per_s"] == pytest.approx(2 / (r["ms"] / 1000))
