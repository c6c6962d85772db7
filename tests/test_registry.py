"""A new rule is one file: a throw-away rule in a temporary module is found everywhere."""

import importlib.util
import sys
import textwrap

import attrs
import pytest
import torch

from neurosim.common.errors import UserError
from neurosim.rules import RULES, register_rule
from neurosim.tools.cli import run_usage
from neurosim.training.config import PRESETS, RULE_NAMES, preset
from neurosim.training.overrides import parse_overrides
from neurosim.training.presets_doc import presets_markdown

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
    from neurosim.tools.cli import run_circuit

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
    from neurosim.training.config import RunConfig

    old = preset("wm_mlp_digits").to_dict()
    old.pop("rule_params")
    old.update(wm_lr=0.2, sleep_before=20, sleep_batch_size=256, kp_decay=0.0, wm_sigma=1.0)
    cfg = RunConfig.from_dict(old)
    assert cfg.rule_params == {"lr": 0.2, "sleep_before": 20, "sleep_batch_size": 256, "sigma": 1.0}
    assert cfg.make_rule().schedule.before == 20
    torch.testing.assert_close(torch.tensor(cfg.wm_lr), torch.tensor(0.2))


# -- aliases: one rule, several names ------------------------------------------------------------

def test_an_alias_finds_its_rule_and_every_listing_shows_the_rule_once():
    from neurosim.rules import SignSymmetry, UniformSignConcordant
    from neurosim.training.config import rule_aliases, rule_names

    assert RULES["ss"] is RULES["usf"] is UniformSignConcordant and SignSymmetry is UniformSignConcordant
    assert "ss" in RULES and RULES.canonical("ss") == "usf" and RULES.aliases("usf") == ("ss",)
    assert rule_aliases() == {"ss": "usf"}
    listed = list(RULES)
    assert "ss" not in listed and len(set(map(RULES.__getitem__, listed))) == len(listed)  # no class twice
    # RULE_NAMES is a view of the registry: equal to the tuple it shows, sliced and indexed alike
    assert RULE_NAMES == rule_names() == tuple(listed) and len(RULE_NAMES) == len(listed)
    assert RULE_NAMES[1:3] == rule_names()[1:3] and RULE_NAMES[-1] == listed[-1]
    assert "ss" not in RULE_NAMES and "usf" in RULE_NAMES and RULE_NAMES.index("kp") == listed.index("kp")
    # presets: each rule's once, and the alias's names still resolve
    assert len(PRESETS) == 8 * len(RULE_NAMES) and not [p for p in PRESETS if p.startswith("ss_")]
    for family in ("mlp_digits", "mlp_original", "resnet18", "resnet50_imagenet"):
        assert f"ss_{family}" in PRESETS and PRESETS[f"ss_{family}"] == PRESETS[f"usf_{family}"]
        cfg = preset(f"ss_{family}")
        assert cfg.preset == f"ss_{family}" and cfg.rule == "usf"  # the run keeps the name it was asked by
        assert attrs.evolve(cfg, preset=f"usf_{family}") == preset(f"usf_{family}")
        assert isinstance(cfg.make_rule(), UniformSignConcordant)
    assert preset("ss_mlp_digits", epochs=3).epochs == 3
    # help and docs/presets.md: one row per rule, the alias named beside it
    doc = presets_markdown()
    assert "`ss_mlp_digits`" not in doc and "| `usf` (alias `ss`) | `UniformSignConcordant` |" in doc
    assert "`ss` is another name of the rule `usf`" in doc
    assert "ss_mlp_digits" not in run_usage() and "usf_mlp_digits" in run_usage()
    with pytest.raises(UserError, match=r"usf \(alias ss\)"):
        preset("sss_mlp_digits")


def test_registering_with_aliases_and_refusing_taken_names():

    from neurosim.rules import PlasticityRule

    def rule_class(name, qualname="Aliased"):
        return attrs.frozen(type(qualname, (PlasticityRule,), {"__annotations__": {}, "name": name,
                                                                "__module__": __name__}))

    cls = register_rule(aliases=("older", "oldest"))(rule_class("aliased"))
    try:
        assert RULES["older"] is RULES["oldest"] is RULES["aliased"] is cls
        assert RULES.aliases("oldest") == ("older", "oldest") and "older" not in list(RULES)
        register_rule(cls, aliases=("older",))  # the same class again (a module reloaded): its aliases now
        assert "oldest" not in RULES and RULES["older"] is cls
        for name, aliases, why in (("other", ("kp",), "is taken by"), ("other", ("ss",), "alias of the rule 'usf'"),
                                   ("ss", (), "alias of the rule 'usf'"), ("other", ("Old_Name",), "an alias is"),
                                   ("other", ("other",), "an alias is")):
            with pytest.raises(ValueError, match=why):
                register_rule(rule_class(name, "Other"), aliases=aliases)
        assert "other" not in RULES and RULES["ss"].__name__ == "UniformSignConcordant"
        with pytest.raises(KeyError):
            RULES["older"] = cls  # an alias is not a rule's own name
    finally:
        RULES.pop("aliased", None)
    assert "older" not in RULES and "aliased" not in RULES


def test_a_run_saved_under_the_old_rule_name_still_loads_and_resumes(tmp_path):
    """Runs of ss_* presets written before ss became an alias hold ``"rule": "ss"`` in config.json
    and in their checkpoint; they resume as they are, under their own preset name."""
    import json

    from neurosim.rules import UniformSignConcordant
    from neurosim.tools.cli import run_circuit
    from neurosim.training.checkpoint import load_checkpoint, save_checkpoint
    from neurosim.training.config import RunConfig, from_saved

    run = tmp_path / "ss_run"
    small = ["--hidden", "16", "--monitor-every", "0", "--device", "cpu", "--quiet"]
    assert run_circuit(["ss_mlp_digits", "--epochs", "1", *small, "--out", str(run)]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["preset"] == "ss_mlp_digits" and saved["rule"] == "usf"
    # the layout of a run written before: the rule under its old name, in both places
    saved["rule"] = "ss"
    (run / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    state = load_checkpoint(run / "last.pt")
    state.pop("digest", None)
    state["config"]["rule"] = "ss"
    save_checkpoint(state, run / "last.pt")

    old = RunConfig.from_dict(saved)
    assert old.rule == "ss" and isinstance(old.make_rule(), UniformSignConcordant)
    assert from_saved(old, {"seed": 1}).rule == "ss"
    assert run_circuit(["ss_mlp_digits", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert run_circuit(["--resume", str(run), "--epochs", "3", "--quiet"]) == 0
    assert json.loads((run / "config.json").read_text())["rule"] == "ss"
    assert load_checkpoint(run / "last.pt")["epoch"] == 3


def test_benchmarks_take_a_rule_by_its_alias():
    """docs/benchmarks.md's commands name ss: the benchmarks accept an alias as the registry does."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    modules = {}
    for name in ("step_time", "epoch_time"):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", root / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    assert modules["step_time"].parse_args(["--rules", "native,bp,ss,kp", "--device", "cpu"]).rules == \
        ["native", "bp", "ss", "kp"]
    assert modules["epoch_time"].parse_args(["--variants", "ss,native", "--device", "cpu"]).variants == ["ss", "native"]
    with pytest.raises(SystemExit):
        modules["step_time"].parse_args(["--rules", "native,sss", "--device", "cpu"])
