"""Presets and command-line overrides: every preset builds; every override is typed and checked."""

import pytest

from neurosim.config import PRESETS, RULE_NAMES, parse_overrides, preset
from neurosim.errors import UserError


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
    ("sleep_before", -2, "before"),
])
def test_invalid_values_are_user_errors(field, value, message):
    with pytest.raises(UserError, match=message):
        preset("wm_mlp_digits", **{field: value})


def test_presets_cover_rules_times_models():
    assert len(PRESETS) == 5 * 5
