"""Sign-concordant feedback: usf, frsf and brsf deliver δ·(sign(W) ∘ magnitude), follow W's signs,
keep (or redraw) their magnitudes as they say, agree across the two executions, compile to one
graph, and train a digits MLP."""

import copy
import time

import pytest
import torch
import torch.nn.functional as F

from neurosim.core.circuit import Circuit
from neurosim.core.reference import reference_backward
from neurosim.core.synapse import weight_init
from neurosim.data import load_dataset
from neurosim.models.mlp import build_mlp
from neurosim.rules import FeedbackAlignment, SignSymmetry
from neurosim.rules.sign_concordant import BatchRandomSignConcordant, FixedRandomSignConcordant, UniformSignConcordant

RULES = {"usf": UniformSignConcordant, "frsf": FixedRandomSignConcordant, "brsf": BatchRandomSignConcordant}
F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# -- one synapse: the error actually delivered -------------------------------------------------

def one_synapse(rule, kind, seed=0):
    """x → y through one synapse without bias: dense 7→5, or a strided grouped 3×3 convolution."""
    c = Circuit(rule=rule, seed=seed)
    if kind == "dense":
        c.input("x", 7)
        c.population("y", 5)
        syn = c.dense("x", "y", bias=False)
    else:
        c.input("x", (4, 7, 7))
        c.population("y", (6, 4, 4))
        syn = c.conv("x", "y", 3, stride=2, padding=1, groups=2, bias=False)
    return c, syn


def fans(kind):
    return (7, 5) if kind == "dense" else (2 * 9, 6 * 9)


def through(kind, delta, m):
    """The error a presynaptic population receives when ``delta`` returns through ``m``, by hand:
    ``δ M`` for a dense synapse, the transposed convolution with ``m`` for a convolution."""
    if kind == "dense":
        return delta @ m
    return F.conv_transpose2d(delta, m, stride=2, padding=1, groups=2)


