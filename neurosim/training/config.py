"""Run configuration: one frozen record, presets built from it, validated overrides."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping

import attrs

from neurosim.common.errors import UserError
from neurosim.common.names import LiveNames
from neurosim.models.registry import FAMILIES, MODEL_NAMES, RECIPE_NAMES, recipes
from neurosim.models.registry import MODELS as _DECLARED_MODELS
from neurosim.rules import RULES
from neurosim.training.applies import (
    Applies,
    folder_holds_out,
    in_time_only,
    milestones_within_epochs,
    padding_within_image,
    representable_problem,
    width_has_channels,
    within_training_images,
)

DYNAMICS = ("instant", "time")
TIME_UPDATES = ("ordered", "synchronous")  # neurosim.core.dynamics.UPDATES, without loading torch
PLASTICITY = ("presentation", "continuous")  # neurosim.core.dynamics.PLASTICITY
# The TimeSettings fields whose configuration field has another name.
TIME_FIELDS = {"update": "time_update"}

# The declared model names (neurosim.models.registry), read afresh on every use.
MODELS = MODEL_NAMES


def rule_names() -> tuple[str, ...]:
    """Every registered rule, once each under its own name, in registration order (the built-in
    ones first); aliases (``ss`` for ``usf``) are not among them (see ``rule_aliases``)."""
    return tuple(RULES)


def rule_aliases() -> dict[str, str]:
    """Every alias and the rule it names, e.g. ``{"ss": "usf"}``."""
    return RULES.aliases()


def rules_listed() -> str:
    """The registered rules for a message: ``bp, fa, usf (alias ss), …``."""
    return ", ".join(name + (f" (alias {', '.join(RULES.aliases(name))})" if RULES.aliases(name) else "")
                     for name in rule_names())


# The rules registered now, read afresh on every use; membership is by their own names
# (``name in RULES`` accepts aliases as well).
RULE_NAMES = LiveNames(rule_names)


def rule_settings() -> dict[str, tuple[str, "attrs.Attribute"]]:
    """Every rule's own settings as command-line fields: ``"<rule>_<field>" → (rule, attrs field)``."""
    out = {}
    for name, cls in RULES.items():
        for f in attrs.fields(attrs.resolve_types(cls)):
            out[f"{name}_{f.name}"] = (name, f)
    return out

_v = attrs.validators


def _positive(inst, att, value):
    if value <= 0:
        raise ValueError(f"{att.name} must be positive, got {value}")


def _representable(inst, att, value):
    problem = representable_problem(att.name, value)
    if problem:
        raise ValueError(problem)


def _finite_floats(cls, fields):
    """Every number field is checked to be representable (``representable_problem``): NaN and
    infinity are never a setting, nor is a number the run's float32 or int64 arithmetic cannot hold."""
    out = []
    for f in fields:
        if "float" in str(f.type) or "int" in str(f.type):  # float, int, int | None, tuple[int, ...]
            # A real number is checked first (NaN passes most comparisons); a whole number after
            # its own validator, whose message says more (the range of a seed).
            own = [f.validator] if f.validator is not None else []
            checks = [_representable, *own] if "float" in str(f.type) else [*own, _representable]
            f = f.evolve(validator=_v.and_(*checks))
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


def _registered(inst, att, value):
    if value not in RULES:
        raise ValueError(f"unknown rule {value!r}; registered rules: {', '.join(RULES)}")


def _declared_model(inst, att, value):
    if value not in MODEL_NAMES:
        raise ValueError(f"'model' must be in {tuple(MODEL_NAMES)!r} (got {value!r})")


