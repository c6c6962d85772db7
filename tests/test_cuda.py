"""The CUDA path, on a CUDA GPU (every test here is skipped without one, see conftest.py).

- compiled execution equals the reference on the GPU, for every rule, dense and convolutional,
  in float32 (TF32 off: rtol 1e-4, atol 1e-5) and float64 (rtol 1e-10, atol 1e-12); the weight
  mirror's sleep too;
- one bf16-autocast, channels_last training step of a small ResNet circuit per rule: finite
  loss, a finite float32 update for every forward weight, float32 weights kept channels_last;
- weight-mirror sleep with a CUDA generator, and with a CPU generator or none;
- torch.compile (inductor) of KP and WM circuits: three compiled steps equal three eager ones
  (float32, TF32 off: rtol 1e-4, atol 1e-5);
- a run interrupted after its first step and resumed ends bit for bit where an uninterrupted
  run ends (deterministic kernels);
- no host synchronisation in a training step: batch, engaged step, monitor record, sleep.

``python -m pytest -m cuda tests/test_cuda.py -q`` runs them; ``benchmarks/gpu_check.py`` runs
them as one part of its GPU check.
"""

import copy
import json

import attrs
import pytest
import torch
import torch.nn.functional as F

from neurosim.core.reference import reference_backward
from neurosim.models import build_resnet
from neurosim.rules import RULES, KolenPollack, WeightMirror
from neurosim.training.config import RunConfig, preset
from neurosim.training.run import Run, RunInterrupted
from neurosim.training.run_dir import open_run, resume_run
from tests.test_equivalence import grads, random_circuit

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
# Every rule at its defaults, and Kolen-Pollack with a decay (its ΔB is then a tensor of its own).
RULE_MAKERS = {**RULES, "kp_decay": lambda: KolenPollack(decay=0.01)}
FLOAT32 = dict(rtol=1e-4, atol=1e-5)
FLOAT64 = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 matrix products and convolutions in float32, not TF32 (10-bit mantissa)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _batch(circuit, n, seed, classes=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *circuit.populations[circuit.input_name].shape, generator=g, dtype=torch.float64)
    return x.to(CUDA, dtype), torch.randint(0, classes, (n,), generator=g).to(CUDA)


# -- compiled execution equals the reference ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("rule", sorted(RULE_MAKERS))
def test_compiled_equals_reference_on_cuda(rule, kind, dtype):
    tol = FLOAT32 if dtype == torch.float32 else FLOAT64
    compiled = random_circuit(RULE_MAKERS[rule](), 0, True, kind).to(CUDA, dtype)
    literal = copy.deepcopy(compiled)
    x, target = _batch(compiled, 6, 10, dtype=dtype)
    loss_fn = lambda out: F.cross_entropy(out, target)

    loss = loss_fn(compiled(x))
    loss.backward()
    ref_loss = reference_backward(literal, x, loss_fn)

    torch.testing.assert_close(loss, ref_loss, **tol)
    a, b = grads(compiled), grads(literal)
    assert a and a.keys() == b.keys()
    learns_feedback = {n for n in a if n.endswith(".feedback")}
    assert bool(learns_feedback) == rule.startswith("kp")
    for n in a:
        assert a[n].device.type == "cuda" and a[n].dtype == dtype, n
        torch.testing.assert_close(a[n], b[n], **tol, msg=n)
    for (n, t), (_, u) in zip(compiled.named_buffers(), literal.named_buffers()):
        torch.testing.assert_close(t, u, **tol, msg=n)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_sleep_compiled_equals_reference_on_cuda(kind):
    compiled = random_circuit(WeightMirror(sigma=0.3, decay=0.5), 3, True, kind).to(CUDA)
    literal = copy.deepcopy(compiled)
    compiled.sleep(5, torch.Generator(CUDA).manual_seed(7))
    literal.sleep(5, torch.Generator(CUDA).manual_seed(7), literal=True)
    for name, syn in compiled.synapses.items():
        assert syn.feedback.grad is not None and syn.feedback.grad.device.type == "cuda"
        torch.testing.assert_close(syn.feedback.grad, literal.synapses[name].feedback.grad, **FLOAT64, msg=name)
        assert syn.weight.grad is None


