"""Phases are part of the rule protocol: each synapse sleeps (or not) as its own rule says.

A circuit that mixes rules trains and sleeps correctly, and a new rule with a sleep phase of its
own is one file, sleeping through the same training loop as the weight mirror."""

import importlib.util
import sys
import textwrap

import pytest
import torch

import neurosim.training.run as run_module
from neurosim.core.circuit import Circuit
from neurosim.rules import RULES, KolenPollack, PlasticityRule, SleepPhase, SleepSchedule, WeightMirror
from neurosim.rules.sign_concordant import BatchRandomSignConcordant
from neurosim.training.config import preset
from neurosim.training.checkpoint import load_checkpoint
from neurosim.training.run_dir import open_run, resume_run


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
    assert [(g.schedule, g.names) for g in run.sleep_groups] == [(WM.schedule, ("h1->h2", "h2->y"))]
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
    assert sleeps == [(0, [2])] + [(s, [1]) for s in range(3, steps + 1, 3)]
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



def test_sleeping_rules_with_different_schedules_each_sleep_on_their_own(tmp_path, monkeypatch):
    """WM in the hidden synapses on one schedule, another WM in the classifier on its own: each
    group sleeps when its schedule says, one after the other when both are due, and a stop
    inside the second group's sleep resumes to the run that was never stopped."""
    other = WeightMirror(sigma=0.5, lr=0.1, sleep_before=1, sleep_every=2, sleep_batches=2)
    monkeypatch.setattr(run_module, "build_circuit", mixed_builder((WM, other), hidden_rule=WM))
    cfg = preset("kp_mlp_digits", epochs=2, device="cpu", monitor_every=0, train_limit=256, batch_size=32)
    run = open_run(tmp_path / "whole", cfg, quiet=True)
    assert [(g.schedule, g.names) for g in run.sleep_groups] == [
        (WM.schedule, ("x->h1", "h1->h2")), (other.schedule, ("h2->y",))]
    slept = []
    real = run.circuit.sleep
    monkeypatch.setattr(run.circuit, "sleep", lambda *a, synapses=None, **k: (
        slept.append((run.step, synapses)), real(*a, synapses=synapses, **k))[1])
    run.train()
    expected = [(0, ("x->h1", "h1->h2"))] * 2 + [(0, ("h2->y",))]
    for step in range(1, run.step + 1):
        expected += [(step, ("x->h1", "h1->h2"))] * (step % 3 == 0)
        expected += [(step, ("h2->y",))] * 2 * (step % 2 == 0)
    assert slept == expected

    # Stopped after the first of the classifier's two mirror batches at step 6 (where both groups sleep).
    part = open_run(tmp_path / "part", cfg, quiet=True)
    calls = []
    real_part = part.circuit.sleep

    def sleep_then_stop(*a, synapses=None, **k):
        real_part(*a, synapses=synapses, **k)
        calls.append((part.step, synapses))
        if calls.count((6, ("h2->y",))) == 1 and calls[-1] == (6, ("h2->y",)):
            part.stop_requested = True

    monkeypatch.setattr(part.circuit, "sleep", sleep_then_stop)
    with pytest.raises(run_module.RunInterrupted, match=r"in the sleep after it \(1 of its mirror batches"):
        part.train()
    saved = load_checkpoint(tmp_path / "part" / "last.pt")
    assert (saved["step"], saved["sleep_left"]) == (6, [0, 1])
    resumed = resume_run(tmp_path / "part", quiet=True)
    resumed.train()
    for (k, a), b in zip(run.circuit.state_dict().items(), resumed.circuit.state_dict().values()):
        assert torch.equal(a, b), k


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


def rule_file(tmp_path, module: str, text: str, cls: str, name: str):
    """Write ``text`` as the file ``module``.py, import it (its rule registers itself) and yield
    its class ``cls``; the rule ``name`` and the module are forgotten afterwards."""
    path = tmp_path / f"{module}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(module, path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    spec.loader.exec_module(loaded)
    try:
        yield getattr(loaded, cls)
    finally:
        RULES.pop(name, None)
        sys.modules.pop(module, None)