def _seed(inst, att, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise ValueError(f"seed must be a whole number from 0 to {SEED_MAX}, got {value}")


def _image_size(inst, att, value):
    if value < 2:
        raise ValueError(f"image_size must be at least 2: a streamed image is resized to image_size × image_size "
                         f"pixels, which PyTorch's antialiased resize cannot do below 2, got {value}")


def _about(group: str, text: str, unit: str | None = None, applies: Applies | None = None, check=None) -> dict:
    """A field's metadata: its ``group`` in ``--help``, one line saying what it is for, its unit
    (None for a name, a switch or a plain ratio), where it ``applies`` (None: everywhere), and a
    ``check`` of its value against the rest of the configuration (why it cannot be meant, or None;
    ``neurosim.training.applies``). ``check_given`` refuses a setting given where it does not apply or with a
    value that fails its check."""
    return {"group": group, "help": text, "unit": unit, "applies": applies, "check": check}


def _time(text: str) -> dict:
    """The metadata of a setting of the circuit in time (in the unit of ``dt``): read under
    ``--dynamics time`` only."""
    return _about("dynamics", text, check=in_time_only)


@attrs.frozen(kw_only=True, field_transformer=_finite_floats)
class RunConfig:
    """Everything a run needs to rebuild its circuit, data and optimizer (saved as JSON).

    Each field's metadata (``_about``) gives its group, description and unit for ``--help``, and
    where it applies and what its value must be (``check_given``)."""

    preset: str = "custom"
    rule: str = attrs.field(default="bp", validator=_registered, metadata=_about(
        "model", "plasticity rule; fixed by the preset"))
    # The rule's own settings (its attrs fields), e.g. {"decay": 0.01}; on the command line
    # and in presets they are "<rule>_<field>" (--kp-decay).
    rule_params: dict = attrs.field(factory=dict, converter=dict)
    model: str = attrs.field(default="mlp", validator=_declared_model, metadata=_about(
        "model", "circuit architecture; fixed by the preset"))
    # data
    data: str = attrs.field(default="digits", metadata=_about(
        "data", "dataset: digits, cifar10, cifar100, synthetic, or a folder of class subfolders of images"))
    data_dir: str = attrs.field(default="data", metadata=_about(
        "data", "where named datasets are kept (and downloaded) and decoded folders cached",
        applies=Applies(data_dir=True, why="where they are kept or downloaded, and decoded folders cached")))
    val_per_class: int | None = attrs.field(default=None, validator=_v.optional(_v.ge(0)), metadata=_about(
        "data", "images per class held out of a folder for testing; none: 10 %", "images",
        applies=Applies(data=("folder",), why="a folder's test images; the named datasets have a test split of "
                                              "their own"), check=folder_holds_out))
    train_limit: int = attrs.field(default=0, validator=_v.ge(0), metadata=_about(
        "data", "train on the first N training images only; 0: all", "images", check=within_training_images))
    synthetic_train: int = attrs.field(default=1024, validator=_positive, metadata=_about(
        "data", "training images of the synthetic dataset", "images",
        applies=Applies(data=("synthetic",), why="the size of the synthetic dataset")))
    synthetic_test: int = attrs.field(default=256, validator=_positive, metadata=_about(
        "data", "test images of the synthetic dataset", "images",
        applies=Applies(data=("synthetic",), why="the size of the synthetic dataset")))
    normalize: str = attrs.field(default="standard", validator=_v.in_(("standard", "unit")), metadata=_about(
        "data", "pixel scaling: standard (zero mean, unit std per channel) or unit (0 to 1)"))
    crop_padding: int = attrs.field(default=0, validator=_v.ge(0), metadata=_about(
        "data", "random crops from images padded by this much; 0: no crops", "pixels",
        applies=Applies(held=True, why="random crops of the images in memory"), check=padding_within_image))
    flip: bool = attrs.field(default=False, metadata=_about(
        "data", "random horizontal flips of training images",
        applies=Applies(held=True, why="random flips of the images in memory")))
    shuffle: bool = attrs.field(default=True, metadata=_about(
        "data", "shuffle the training images every epoch",
        applies=Applies(held=True, why="the order of the images in memory")))
    # Folders: "auto" streams one whose decoded images would not fit comfortably in memory
    # (neurosim.data.stream), "on" always streams, "off" always decodes once and holds it on the device.
    stream: str = attrs.field(default="auto", validator=_v.in_(("auto", "on", "off")), metadata=_about(
        "data", "read a folder from disk as it trains (on), decode it once into memory (off), or by size",
        applies=Applies(data=("folder",), why="the named datasets are always held in memory")))
    image_size: int = attrs.field(default=224, validator=_image_size, metadata=_about(
        "data", "crop size of a streamed folder's images", "pixels",
        applies=Applies(data=("folder",), held=False, why="the size a streamed image is cropped to; other data "
                                                          "keeps its own")))
    workers: int = attrs.field(default=4, validator=_v.ge(0), metadata=_about(
        "data", "loader processes per training process when streaming", "processes",
        applies=Applies(data=("folder",), held=False, why="the processes that read a streamed folder")))
    # circuit
    hidden: tuple[int, ...] = attrs.field(default=(), converter=tuple, validator=_positive_ints, metadata=_about(
        "model", "sizes of an MLP's hidden populations", "neurons",
        applies=Applies(model="mlp", instead="scale a ResNet with --width")))
    activation: str = attrs.field(default="relu", validator=_v.in_(("relu", "sigmoid", "tanh")), metadata=_about(
        "model", "nonlinearity of an MLP's hidden neurons",
        applies=Applies(model="mlp", instead="ResNet circuits use ReLU")))
    bias: bool = attrs.field(default=True, metadata=_about(
        "model", "biases on an MLP's synapses (without them, ReLU neurons rest at 0 with no input)",
        applies=Applies(model="mlp", instead="ResNet convolutions have no bias, their batch norm has")))
    init: str = attrs.field(default="default", validator=_v.in_(("default", "kaiming_normal", "xavier_sum")),
                            metadata=_about("model", "initial weight distribution of an MLP", applies=Applies(
                                model="mlp", instead="ResNet circuits use Kaiming-normal initialisation")))
    width: float = attrs.field(default=1.0, validator=_positive, metadata=_about(
        "model", "channels of a ResNet relative to the standard 64-128-256-512", "× standard",
        applies=Applies(model="resnet", instead="set its layer sizes with --hidden (now {hidden})"),
        check=width_has_channels))
    loss: str = attrs.field(default="cross_entropy", validator=_v.in_(("cross_entropy", "sigmoid_bce")),
                            metadata=_about("optimisation", "loss at the output population"))
    # optimisation
    epochs: int = attrs.field(default=10, validator=_positive, metadata=_about(
        "optimisation", "passes over the training images", "epochs"))
    batch_size: int = attrs.field(default=128, validator=_positive, metadata=_about(
        "optimisation", "images per step in each process (the global batch is this × processes)", "images"))
    lr: float = attrs.field(default=0.1, validator=_positive, metadata=_about(
        "optimisation", "learning rate of SGD (at --lr-batch images when that is set)"))
    # The linear scaling rule: lr is the rate at a global batch of lr_batch images, and a run
    # whose global batch (batch_size x processes) differs uses lr x global / lr_batch. 0: lr as given.
    lr_batch: int = attrs.field(default=0, validator=_v.ge(0), metadata=_about(
        "optimisation", "global batch at which --lr applies, scaled linearly to the actual one; 0: as given",
        "images"))
    momentum: float = attrs.field(default=0.0, validator=[_v.ge(0.0), _v.lt(1.0)], metadata=_about(
        "optimisation", "SGD momentum, from 0 up to (not including) 1"))
    weight_decay: float = attrs.field(default=0.0, validator=_v.ge(0.0), metadata=_about(
        "optimisation", "SGD weight decay, on forward and learned feedback weights alike"))
    milestones: tuple[int, ...] = attrs.field(default=(), converter=tuple, validator=[_positive_ints, _increasing],
                                              metadata=_about("optimisation", "epochs after which the learning rate "
                                                              "is multiplied by --lr-gamma", "epochs",
                                                              check=milestones_within_epochs))
    lr_gamma: float = attrs.field(default=0.2, validator=_positive, metadata=_about(
        "optimisation", "factor of the learning rate at each milestone",
        applies=Applies(needs="milestones", why="the factor of the learning rate at each milestone")))
    # execution
    seed: int = attrs.field(default=0, validator=_seed, metadata=_about(
        "execution", "seed of every random draw of the run (weights, data order, augmentation, noise)"))
    device: str = attrs.field(default="auto", validator=_device, metadata=_about(
        "execution", "where to train; auto: the first CUDA GPU if there is one, else the CPU"))
    amp: str = attrs.field(default="auto", validator=_v.in_(("auto", "off", "bf16")), metadata=_about(
        "execution", "mixed precision; auto: bf16 on a GPU, off on the CPU"))
    channels_last: str = attrs.field(default="auto", validator=_v.in_(("auto", "on", "off")), metadata=_about(
        "execution", "channels-last memory layout; auto: for ResNets on a GPU",
        applies=Applies(model="resnet", instead="its populations have no channels to lay out")))
    compile: bool = attrs.field(default=False, metadata=_about("execution", "compile the circuit with torch.compile"))
    # Under torchrun: batch statistics over every process's batch (synchronised batch norm).
    sync_bn: bool = attrs.field(default=False, metadata=_about(
        "execution", "under torchrun, batch norm statistics over every process's batch",
        applies=Applies(model="resnet", several=True, why="batch norm statistics over every process's batch",
                        instead="it has no batch norm")))
    # Deterministic kernels (cuDNN without autotuning, torch.use_deterministic_algorithms): what
    # makes a CUDA run repeat, and resume, bit for bit. CPU runs are deterministic either way.
    deterministic: bool = attrs.field(default=False, metadata=_about(
        "execution", "deterministic GPU kernels, so that a CUDA run repeats bit for bit (slower)"))
    execution: str = attrs.field(default="compiled", validator=_v.in_(("compiled", "reference")), metadata=_about(
        "execution", "compiled (batched tensor ops) or reference (synapse by synapse, literal; slow)"))
    # dynamics (neurosim.core.dynamics): each field after ``dynamics`` is the TimeSettings field
    # of the same name (``time_update`` its ``update``); given under instant dynamics, refused.
    dynamics: str = attrs.field(default="instant", validator=_v.in_(DYNAMICS), metadata=_about(
        "dynamics", "instant (a step is a forward pass, an error, an update) or time (the circuit runs in steps "
        "of --dt: leaky activities and errors, plasticity integrated over each presentation)",
        applies=Applies(model="mlp", instead="its populations have batch norm, which a circuit in time has not")))
    dt: float = attrs.field(default=1.0, validator=_positive, metadata=_time("the time step"))
    duration: float = attrs.field(default=1.0, validator=_positive, metadata=_time(
        "how long each stimulus is presented (a whole number of --dt)"))
    tau: float | None = attrs.field(default=None, metadata=_time(
        "the populations' time constant for activities and errors; none: --dt (they follow at once)"))
    tau_plasticity: float | None = attrs.field(default=None, metadata=_time(
        "the synapses' plasticity time constant; none: --duration (one presentation gives the discrete update)"))
    tau_decay: float | None = attrs.field(default=None, metadata=_time("weight decay time constant; none: none"))
    tau_eligibility: float | None = attrs.field(default=None, metadata=_time(
        "time constant of a presynaptic eligibility trace; none: the activity itself"))
    delay: float = attrs.field(default=0.0, validator=_v.ge(0.0), metadata=_time(
        "transmission delay of every feedback hop (a whole number of --dt)"))
    settle: float | None = attrs.field(default=None, validator=_v.optional(_v.ge(0.0)), metadata=_time(
        "time simulated after the stimulus ends; none: until the last error has arrived"))
    time_update: str = attrs.field(default="ordered", validator=_v.in_(TIME_UPDATES), metadata=_time(
        "ordered (propagation within a step) or synchronous (one --dt per synaptic hop)"))
    noise: float = attrs.field(default=0.0, validator=_v.ge(0.0), metadata=_time(
        "standard deviation of the noise every non-input population adds to its drive at every step; 0: none"))
    tau_noise: float | None = attrs.field(default=None, metadata=_time(
        "correlation time of that noise (Ornstein-Uhlenbeck); none: white"))
    plasticity: str = attrs.field(default="presentation", validator=_v.in_(PLASTICITY), metadata=_time(
        "presentation (each synapse integrates its update over a presentation; the optimizer applies it at the "
        "end) or continuous (the weights move at every step by -lr x dt/tau_plasticity x the update; needs "
        "--momentum 0 and --weight-decay 0, which the synapses' dynamics do not have: decay is --tau-decay)"))
    # observation (neurosim.observe.monitors): record every N engaged steps, 0 for no monitor
    monitor_every: int = attrs.field(default=200, validator=_v.ge(0), metadata=_about(
        "monitors", "engaged steps between monitor records; 0: no monitor", "steps"))
    monitor_synapses: str = attrs.field(default="*", metadata=_about(
        "monitors", "synapses to monitor, as patterns such as 'x->h1,h2->*'; *: all",
        applies=Applies(needs="monitor_every", why="which synapses the monitor records")))
    monitor_traces: int = attrs.field(default=16, validator=_v.ge(0), metadata=_about(
        "monitors", "weights per synapse whose values are traced", "weights",
        applies=Applies(needs="monitor_every", why="weights the monitor traces")))
    monitor_probe: int = attrs.field(default=128, validator=_v.ge(0), metadata=_about(
        "monitors", "fixed training images on which the feedback signal is compared with the gradient",
        "images", applies=Applies(needs="monitor_every", why="the monitor's probe images")))
    log_every: int = attrs.field(default=0, validator=_v.ge(0), metadata=_about(
        "output", "steps between progress lines; 0: by time (twice a second on a terminal, else every 30 s)",
        "steps"))
    # Stop when the training loss exceeds this multiple of the first step's loss (0: only when
    # it is not finite); checked every 32 steps.
    max_loss_ratio: float = attrs.field(default=100.0, validator=_v.ge(0.0), metadata=_about(
        "execution", "stop when the loss exceeds this multiple of the first step's; 0: only when not finite",
        "× first loss"))

    def to_dict(self) -> dict:
        return attrs.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if not isinstance(d, Mapping):
            raise UserError(f"a configuration is a JSON object of settings, not {type(d).__name__} {d!r:.40}")
        d = _migrate(dict(d))
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"configuration has unknown fields {unknown}; it was written by another version")
        return cls(**d)

    def time_settings(self):
        """The ``TimeSettings`` of a run in time (None under instant dynamics); checks them."""
        if self.dynamics != "time":
            return None
        from neurosim.core.dynamics import TimeSettings

        return TimeSettings(**{f.name: getattr(self, TIME_FIELDS.get(f.name, f.name))
                               for f in attrs.fields(TimeSettings)})

    def make_rule(self):
        """The plasticity rule this configuration names, with its own settings."""
        return RULES[self.rule](**self.rule_params)

    def __getattr__(self, name):
        # The rule's settings read as the command line names them: cfg.wm_lr, cfg.kp_decay.
        if name.startswith("__"):  # copy/pickle protocol look-ups, possibly before fields exist
            raise AttributeError(name)
        prefix = f"{self.rule}_"
        if name.startswith(prefix):
            field = name[len(prefix):]
            fields = {f.name: f for f in attrs.fields(RULES[self.rule])}
            if field in fields:
                return self.rule_params.get(field, fields[field].default)
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")


