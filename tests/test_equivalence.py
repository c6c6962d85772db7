"""The compiled and reference executions give the same local updates, for every rule and kind."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from neurosim.core.circuit import Circuit
from neurosim.core.reference import reference_backward
from neurosim.rules import RULES as REGISTRY
from neurosim.rules import Backprop, FeedbackAlignment, KolenPollack, LocalSignals, SignSymmetry, WeightMirror

# Every registered rule, as its file's example instance (tests/test_registry.py: a new rule is
# covered by adding its file).
RULES = {name: cls.example for name, cls in REGISTRY.items()}


def random_circuit(rule, seed, bias, kind):
    """A circuit with random widths: convs (strided, grouped, a residual) or a dense stack."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    c = Circuit(rule=rule, seed=seed)
    if kind == "conv":
        ch = 2 * r(1, 3)
        c.input("x", (3, 9, 9))
        c.population("c1", (ch, 5, 5), activation="relu", norm="batch")
        c.conv("x", "c1", 3, stride=2, padding=1, bias=bias)
        c.population("c2", (ch, 5, 5), activation="relu")
        c.conv("c1", "c2", 3, padding=1, groups=2, bias=bias)
        c.identity("c1", "c2")
        c.population("c3", (ch + 1, 2, 2), activation="tanh")
        c.conv("c2", "c3", 2, stride=2, bias=bias)
        c.population("pool", (ch + 1,), pool="global_avg")
        c.identity("c3", "pool")
        c.population("y", 4)
        c.dense("pool", "y", bias=bias)
        c.dense("c3", "y", bias=bias)  # a second pathway into one population
    else:
        widths = [r(3, 9) for _ in range(3)]
        c.input("x", widths[0])
        c.population("h1", widths[1], activation="sigmoid")
        c.dense("x", "h1", bias=bias)
        c.population("h2", widths[2], activation="relu", norm="batch")
        c.dense("h1", "h2", bias=bias)
        c.population("y", 4)
        c.dense("h2", "y", bias=bias)
        c.dense("x", "y", bias=bias)  # skip pathway
    if getattr(rule, "direct_feedback", False):
        c.add_direct_feedback()  # DFA: the output error straight to every hidden population
    return c.double()


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_equals_reference(rule, kind, bias, seed):
    compiled = random_circuit(RULES[rule](), seed, bias, kind)
    literal = copy.deepcopy(compiled)
    shape = (6, *compiled.populations["x"].shape)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 10))
    target = torch.arange(6) % 4
    loss_fn = lambda out: F.cross_entropy(out, target)

    loss = loss_fn(compiled(x))
    loss.backward()
    ref_loss = reference_backward(literal, x, loss_fn)

    assert torch.allclose(loss, ref_loss, rtol=1e-12, atol=1e-12)
    a, b = grads(compiled), grads(literal)
    assert a.keys() == b.keys()
    learns = REGISTRY[rule].feedback_learns == "engaged"  # KP's B learns from the task
    assert {n for n in a if n.endswith(".feedback")} == (
        {f"synapses.{s}.feedback" for s in compiled.synapses} if learns else set())
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-10, atol=1e-12), n
    # Batch-norm running statistics moved identically too.
    for (n, t), (_, u) in zip(compiled.named_buffers(), literal.named_buffers()):
        assert torch.allclose(t.double(), u.double()), n


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_sleep_compiled_equals_reference(kind):
    compiled = random_circuit(WeightMirror(sigma=0.3, decay=0.5), 3, True, kind)
    literal = copy.deepcopy(compiled)
    compiled.sleep(5, torch.Generator().manual_seed(7))
    literal.sleep(5, torch.Generator().manual_seed(7), literal=True)
    for name, syn in compiled.synapses.items():
        assert syn.feedback.grad is not None
        assert torch.allclose(syn.feedback.grad, literal.synapses[name].feedback.grad, rtol=1e-10, atol=1e-12)
        assert syn.weight.grad is None  # sleep never touches forward weights


def test_sleep_expected_update_points_to_w():
    """E[ξ (Wξ)ᵀ]/σ² = Wᵀ: averaged over many mirror batches the Hebbian term recovers W."""
    c = Circuit(rule=WeightMirror(sigma=0.2, decay=0.0), seed=0)
    c.input("x", 20)
    c.population("y", 7)
    syn = c.dense("x", "y")
    c.sleep(20000, torch.Generator().manual_seed(0))
    hebb = -syn.feedback.grad
    from neurosim.core.analysis import angle_deg
    assert float(angle_deg(hebb, syn.weight)) < 3.0
    assert torch.allclose(hebb.norm(), syn.weight.detach().norm(), rtol=0.05)


