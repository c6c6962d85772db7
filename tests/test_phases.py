"""Phases are part of the rule protocol: each synapse sleeps (or not) as its own rule says.

A circuit that mixes rules trains and sleeps correctly, and a new rule with a sleep phase of its
own is one file, sleeping through the same training loop as the weight mirror."""

import importlib.util
import sys
import textwrap

import pytest
import torch

import neurosim.training.run as run_module
from neurosim.common.errors import UserError
from neurosim.core.circuit import Circuit
from neurosim.rules import RULES, KolenPollack, PlasticityRule, SleepPhase, SleepSchedule, WeightMirror
from neurosim.rules.sign_concordant import BatchRandomSignConcordant
from neurosim.training.config import preset
from neurosim.training.run_dir import open_run


def mixed_builder(classifier_rules, hidden_rule=None):
    """A stand-in for ``build_circuit``: ``x → h1 → h2 → y``, the first synapse under
    ``hidden_rule`` (default: the configuration's), the next two under ``classifier_rules``."""
    def build(cfg, image_shape, num_classes):
        rule = cfg.make_rule()
        c = Circuit(rule=rule, seed=cfg.seed)
        c.input("x", image_shape)
        c.population("h1", 16, activation="relu")
        c.dense("x", "h1", rule=hidden_rule)
        c.population("h2", 12, activation="relu")
        c.dense("h1", "h2", rule=classifier_rules[0])
        c.population("y", num_classes)
        c.dense("h2", "y", rule=classifier_rules[1])
        return c
    return build


WM = WeightMirror(sigma=0.5, lr=0.3, sleep_before=2, sleep_every=3, sleep_batches=1)


def test_a_circuit_mixing_kp_and_wm_trains_and_sleeps_by_each_synapses_rule(tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "build_circuit", mixed_builder((WM, WM)))
    cfg = preset("kp_mlp_digits", epochs=1, device="cpu", monitor_every=0, train_limit=256, batch_size=32)
    run = open_run(tmp_path / "r", cfg, quiet=True)
    kp, wm1, wm2 = run.circuit.synapses.values()
    assert isinstance(kp.rule, KolenPollack) and wm1.rule is WM and run.circuit.rule == kp.rule
    # The sleep optimizer holds the WM synapses alone, at WM's rate; the schedule is WM's.
    assert run.schedule == WM.schedule
    groups = run.sleep_optimizer.param_groups
    assert len(groups) == 1 and groups[0]["lr"] == 0.3
    assert [id(p) for p in groups[0]["params"]] == [id(wm1.feedback), id(wm2.feedback)]

    # A sleep: the WM feedback weights learn with WM's noise (sigma 0.5) and rate; KP's is untouched.
    before = {n: s.feedback.detach().clone() for n, s in run.circuit.synapses.items()}
    expected = {}
    g = torch.Generator(run.device)
    g.set_state(run.sleep_generator.get_state())
    for syn in (wm1, wm2):
        pre = run.circuit.populations[syn.pre].shape
        expected[id(syn)] = syn.feedback.detach() - 0.3 * syn.sleep_update(pre, cfg.batch_size, g)
    run.sleep(1)
    assert torch.equal(kp.feedback, before[next(iter(run.circuit.synapses))])
    for syn in (wm1, wm2):
        assert torch.allclose(syn.feedback.detach(), expected[id(syn)], rtol=0, atol=1e-6)
        assert not torch.equal(syn.feedback.detach(), before[[n for n, s in run.circuit.synapses.items()
                                                              if s is syn][0]])

    # An engaged step: KP's feedback learns from the task, WM's does not.
    kp_b, wm_b = kp.feedback.detach().clone(), wm1.feedback.detach().clone()
    x, y = run.train_stream.batch(0, 0)
    run.engaged_step(x, y)
    assert not torch.equal(kp.feedback.detach(), kp_b) and torch.equal(wm1.feedback.detach(), wm_b)

    # And the whole loop: sleep before training and after every third step, as WM says.
    run = open_run(tmp_path / "r2", cfg, quiet=True)
    sleeps = []
    real = run.sleep
    monkeypatch.setattr(run, "sleep", lambda n: (sleeps.append((run.step, n)), real(n)))
    run.train()
    steps = run.step
    assert sleeps == [(0, 2)] + [(s, 1) for s in range(3, steps + 1, 3)]
    assert all(torch.isfinite(p).all() for p in run.circuit.parameters())


def test_sleeping_rules_with_their_own_rates_and_batch_sizes_or_schedules(tmp_path, monkeypatch):
    slow = WeightMirror(sigma=0.5, lr=0.02, sleep_before=2, sleep_every=3, sleep_batch_size=7)
    monkeypatch.setattr(run_module, "build_circuit", mixed_builder((WM, slow), hidden_rule=WM))
    cfg = preset("kp_mlp_digits", epochs=1, device="cpu", monitor_every=0, train_limit=64, batch_size=32)
    run = open_run(tmp_path / "r", cfg, quiet=True)
    s1, s2, s3 = run.circuit.synapses.values()
    # One parameter group per distinct rate, in the order the rates first appear.
    assert [(g["lr"], [id(p) for p in g["params"]]) for g in run.sleep_optimizer.param_groups] == [
        (0.3, [id(s1.feedback), id(s2.feedback)]), (0.02, [id(s3.feedback)])]
    # Each synapse's mirror batch is its own rule's size (0: the training batch size).
    drawn = []
    monkeypatch.setattr(WeightMirror, "draw_noise",
                        lambda self, shape, *a, _d=WeightMirror.draw_noise, **k: (drawn.append(shape[0]),
                                                                                  _d(self, shape, *a, **k))[1])
    before = [s.feedback.detach().clone() for s in (s1, s2, s3)]
    run.sleep(1)
    assert drawn == [32, 32, 7]
    assert all(not torch.equal(s.feedback.detach(), b) for s, b in zip((s1, s2, s3), before))

    # Two sleeping rules on different schedules are refused, naming the synapses.
    other = WeightMirror(sleep_every=2)
    monkeypatch.setattr(run_module, "build_circuit", mixed_builder((WM, other)))
    with pytest.raises(UserError, match="different sleep schedules"):
        open_run(tmp_path / "r3", cfg, quiet=True)