# Before rules declared their settings, configurations held them as top-level fields.
_LEGACY = {"kp_decay": "kp_decay", "wm_sigma": "wm_sigma", "wm_noise": "wm_noise", "wm_decay": "wm_decay",
           "wm_response": "wm_response", "wm_lr": "wm_lr", "sleep_before": "wm_sleep_before",
           "sleep_every": "wm_sleep_every", "sleep_batches": "wm_sleep_batches",
           "sleep_batch_size": "wm_sleep_batch_size"}


def _migrate(d: dict) -> dict:
    """A configuration written before ``rule_params``: its rule's settings move there."""
    legacy = {_LEGACY[k]: d.pop(k) for k in list(d) if k in _LEGACY}
    if legacy and "rule_params" not in d:
        settings = rule_settings()
        d["rule_params"] = {settings[k][1].name: v for k, v in legacy.items()
                            if k in settings and settings[k][0] == d.get("rule")}
    return d


# ---------------------------------------------------------------------------------------------
# Presets: <rule>_<recipe>. Each model declares its recipes (neurosim.models.registry); each is a
# documented set of overrides of RunConfig's defaults.


def presets() -> dict[str, dict]:
    """Every preset ``<rule>_<recipe>`` of every registered rule and every declared model's
    recipe, as command-line fields: the recipe's settings, then the settings the rule's file
    declares for the model's family (``FAMILIES``) and for the recipe by name.

    A rule's ``"resnet"`` settings apply to every ResNet, CIFAR and ImageNet alike: they are
    about the architecture (WM's sleep schedule, sized for convolutions), not the data. Its
    ``"imagenet"`` settings, if it declares any, apply to the ImageNet presets on top of those."""
    out = {}
    declared = recipes()
    for rule, cls in RULES.items():
        own = cls.presets
        for name, (model, recipe) in declared.items():
            settings = {}
            for key in (*FAMILIES[model.family], name):
                settings.update(own.get(key, {}))
            out[f"{rule}_{name}"] = dict(recipe.settings, **settings, rule=rule, model=model.name)
    return out


