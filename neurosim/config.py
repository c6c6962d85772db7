"""Run configuration: one frozen record, presets built from it, validated overrides."""

from __future__ import annotations

import json
import math
import re
import typing

import attrs

from neurosim.errors import UserError
from neurosim.models import RESNETS
from neurosim.rules import (Backprop, FeedbackAlignment, KolenPollack, SignSymmetry, SleepSchedule,
                            WeightMirror)

RULE_NAMES = ("bp", "fa", "ss", "wm", "kp")
MODELS = ("mlp", *RESNETS)

_v = attrs.validators


def _positive(inst, att, value):
    if value <= 0:
        raise ValueError(f"{att.name} must be positive, got {value}")


def _finite(inst, att, value):
    if isinstance(value, (int, float)) and not math.isfinite(value):
        raise ValueError(f"{att.name} must be a finite number, got {value}")


def _finite_floats(cls, fields):
    """Every float field is checked to be finite (NaN and infinity are never a setting)."""
    out = []
    for f in fields:
        if f.type in ("float", float):
            f = f.evolve(validator=_finite if f.validator is None else _v.and_(_finite, f.validator))
        out.append(f)
    return out


def _positive_ints(inst, att, value):
    bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int) or v <= 0]
    if bad:
        raise ValueError(f"{att.name} must be positive whole numbers, got {','.join(map(str, value))}")


def _increasing(inst, att, value):
    if any(b <= a for a, b in zip(value, value[1:])):
        raise ValueError(f"{att.name} must be increasing epochs without repeats, got {','.join(map(str, value))}")


SEED_MAX = 2**32 - 1
DEVICE_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_problem(spec: str) -> str | None:
    """Why ``spec`` is not a device neurosim runs on, or None if it is one (auto, cpu, cuda, cuda:N)."""
    if isinstance(spec, str) and DEVICE_SPEC.fullmatch(spec):
        return None
    return f"device must be auto, cpu, cuda or cuda:N (N the index of a CUDA GPU), not {spec!r}"


def _device(inst, att, value):
    problem = device_problem(value)
    if problem:
        raise ValueError(problem)


