"""torch.compile, bf16 autocast and device handling of compiled circuits, on the CPU.

One graph and no break per circuit forward for every rule (the custom autograd functions'
backward is traced with it); compiled training steps equal eager ones; bf16 autocast for dense
and convolutional synapses under every rule; sleep noise on the circuit's device; a resume
that changes device; deterministic mode.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from neurosim.core.circuit import Circuit
from neurosim.rules import RULES as REGISTRY
from neurosim.rules import Backprop, KolenPollack, WeightMirror
from neurosim.training.checkpoint import load_checkpoint, save_checkpoint
from neurosim.training.config import preset
from neurosim.training.run import RunInterrupted
from neurosim.training.run_dir import open_run, resume_run

# Every registered rule (its example instance), plus KP without decay: W and B then share one
# product tensor.
RULES = {name: cls.example for name, cls in REGISTRY.items()}
RULES["kp_decay"], RULES["kp"] = RULES["kp"], KolenPollack


def small_circuit(rule, kind, seed=0):
    """A dense stack, or convolutions with batch norm, a residual sum and pooling."""
    c = Circuit(rule=rule, seed=seed)
    if kind == "dense":
        c.input("x", 12)
        c.population("h", 16, activation="relu")
        c.dense("x", "h")
        c.population("y", 5)
        c.dense("h", "y")
    else:
        c.input("x", (3, 8, 8))
        c.population("a", (4, 8, 8), activation="relu", norm="batch")
        c.conv("x", "a", 3, padding=1, bias=False)
        c.population("b", (4, 8, 8), norm="batch")
        c.conv("a", "b", 3, padding=1, bias=False)
        c.population("sum", (4, 8, 8), activation="relu")  # in-place ReLU on a residual sum
        c.identity("a", "sum")
        c.identity("b", "sum")
        c.population("pool", (4,), pool="global_avg")
        c.identity("sum", "pool")
        c.population("y", 5)
        c.dense("pool", "y")
    if getattr(rule, "direct_feedback", False):
        c.add_direct_feedback()
    return c


def batches(c, n, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = c.populations["x"].shape
    return [(torch.randn(n, *shape, generator=g), torch.randint(0, 5, (n,), generator=g)) for _ in range(steps)]


def sgd(circuit):
    return torch.optim.SGD(circuit.engaged_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def train_steps(model, circuit, data, opt=None):
    opt = opt or sgd(circuit)
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_forward_is_one_graph_without_breaks(rule, kind):
    c = small_circuit(RULES[rule](), kind)
    x, _ = batches(c, 4, 1)[0]
    explained = torch._dynamo.explain(c)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_compiled_steps_equal_eager_steps(rule, kind):
    """AOTAutograd traces forward and the rules' backward; three steps match eager to 1e-6
    and a second call of the same shape compiles nothing new."""
    eager = small_circuit(RULES[rule](), kind)
    compiled = copy.deepcopy(eager)
    model = torch.compile(compiled, backend="aot_eager")
    data = batches(eager, 8, 3)
    train_steps(eager, eager, data)
    opt = sgd(compiled)
    train_steps(model, compiled, data[:1], opt)
    with torch._dynamo.config.patch(error_on_recompile=True):
        train_steps(model, compiled, data[1:], opt)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["kp_decay", "wm"])
def test_inductor_steps_match_eager(rule):
    """The real compiler (C++ kernels on the CPU) agrees with eager to float32 rounding."""
    eager = small_circuit(RULES[rule](), "conv")
    compiled = copy.deepcopy(eager)
    data = batches(eager, 8, 3)
    train_steps(eager, eager, data)
    train_steps(torch.compile(compiled), compiled, data)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


# -- bf16 autocast -------------------------------------------------------------------------------

def test_conv_autocast_bf16_matches_native():
    c = Circuit(rule=Backprop(), seed=0)
    c.input("x", (3, 8, 8))
    c.population("y", (6, 4, 4))
    syn = c.conv("x", "y", 3, stride=2, padding=1)
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.copy_(syn.weight)
        conv.bias.copy_(syn.bias)
    x = torch.randn(5, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_c, out_n = c(x), conv(x)
    assert out_c.dtype == out_n.dtype == torch.bfloat16
    assert torch.equal(out_c, out_n)
    g = torch.randn_like(out_c)
    out_c.backward(g)
    out_n.backward(g)
    assert syn.weight.grad.dtype == syn.bias.grad.dtype == torch.float32
    torch.testing.assert_close(syn.weight.grad, conv.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(syn.bias.grad, conv.bias.grad, rtol=0, atol=0)


def _rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_autocast_bf16_updates_match_float32(rule, kind):
    """Under bf16 autocast every local update (ΔW, Δb, KP's ΔB) lands in float32 on the float32
    master weights and agrees with the float32 step to bf16 precision."""
    full = small_circuit(RULES[rule](), kind)
    half = copy.deepcopy(full)
    x, y = batches(full, 16, 1)[0]
    F.cross_entropy(full(x), y).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = half(x)
        assert out.dtype == torch.bfloat16
        F.cross_entropy(out.float(), y).backward()
    for (name, p), q in zip(full.named_parameters(), half.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        assert q.dtype == q.grad.dtype == torch.float32, name
        # bf16 keeps 8 significant bits; three bf16 layers and batch norm deep, the first
        # synapse's update is within 8 %; batch norm's few per-channel sums of cancelling terms
        # lose more. A wrong dtype path (an fp32 update dropped, a bf16 gradient kept) is far off.
        tol = 0.08 if name.startswith("synapses.") else 0.15
        assert _rel_err(q.grad, p.grad) < tol, (name, _rel_err(q.grad, p.grad))
    if rule.startswith("kp"):
        for syn in half.synapses.values():
            assert syn.feedback.grad is not None and syn.feedback.grad.dtype == torch.float32


def test_sleep_under_bf16_weights_stays_float32():
    """A sleep step after bf16 training: noise, response and update in the weights' float32."""
    c = small_circuit(WeightMirror(sigma=0.5), "conv")
    c.sleep(4, torch.Generator().manual_seed(0))
    for syn in c.synapses.values():
        assert syn.feedback.grad.dtype == torch.float32 and torch.isfinite(syn.feedback.grad).all()


def test_monitor_probe_runs_in_the_training_precision():
    from neurosim.observe.monitors import Monitor, MonitorConfig

    c = small_circuit(KolenPollack(decay=0.01), "conv")
    x, y = batches(c, 8, 1)[0]
    seen = []
    for syn in c.synapses.values():
        syn.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    Monitor(c, MonitorConfig(every=1, probe=8), 10, (x, y), F.cross_entropy, autocast_dtype=torch.bfloat16)
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    Monitor(c, MonitorConfig(every=1, probe=8), 10, (x, y), F.cross_entropy)
    assert seen and set(seen) == {torch.float32}


# -- devices -------------------------------------------------------------------------------------

@pytest.mark.parametrize("generator", [None, "cpu"])
def test_sleep_noise_lands_on_the_circuits_device(generator):
    c = small_circuit(WeightMirror(sigma=0.5), "dense")
    g = torch.Generator("cpu").manual_seed(1) if generator else None
    c.sleep(8, g)
    for syn in c.synapses.values():
        assert syn.feedback.grad.device == syn.weight.device


def test_noise_drawn_by_a_generator_elsewhere_is_moved_to_the_device():
    rule = WeightMirror(sigma=2.0, noise="uniform")
    g = torch.Generator("cpu").manual_seed(3)
    xi = rule.draw_noise((1000,), g, "meta", torch.float32)
    assert xi.device.type == "meta"  # drawn on the CPU with g, then moved
    ref = rule.draw_noise((1000,), torch.Generator("cpu").manual_seed(3), "cpu", torch.float32)
    assert ref.abs().max() <= 2.0 * 3**0.5 and abs(float(ref.std()) - 2.0) < 0.15


def _stop_at(step):
    def hook(run):
        if run.step == step:
            run.stop_requested = True
    return hook


def test_resume_on_another_device_continues_with_a_note(tmp_path, capsys):
    """A checkpoint from a CUDA run (its generator state is CUDA's) resumes on the CPU."""
    cfg = preset("wm_mlp_digits", device="cpu", epochs=1, monitor_every=0)
    run = open_run(tmp_path / "r", cfg, quiet=True)
    with pytest.raises(RunInterrupted):
        run.train(on_step=_stop_at(3))
    path = tmp_path / "r" / "last.pt"
    state = load_checkpoint(path)
    state["rng"]["device"] = "cuda"
    state["rng"]["sleep"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state size
    save_checkpoint(state, path)
    resumed = resume_run(tmp_path / "r")
    assert "was trained on cuda and continues on cpu" in capsys.readouterr().err
    assert resumed.step == 3
    resumed.quiet = True
    resumed.train()
    assert resumed.epoch == 1


@pytest.mark.slow
def test_deterministic_mode_trains_and_resumes_bit_for_bit(tmp_path):
    cfg = preset("kp_resnet18", device="cpu", deterministic=True, epochs=1, width=0.0625, data="synthetic",
                 synthetic_train=64, synthetic_test=16, batch_size=16, monitor_every=2)
    try:
        whole = open_run(tmp_path / "whole", cfg, quiet=True)
        assert torch.are_deterministic_algorithms_enabled()
        whole.train()
        part = open_run(tmp_path / "part", cfg, quiet=True)
        with pytest.raises(RunInterrupted):
            part.train(on_step=_stop_at(2))
        resumed = resume_run(tmp_path / "part", quiet=True)
        resumed.train()
    finally:
        torch.use_deterministic_algorithms(False)
    for (k, a), b in zip(whole.circuit.state_dict().items(), resumed.circuit.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_a_compiled_run_compiles_one_graph_for_every_batch_size(tmp_path):
    """An epoch ends with a smaller batch, and evaluation has its own: with the batch dimension
    marked dynamic from the first call, training and evaluation compile one graph each."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = preset("kp_mlp_digits", epochs=1, train_limit=70, batch_size=32, compile=True, monitor_every=0,
                 device="cpu")
    run = open_run(tmp_path / "r", cfg, quiet=True)
    # Training batches of 32, 32 and 6 images; evaluation of 360 in batches of 256 and 104.
    assert len(run.train_stream) == 3 and len(run.data.test_y) == 360
    run.train()
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    torch._dynamo.reset()