NATIVE_CONV = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False), nn.ReLU(),
                            nn.Flatten(), nn.Linear(100, 5))


def test_backprop_compiled_equals_native_autograd():
    c = Circuit(rule=Backprop(), seed=0)
    c.input("x", (3, 10, 10))
    c.population("a", (4, 5, 5), activation="relu", norm="batch")
    c.conv("x", "a", 3, stride=2, padding=1)
    c.population("b", (4, 5, 5), activation="relu")
    c.conv("a", "b", 3, padding=1, groups=2, bias=False)
    c.population("y", 5)
    c.dense("b", "y")
    c = c.double()
    native = copy.deepcopy(NATIVE_CONV).double()
    with torch.no_grad():
        native[0].weight.copy_(c.synapses["x->a"].weight)
        native[0].bias.copy_(c.synapses["x->a"].bias)
        native[3].weight.copy_(c.synapses["a->b"].weight)
        native[6].weight.copy_(c.synapses["b->y"].weight)
        native[6].bias.copy_(c.synapses["b->y"].bias)
    x = torch.randn(8, 3, 10, 10, dtype=torch.float64)
    t = torch.arange(8) % 5
    F.cross_entropy(c(x), t).backward()
    F.cross_entropy(native(x), t).backward()
    pairs = [(c.synapses["x->a"].weight, native[0].weight), (c.synapses["x->a"].bias, native[0].bias),
             (c.populations["a"].norm.weight, native[1].weight), (c.synapses["a->b"].weight, native[3].weight),
             (c.synapses["b->y"].weight, native[6].weight), (c.synapses["b->y"].bias, native[6].bias)]
    for mine, theirs in pairs:
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-12, atol=1e-14)


def test_feedback_alignment_sends_error_through_b_not_w():
    c = Circuit(rule=FeedbackAlignment(), seed=0)
    c.input("x", 5)
    c.population("y", 3)
    syn = c.dense("x", "y", bias=False)
    c.double()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    c(x).sum().backward()
    ones = torch.ones(4, 3, dtype=torch.float64)
    assert torch.allclose(x.grad, ones @ syn.feedback)
    assert not torch.allclose(x.grad, ones @ syn.weight.detach())


def test_kolen_pollack_feedback_update_uses_only_its_local_signals():
    rule = KolenPollack(decay=0.1)
    pre, post = torch.randn(6, 5), torch.randn(6, 3)
    b = torch.randn(3, 5)
    from neurosim.core.kinds import Dense

    # The feedback update's signals hold its input, its partner's activity and its own weight;
    # W is not among them — the result must be computable all the same, and equal the law.
    s = LocalSignals(Dense(5, 3), pre, post, b)
    got = rule.feedback_update(s)
    assert torch.allclose(got, post.t() @ pre + 0.1 * b)
    # The compiled function's update of B does not change when W changes.
    outs = []
    for seed in (0, 1):
        c = Circuit(rule=rule, seed=seed)
        c.input("x", 5)
        c.population("y", 3)
        syn = c.dense("x", "y", bias=False)
        c.double()
        with torch.no_grad():
            syn.feedback.copy_(b.double())
        x = pre.double()
        (c(x) * post.double()).sum().backward()
        outs.append(syn.feedback.grad)
    assert torch.equal(outs[0], outs[1])


def test_kp_feedback_and_weight_gradients_are_distinct_tensors():
    c = Circuit(rule=KolenPollack(), seed=0)
    c.input("x", 4)
    c.population("y", 3)
    syn = c.dense("x", "y")
    c(torch.randn(2, 4)).sum().backward()
    assert torch.equal(syn.weight.grad, syn.feedback.grad)
    assert syn.weight.grad.data_ptr() != syn.feedback.grad.data_ptr()