def preset_name(name: str) -> str:
    """The preset ``name`` stands for: itself, or for a name that starts with a rule's alias
    (``ss_mlp_digits``) the same preset under the rule's own name (``usf_mlp_digits``)."""
    rule, sep, family = name.partition("_") if isinstance(name, str) else (None, "", None)
    if sep and rule in RULES.aliases():
        return f"{RULES.canonical(rule)}_{family}"
    return name


class _Presets(Mapping):
    """``PRESETS``: the presets of the rules registered now (see ``presets()``). Looking one up
    accepts a rule's alias in its name (``PRESETS["ss_mlp_digits"]`` is ``usf_mlp_digits``'s
    settings); going through them lists each rule's once, under its own name."""

    def __getitem__(self, name):
        return presets()[preset_name(name)]

    def __iter__(self):
        return iter(presets())

    def __len__(self):
        return len(presets())


PRESETS = _Presets()


def preset(name: str, **overrides) -> RunConfig:
    """The configuration of a named preset, with overrides applied and validated.

    A preset fixes its rule and model (its name says which), so overriding either is refused, as
    is a setting its kind of circuit does not read (it would change nothing). The command line
    also refuses settings of other rules (``check_rule_settings``).

    A name that starts with a rule's alias is that rule's preset under the name asked for:
    ``preset("ss_mlp_digits")`` has the settings of ``usf_mlp_digits`` and ``rule`` ``"usf"``, and
    keeps ``preset`` ``"ss_mlp_digits"``, so the run is named (and its directory, and its resume
    command) as it was asked for, as runs of that name always were. Configurations saved with
    ``"rule": "ss"`` load as they are (``RULES`` finds ``ss``)."""
    if name not in PRESETS:
        raise UserError(unknown_preset(name))
    _check_overrides(name, overrides)
    check_rule_settings(name, overrides)
    fields = dict(PRESETS[name], preset=name)
    fields.update(overrides)
    cfg = build(fields)
    check_given(cfg, _changed(fields_of(name), overrides))
    return cfg


