"""Feedback pathways and direct feedback alignment (DFA) built from them.

Compiled equals reference (float64, dense and convolutional, with and without bias); the error
a hidden population receives is ``B e`` times its own derivative; ``B`` never changes; the
output synapse gets the true error; torch.compile sees one graph; DFA learns the digits; a
ResNet-18 DFA circuit trains a step.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from neurosim.core.circuit import Circuit
from neurosim.core.pathways import FeedbackPathway
from neurosim.core.pathways import __doc__ as pathways_doc
from neurosim.core.reference import reference_backward
from neurosim.core.synapse import weight_init
from neurosim.models import build_mlp, build_resnet
from neurosim.rules import Backprop, FeedbackAlignment, KolenPollack, SignSymmetry
from neurosim.rules.direct_feedback_alignment import DirectFeedbackAlignment
from tests.test_equivalence import grads, random_circuit


def dfa_circuit(kind, seed=0, bias=True, per_unit=False):
    c = random_circuit(DirectFeedbackAlignment(per_unit=per_unit), seed, bias, kind)
    c.add_direct_feedback()
    return c


# -- the two executions agree ----------------------------------------------------------------

@pytest.mark.parametrize("per_unit", [False, True])
@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_equals_reference(kind, bias, seed, per_unit):
    compiled = dfa_circuit(kind, seed, bias, per_unit)
    targets = {p.target for p in compiled.feedback_pathways.values()}
    assert targets == ({"c1", "c2", "c3"} if kind == "conv" else {"h1", "h2"})  # not pool, not y
    assert all(p.feedback.dtype == torch.float64 for p in compiled.feedback_pathways.values())
    for p in compiled.feedback_pathways.values():  # one row per unit, or per channel of a spatial target
        rows = math.prod(p.target_shape) if per_unit else p.target_shape[0]
        assert tuple(p.feedback.shape) == (rows, 4) and p.per_unit == (per_unit and kind == "conv")
    literal = copy.deepcopy(compiled)
    x = torch.randn(6, *compiled.populations["x"].shape, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed + 10))
    target = torch.arange(6) % 4
    loss_fn = lambda out: F.cross_entropy(out, target)

    loss = loss_fn(compiled(x))
    loss.backward()
    ref_loss = reference_backward(literal, x, loss_fn)

    assert torch.allclose(loss, ref_loss, rtol=1e-12, atol=1e-12)
    a, b = grads(compiled), grads(literal)
    assert a.keys() == b.keys()
    assert {f"synapses.{n}.weight" for n in compiled.synapses} <= a.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-10, atol=1e-12), n
    for (n, t), (_, u) in zip(compiled.named_buffers(), literal.named_buffers()):
        assert torch.allclose(t.double(), u.double()), n


def test_pathways_off_both_executions_agree():
    """Without its pathways a DFA circuit trains only the synapses into the output."""
    compiled = dfa_circuit("dense", 0)
    literal = copy.deepcopy(compiled)
    x = torch.randn(5, *compiled.populations["x"].shape, dtype=torch.float64)
    loss_fn = lambda out: F.cross_entropy(out, torch.arange(5) % 4)
    with compiled.feedback_pathways_off():
        loss_fn(compiled(x)).backward()
    with literal.feedback_pathways_off():
        reference_backward(literal, x, loss_fn)
    assert compiled.pathways_enabled and literal.pathways_enabled
    a, b = grads(compiled), grads(literal)
    # No .grad at all (not a zero one) where no error arrives: weight decay leaves them alone too.
    assert a.keys() == b.keys() == {"synapses.h2->y.weight", "synapses.h2->y.bias", "synapses.x->y.weight",
                                     "synapses.x->y.bias"}
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-10, atol=1e-12), n


# -- what each synapse receives ------------------------------------------------------------

def two_layer(rule, seed=0):
    c = Circuit(rule=rule, seed=seed)
    c.input("x", 7)
    c.population("h", 9, activation="tanh")
    c.dense("x", "h")
    c.population("y", 4)
    c.dense("h", "y")
    if getattr(rule, "direct_feedback", False):
        c.add_direct_feedback()
    return c.double()


def test_hidden_error_is_b_e_times_its_derivative():
    c = two_layer(DirectFeedbackAlignment())
    (pathway,) = c.feedback_pathways.values()
    assert (pathway.source, pathway.target, tuple(pathway.feedback.shape)) == ("y", "h", (9, 4))
    w1, b1 = c.synapses["x->h"].weight, c.synapses["x->h"].bias
    w2 = c.synapses["h->y"].weight
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    t = torch.arange(6) % 4
    drive = {}

    def keep(module, inputs, output):
        output.retain_grad()
        drive["u"] = output

    c.synapses["x->h"].register_forward_hook(keep)
    out = c(x)
    F.cross_entropy(out, t).backward()

    with torch.no_grad():
        u = x @ w1.t() + b1
        h = torch.tanh(u)
        e = (torch.softmax(h @ w2.t() + c.synapses["h->y"].bias, 1) - F.one_hot(t, 4)) / 6
        delta = (e @ pathway.feedback.t()) * (1 - h**2)  # B e times tanh'(u)
    torch.testing.assert_close(drive["u"].grad, delta, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(w1.grad, delta.t() @ x.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b1.grad, delta.sum(0), rtol=1e-12, atol=1e-14)
    assert x.grad is None  # synapses under DFA send nothing back to their presynaptic population


def test_output_synapse_gets_the_true_error():
    """Under DFA the synapse into the output learns exactly as under backprop; hidden ones not."""
    dfa, bp = two_layer(DirectFeedbackAlignment(), seed=3), two_layer(Backprop(), seed=3)
    for n in bp.synapses:  # neither rule draws synapse feedback: the same forward weights
        assert torch.equal(dfa.synapses[n].weight, bp.synapses[n].weight)
    x = torch.randn(8, 7, dtype=torch.float64)
    t = torch.arange(8) % 4
    for c in (dfa, bp):
        F.cross_entropy(c(x), t).backward()
    for p in ("weight", "bias"):
        torch.testing.assert_close(getattr(dfa.synapses["h->y"], p).grad, getattr(bp.synapses["h->y"], p).grad,
                                   rtol=1e-13, atol=1e-15)
    assert not torch.allclose(dfa.synapses["x->h"].weight.grad, bp.synapses["x->h"].weight.grad)


def test_b_never_changes_and_is_state():
    c = build_mlp(DirectFeedbackAlignment(), 12, (16, 8), 5)
    before = {n: p.feedback.clone() for n, p in c.feedback_pathways.items()}
    assert set(before) == {"y=>h1", "y=>h2"}
    assert not any(p is q.feedback for p in c.engaged_parameters() for q in c.feedback_pathways.values())
    opt = torch.optim.SGD(c.engaged_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    g = torch.Generator().manual_seed(0)
    w0 = c.synapses["x->h1"].weight.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(c(torch.randn(8, 12, generator=g)), torch.randint(0, 5, (8,), generator=g)).backward()
        opt.step()
    assert not torch.equal(c.synapses["x->h1"].weight, w0)  # training happened
    for n, p in c.feedback_pathways.items():
        assert torch.equal(p.feedback, before[n]), n
        assert not p.feedback.requires_grad
    state = c.state_dict()
    assert torch.equal(state["feedback_pathways.y=>h1.feedback"], before["y=>h1"])
    assert c.double().feedback_pathways["y=>h1"].feedback.dtype == torch.float64  # .to() moves B
    # Seeded: the same circuit again draws the same B; U(±1/√K) with K = 5 output neurons.
    again = build_mlp(DirectFeedbackAlignment(), 12, (16, 8), 5)
    assert torch.equal(again.feedback_pathways["y=>h2"].feedback, before["y=>h2"])
    assert before["y=>h1"].abs().max() <= 1 / math.sqrt(5)


# -- building ------------------------------------------------------------------------------

def test_builders_add_pathways_only_for_direct_feedback_rules():
    c = build_mlp(DirectFeedbackAlignment(), (1, 8, 8), (128, 64), 10)
    text = repr(c)
    assert "feedback pathways:" in text
    assert "y => h1 (direct, fixed random 10->128, B(128, 10), rule=fa)" in text
    assert "y => h2 (direct, fixed random 10->64, B(64, 10), rule=fa)" in text
    assert c.plausibility() == {"x->h1": "nothing", "h1->h2": "nothing", "h2->y": "nothing"}
    for rule in (Backprop(), FeedbackAlignment(), KolenPollack(), SignSymmetry()):
        plain = build_mlp(rule, 12, (6,), 3)
        assert len(plain.feedback_pathways) == 0 and "feedback pathways" not in repr(plain)
        assert not any("feedback_pathways" in k for k in plain.state_dict())
    r = build_resnet("resnet18", DirectFeedbackAlignment(), 10, (3, 8, 8), width=0.125)
    targets = {p.target for p in r.feedback_pathways.values()}
    assert targets == {s.post for s in r.synapses.values()} - {"logits"}
    assert "pool" not in targets and "layer1_0" not in targets and "layer2_0_sc" in targets
    stem = r.feedback_pathways["logits=>stem"]
    assert tuple(stem.feedback.shape) == (8, 10)
    assert "per channel, broadcast over 8x8" in stem.describe()
    assert len(build_resnet("resnet18", KolenPollack(), 10, (3, 8, 8), width=0.125).feedback_pathways) == 0


def test_alignment_angles_are_nan_without_a_feedback_matrix():
    c = build_mlp(DirectFeedbackAlignment(), 6, (5,), 3)
    assert all(math.isnan(a) for a in c.alignment_angles().values())
    assert all(s.feedback is None and s.feedback_matrix() is None for s in c.synapses.values())
    assert not any(math.isnan(a) for a in build_mlp(FeedbackAlignment(), 6, (5,), 3).alignment_angles().values())


def test_pathway_validation_messages():
    c = Circuit(rule=DirectFeedbackAlignment())
    c.input("x", 4)
    c.population("h", 5, activation="relu")
    c.dense("x", "h")
    c.population("y", 3)
    c.dense("h", "y")
    with pytest.raises(ValueError, match="source must be the output population 'y', not 'h'"):
        c.feedback_pathway("h", "y")
    with pytest.raises(ValueError, match="cannot target the input"):
        c.feedback_pathway("y", "x")
    with pytest.raises(ValueError, match="cannot target the output"):
        c.feedback_pathway("y", "y")
    with pytest.raises(ValueError, match="learns its feedback weight"):
        c.feedback_pathway("y", "h", rule=KolenPollack())
    with pytest.raises(ValueError, match="reads weights"):
        c.feedback_pathway("y", "h", rule=Backprop())
    with pytest.raises(ValueError, match="keeps no feedback weight"):
        c.feedback_pathway("y", "h", rule=DirectFeedbackAlignment())
    c.feedback_pathway("y", "h")
    with pytest.raises(ValueError, match="already receives a feedback pathway"):
        c.feedback_pathway("y", "h")
    assert c.add_direct_feedback() == []  # h has one already
    with pytest.raises(ValueError, match="flat population"):
        FeedbackPathway("a", "b", (2, 3, 3), (4,))
    # Adding a population after the pathway changes the output: the plan says so.
    c.population("z", 2)
    c.dense("y", "z")
    with pytest.raises(ValueError, match="no longer the output population 'z'"):
        c(torch.randn(2, 4))


def test_pathway_compiled_and_literal_delivery_agree():
    g = torch.Generator().manual_seed(0)
    for shape in [(6,), (3, 4, 5)]:
        p = FeedbackPathway("y", "t", (4,), shape, generator=g).double()
        e = torch.randn(7, 4, dtype=torch.float64, generator=g)
        got, ref = p(e), p.ref_feedback(e)
        assert got.shape == ref.shape == (7, *shape)
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-15)


# -- per unit (Nøkland's form) and per channel (neurosim's default) ---------------------------

def small_conv(rule, seed=0):
    """x (2, 6, 6) → c1 (3, 6, 6) ReLU → c2 (4, 3, 3) tanh → y (3): no identity pathway, so the
    only error a hidden activity receives is the one its feedback pathway delivers."""
    c = Circuit(rule=rule, seed=seed)
    c.input("x", (2, 6, 6))
    c.population("c1", (3, 6, 6), activation="relu")
    c.conv("x", "c1", 3, padding=1)
    c.population("c2", (4, 3, 3), activation="tanh")
    c.conv("c1", "c2", 3, stride=2, padding=1)
    c.population("y", 3)
    c.dense("c2", "y")
    c.add_direct_feedback()
    return c.double()


def small_mlp(rule, seed=0):
    c = Circuit(rule=rule, seed=seed)
    c.input("x", 5)
    c.population("h1", 6, activation="relu")
    c.dense("x", "h1")
    c.population("h2", 7, activation="tanh")
    c.dense("h1", "h2")
    c.population("y", 3)
    c.dense("h2", "y")
    c.add_direct_feedback()
    return c.double()


def per_unit_rows(b, shape):
    """``B`` with one row per unit written out unit by unit: row of the unit at ``(c, h, w)``."""
    c_, h_, w_ = shape
    rows = {(c, h, w): b[(c * h_ + h) * w_ + w] for c in range(c_) for h in range(h_) for w in range(w_)}
    return torch.stack([rows[(c, h, w)] for c in range(c_) for h in range(h_) for w in range(w_)])


def literal_updates(c, x, t):
    """Every update of a DFA circuit from the formulas, in float64: the output error
    ``e = (softmax − onehot)/N``; at each hidden population the delivered error ``e B_lᵀ`` (one
    row of ``B_l`` per unit, reshaped to the population) times its derivative is ``δ``;
    ``ΔW = δ ⊗ x`` summed over samples (and positions: unfold), ``Δb = Σ δ``."""
    syn = dict(c.synapses)
    acts, pres = {"x": x}, {}
    with torch.no_grad():
        for name in c.order()[1:]:
            (s,) = [s for s in syn.values() if s.post == name]
            pres[name] = acts[s.pre]
            u = s.ref_forward(acts[s.pre])
            acts[name] = c.populations[name].respond(u)
        n = x.shape[0]
        e = (torch.softmax(acts["y"], 1) - F.one_hot(t, acts["y"].shape[1])) / n
        delivered, deltas = {}, {"y": e}
        for p in c.feedback_pathways.values():
            shape = p.target_shape
            b = per_unit_rows(p.feedback, shape) if len(shape) == 3 and p.per_unit else p.feedback
            d = e @ b.t()
            if len(shape) == 3:
                d = d.reshape(n, *shape) if p.per_unit else d[:, :, None, None].expand(n, *shape)
            delivered[p.target] = d
            a = acts[p.target]
            act = c.populations[p.target].activation
            deltas[p.target] = d * ((a > 0).double() if act == "relu" else 1 - a**2)
        want = {}
        for s in syn.values():
            delta, pre = deltas[s.post], pres[s.post]
            if delta.dim() == 4:
                k = s.weight.shape[-1]
                cols = F.unfold(pre, k, padding=s.kind.padding, stride=s.kind.stride)
                gw = torch.einsum("nol,nil->oi", delta.flatten(2), cols).reshape(s.weight.shape)
                gb = delta.sum((0, 2, 3))
            else:
                gw, gb = delta.t() @ pre.flatten(1), delta.sum(0)
            want[f"synapses.{s.name}.weight"], want[f"synapses.{s.name}.bias"] = gw, gb
    return delivered, want


@pytest.mark.parametrize("build", [small_mlp, small_conv])
@pytest.mark.parametrize("per_unit", [False, True])
def test_delivered_error_and_updates_are_the_literal_matrix_products(build, per_unit):
    """Per unit: the error at each target is ``e @ B_lᵀ`` reshaped, ``B_l`` with one row per unit
    (``C·H·W × K``), each unit its own; per channel: one row per channel, broadcast over space.
    Both executions, float64, against the formulas."""
    c = build(DirectFeedbackAlignment(per_unit=per_unit), seed=2)
    for p in c.feedback_pathways.values():
        spatial = len(p.target_shape) == 3
        rows = math.prod(p.target_shape) if per_unit and spatial else p.target_shape[0]
        assert tuple(p.feedback.shape) == (rows, 3) and p.per_unit == (per_unit and spatial)
    literal = copy.deepcopy(c)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, *c.populations["x"].shape, dtype=torch.float64, generator=g)
    t = torch.tensor([0, 2, 1, 2])
    got = {}

    def keep(module, inputs, out):
        out.retain_grad()
        got[module.name] = out

    for name in (p.target for p in c.feedback_pathways.values()):
        c.populations[name].register_forward_hook(keep)
    F.cross_entropy(c(x), t).backward()
    reference_backward(literal, x, lambda out: F.cross_entropy(out, t))
    delivered, want = literal_updates(c, x, t)

    assert got.keys() == delivered.keys() and len(got) == 2
    for name, d in delivered.items():
        torch.testing.assert_close(got[name].grad, d, rtol=1e-12, atol=1e-15)
        if len(d.shape) == 4:  # per unit, positions of one channel receive different errors
            assert torch.equal(d, d[:, :, :1, :1].expand_as(d)) != per_unit
    a, b = grads(c), grads(literal)
    assert a.keys() == b.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(a[n], want[n], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(b[n], want[n], rtol=1e-10, atol=1e-13)


def test_per_channel_is_unchanged():
    """``per_unit=False`` (the default) is the form neurosim had: ``B_l`` of ``C × K`` drawn in
    the same order from the circuit's generator, its error broadcast over space bit for bit, and
    the same updates as a circuit whose pathways are added per channel explicitly."""
    default, explicit = DirectFeedbackAlignment(), DirectFeedbackAlignment(per_unit=False)
    assert default == explicit and not default.per_unit
    c = small_conv(default, seed=1)
    # The old draw, replayed: the synapses' weights, then each pathway's U(±1/√K) of C × K.
    bare = Circuit(rule=default, seed=1)
    for name, shape in [("x", (2, 6, 6)), ("c1", (3, 6, 6)), ("c2", (4, 3, 3)), ("y", (3,))]:
        (bare.input if name == "x" else bare.population)(name, shape)
    bare.conv("x", "c1", 3, padding=1)
    bare.conv("c1", "c2", 3, stride=2, padding=1)
    bare.dense("c2", "y")
    for p in c.feedback_pathways.values():
        drawn = FeedbackAlignment().init_feedback(torch.empty(p.target_shape[0], 3), weight_init("default", 3, p.target_shape[0]),
                                                  bare._generator)
        assert torch.equal(p.feedback, drawn.double()), p.name
        e = torch.randn(5, 3, dtype=torch.float64)
        assert torch.equal(p(e), e.mm(p.feedback.t())[:, :, None, None].expand(5, *p.target_shape))
        assert "per channel, broadcast over" in p.describe()
    other = copy.deepcopy(c)
    other.feedback_pathways.clear()
    other.add_direct_feedback(per_unit=False)  # draws on from other's generator: copy B over
    for n, p in other.feedback_pathways.items():
        p.feedback.copy_(c.feedback_pathways[n].feedback)
    x, t = torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    for circuit in (c, other):
        F.cross_entropy(circuit(x), t).backward()
    a, b = grads(c), grads(other)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_checkpoints_keep_their_shapes():
    """A per-channel state (every run before per-unit existed) loads into a per-channel circuit;
    a per-unit one has the same names, larger ``B``, and is refused by a per-channel circuit."""
    old = build_resnet("resnet18", DirectFeedbackAlignment(), 10, (3, 8, 8), width=0.125)
    state = old.state_dict()
    assert tuple(state["feedback_pathways.logits=>stem.feedback"].shape) == (8, 10)
    fresh = build_resnet("resnet18", DirectFeedbackAlignment(), 10, (3, 8, 8), width=0.125, seed=1)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.feedback_pathways["logits=>stem"].feedback, state["feedback_pathways.logits=>stem.feedback"])
    unit = build_resnet("resnet18", DirectFeedbackAlignment(per_unit=True), 10, (3, 8, 8), width=0.125)
    assert unit.state_dict().keys() == state.keys()
    stem = unit.feedback_pathways["logits=>stem"]
    assert tuple(stem.feedback.shape) == (8 * 8 * 8, 10) and "per unit, 8x8 positions" in stem.describe()
    with pytest.raises(RuntimeError, match="size mismatch"):
        unit.load_state_dict(state)


def test_per_unit_is_a_rule_setting_and_an_option():
    from neurosim.tools.cli.options import parse_run_args
    from neurosim.training.config import preset

    assert DirectFeedbackAlignment.example().per_unit  # what the rule-generic tests run
    assert preset("dfa_resnet18").make_rule() == DirectFeedbackAlignment()
    assert preset("dfa_resnet18", dfa_per_unit=True).make_rule() == DirectFeedbackAlignment(per_unit=True)
    for argv, want in ((["--dfa-per-unit"], True), (["--dfa-per-unit", "false"], False)):
        request = parse_run_args(["dfa_resnet18", *argv])
        assert request.overrides["dfa_per_unit"] is want
    with pytest.raises(TypeError):
        DirectFeedbackAlignment(per_unit="yes")


def test_per_unit_memory_figure_in_the_docstrings():
    """ResNet-18, width 1, CIFAR-100: the numbers of floats the docstrings state (built on meta)."""
    with torch.device("meta"):
        per_unit = build_resnet("resnet18", DirectFeedbackAlignment(per_unit=True), 100, (3, 32, 32))
        per_channel = build_resnet("resnet18", DirectFeedbackAlignment(), 100, (3, 32, 32))
    count = lambda c: sum(p.feedback.numel() for p in c.feedback_pathways.values())
    units = sum(math.prod(p.target_shape) for p in per_unit.feedback_pathways.values())
    assert (len(per_unit.feedback_pathways), units, count(per_unit), count(per_channel)) == (20, 614_400, 61_440_000,
                                                                                             480_000)
    assert round(sum(p.numel() for p in per_unit.parameters()) / 1e6, 1) == 11.2
    for doc in (DirectFeedbackAlignment.__doc__, pathways_doc):
        flat = " ".join(doc.split())
        assert "614,400" in flat and "61,440,000 floats" in flat and "480,000 floats" in flat


# -- torch.compile and autocast: tests/test_compile.py runs its one-graph, compiled-equals-eager
# and bf16 tests for every registered rule, DFA among them (its circuits get their pathways).


# -- learning ------------------------------------------------------------------------------

def test_dfa_learns_digits():
    """64-128-64-10 ReLU circuit, SGD momentum 0.9, lr 0.05, batch 32, 30 epochs (about 2 s on one
    thread): ≥ 90 % (seed 0 reaches 97.8 %; seeds 1-3 95.3-96.7 %, and ≥ 94.4 % already after 10
    epochs). B stays as drawn."""
    from neurosim.data import load_dataset

    data = load_dataset("digits")

    def prep(x):
        return (x.float() / 255 - data.mean[0]) / data.std[0]

    xtr, ytr, xte, yte = prep(data.train_x), data.train_y, prep(data.test_x), data.test_y
    c = build_mlp(DirectFeedbackAlignment(), data.image_shape, (128, 64), data.num_classes)
    before = {n: p.feedback.clone() for n, p in c.feedback_pathways.items()}
    opt = torch.optim.SGD(c.engaged_parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small run fastest on one thread, whatever else runs
    try:
        for _ in range(30):
            perm = torch.randperm(len(xtr), generator=g)
            for i in range(0, len(xtr), 32):
                idx = perm[i:i + 32]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(c(xtr[idx]), ytr[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        acc = float((c(xte).argmax(1) == yte).float().mean()) * 100
    assert acc >= 90, acc
    assert all(torch.equal(p.feedback, before[n]) for n, p in c.feedback_pathways.items())


def test_resnet18_dfa_training_step():
    c = build_resnet("resnet18", DirectFeedbackAlignment(), 10, (3, 16, 16), width=0.125)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    opt = torch.optim.SGD(c.engaged_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    w0 = {n: s.weight.detach().clone() for n, s in c.synapses.items()}
    loss = F.cross_entropy(c(x), y)
    loss.backward()
    for n, p in c.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    opt.step()
    assert all(not torch.equal(s.weight, w0[n]) for n, s in c.synapses.items())
    assert torch.isfinite(F.cross_entropy(c(x), y))