def _seed(inst, att, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise ValueError(f"seed must be a whole number from 0 to {SEED_MAX}, got {value}")


@attrs.frozen(kw_only=True, field_transformer=_finite_floats)
class RunConfig:
    """Everything a run needs to rebuild its circuit, data and optimizer (saved as JSON)."""

    preset: str = "custom"
    rule: str = attrs.field(default="bp", validator=_v.in_(RULE_NAMES))
    model: str = attrs.field(default="mlp", validator=_v.in_(MODELS))
    # data
    data: str = "digits"
    data_dir: str = "data"
    val_per_class: int | None = attrs.field(default=None, validator=_v.optional(_v.ge(0)))
    train_limit: int = attrs.field(default=0, validator=_v.ge(0))  # train on the first N images; 0: all
    synthetic_train: int = attrs.field(default=1024, validator=_positive)
    synthetic_test: int = attrs.field(default=256, validator=_positive)
    normalize: str = attrs.field(default="standard", validator=_v.in_(("standard", "unit")))
    crop_padding: int = attrs.field(default=0, validator=_v.ge(0))
    flip: bool = False
    shuffle: bool = True
    # circuit
    hidden: tuple[int, ...] = attrs.field(default=(), converter=tuple, validator=_positive_ints)
    activation: str = attrs.field(default="relu", validator=_v.in_(("relu", "sigmoid", "tanh")))
    init: str = attrs.field(default="default", validator=_v.in_(("default", "kaiming_normal", "xavier_sum")))
    width: float = attrs.field(default=1.0, validator=_positive)
    loss: str = attrs.field(default="cross_entropy", validator=_v.in_(("cross_entropy", "sigmoid_bce")))
    # optimisation
    epochs: int = attrs.field(default=10, validator=_positive)
    batch_size: int = attrs.field(default=128, validator=_positive)
    lr: float = attrs.field(default=0.1, validator=_positive)
    momentum: float = attrs.field(default=0.0, validator=[_v.ge(0.0), _v.lt(1.0)])
    weight_decay: float = attrs.field(default=0.0, validator=_v.ge(0.0))
    milestones: tuple[int, ...] = attrs.field(default=(), converter=tuple, validator=[_positive_ints, _increasing])
    lr_gamma: float = attrs.field(default=0.2, validator=_positive)
    # rule hyper-parameters
    kp_decay: float = attrs.field(default=0.0, validator=_v.ge(0.0))
    wm_sigma: float = attrs.field(default=1.0, validator=_positive)
    wm_noise: str = attrs.field(default="gaussian", validator=_v.in_(("gaussian", "uniform")))
    wm_decay: float = attrs.field(default=1.0, validator=_v.ge(0.0))
    wm_response: str = attrs.field(default="linear", validator=_v.in_(("linear", "sigmoid")))
    wm_lr: float = attrs.field(default=0.05, validator=_positive)
    sleep_before: int = attrs.field(default=0, validator=_v.ge(-1))  # -1: one epoch's worth of batches
    sleep_every: int = attrs.field(default=1, validator=_positive)
    sleep_batches: int = attrs.field(default=1, validator=_v.ge(0))
    sleep_batch_size: int = attrs.field(default=0, validator=_v.ge(0))  # 0: the training batch size
    # execution
    seed: int = attrs.field(default=0, validator=_seed)
    device: str = attrs.field(default="auto", validator=_device)
    amp: str = attrs.field(default="auto", validator=_v.in_(("auto", "off", "bf16")))
    channels_last: str = attrs.field(default="auto", validator=_v.in_(("auto", "on", "off")))
    compile: bool = False
    # Deterministic kernels (cuDNN without autotuning, torch.use_deterministic_algorithms): what
    # makes a CUDA run repeat, and resume, bit for bit. CPU runs are deterministic either way.
    deterministic: bool = False
    execution: str = attrs.field(default="compiled", validator=_v.in_(("compiled", "reference")))
    # observation (neurosim.monitors): record every N engaged steps, 0 for no monitor
    monitor_every: int = attrs.field(default=200, validator=_v.ge(0))
    monitor_synapses: str = "*"
    monitor_traces: int = attrs.field(default=16, validator=_v.ge(0))
    monitor_probe: int = attrs.field(default=128, validator=_v.ge(0))
    log_every: int = attrs.field(default=0, validator=_v.ge(0))  # steps between progress lines; 0: by time
    # Stop when the training loss exceeds this multiple of the first step's loss (0: only when
    # it is not finite); checked every 32 steps.
    max_loss_ratio: float = attrs.field(default=100.0, validator=_v.ge(0.0))

    def to_dict(self) -> dict:
        return attrs.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"configuration has unknown fields {unknown}; it was written by another version")
        return cls(**d)

    def make_rule(self):
        """The plasticity rule this configuration names, with its hyper-parameters."""
        if self.rule == "bp":
            return Backprop()
        if self.rule == "fa":
            return FeedbackAlignment()
        if self.rule == "ss":
            return SignSymmetry()
        if self.rule == "kp":
            return KolenPollack(decay=self.kp_decay)
        schedule = SleepSchedule(before=self.sleep_before, every=self.sleep_every, batches=self.sleep_batches)
        return WeightMirror(sigma=self.wm_sigma, noise=self.wm_noise, decay=self.wm_decay,
                            response=self.wm_response, schedule=schedule)


# ---------------------------------------------------------------------------------------------
# Presets: <rule>_<model>. Each is a documented set of overrides of RunConfig's defaults.

_DIGITS = dict(model="mlp", data="digits", hidden=(128, 64), activation="relu", epochs=30,
               batch_size=32, lr=0.05, momentum=0.9, monitor_every=20)