# -- bf16 autocast and channels_last ---------------------------------------------------------------

@pytest.mark.parametrize("rule", sorted(RULE_MAKERS))
def test_resnet_bf16_channels_last_step(rule):
    c = build_resnet("resnet18", RULE_MAKERS[rule](), 10, (3, 32, 32), width=0.125, seed=0)
    c = c.to(CUDA).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(c.engaged_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = _batch(c, 16, 0, classes=10)
    x = x.contiguous(memory_format=torch.channels_last)

    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = c(x)
        assert out.dtype == torch.bfloat16
        loss = F.cross_entropy(out.float(), y)
    loss.backward()
    assert torch.isfinite(loss)
    for name, syn in c.synapses.items():
        g = syn.weight.grad
        assert g is not None and g.dtype == torch.float32 and bool(torch.isfinite(g).all()), name
        if rule.startswith("kp"):
            gb = syn.feedback.grad
            assert gb is not None and gb.dtype == torch.float32 and bool(torch.isfinite(gb).all()), name
    opt.step()
    for name, p in c.named_parameters():
        assert p.dtype == torch.float32 and p.device.type == "cuda" and bool(torch.isfinite(p).all()), name
    for name, syn in c.synapses.items():
        if syn.weight.dim() == 4:
            assert syn.weight.is_contiguous(memory_format=torch.channels_last), name
    if rule == "wm":
        c.sleep(8, torch.Generator(CUDA).manual_seed(0))
        for name, syn in c.synapses.items():
            gb = syn.feedback.grad
            assert gb.dtype == torch.float32 and gb.device.type == "cuda" and bool(torch.isfinite(gb).all()), name


# -- weight-mirror sleep and its generator ---------------------------------------------------------

@pytest.mark.parametrize("generator", ["cuda", "cpu", None])
def test_wm_sleep_on_cuda(generator):
    """A CUDA generator must work and repeat; a CPU generator or none either works with the
    noise on the circuit's device, or is refused with an error that names the device."""
    c = random_circuit(WeightMirror(sigma=0.5), 0, True, "conv").float().to(CUDA)
    make = lambda: torch.Generator(generator).manual_seed(1) if generator else None
    try:
        c.sleep(8, make())
    except (TypeError, ValueError) as e:
        assert generator != "cuda", f"sleep with a generator on the circuit's device failed: {e}"
        assert "device" in str(e).lower(), f"the error does not name the device: {e}"
        return
    first = {}
    for name, syn in c.synapses.items():
        g = syn.feedback.grad
        assert g is not None and g.device.type == "cuda" and bool(torch.isfinite(g).all()), name
        assert syn.weight.grad is None, name
        first[name] = g.clone()
        syn.feedback.grad = None
    if generator is not None:  # the same seed draws the same noise
        c.sleep(8, make())
        for name, syn in c.synapses.items():
            assert torch.equal(syn.feedback.grad, first[name]), name


# -- torch.compile ---------------------------------------------------------------------------------

def _train(model, circuit, data, sleep_seed=None):
    opt = torch.optim.SGD(circuit.engaged_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sleepers = circuit.sleep_parameters()
    sleep_opt = torch.optim.SGD(sleepers, lr=0.1) if sleepers else None
    g = torch.Generator(CUDA).manual_seed(sleep_seed or 0)
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if sleep_opt is not None:  # B changes between compiled calls: the graph must read it anew
            sleep_opt.zero_grad(set_to_none=True)
            circuit.sleep(8, g)
            sleep_opt.step()


@pytest.mark.parametrize("rule", ["kp", "wm"])
def test_compiled_steps_equal_eager_steps_on_cuda(rule):
    torch._dynamo.reset()
    eager = random_circuit(RULE_MAKERS[rule](), 1, True, "conv").float().to(CUDA)
    compiled = copy.deepcopy(eager)
    model = torch.compile(compiled)
    data = [_batch(eager, 8, seed) for seed in range(3)]
    try:
        _train(eager, eager, data)
        _train(model, compiled, data)
    finally:
        torch._dynamo.reset()
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, **FLOAT32, msg=name)


# -- resume bit for bit ----------------------------------------------------------------------------

def _stop_at(step):
    def hook(run):
        if run.step == step:
            run.stop_requested = True
    return hook


def _wm_sleep(name, **settings):
    """Weight-mirror sleep settings for a ``wm_*`` preset, under the names the configuration gives
    them (``sleep_every`` as a field of its own, or ``wm_sleep_every`` as a setting of the rule);
    nothing for other presets, which do not sleep."""
    if not name.startswith("wm_"):
        return {}
    fields = {f.name for f in attrs.fields(RunConfig)}
    return {key if key in fields else f"wm_{key}": value for key, value in settings.items()}


def _deterministic():
    """What ``RunConfig.deterministic`` sets (set here too, for a configuration without it)."""
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@pytest.mark.parametrize("name", ["kp_resnet18", "wm_resnet18"])
def test_interrupted_run_resumes_bit_for_bit_on_cuda(tmp_path, name):
    overrides = dict(device="cuda", epochs=1, width=0.0625, data="synthetic", synthetic_train=32,
                     synthetic_test=16, batch_size=16, monitor_every=1, monitor_probe=8,
                     **_wm_sleep(name, sleep_before=2, sleep_every=1, sleep_batch_size=8))
    if "deterministic" in {f.name for f in attrs.fields(RunConfig)}:
        overrides["deterministic"] = True
    cfg = preset(name, **overrides)
    try:
        whole = open_run(tmp_path / "whole", cfg, quiet=True)
        _deterministic()
        whole.train()
        part = open_run(tmp_path / "part", cfg, quiet=True)
        _deterministic()
        with pytest.raises(RunInterrupted):
            part.train(on_step=_stop_at(1))
        resumed = resume_run(tmp_path / "part", quiet=True)
        _deterministic()
        assert resumed.step == 1
        resumed.train()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = False
    assert resumed.step == whole.step == 2
    a, b = whole.circuit.state_dict(), resumed.circuit.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].device.type == "cuda" and torch.equal(a[k], b[k]), k
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "images_per_s")}
                          for line in path.read_text().splitlines()]
    assert strip(tmp_path / "whole" / "metrics.jsonl") == strip(tmp_path / "part" / "metrics.jsonl")


