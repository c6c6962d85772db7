"""Presets and command-line overrides: every preset builds; every override is typed and checked."""

import math

import attrs
import pytest

from neurosim.common.errors import UserError
from neurosim.training.overrides import parse_overrides
from neurosim.training.config import (
    PRESETS,
    RULE_NAMES,
    RunConfig,
    build,
    check_rule_settings,
    device_problem,
    preset,
    rule_settings,
)


def test_every_rule_model_pair_has_a_preset():
    for rule in RULE_NAMES:
        for model in ("mlp_digits", "mlp_original", "resnet18", "resnet34", "resnet50"):
            cfg = preset(f"{rule}_{model}")
            assert cfg.rule == rule
            cfg.make_rule()


def test_resnet_presets_follow_the_standard_recipe():
    cfg = preset("kp_resnet18")
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size, cfg.epochs) == (0.1, 0.9, 5e-4, 128, 200)
    assert cfg.milestones == (60, 120, 160) and cfg.lr_gamma == 0.2
    assert cfg.crop_padding == 4 and cfg.flip and cfg.data == "cifar100"


def test_overrides_are_typed():
    o = parse_overrides(["--epochs", "30", "--lr", "0.05", "--width", "0.25", "--milestones", "10,20",
                         "--flip", "false", "--val-per-class", "none", "--data", "synthetic"])
    assert o == dict(epochs=30, lr=0.05, width=0.25, milestones=(10, 20), flip=False, val_per_class=None,
                     data="synthetic")
    cfg = preset("wm_resnet18", **o)
    assert cfg.epochs == 30 and cfg.milestones == (10, 20)


@pytest.mark.parametrize("args, message", [
    (["--epochs", "ten"], "bad value 'ten' for --epochs"),
    (["--flip", "maybe"], "expected true or false"),
    (["--colour", "red"], "unknown option --colour"),
    (["lr", "0.1"], "unexpected argument 'lr'"),
])
def test_bad_overrides(args, message):
    with pytest.raises(UserError, match=message):
        parse_overrides(args)


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs must be positive"),
    ("rule", "xx", "rule"),
    ("momentum", 1.0, "momentum"),
    ("wm_sleep_before", -2, "sleep_before"),
    ("wm_lr", -1.0, "lr"),
])
def test_invalid_values_are_user_errors(field, value, message):
    with pytest.raises(UserError, match=message):
        preset("wm_mlp_digits", **{field: value})


def test_presets_cover_rules_times_models():
    # mlp_digits, mlp_original, three CIFAR ResNets and three ImageNet ResNets
    assert len(PRESETS) == len(RULE_NAMES) * 8 and len(RULE_NAMES) >= 5


# -- values that used to pass validation and fail (or mislead) later ----------------------------

FLOAT_FIELDS = [f.name for f in attrs.fields(RunConfig) if f.type in ("float", float)] + [
    k for k, (rule, f) in rule_settings().items() if rule == "wm" and f.type in ("float", float)]


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_field_must_be_finite(field, value):
    with pytest.raises(UserError, match=f"{field} must be a finite number"):
        build({**PRESETS["wm_resnet18"], field: value})
    with pytest.raises(UserError, match="expected a finite number"):
        parse_overrides([f"--{field.replace('_', '-')}", str(value)])


@pytest.mark.parametrize("field, value, message", [
    ("hidden", (0,), "hidden must be positive whole numbers"),
    ("hidden", (64, -5), "hidden must be positive whole numbers"),
    ("seed", -1, "seed must be a whole number from 0"),
    ("seed", 2**32, "seed must be a whole number from 0"),
    ("device", "mps", "device must be auto, cpu, cuda or cuda:N"),
    ("device", "cuda:", "device must be auto, cpu, cuda or cuda:N"),
    ("device", "gpu0", "device must be auto, cpu, cuda or cuda:N"),
    ("milestones", (-3,), "milestones must be positive"),
    ("milestones", (20, 10), "milestones must be increasing"),
    ("milestones", (10, 10), "milestones must be increasing"),
    ("val_per_class", -1, "val_per_class"),
    ("batch_size", 0, "batch_size must be positive"),
])
def test_out_of_range_values_are_user_errors(field, value, message):
    with pytest.raises(UserError, match=message):
        preset("kp_mlp_digits", **{field: value})


def test_device_specs_accepted():  # checks the form only: configurations move between machines
    for spec in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert device_problem(spec) is None
        assert RunConfig(device=spec).device == spec


@pytest.mark.parametrize("args, message", [
    (["--hidden", "3,,4"], "expected whole numbers separated by commas"),
    (["--milestones", "1.5"], "expected whole numbers separated by commas"),
    (["--epochs", "1.5"], "expected a whole number"),
    (["--lr", "fast"], "expected a number"),
    (["--lr", "nan"], "expected a finite number"),
    (["--kp-decay", "inf"], "expected a finite number"),
])
def test_bad_override_text(args, message):
    with pytest.raises(UserError, match=message):
        parse_overrides(args)


def test_empty_tuples_and_none():
    assert parse_overrides(["--milestones", "none", "--hidden", "none", "--val-per-class", "none"]) == dict(
        milestones=(), hidden=(), val_per_class=None)
    for option in ("--hidden", "--val-per-class", "--lr", "--data"):  # empty is not none: an unset variable
        with pytest.raises(UserError, match=f"option {option} has an empty value"):
            parse_overrides([option, ""])


@pytest.mark.parametrize("name, overrides, message", [
    ("kp_mlp_digits", dict(rule="fa"), "fixes rule 'kp'.*use the preset fa_mlp_digits instead"),
    ("kp_mlp_digits", dict(model="resnet18"), "fixes model 'mlp'.*use the preset kp_resnet18 instead"),
    ("wm_resnet34", dict(model="mlp"), "use the preset wm_mlp_digits or wm_mlp_original"),
    ("wm_resnet34", dict(rule="bp", model="resnet50"), "use the preset bp_resnet50"),
    ("kp_mlp_digits", dict(width=0.5), "--width applies to ResNets only.*with --hidden"),
    ("bp_mlp_original", dict(width=2.0), "--width applies to ResNets only"),
    ("kp_resnet18", dict(hidden=(64,)), "--hidden applies to MLPs only"),
    ("kp_resnet18", dict(activation="tanh"), "--activation applies to MLPs only"),
    ("kp_resnet18", dict(init="default"), "--init applies to MLPs only"),
])
def test_preset_refuses_settings_it_would_ignore(name, overrides, message):
    with pytest.raises(UserError, match=message):
        preset(name, **overrides)


def test_preset_accepts_its_own_values():
    assert preset("kp_mlp_digits", rule="kp", model="mlp", width=1.0).rule == "kp"
    assert preset("kp_resnet18", width=0.5, hidden=[], init="kaiming_normal").width == 0.5


def test_rule_settings_of_another_rule_are_refused():
    with pytest.raises(UserError, match="--wm-sleep-every applies to the wm rule only.*use the preset wm_mlp_digits"):
        check_rule_settings("kp_mlp_digits", dict(wm_sleep_every=2))
    with pytest.raises(UserError, match="--wm-sleep-every applies to the wm rule only"):
        preset("kp_mlp_digits", wm_sleep_every=2)
    with pytest.raises(UserError, match="--kp-decay applies to the kp rule only.*kp_resnet18"):
        check_rule_settings("bp_resnet18", dict(kp_decay=0.1))
    check_rule_settings("wm_mlp_digits", dict(wm_sleep_every=2, wm_lr=0.1))
    check_rule_settings("bp_resnet18", dict(kp_decay=0.0, wm_sleep_before=0))  # the preset's own values