_DIGITS_RULE = {
    "bp": {}, "fa": {}, "ss": {},
    "kp": dict(kp_decay=0.01),
    # Twenty mirror batches before training, then one after every engaged step. The mirror
    # rate must let B keep pace with W: at wm_lr=0.05 B lags W by ~20 steps and training with
    # momentum diverges even though the angle stays small (docs/design.md).
    "wm": dict(sleep_before=20, sleep_batches=1, wm_lr=0.2, sleep_batch_size=256),
}

# The weight-mirror authors' NumPy experiments (MLP, MNIST/CIFAR-10): sigmoid units, sigmoid
# cross-entropy, plain SGD on batch 128 without shuffling, N(0, 1/(n_in+n_out)) init, 400 epochs.
# Hidden width 1000 is their CIFAR-10 network; use --hidden 500 for their MNIST one.
_ORIGINAL = dict(model="mlp", data="cifar10", hidden=(1000,), activation="sigmoid", init="xavier_sum",
                 loss="sigmoid_bce", normalize="unit", shuffle=False, epochs=400, batch_size=128,
                 momentum=0.0)
_ORIGINAL_RULE = {
    "bp": dict(lr=0.2), "fa": dict(lr=0.2), "ss": dict(lr=0.2),
    "kp": dict(lr=0.3, kp_decay=0.0),
    # Uniform noise in ±0.05, response through the sigmoid, a full pass of mirror batches before
    # training (sleep_before=-1: as many as there are training batches), one after every SGD step.
    # Decay 0.25 = f'(0) of the sigmoid, so B settles at Wᵀ; their size control was a no-op.
    "wm": dict(lr=0.05, wm_noise="uniform", wm_sigma=0.05 / 3**0.5, wm_response="sigmoid", wm_decay=0.25,
               wm_lr=0.01, sleep_before=-1, sleep_batches=1),
}

# Standard CIFAR-100 ResNet recipe: SGD momentum 0.9, lr 0.1 at batch 128, weight decay 5e-4,
# 200 epochs, lr ×0.2 at epochs 60/120/160, random crop (pad 4) + horizontal flip.
_RESNET = dict(data="cifar100", init="kaiming_normal", epochs=200, batch_size=128, lr=0.1, momentum=0.9,
               weight_decay=5e-4, milestones=(60, 120, 160), lr_gamma=0.2, crop_padding=4, flip=True)
_RESNET_RULE = {
    "bp": {}, "fa": {}, "ss": {},
    # The optimizer's weight decay acts on W and B alike and is KP's shared decay λ.
    "kp": dict(kp_decay=0.0),
    # One mirror batch of 32 noise images after every 4th engaged step. A convolution sees every
    # output position as a co-activation, so 32 images give tens of thousands of events per
    # weight in early layers. Sleeping every step with 8 or 16 images (the same events per step)
    # cost 1.19x / 1.28x native at batch 64 on CPU: small-batch convolutions run slowly and the
    # mirror optimizer touches every B each time (docs/benchmarks.md). 200 mirror batches first.
    "wm": dict(sleep_before=200, sleep_every=4, sleep_batches=1, sleep_batch_size=32, wm_lr=0.1, wm_sigma=1.0),
}


def _presets() -> dict[str, dict]:
    out = {}
    for rule in RULE_NAMES:
        out[f"{rule}_mlp_digits"] = dict(_DIGITS, **_DIGITS_RULE[rule], rule=rule)
        out[f"{rule}_mlp_original"] = dict(_ORIGINAL, **_ORIGINAL_RULE[rule], rule=rule)
        for model in RESNETS:
            out[f"{rule}_{model}"] = dict(_RESNET, **_RESNET_RULE[rule], rule=rule, model=model)
    return out


PRESETS = _presets()