@pytest.fixture
def tanh_mirror(tmp_path):
    yield from rule_file(tmp_path, "tanh_mirror", PHASE_RULE_FILE, "TanhMirror", "tanhmirror")


def test_a_rule_with_its_own_sleep_phase_is_one_file(tanh_mirror, tmp_path):
    assert RULES["tanhmirror"] is tanh_mirror
    cfg = preset("tanhmirror_mlp_digits", epochs=1, device="cpu", monitor_every=0, train_limit=128,
                 batch_size=32, hidden=(16,), tanhmirror_rate=0.04)
    run = open_run(tmp_path / "r", cfg, quiet=True)
    assert all(isinstance(s.rule, tanh_mirror) for s in run.circuit.synapses.values())
    assert [g.schedule for g in run.sleep_groups] == [SleepSchedule(3, 2, 2)]
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
    assert sleeps == [(0, [3])] + [(s, [2]) for s in range(2, run.step + 1, 2)]
    assert set(sizes) == {5}  # its own mirror batch, not --batch-size
    assert len(sizes) == 2 * (3 + 2 * len(sleeps[1:]))  # two synapses per mirror batch
    for s, b in zip(run.circuit.synapses.values(), before):
        assert not torch.equal(s.feedback.detach(), b)
        assert torch.isfinite(s.feedback).all()


REPLAY_RULE_FILE = textwrap.dedent('''
    """Replay mirror: feedback learns in a sleep that replays the circuit's own activity on the
    batch it was just trained on, instead of noise (a rule written for a test)."""

    from typing import ClassVar

    import attrs

    from neurosim.rules import PlasticityRule, SleepPhase, SleepSchedule, register_rule
    from neurosim.rules.base import random_feedback


    @register_rule
    @attrs.frozen
    class ReplayMirror(PlasticityRule):
        name: ClassVar[str] = "replaymirror"
        feedback_learns: ClassVar[str] = "sleep"
        backward_reads_weight: ClassVar[bool] = False
        presets: ClassVar[dict] = {"mlp_digits": {"lr": 0.05}}
        rate: float = attrs.field(default=0.02, validator=attrs.validators.gt(0.0))
        decay: float = attrs.field(default=0.1, validator=attrs.validators.ge(0.0))

        @property
        def sleep_phase(self):
            return SleepPhase(SleepSchedule(before=1, every=2, batches=2), rate=self.rate, drive="data")

        def init_feedback(self, w, init, generator):
            return random_feedback(w, init, generator)

        def feedback_matrix(self, w, feedback):
            return feedback

        def sleep_update(self, s):
            return s.product().mul(-1.0 / s.pre.shape[0]).add_(s.own, alpha=self.decay)
''')


@pytest.fixture
def replay_mirror(tmp_path):
    yield from rule_file(tmp_path, "replay_mirror", REPLAY_RULE_FILE, "ReplayMirror", "replaymirror")