def expected_magnitude(rule, kind, syn, scale0, redraw_seed):
    """The magnitude each rule should use, found independently of the synapse's feedback state."""
    if rule == "usf":
        return scale0.double()  # RMS of W at construction
    if rule == "frsf":
        # The draw feedback alignment makes for the same synapse and seed, made positive.
        _, fa = one_synapse(FeedbackAlignment(), kind)
        assert torch.equal(fa.weight.detach().double(), syn.weight.detach())  # the same W was drawn first
        return fa.feedback.detach().abs().double()
    # brsf: the synapse's initialiser run with new_batch's generator.
    init = weight_init("default", *fans(kind))
    return init(torch.empty(syn.weight.shape, dtype=F64), gen(redraw_seed)).abs()


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_delivered_error_is_delta_through_sign_w_times_magnitude(rule, kind):
    c, syn = one_synapse(RULES[rule](), kind)
    scale0 = syn.weight.detach().pow(2).mean().sqrt()
    w0 = syn.weight.detach().double().clone()
    c.double()
    if rule == "brsf":
        c.new_batch(gen(5))
    magnitude = expected_magnitude(rule, kind, syn, scale0, 5)
    # W has changed since construction: about half its signs flipped, every magnitude grown.
    flip = torch.where(torch.rand(syn.weight.shape, generator=gen(1)) < 0.5, -2.0, 2.0).double()
    with torch.no_grad():
        syn.weight.mul_(flip)
    x = torch.randn(3, *c.populations["x"].shape, dtype=F64, generator=gen(2), requires_grad=True)
    delta = torch.randn(3, *c.populations["y"].shape, dtype=F64, generator=gen(3))
    c(x).backward(delta)

    w = syn.weight.detach()
    assert torch.allclose(x.grad, through(kind, delta, torch.sign(w) * magnitude), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(x.grad, through(kind, delta, w), rtol=1e-3)  # not W's magnitudes
    assert not torch.allclose(x.grad, through(kind, delta, torch.sign(w0) * magnitude), rtol=1e-3)  # nor old signs
    assert c.plausibility() == {syn.name: "signs"}


# -- frsf: fixed magnitudes, current signs -------------------------------------------------------

@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_frsf_magnitude_never_changes_while_signs_follow_w(kind):
    c, syn = one_synapse(FixedRandomSignConcordant(), kind)
    c.double()
    magnitude = syn.feedback.clone()
    assert (magnitude >= 0).all()
    assert all(p is not syn.feedback for p in c.engaged_parameters())
    opt = torch.optim.SGD(c.engaged_parameters(), lr=2.0, momentum=0.9, weight_decay=0.1)
    signs0 = torch.sign(syn.weight.detach()).clone()
    for step in range(6):
        w = syn.weight.detach().clone()
        x = torch.randn(4, *c.populations["x"].shape, dtype=F64, generator=gen(10 + step), requires_grad=True)
        delta = torch.randn(4, *c.populations["y"].shape, dtype=F64, generator=gen(20 + step))
        opt.zero_grad(set_to_none=True)
        c(x).backward(delta)
        assert torch.allclose(x.grad, through(kind, delta, torch.sign(w) * magnitude), rtol=1e-12, atol=1e-14)
        opt.step()
        assert torch.equal(syn.feedback, magnitude), step
    flipped = (torch.sign(syn.weight.detach()) != signs0).sum()
    assert flipped > 0  # the signs it followed really changed


# -- brsf: redrawn per batch, the same in both executions --------------------------------------

def deep_circuit(rule, kind, seed=0):
    """Several synapses: convolutions (strided, grouped, a residual, two pathways into one
    population) or a dense stack with a skip pathway, batch norm and mixed nonlinearities."""
    c = Circuit(rule=rule, seed=seed)
    if kind == "conv":
        c.input("x", (3, 9, 9))
        c.population("c1", (4, 5, 5), activation="relu", norm="batch")
        c.conv("x", "c1", 3, stride=2, padding=1)
        c.population("c2", (4, 5, 5), activation="relu")
        c.conv("c1", "c2", 3, padding=1, groups=2, bias=False)
        c.identity("c1", "c2")
        c.population("c3", (5, 2, 2), activation="tanh")
        c.conv("c2", "c3", 2, stride=2)
        c.population("pool", (5,), pool="global_avg")
        c.identity("c3", "pool")
        c.population("y", 4)
        c.dense("pool", "y")
        c.dense("c3", "y", bias=False)
    else:
        c.input("x", 8)
        c.population("h1", 9, activation="sigmoid")
        c.dense("x", "h1")
        c.population("h2", 7, activation="relu", norm="batch")
        c.dense("h1", "h2", bias=False)
        c.population("y", 4)
        c.dense("h2", "y")
        c.dense("x", "y")
    return c


def feedbacks(c):
    return {n: s.feedback.clone() for n, s in c.synapses.items()}


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_brsf_redraw_is_identical_for_compiled_and_reference_executions(kind):
    compiled = deep_circuit(BatchRandomSignConcordant(), kind).double()
    literal = copy.deepcopy(compiled)
    opts = [torch.optim.SGD(m.engaged_parameters(), lr=0.1, momentum=0.9) for m in (compiled, literal)]
    target = torch.arange(6) % 4
    loss_fn = lambda out: F.cross_entropy(out, target)
    before = feedbacks(compiled)
    for step in range(3):
        compiled.new_batch(gen(100 + step))
        literal.new_batch(gen(100 + step))
        now = feedbacks(compiled)
        for n, m in now.items():
            assert torch.equal(m, literal.synapses[n].feedback), n
            assert not torch.equal(m, before[n]), n  # a fresh magnitude every batch
            assert (m >= 0).all()
        before = now
        x = torch.randn(6, *compiled.populations["x"].shape, dtype=F64, generator=gen(step))
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss = loss_fn(compiled(x))
        loss.backward()
        ref_loss = reference_backward(literal, x, loss_fn)
        assert torch.allclose(loss, ref_loss, rtol=1e-12, atol=1e-12)
        a = {n: p.grad for n, p in compiled.named_parameters() if p.grad is not None}
        b = {n: p.grad for n, p in literal.named_parameters() if p.grad is not None}
        assert a.keys() == b.keys() and not any(n.endswith(".feedback") for n in a)
        for n in a:
            assert torch.allclose(a[n], b[n], rtol=1e-10, atol=1e-12), (step, n)
        for opt in opts:
            opt.step()
    for (n, p), q in zip(compiled.state_dict().items(), literal.state_dict().values()):
        assert torch.allclose(p.double(), q.double(), rtol=1e-10, atol=1e-12), n


@pytest.mark.parametrize("init", ["default", "kaiming_normal", "xavier_sum"])
def test_brsf_redraw_comes_from_the_synapse_init_and_its_generator(init):
    c = Circuit(rule=BatchRandomSignConcordant(), seed=0)
    c.input("x", 128)
    c.population("y", 64)
    syn = c.dense("x", "y", init=init)
    start = syn.feedback.clone()
    c.new_batch(gen(7))
    first = syn.feedback.clone()
    assert torch.equal(first, weight_init(init, 128, 64)(torch.empty(64, 128), gen(7)).abs())
    assert not torch.equal(first, start)
    c.new_batch(gen(7))
    assert torch.equal(syn.feedback, first)  # the generator alone decides the draw
    torch.manual_seed(3)
    c.new_batch()  # None: the default generator of the buffer's device
    drawn = syn.feedback.clone()
    torch.manual_seed(3)
    c.new_batch()
    assert torch.equal(syn.feedback, drawn) and not torch.equal(drawn, first)
    # |M| has W's scale: ‖B‖ ≈ ‖W₀‖ whatever the init.
    assert syn.feedback.norm() / syn.weight.detach().norm() == pytest.approx(1.0, abs=0.05)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_brsf_redraw_on_cuda_with_a_generator_on_either_device(where):
    c = deep_circuit(BatchRandomSignConcordant(), "dense")
    on_gpu = copy.deepcopy(c).cuda()
    on_gpu.new_batch(torch.Generator(where).manual_seed(3))
    c.new_batch(gen(3))
    for n, syn in on_gpu.synapses.items():
        assert syn.feedback.device.type == "cuda" and (syn.feedback >= 0).all()
        if where == "cpu":  # drawn on the CPU and moved: the CPU circuit's draw
            assert torch.equal(syn.feedback.cpu(), c.synapses[n].feedback), n
    F.cross_entropy(on_gpu(torch.randn(4, 8, device="cuda")), torch.arange(4, device="cuda")).backward()


def test_device_names_without_an_index_mean_the_current_device():
    from neurosim.rules.sign_concordant import same_device

    assert same_device(torch.device("cuda"), torch.device("cuda:0"))  # a CUDA generator's device
    assert same_device("cpu", torch.device("cpu"))
    assert not same_device("cuda:1", "cuda:0") and not same_device("cpu", "cuda:0")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_brsf_redraw_with_a_generator_on_the_gpu_draws_in_place():
    """A ``torch.Generator("cuda")`` draws straight into the buffer: no weight-sized temporary."""
    c = deep_circuit(BatchRandomSignConcordant(), "dense").cuda()
    g = torch.Generator("cuda").manual_seed(3)
    c.new_batch(g)  # first use
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    c.new_batch(g)
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before


def test_brsf_redraw_between_forward_and_backward_is_refused():
    c = deep_circuit(BatchRandomSignConcordant(), "dense")
    out = c(torch.randn(4, 8))
    c.new_batch(gen(0))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_new_batch_leaves_other_rules_alone():
    for rule in (UniformSignConcordant(), FixedRandomSignConcordant(), FeedbackAlignment()):
        c = deep_circuit(rule, "dense")
        before = copy.deepcopy(c.state_dict())
        c.new_batch(gen(0))
        for n, t in c.state_dict().items():
            assert torch.equal(t, before[n]), n


# -- every rule: sign-concordant, W's scale ------------------------------------------------------

@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_feedback_is_always_sign_concordant_with_current_w(rule, kind):
    c = deep_circuit(RULES[rule](), kind)
    opt = torch.optim.SGD(c.engaged_parameters(), lr=0.5, momentum=0.9)
    g = gen(1)
    for step in range(4):
        with torch.no_grad():  # some weights exactly zero: their feedback must be zero too
            for syn in c.synapses.values():
                syn.weight.view(-1)[step::5] = 0.0
        c.new_batch(g)
        x = torch.randn(6, *c.populations["x"].shape, generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(c(x), torch.arange(6) % 4).backward()
        opt.step()
        for n, syn in c.synapses.items():
            w, b = syn.weight.detach(), syn.feedback_matrix().detach()
            assert torch.equal(torch.sign(b), torch.sign(w)), (step, n)
            if rule == "usf":
                assert torch.equal(b.abs()[w != 0].unique(), syn.feedback.view(1)), n


@pytest.mark.parametrize("init", ["default", "kaiming_normal", "xavier_sum"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_feedback_has_the_scale_of_the_initial_weights(rule, init):
    c = Circuit(rule=RULES[rule](), seed=0)
    c.input("x", (16, 8, 8))
    c.population("y", (16, 8, 8))
    syn = c.conv("x", "y", 3, padding=1, init=init)
    ratio = float(syn.feedback_matrix().detach().norm() / syn.weight.detach().norm())
    if rule == "usf":
        assert ratio == pytest.approx(1.0, rel=1e-5)  # float32 sums
    else:
        assert ratio == pytest.approx(1.0, abs=0.05)
    if rule == "usf" and init == "kaiming_normal":
        # BioTorch's factor √(2/(fan_in+fan_out)) would be √2 too small here (fan_in = fan_out).
        fan = 16 * 9
        assert float(syn.feedback) / (2 / (fan + fan)) ** 0.5 == pytest.approx(2**0.5, rel=0.05)


def test_sign_symmetry_is_usf_under_its_older_name():
    """``ss`` is an alias of ``usf`` and ``SignSymmetry`` another name of its class: one rule."""
    from neurosim.rules import RULES as REGISTRY

    assert SignSymmetry is UniformSignConcordant and REGISTRY["ss"] is REGISTRY["usf"] is UniformSignConcordant
    assert SignSymmetry() == UniformSignConcordant() and SignSymmetry.name == "usf"


# -- torch.compile ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_forward_is_one_graph_without_breaks(rule, kind):
    c = deep_circuit(RULES[rule](), kind)
    c.new_batch(gen(0))
    explained = torch._dynamo.explain(c)(torch.randn(4, *c.populations["x"].shape))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_brsf_compiled_steps_with_redraws_equal_eager_steps(kind):
    """Redraws between compiled steps are buffer updates: same steps as eager, no recompilation."""
    eager = deep_circuit(BatchRandomSignConcordant(), kind)
    compiled = copy.deepcopy(eager)
    model = torch.compile(compiled, backend="aot_eager")
    g_data = gen(0)
    data = [(torch.randn(8, *eager.populations["x"].shape, generator=g_data), torch.arange(8) % 4)
            for _ in range(3)]
    for net, m in ((eager, eager), (compiled, model)):
        opt = torch.optim.SGD(net.engaged_parameters(), lr=0.1, momentum=0.9)
        g = gen(1)
        for i, (x, y) in enumerate(data):
            net.new_batch(g)
            opt.zero_grad(set_to_none=True)
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                F.cross_entropy(m(x), y).backward()
            opt.step()
    for (n, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=n)


# -- learning: a digits MLP under each rule ---------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits")
    norm = lambda x: (x.float() / 255 - d.mean[0]) / d.std[0]
    return norm(d.train_x), d.train_y, norm(d.test_x), d.test_y


@pytest.fixture
def one_thread():
    """A 64-128-64-10 MLP gains nothing from a second thread, and on a busy machine OpenMP's
    waiting threads make it several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_digits_mlp_learns(rule, digits, one_thread):
    train_x, train_y, test_x, test_y = digits
    t0 = time.perf_counter()
    c = build_mlp(RULES[rule](), (1, 8, 8), (128, 64), 10)
    opt = torch.optim.SGD(c.engaged_parameters(), lr=0.05, momentum=0.9)
    order, redraws = gen(0), gen(1)
    for _ in range(20):
        perm = torch.randperm(len(train_y), generator=order)
        for i in range(0, len(perm), 32):
            idx = perm[i:i + 32]
            c.new_batch(redraws)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(c(train_x[idx]), train_y[idx]).backward()
            opt.step()
    c.set_mode("eval")
    with torch.no_grad():
        accuracy = float((c(test_x).argmax(1) == test_y).double().mean())
    print(f"{rule}: test accuracy {100 * accuracy:.2f} % in {time.perf_counter() - t0:.1f} s")
    assert accuracy >= 0.90


def test_usf_scale_is_measured_from_weights_copied_in_by_convert():
    """``convert(..., copy_weights=True)`` puts a trained model's ``W`` in place of the initial
    draw: uSF's scale is the RMS of the copied ``W``, not of the draw it replaced; a feedback
    weight drawn independently of ``W`` (frSF's ``|M|``, FA's ``B``) stays as drawn."""
    import torch.nn as nn

    from neurosim import convert
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(7.0)  # far from any initial draw, as trained weights may be
    example = torch.zeros(1, 6)
    c = convert(model, UniformSignConcordant(), example_input=example, copy_weights=True)
    for syn, layer in zip(c.synapses.values(), (model[0], model[2])):
        rms = layer.weight.detach().pow(2).mean().sqrt()
        torch.testing.assert_close(syn.feedback, rms)
        torch.testing.assert_close(syn.feedback_matrix(), layer.weight.detach().sign() * rms)
    for rule in (FixedRandomSignConcordant(), FeedbackAlignment()):
        drawn = convert(model, rule, example_input=example, seed=3)
        copied = convert(model, rule, example_input=example, copy_weights=True, seed=3)
        for a, b in zip(drawn.synapses.values(), copied.synapses.values()):
            assert torch.equal(a.feedback, b.feedback)