def preset(name: str, **overrides) -> RunConfig:
    """The configuration of a named preset, with overrides applied and validated.

    A preset fixes its rule and model (its name says which), so overriding either is refused, as
    is a setting its kind of circuit does not read (it would change nothing). The command line
    also refuses settings of other rules (``check_rule_settings``)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}. Presets are <rule>_<model> with rule in "
                        f"{', '.join(RULE_NAMES)} and model in {', '.join(MODEL_FAMILIES)}; "
                        f"e.g. kp_mlp_digits, wm_resnet18.\n"
                        f"All presets: {' '.join(sorted(PRESETS))}")
    _check_overrides(name, overrides)
    fields = dict(PRESETS[name], preset=name)
    fields.update(overrides)
    return build(fields)


MODEL_FAMILIES = ("mlp_digits", "mlp_original", *RESNETS)

# Settings that only one kind of circuit or one rule reads; elsewhere they would change nothing.
_MLP_ONLY = {"hidden": "scale a ResNet with --width", "activation": "ResNet circuits use ReLU",
             "init": "ResNet circuits use Kaiming-normal initialisation"}
_RULE_ONLY = {"kp_decay": "kp", "wm_sigma": "wm", "wm_noise": "wm", "wm_decay": "wm", "wm_response": "wm",
              "wm_lr": "wm", "sleep_before": "wm", "sleep_every": "wm", "sleep_batches": "wm",
              "sleep_batch_size": "wm"}


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


def _changes(name: str, overrides: dict):
    """``changes(key)``: whether ``overrides`` sets ``key`` away from the preset's value."""
    base = PRESETS[name]
    defaults = {f.name: f.default for f in attrs.fields(RunConfig)}

    def changes(key):
        value = overrides.get(key)
        return key in overrides and (tuple(value) if isinstance(value, list) else value) != base.get(
            key, defaults[key])

    return changes


def _check_overrides(name: str, overrides: dict) -> None:
    base = PRESETS[name]
    rule, model, family = base["rule"], base["model"], name.split("_", 1)[1]
    changes = _changes(name, overrides)

    if changes("rule") or changes("model"):
        key = "rule" if changes("rule") else "model"
        want_rule, want_model = overrides.get("rule", rule), overrides.get("model", model)
        if want_rule not in RULE_NAMES or want_model not in MODELS:
            instead = (f"choose the preset <rule>_<model> (rule in {', '.join(RULE_NAMES)}, model in "
                       f"{', '.join(MODEL_FAMILIES)})")
        elif want_model == model:
            instead = f"use the preset {want_rule}_{family} instead"
        elif want_model == "mlp":
            instead = f"use the preset {want_rule}_mlp_digits or {want_rule}_mlp_original instead"
        else:
            instead = f"use the preset {want_rule}_{want_model} instead"
        raise UserError(f"the preset {name} fixes {key} {base[key]!r}, so {_option(key)} {overrides[key]} "
                        f"cannot change it (the run would be named {name}); {instead}")
    if model == "mlp" and changes("width"):
        raise UserError(f"--width applies to ResNets only; {name} is an MLP: set its layer sizes with --hidden "
                        f"(now {','.join(map(str, base['hidden']))})")
    if model != "mlp":
        for key, why in _MLP_ONLY.items():
            if changes(key):
                raise UserError(f"{_option(key)} applies to MLPs only and {name} is a {model} ({why}); "
                                f"for an MLP use a preset such as {rule}_mlp_digits")


def check_rule_settings(name: str, overrides: dict) -> None:
    """Refuse hyper-parameters of another rule than the preset's (they would change nothing)."""
    if name not in PRESETS:
        return  # preset() names the problem
    rule, family, changes = PRESETS[name]["rule"], name.split("_", 1)[1], _changes(name, overrides)
    for key, owner in _RULE_ONLY.items():
        if owner != rule and changes(key):
            raise UserError(f"{_option(key)} applies to the {owner} rule only and {name} trains {rule}; "
                            f"for the {owner} rule use the preset {owner}_{family}")