# The declared recipe names, the <model> of a preset <rule>_<model>, read afresh on every use.
MODEL_FAMILIES = RECIPE_NAMES


def unknown_preset(name: str) -> str:
    """One line saying that ``name`` is no preset: the closest presets, and how names are made."""
    close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return (f"unknown preset {name!r}; {hint}A preset is <rule>_<model> with rule in {rules_listed()} and "
            f"model in {', '.join(MODEL_FAMILIES)}, e.g. kp_mlp_digits, wm_resnet18")


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


def _changes(name: str, overrides: dict):
    """``changes(key)``: whether ``overrides`` sets ``key`` away from the preset's value."""
    base = PRESETS[name]
    defaults = {f.name: f.default for f in attrs.fields(RunConfig)}
    defaults.update({k: f.default for k, (_, f) in rule_settings().items()})

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
        if want_rule not in RULES or want_model not in MODELS:
            instead = (f"choose the preset <rule>_<model> (rule in {rules_listed()}, model in "
                       f"{', '.join(MODEL_FAMILIES)})")
        elif want_model == model:
            instead = f"use the preset {want_rule}_{family} instead"
        else:
            instead = "use the preset " + " or ".join(
                f"{want_rule}_{r}" for r in _DECLARED_MODELS[want_model].recipes) + " instead"
        raise UserError(f"the preset {name} fixes {key} {base[key]!r}, so {_option(key)} {overrides[key]} "
                        f"cannot change it (the run would be named {name}); {instead}")