# -- no host synchronisation -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["kp_resnet18", "wm_resnet18"])
def test_no_host_sync_in_training_steps(tmp_path, name):
    """Batches, engaged steps (bf16 autocast, channels_last), monitor records and sleep stay on the
    device: ``set_sync_debug_mode("error")`` turns any host synchronisation into an error."""
    cfg = preset(name, device="cuda", epochs=1, width=0.0625, data="synthetic", synthetic_train=96,
                 synthetic_test=16, batch_size=16, monitor_every=2, monitor_probe=8,
                 **_wm_sleep(name, sleep_before=0, sleep_every=1, sleep_batch_size=8))
    run = Run(cfg, tmp_path, quiet=True)
    assert run.monitor is not None and bool(run.sleep_groups) == (name.startswith("wm"))

    def step(index):  # what Run._train_epoch does for one batch
        x, y = run.train_stream.batch(0, index)
        run.engaged_step(x, y)
        run.monitor.after_step(run.step)
        if run.sleep_groups:
            due = [g.schedule.due(run.step) for g in run.sleep_groups]
            if any(due):
                run.sleep(due)

    for i in range(2):  # first use: allocations, cuDNN's algorithm search
        step(i)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(2, 6):  # monitor records at steps 4 and 6, none at 3 and 5
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert run.step == 6 and run.monitor.steps[-1] == 6
    assert bool(torch.isfinite(run.stats).all())


def test_evaluation_syncs_the_host_only_to_read_its_result(tmp_path):
    """The evaluation loop queues every batch without waiting for the GPU; its totals are read once."""
    from neurosim.training.evaluation import evaluation_totals

    cfg = preset("kp_resnet18", device="cuda", epochs=1, width=0.0625, data="synthetic", synthetic_train=32,
                 synthetic_test=600, batch_size=16, monitor_every=0)
    run = Run(cfg, tmp_path, quiet=True)
    evaluation_totals(run.model, run.circuit, run.test_stream, run.loss_fn, run.amp_dtype)  # first use
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        totals = evaluation_totals(run.model, run.circuit, run.test_stream, run.loss_fn, run.amp_dtype)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(run.test_stream) >= 2 and totals.tolist()[3] == 600