def test_redraw_and_direct_feedback_are_declared_hooks():
    for cls in RULES.values():
        assert isinstance(cls.direct_feedback, bool)
    assert PlasticityRule.direct_feedback is False and RULES["dfa"].direct_feedback is True
    # The base rule's redraw leaves the feedback as it is; brSF's draws it anew.
    c = Circuit(rule=KolenPollack(), seed=0)
    c.input("x", 6)
    c.population("h", 5, activation="relu")
    kp = c.dense("x", "h")
    c.population("y", 3)
    sf = c.dense("h", "y", rule=BatchRandomSignConcordant())
    kp_b, sf_b = kp.feedback.detach().clone(), sf.feedback.detach().clone()
    c.new_batch(torch.Generator().manual_seed(1))
    assert torch.equal(kp.feedback.detach(), kp_b) and not torch.equal(sf.feedback.detach(), sf_b)
    assert "redraw" in vars(PlasticityRule) and "sleep_phase" in vars(PlasticityRule)
    assert PlasticityRule().sleep_phase is None and KolenPollack().sleep_phase is None
    assert WM.sleep_phase == SleepPhase(SleepSchedule(2, 3, 1), 0.3, 0, 0)


PHASE_RULE_FILE = textwrap.dedent('''
    """Tanh mirror: feedback learns in a sleep of uniform noise through a tanh response, on its
    own schedule, rate and mirror batch (a rule written for a test)."""

    from typing import ClassVar

    import attrs

    from neurosim.rules import PlasticityRule, SleepPhase, SleepSchedule, register_rule
    from neurosim.rules.base import random_feedback


    @register_rule
    @attrs.frozen
    class TanhMirror(PlasticityRule):
        name: ClassVar[str] = "tanhmirror"
        feedback_learns: ClassVar[str] = "sleep"
        backward_reads_weight: ClassVar[bool] = False
        presets: ClassVar[dict] = {"mlp_digits": {"lr": 0.05}}
        rate: float = attrs.field(default=0.02, validator=attrs.validators.gt(0.0))
        amplitude: float = attrs.field(default=0.3, validator=attrs.validators.gt(0.0))

        @property
        def sleep_phase(self):
            return SleepPhase(SleepSchedule(before=3, every=2, batches=2), rate=self.rate, batch_size=5)

        def init_feedback(self, w, init, generator):
            return random_feedback(w, init, generator)

        def feedback_matrix(self, w, feedback):
            return feedback

        def draw_noise(self, shape, generator, device, dtype, memory_format=None):
            import torch

            xi = torch.empty(shape, dtype=dtype, device=generator.device).uniform_(generator=generator)
            return xi.mul_(2 * self.amplitude).sub_(self.amplitude).to(device)

        def respond(self, drive):
            return drive.tanh()

        def sleep_update(self, s):
            return s.product().mul(-1.0 / s.pre.shape[0]).add_(s.own, alpha=0.5)
''')


@pytest.fixture
def tanh_mirror(tmp_path):
    path = tmp_path / "tanh_mirror.py"
    path.write_text(PHASE_RULE_FILE)
    spec = importlib.util.spec_from_file_location("tanh_mirror", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tanh_mirror"] = module
    spec.loader.exec_module(module)
    try:
        yield module.TanhMirror
    finally:
        RULES.pop("tanhmirror", None)
        sys.modules.pop("tanh_mirror", None)


def test_a_rule_with_its_own_sleep_phase_is_one_file(tanh_mirror, tmp_path):
    assert RULES["tanhmirror"] is tanh_mirror
    cfg = preset("tanhmirror_mlp_digits", epochs=1, device="cpu", monitor_every=0, train_limit=128,
                 batch_size=32, hidden=(16,), tanhmirror_rate=0.04)
    run = open_run(tmp_path / "r", cfg, quiet=True)
    assert all(isinstance(s.rule, tanh_mirror) for s in run.circuit.synapses.values())
    assert run.schedule == SleepSchedule(3, 2, 2)
    assert [g["lr"] for g in run.sleep_optimizer.param_groups] == [0.04]
    sizes = []
    real = tanh_mirror.draw_noise
    tanh_mirror.draw_noise = lambda self, shape, *a, **k: (sizes.append(shape[0]), real(self, shape, *a, **k))[1]
    try:
        before = [s.feedback.detach().clone() for s in run.circuit.synapses.values()]
        sleeps = []
        sleep = run.sleep
        run.sleep = lambda n: (sleeps.append((run.step, n)), sleep(n))
        run.train()
    finally:
        tanh_mirror.draw_noise = real
    assert sleeps == [(0, 3)] + [(s, 2) for s in range(2, run.step + 1, 2)]
    assert set(sizes) == {5}  # its own mirror batch, not --batch-size
    assert len(sizes) == 2 * (3 + 2 * len(sleeps[1:]))  # two synapses per mirror batch
    for s, b in zip(run.circuit.synapses.values(), before):
        assert not torch.equal(s.feedback.detach(), b)
        assert torch.isfinite(s.feedback).all()