def test_a_sleep_driven_by_data_is_one_file(replay_mirror, tmp_path, monkeypatch):
    cfg = preset("replaymirror_mlp_digits", epochs=2, device="cpu", monitor_every=0, train_limit=128,
                 batch_size=32, hidden=(16,))
    run = open_run(tmp_path / "one", cfg, quiet=True)
    assert [g.replays for g in run.sleep_groups] == [True]
    # One sleep after one step: each synapse replays its presynaptic population's activity on
    # that step's batch (batch norm frozen, no gradients), not noise.
    x, y = run.train_stream.batch(0, 0)
    run.engaged_step(x, y)
    acts = run.circuit.activities(x, ["x", "h1"])
    assert torch.equal(acts["x"], x) and acts["h1"].shape == (32, 16) and not acts["h1"].requires_grad
    expected = {}
    for name, syn in run.circuit.synapses.items():
        b = syn.feedback.detach()
        drive = acts[syn.pre].reshape(32, -1) @ syn.weight.detach().T
        update = -(drive.T @ acts[syn.pre].reshape(32, -1)) / 32 + 0.1 * b
        expected[name] = b - 0.02 * update
    monkeypatch.setattr(replay_mirror, "draw_noise", lambda *a, **k: pytest.fail("a data-driven sleep drew noise"))
    run.sleep(1)
    for name, syn in run.circuit.synapses.items():
        torch.testing.assert_close(syn.feedback.detach(), expected[name], rtol=1e-5, atol=1e-6)

    # Through the training loop: every sleep replays the batch of the step it follows (the
    # first batch before training), and the feedback aligns.
    whole = open_run(tmp_path / "whole", cfg, quiet=True)
    seen, replayed = {0: whole.train_stream.batch(0, 0)[0]}, []
    step = whole.engaged_step
    monkeypatch.setattr(whole, "engaged_step", lambda x, y: (step(x, y), seen.__setitem__(whole.step, x)))
    sleep = whole.circuit.sleep
    monkeypatch.setattr(whole.circuit, "sleep", lambda *a, data=None, **k: (
        replayed.append((whole.step, data)), sleep(*a, data=data, **k))[1])
    before = [s.feedback.detach().clone() for s in whole.circuit.synapses.values()]
    whole.train()
    assert [s for s, _ in replayed] == [0] + [s for s in range(2, whole.step + 1, 2) for _ in range(2)]
    assert torch.equal(replayed[0][1], seen[0])  # read from the stream: no step has been taken
    assert all(data is seen[s] for s, data in replayed[1:])  # the step's own batch, not a copy
    assert all(not torch.equal(s.feedback.detach(), b) for s, b in zip(whole.circuit.synapses.values(), before))
    angles = [r["mean_angle"] for r in whole.records]
    assert angles[0] > 85 and angles[2] < angles[1] < angles[0] - 2  # the replay aligns B with W

    # Stopped between the two mirror batches after step 4 (the last of epoch 1): the resumed run
    # reads that step's batch again from the stream and ends as the unbroken one.
    part = open_run(tmp_path / "part", cfg, quiet=True)
    sleep_part = part.circuit.sleep

    def stop_at_step_4(*a, **k):
        sleep_part(*a, **k)
        part.stop_requested = part.stop_requested or part.step == 4

    monkeypatch.setattr(part.circuit, "sleep", stop_at_step_4)
    with pytest.raises(run_module.RunInterrupted, match="epoch 1, batch 4/4, in the sleep after it"):
        part.train()
    assert load_checkpoint(tmp_path / "part" / "last.pt")["sleep_left"] == [1]
    resumed = resume_run(tmp_path / "part", quiet=True)
    resumed.train()
    for (k, a), b in zip(whole.circuit.state_dict().items(), resumed.circuit.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_data_driven_phase_replays_its_batch_whole_and_asks_for_a_known_drive():
    with pytest.raises(ValueError, match="replays the training batch"):
        SleepPhase(drive="data", batch_size=5)
    with pytest.raises(ValueError, match="drive"):
        SleepPhase(drive="dreams")
    c = Circuit(rule=KolenPollack(), seed=0)
    c.input("x", (2, 6, 6))
    c.population("h", (3, 6, 6), activation="relu", norm="batch")
    c.conv("x", "h", 3, padding=1)
    c.population("y", 3, pool="global_avg")
    c.identity("h", "y")
    norm = c.populations["h"].norm
    stats = [t.clone() for t in norm.buffers()]
    x = torch.randn(5, 2, 6, 6)
    acts = c.activities(x, ["h"])
    assert c.mode == "engaged" and all(torch.equal(a, b) for a, b in zip(stats, norm.buffers()))
    c.eval()
    with torch.no_grad():
        torch.testing.assert_close(acts["h"].mean((2, 3)), c(x))  # frozen batch norm, as in eval
    with pytest.raises(KeyError, match="no population 'z'"):
        c.activities(x, ["z"])