def test_sign_symmetry_feedback_is_sign_of_current_w():
    """The error delivered to the presynaptic neurons is ``δ·(sign(W)·s)``: the signs of ``W`` as
    it is now, and one magnitude ``s`` fixed at construction (the RMS of the initial ``W``)."""
    c = Circuit(rule=SignSymmetry(), seed=0)
    c.input("x", 6)
    c.population("y", 4)
    syn = c.dense("x", "y", bias=False)
    w0 = syn.weight.detach().clone()
    scale = w0.pow(2).mean().sqrt().double()  # as the rule computes it, in the weights' float32
    c.double()
    with torch.no_grad():
        syn.weight.mul_(-3)  # every sign flipped, every magnitude tripled
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(5, 4, dtype=torch.float64)
    c(x).backward(delta)
    w = syn.weight.detach()
    assert torch.allclose(x.grad, delta @ (torch.sign(w) * scale), rtol=1e-12, atol=1e-15)
    assert torch.allclose(x.grad, -(delta @ torch.sign(w0.double())) * scale, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(x.grad, delta @ w)  # W's magnitudes do not travel


def test_plausibility_report():
    for rule, transports in [(Backprop(), True), (SignSymmetry(), False), (KolenPollack(), False)]:
        c = Circuit(rule=rule)
        c.input("x", 3)
        c.population("y", 2)
        c.dense("x", "y")
        assert c.transports_weights() is transports
    assert c.plausibility() == {"x->y": "nothing"}


def test_circuit_validation_messages():
    c = Circuit(rule=Backprop())
    c.input("x", (3, 8, 8))
    c.population("y", (4, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        c.conv("x", "y", 3)  # no padding: 6x6 output does not fit
    with pytest.raises(ValueError, match="no population 'z'"):
        c.dense("x", "z")
    c.population("a", (4, 8, 8))
    c.population("b", (4, 4, 4))
    c.conv("x", "a", 3, padding=1)
    c.conv("x", "b", 3, stride=2, padding=1)
    c.population("pool", 4, pool="global_avg")
    c.identity("a", "pool")
    with pytest.raises(ValueError, match=r"pools drives of shape \(4, 8, 8\), not \(4, 4, 4\)"):
        c.identity("b", "pool")
    c.population("lonely", 3)
    with pytest.raises(ValueError, match="receives no pathway"):
        c(torch.randn(1, 3, 8, 8))


def test_autocast_bf16_on_cpu_matches_native():
    """Under autocast the synapse computes in bf16 like native layers, and grads land in fp32."""
    c = Circuit(rule=Backprop(), seed=0)
    c.input("x", 8)
    c.population("y", 4)
    syn = c.dense("x", "y")
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight.copy_(syn.weight)
        lin.bias.copy_(syn.bias)
    x = torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_c, out_n = c(x), lin(x)
    assert out_c.dtype == out_n.dtype == torch.bfloat16
    assert torch.equal(out_c, out_n)
    out_c.float().sum().backward()
    out_n.float().sum().backward()
    assert syn.weight.grad.dtype == torch.float32
    assert torch.allclose(syn.weight.grad, lin.weight.grad, rtol=1e-2, atol=1e-2)


# Rules whose synapses run under native autograd (backprop) keep what autograd keeps.
@pytest.mark.parametrize("rule", [r for r in sorted(RULES) if not RULES[r]().native_backward] + ["kp_no_decay"])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_the_backward_keeps_a_copy_of_w_only_if_the_rule_reads_it(rule, kind):
    """Under autocast each synapse casts W to bf16; that copy is kept for the backward only by
    rules that send errors through W (or its signs) or decay it, and their updates are unchanged."""
    make = (lambda: KolenPollack(decay=0.0)) if rule == "kp_no_decay" else RULES[rule]
    c = random_circuit(make(), 0, True, kind).float()
    casts = {s.weight.detach().to(torch.bfloat16) for s in c.synapses.values()}
    kept = []

    def pack(t):
        kept.append(any(t.dtype == w.dtype and t.shape == w.shape and torch.equal(t, w) for w in casts))
        return t

    x = torch.randn(6, *c.populations["x"].shape)
    y = torch.randint(0, 4, (6,))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(c(x).float(), y)
    loss.backward()
    reads = make().backward_reads_weight
    assert reads == (rule not in ("fa", "wm", "dfa", "kp_no_decay", "pal"))
    assert sum(kept) == (len(c.synapses) if reads else 0)
    assert all(torch.isfinite(s.weight.grad).all() for s in c.synapses.values())


def test_synapse_kinds_follow_one_protocol():
    from neurosim.core.kinds import Conv2d, Dense, SynapseKind

    dense, conv = Dense(6, 4), Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    assert isinstance(dense, SynapseKind) and isinstance(conv, SynapseKind)
    assert (dense.fan_in(), dense.fan_out(), dense.describe()) == (6, 4, "dense 6->4")
    assert (conv.fan_in(), conv.fan_out()) == (18, 54)  # as torch.nn.init computes them
    assert conv.describe() == "conv3x3 4->6 stride=2 pad=1 groups=2"
    e = torch.randn(5, 6, 3, 3)
    torch.testing.assert_close(conv.ref_bias_sum(e), e.sum((0, 2, 3)))
    c = Circuit(rule=Backprop())
    c.input("x", 6)
    c.population("y", 4)
    with pytest.raises(TypeError, match="is not a synapse kind"):
        c.connect("x", "y", object())
