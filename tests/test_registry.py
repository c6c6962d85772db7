"""A new rule is one file: a throw-away rule in a temporary module is found everywhere."""

import importlib.util
import sys
import textwrap

import pytest
import torch

from neurosim.cli import run_usage
from neurosim.config import PRESETS, RULE_NAMES, parse_overrides, preset, presets_markdown
from neurosim.errors import UserError
from neurosim.rules import RULES, register_rule

RULE_FILE = textwrap.dedent('''
    """Scaled feedback alignment: a fixed random B times a gain (a rule written for a test)."""

    from typing import ClassVar

    import attrs

    from neurosim.rules import PlasticityRule, register_rule
    from neurosim.rules.base import random_feedback


    @register_rule
    @attrs.frozen
    class ScaledFeedback(PlasticityRule):
        name: ClassVar[str] = "scaled"
        presets: ClassVar[dict] = {"mlp_digits": {"scaled_gain": 2.0, "lr": 0.02}}
        gain: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))

        def init_feedback(self, w, init, generator):
            return random_feedback(w, init, generator)

        def feedback_matrix(self, w, feedback):
            return feedback * self.gain
''')


@pytest.fixture
def scaled_rule(tmp_path):
    path = tmp_path / "scaled_feedback.py"
    path.write_text(RULE_FILE)
    spec = importlib.util.spec_from_file_location("scaled_feedback", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaled_feedback"] = module
    spec.loader.exec_module(module)
    try:
        yield module.ScaledFeedback
    finally:
        RULES.pop("scaled", None)
        sys.modules.pop("scaled_feedback", None)


def test_a_rule_in_its_own_file_is_found_everywhere(scaled_rule, tmp_path):
    assert RULES["scaled"] is scaled_rule and "scaled" in RULE_NAMES
    # presets for every model family, with the settings the file declares
    for family in ("mlp_digits", "mlp_original", "resnet18", "resnet34", "resnet50"):
        assert f"scaled_{family}" in PRESETS
    cfg = preset("scaled_mlp_digits")
    assert cfg.rule_params == {"gain": 2.0} and cfg.lr == 0.02 and cfg.scaled_gain == 2.0
    # its option, typed and validated by the rule's own attrs field
    overrides = parse_overrides(["--scaled-gain", "3.5"])
    assert overrides == {"scaled_gain": 3.5}
    rule = preset("scaled_mlp_digits", **overrides).make_rule()
    assert isinstance(rule, scaled_rule) and rule.gain == 3.5
    with pytest.raises(UserError, match="gain"):
        preset("scaled_mlp_digits", scaled_gain=-1.0)
    with pytest.raises(UserError, match="--scaled-gain applies to the scaled rule only"):
        preset("kp_mlp_digits", scaled_gain=2.0)
    # help and the generated presets page
    assert "--scaled-gain X" in run_usage() and "scaled_resnet18" in run_usage()
    assert "`scaled_mlp_digits`" in presets_markdown() and "`--scaled-gain`" in presets_markdown()
    # and it trains, through the same command-line path as every rule
    from neurosim.cli import run_circuit

    code = run_circuit(["scaled_mlp_digits", "--epochs", "1", "--hidden", "16", "--monitor-every", "0",
                        "--device", "cpu", "--quiet", "--out", str(tmp_path / "run")])
    assert code == 0
    saved = (tmp_path / "run" / "config.json").read_text()
    assert '"rule": "scaled"' in saved and '"gain": 2.0' in saved


def test_registration_refuses_unusable_names():
    import attrs

    from neurosim.rules import PlasticityRule

    for bad in (None, "Two_Words", "kp"):
        cls = attrs.frozen(type("Bad", (PlasticityRule,), {"__annotations__": {}, **({"name": bad} if bad else {})}))
        with pytest.raises(ValueError, match="needs a class attribute name|is taken"):
            register_rule(cls)
    assert RULES["kp"].__name__ == "KolenPollack"


def test_every_registered_rule_builds_from_its_presets():
    for name, cls in RULES.items():
        for family in ("mlp_digits", "mlp_original", "resnet18"):
            assert isinstance(preset(f"{name}_{family}").make_rule(), cls)
        assert isinstance(cls.example(), cls)


def test_configurations_written_before_rule_params_still_load():
    from neurosim.config import RunConfig

    old = preset("wm_mlp_digits").to_dict()
    old.pop("rule_params")
    old.update(wm_lr=0.2, sleep_before=20, sleep_batch_size=256, kp_decay=0.0, wm_sigma=1.0)
    cfg = RunConfig.from_dict(old)
    assert cfg.rule_params == {"lr": 0.2, "sleep_before": 20, "sleep_batch_size": 256, "sigma": 1.0}
    assert cfg.make_rule().schedule.before == 20
    torch.testing.assert_close(torch.tensor(cfg.wm_lr), torch.tensor(0.2))