def refuse_unsupported(cfg: RunConfig, several_processes: bool) -> None:
    """The combinations of settings a run cannot train, each a ``UserError`` saying what to change
    (``several_processes``: the run is one of several under torchrun)."""
    if several_processes and (cfg.execution == "reference" or cfg.dynamics == "time"):
        raise UserError("--execution reference and --dynamics time run in one process; under torchrun use "
                        "the compiled execution (the default) with instant dynamics")
    timed = cfg.dynamics == "time"
    if cfg.make_rule().needs_time and (not timed or not cfg.noise):
        raise UserError(f"the {cfg.rule} rule learns its feedback weights in time, from intrinsic noise: run it with "
                        f"--dynamics time and --noise above 0 (an MLP; its preset {cfg.rule}_mlp_digits has both)")
    if timed and cfg.amp == "bf16":
        raise UserError("--amp bf16 applies to instant dynamics; a circuit in time computes in float32: "
                        "leave --amp out")
    if timed and cfg.plasticity == "continuous" and (cfg.momentum or cfg.weight_decay):
        raise UserError(f"--plasticity continuous moves the weights by the synapses' own dynamics at every step, "
                        f"which have no momentum and no weight decay (--momentum {cfg.momentum:g}, --weight-decay "
                        f"{cfg.weight_decay:g}): give --momentum 0 --weight-decay 0 (decay in time is --tau-decay)")


