"""Training a circuit in time (``--dynamics time``): the run presents every batch in steps of
``dt`` (``neurosim.core.dynamics``) and applies the integrated updates with its optimizer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neurosim.training.config import RunConfig, preset
from neurosim.training.run import RunInterrupted
from neurosim.training.run_dir import open_run, resume_run
from tests.test_option_fuzz import BAD, cli, fuzz  # noqa: F401  (cli is a fixture)

ROOT = Path(__file__).resolve().parents[1]


def _weights(run):
    return {k: v.clone() for k, v in run.circuit.state_dict().items()}


def _train(tmp_path, name, **overrides):
    run = open_run(tmp_path / name, preset(name.split("-")[0], device="cpu", monitor_every=0, **overrides), quiet=True)
    run.train()
    return run


@pytest.mark.parametrize("rule", ["fa", "kp"])
def test_in_the_limit_a_run_in_time_trains_as_the_instant_run(tmp_path, rule):
    # tau = dt, no delay, tau_plasticity = the duration: every time step sees the instant step's
    # signals and one presentation integrates its update (float32 sums of five equal terms).
    name = f"{rule}_mlp_digits"
    instant = _train(tmp_path, name, epochs=1, train_limit=256)
    timed = _train(tmp_path, f"{name}-time", epochs=1, train_limit=256, dynamics="time", duration=5.0)
    a, b = _weights(instant), _weights(timed)
    moved = max(float((a[k] - v).abs().max()) for k, v in _weights(open_run(
        tmp_path / "fresh", preset(name, device="cpu", epochs=1), quiet=True)).items())
    assert moved > 1e-2  # training changed the weights: equality below is not two untouched circuits
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_feedback_delay_as_long_as_the_stimulus_teaches_only_the_output_synapse(tmp_path):
    # Under FA the error reaches h2's drive one hop after the output's, h1's two hops after: with
    # every hop taking the whole stimulus duration, no error overlaps a stimulus below the output
    # (ReLU neurons without bias rest at 0 once the stimulus is off).
    overrides = dict(epochs=1, train_limit=256, hidden=(32, 16), bias=False, dynamics="time", duration=3.0,
                     delay=3.0)
    start = _weights(open_run(tmp_path / "fresh", preset("fa_mlp_digits", device="cpu", **overrides), quiet=True))
    end = _weights(_train(tmp_path, "fa_mlp_digits", **overrides))
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    out = [k for k in start if k.startswith("synapses.") and ".weight" in k][-1].rsplit(".", 1)[0]
    assert changed == {f"{out}.weight"}, changed
    # Half the duration: the hidden synapses learn too.
    half = _weights(_train(tmp_path, "fa_mlp_digits-half", **dict(overrides, delay=1.0)))
    assert all(not torch.equal(start[k], half[k]) for k in start if k.startswith("synapses.") and "feedback" not in k)


def test_a_run_in_time_resumes_bit_for_bit(tmp_path):
    # Intrinsic noise too: it is drawn from the run's seeded, checkpointed generator.
    cfg = preset("kp_mlp_digits", device="cpu", epochs=2, train_limit=256, dynamics="time", duration=4.0, tau=2.0,
                 delay=1.0, tau_eligibility=2.0, noise=0.1, tau_noise=2.0)
    whole = open_run(tmp_path / "whole", cfg, quiet=True)
    whole.train()
    part = open_run(tmp_path / "part", cfg, quiet=True)
    stop = len(part.train_stream) + 1

    def hook(run):
        if run.step == stop:
            run.stop_requested = True

    with pytest.raises(RunInterrupted):
        part.train(on_step=hook)
    resumed = resume_run(tmp_path / "part", quiet=True)
    assert resumed.cfg.time_settings() == cfg.time_settings()
    resumed.train()
    a, b = _weights(whole), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(123)  # the process-wide stream is not where the noise comes from
    again = open_run(tmp_path / "again", cfg, quiet=True)
    again.train()
    assert all(torch.equal(a[k], v) for k, v in _weights(again).items())
    saved = json.loads((tmp_path / "part" / "config.json").read_text())
    assert (saved["dynamics"], saved["tau"], saved["delay"]) == ("time", 2.0, 1.0)


def test_configurations_written_before_dynamics_load_as_instant():
    old = {k: v for k, v in RunConfig().to_dict().items() if k not in ("dynamics", "dt", "duration", "tau", "delay")}
    assert RunConfig.from_dict(old).time_settings() is None


def test_every_time_setting_is_an_option():
    import attrs

    from neurosim.core.dynamics import TimeSettings
    from neurosim.training.config import TIME_FIELDS

    cfg = preset("fa_mlp_digits", dynamics="time", duration=6.0, tau=2.0, tau_plasticity=60.0, tau_decay=500.0,
                 tau_eligibility=3.0, delay=2.0, settle=4.0, time_update="synchronous", dt=0.5)
    settings = cfg.time_settings()
    for f in attrs.fields(TimeSettings):
        key = TIME_FIELDS.get(f.name, f.name)
        assert key in attrs.fields_dict(RunConfig), f"TimeSettings.{f.name} has no configuration field"
        assert getattr(settings, f.name) == getattr(cfg, key)
    assert settings.update == "synchronous" and settings.dt == 0.5


@pytest.mark.parametrize("args, message", [
    (["fa_mlp_digits", "--delay", "2"], "apply to a circuit run in time only"),
    (["fa_mlp_digits", "--tau", "3", "--dynamics", "instant"], "add --dynamics time"),
    (["fa_resnet18", "--dynamics", "time"], "--dynamics applies to MLPs only"),
    (["fa_mlp_digits", "--dynamics", "time", "--duration", "2.5"], "duration 2.5 is not a whole number of steps"),
    (["fa_mlp_digits", "--dynamics", "time", "--tau", "0.5"], "tau 0.5 is shorter than dt"),
    (["fa_mlp_digits", "--dynamics", "time", "--tau", "fast"], "bad value 'fast' for --tau: expected a number"),
    (["fa_mlp_digits", "--dynamics", "time", "--amp", "bf16", "--device", "cpu"], "a circuit in time computes in float32"),
    (["fa_mlp_digits", "--dynamics", "space"], "dynamics"),
    (["pal_mlp_digits", "--dynamics", "instant"], "learns its feedback weights in time"),
    (["pal_mlp_digits", "--noise", "0"], "--dynamics time and --noise above 0"),
    (["pal_resnet18", "--width", "0.0625", "--data", "synthetic"], "learns its feedback weights in time"),
])
def test_bad_time_settings_are_one_line_and_exit_2(tmp_path, args, message):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, str(ROOT / "experiments" / "run_circuit.py"), *args, "--epochs", "1",
                        "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not out.exists() or not any(out.iterdir())


def test_every_time_option_refuses_bad_values(cli, tmp_path):  # noqa: F811  (the fixture)
    # Each of BAD for every option of the dynamics group, under --dynamics time: one error line
    # and status 2, or a sane value (0 where 0 means none).
    from neurosim.tools.cli.options import build_parser

    parser = build_parser(name="fa_mlp_digits")
    group = next(g for g in parser._action_groups if g.title.startswith("dynamics"))
    options = [a.option_strings[0] for a in group._group_actions if a.option_strings[0] != "--dynamics"]
    assert len(options) == 12
    accepted = fuzz(cli, tmp_path, "fa_mlp_digits", BAD, fixed=("--dynamics", "time"))
    accepted = {(o, v) for o, v in accepted if o in options}
    assert accepted == {("--delay", "0"), ("--noise", "0"), ("--settle", "0")}, accepted