def build(fields: dict) -> RunConfig:
    """A validated configuration (its rule is built once too, so rule settings are checked)."""
    try:
        cfg = RunConfig(**fields)
        cfg.make_rule()
        return cfg
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid setting: {e}") from None


def parse_overrides(args: list[str]) -> dict:
    """``["--lr", "0.05", "--milestones", "30,60"]`` → typed values for RunConfig fields."""
    types = typing.get_type_hints(RunConfig)
    out, i = {}, 0
    names = sorted(f.name.replace("_", "-") for f in attrs.fields(RunConfig) if f.name != "preset")
    while i < len(args):
        key = args[i]
        if not key.startswith("--"):
            raise UserError(f"unexpected argument {key!r}; options are --name value")
        name = key[2:].replace("-", "_")
        if name not in types or name == "preset":
            raise UserError(f"unknown option {key}. Options: {' '.join('--' + n for n in names)}")
        if i + 1 >= len(args):
            raise UserError(f"option {key} needs a value")
        out[name] = _convert(key, args[i + 1], types[name])
        i += 2
    return out


def _convert(key: str, text: str, typ):
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"bad value {text!r} for {key}: expected true or false")
    if origin is tuple:
        if text.strip().lower() in ("", "none"):
            return ()
        parts = [v.strip() for v in text.split(",")]
        if not all(_is_int(v) for v in parts):
            raise UserError(f"bad value {text!r} for {key}: expected whole numbers separated by commas, "
                            f"e.g. 60,120,160 (or none)")
        return tuple(int(v) for v in parts)
    if type(None) in args:  # Optional[int]
        if text.strip().lower() in ("none", ""):
            return None
        typ = int
    if typ is int:
        if not _is_int(text.strip()):
            raise UserError(f"bad value {text!r} for {key}: expected a whole number")
        return int(text)
    if typ is float:
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"bad value {text!r} for {key}: expected a number") from None
        if not math.isfinite(value):
            raise UserError(f"bad value {text!r} for {key}: expected a finite number")
        return value
    return typ(text)


def _is_int(text: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", text) is not None


def presets_markdown() -> str:
    """The preset table of ``docs/presets.md`` (``python -m neurosim.config > docs/presets.md``)."""
    defaults = RunConfig()
    lines = ["# Presets", "",
             "Generated by `python -m neurosim.config > docs/presets.md`. A preset is `<rule>_<model>`;",
             "each row lists the fields it sets away from the defaults below. Any field can be",
             "overridden on the command line as `--field-name value` (tuples as `60,120,160`).", ""]
    families = [("mlp_digits", "8×8 digits MLP (64-128-64-10, ReLU)"),
                ("mlp_original", "the weight-mirror authors' NumPy MLP experiments"),
                *[(m, f"CIFAR {m}, standard CIFAR-100 recipe") for m in RESNETS]]
    for model, title in families:
        lines += [f"## `*_{model}`: {title}", "", "| preset | settings |", "| --- | --- |"]
        for rule in RULE_NAMES:
            name = f"{rule}_{model}"
            cfg = preset(name)
            diff = {k: v for k, v in cfg.to_dict().items() if k != "preset" and getattr(defaults, k) != v}
            lines.append(f"| `{name}` | " + ", ".join(f"{k}={_show(v)}" for k, v in diff.items()) + " |")
        lines.append("")
    lines += ["## Defaults of every field", "", "| field | default |", "| --- | --- |"]
    lines += [f"| `{f.name}` | {_show(getattr(defaults, f.name))} |" for f in attrs.fields(RunConfig)]
    return "\n".join(lines) + "\n"


def _show(v) -> str:
    if isinstance(v, tuple):
        return ",".join(map(str, v)) or "()"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


if __name__ == "__main__":
    print(presets_markdown(), end="")