def check_rule_settings(name: str, overrides: dict) -> None:
    """Refuse hyper-parameters of another rule than the preset's (they would change nothing)."""
    if name not in PRESETS:
        return  # preset() names the problem
    rule, family, changes = PRESETS[name]["rule"], name.split("_", 1)[1], _changes(name, overrides)
    for key, (owner, _) in rule_settings().items():
        if owner != rule and changes(key):
            raise UserError(f"{_option(key)} applies to the {owner} rule only and {name} trains {rule}; "
                            f"for the {owner} rule use the preset {owner}_{family}")


def from_saved(saved: RunConfig, overrides: dict) -> RunConfig:
    """A saved configuration (a run's ``config.json``) with command-line overrides, checked as a
    preset's are: the rule and model its preset names stay, and settings it would ignore (another
    rule's, an MLP's on a ResNet) are refused."""
    if saved.preset in PRESETS:
        _check_overrides(saved.preset, overrides)
        check_rule_settings(saved.preset, overrides)
    else:
        for key, (owner, _) in rule_settings().items():
            if key in overrides and owner != overrides.get("rule", saved.rule):
                raise UserError(f"{_option(key)} applies to the {owner} rule only and this configuration trains "
                                f"{saved.rule}")
    base = flat_settings(saved)
    cfg = build({**base, **overrides})
    check_given(cfg, _changed(base, overrides))
    return cfg


def fields_of(name: str) -> dict:
    """Every command-line field of preset ``name`` (its own settings over the defaults), unvalidated."""
    defaults = {f.name: f.default for f in attrs.fields(RunConfig)}
    defaults.update({k: f.default for k, (_, f) in rule_settings().items()})
    return {**defaults, **PRESETS[name]}


def _changed(base: dict, overrides: dict) -> list[str]:
    """The keys of ``overrides`` whose value differs from ``base``'s: the settings given that
    change something (a setting given at the value it has anyway is harmless wherever it is)."""
    def same(a, b):
        return (tuple(a) if isinstance(a, list) else a) == (tuple(b) if isinstance(b, list) else b)

    return [k for k, v in overrides.items() if k not in base or not same(v, base[k])]


def check_given(cfg: RunConfig, given, streamed: bool | None = None) -> None:
    """Refuse a setting of ``given`` (those the user set, to values that change ``cfg``) that
    ``cfg``'s run would not read, or whose value cannot be meant: each field's metadata says where
    it applies (``Applies``) and what its value must be (``check``). ``streamed``: whether a
    folder is read from disk, once that is known (None: as far as ``cfg`` says)."""
    given, name = set(given), cfg.preset if cfg.preset in PRESETS else "this configuration"
    for f in attrs.fields(RunConfig):
        if f.name not in given:
            continue
        applies, check = f.metadata.get("applies"), f.metadata.get("check")
        problem = (applies.problem(cfg, f.name, name, streamed) if applies else None) or (check(cfg) if check else None)
        if problem:
            raise UserError(problem)


def build(fields: dict) -> RunConfig:
    """A validated configuration from command-line fields (a rule's settings as ``<rule>_<field>``).

    The rule is built once too, so its own validators check its settings."""
    fields = dict(fields)
    rule = fields.get("rule", "bp")
    settings = rule_settings()
    params = dict(fields.pop("rule_params", {}) or {})
    for key in [k for k in fields if k in settings]:
        owner, f = settings[key]
        value = fields.pop(key)
        if owner == rule and value != f.default:
            params[f.name] = value
    try:
        for key, value in params.items():
            problem = representable_problem(f"{rule}_{key}", value)
            if problem:
                raise ValueError(problem)
        cfg = RunConfig(**fields, rule_params=params)
        cfg.make_rule()
        cfg.time_settings()
        return cfg
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid setting: {e}") from None


def flat_settings(cfg: RunConfig) -> dict:
    """A configuration as command-line fields: its own, then its rule's as ``<rule>_<field>``."""
    out = {k: v for k, v in cfg.to_dict().items() if k != "rule_params"}
    for f in attrs.fields(RULES[cfg.rule]):
        out[f"{cfg.rule}_{f.name}"] = cfg.rule_params.get(f.name, f.default)
    return out


if __name__ == "__main__":
    from neurosim.training.presets_doc import presets_markdown

    print(presets_markdown(), end="")
