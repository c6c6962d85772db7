"""A study's command line and its plan, checked before anything is made or trained.

``parse_request`` reads the options of ``compare_rules.py`` (``neurosim compare``) one by one;
``plan_study`` checks them for every rule the study holds (each preset's configuration, the device,
the data); ``one_name_per_rule`` keeps an alias and its rule from training twice;
``_check_same_study`` refuses to continue a study with options that would make its runs differ.
Below it: ``neurosim.tools.study.report`` (how options are written).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import attrs

from neurosim.common.errors import UserError
from neurosim.tools.study.report import _flag

# Settings a continued study may change: where and how its runs go, not what they learn. These
# are the ones run_circuit.py --resume accepts (neurosim.training.run_dir.CHANGEABLE_ON_RESUME) but the
# epochs, which are the study's budget.
MACHINE_SETTINGS = ("device", "data_dir", "log_every", "compile", "deterministic")
STUDY_OPTIONS = ("--rules", "--out", "--resume", "--quiet", "--in-process")


def usage(prog: str = "compare_rules.py") -> str:
    """The help of ``prog`` (``neurosim compare`` when run through the ``neurosim`` command)."""
    from neurosim.training.config import MODEL_FAMILIES, RULE_NAMES, rule_aliases

    rules = ",".join(_in_order(RULE_NAMES))
    aliases = ", ".join(f"{a} is {r}" for a, r in rule_aliases().items())
    pad = " " * len(f"usage: {prog} ")
    return "\n".join([
        f"usage: {prog} MODEL [--rules RULE,RULE,...] [--out STUDY_DIR] [--quiet] [--in-process]",
        f"{pad}[--field-name VALUE ...]",
        f"       {prog} --resume STUDY_DIR [--rules RULE,...] [--quiet] [--in-process] [--field-name VALUE ...]",
        f"       {prog} --combine STUDY_DIR STUDY_DIR [...] [--out FILE.md]",
        "",
        *textwrap.wrap(
            "Train every registered rule (or those of --rules) on the same model, seed, data and budget, "
            "one run after another, and compare them in STUDY_DIR/report.md. MODEL is a model family: "
            f"{', '.join(MODEL_FAMILIES)}. Each rule trains its preset <rule>_MODEL with the options given, "
            "through experiments/run_circuit.py in a process of its own, into STUDY_DIR/<rule>/; a run that "
            "fails is recorded (exit status, last lines of output) and the study goes on with the next rule.",
            100),
        "",
        "  --rules LIST        the rules to train, comma-separated (default: every registered rule,",
        f"                      {rules})",
        *([f"                      an alias names its rule, which trains once ({aliases})"] if aliases else []),
        "  --out STUDY_DIR     the study directory (default studies/MODEL-YYYYmmdd-HHMMSS); the same command",
        "                      again continues the study there",
        "  --resume STUDY_DIR  continue a study; MODEL and the options are read from its study.json (options",
        "                      given here replace theirs: only --device, --data-dir, --log-every, --compile",
        "                      and --deterministic may differ)",
        "  --quiet             one line per rule instead of the runs' output (kept in STUDY_DIR/logs/)",
        "  --in-process        train each run in the study's own process instead of a process of its own:",
        "                      no start-up per run (seconds; for small models), but a crash ends the study",
        "  -h, --help          this help",
        "",
        *textwrap.wrap(
            "Every other option is a run setting (run_circuit.py --help lists them) and goes to every run, "
            "e.g. --epochs 10 --data cifar100 --width 0.125. A rule's own settings (--kp-decay, --wm-lr, ...) "
            "go to that rule's run only, and are refused when the study does not train that rule. All of "
            "them are checked for every rule before anything trains.", 100),
        "",
        *textwrap.wrap(
            "Continuing: a rule whose run finished is skipped; an interrupted run continues from its "
            "checkpoint (run_circuit.py PRESET --resume STUDY_DIR/<rule>); a failed one is tried again; the "
            "others start. A study directory holds one model and one set of options; --rules may add rules "
            "to it, and its report covers every rule it holds. Ctrl-C stops the current run at its next step "
            "with its checkpoint saved (a second Ctrl-C stops it at once) and ends the study, saying how to "
            "continue it.", 100),
        "",
        "Writes STUDY_DIR/study.json (the state and the exact command of every run), report.md (results",
        "per rule, per-synapse W–Bᵀ and delta angles, figures, commands), figures/*.png and logs/<rule>.log.",
        *textwrap.wrap(
            "Seeds: --combine reads studies that differ only in --seed (one study per seed) and writes one report "
            "of them: per rule the mean over the seeds and their range, the gap to bp paired seed by seed, the "
            "angles per synapse averaged over the seeds (--combine --help).", 100),
        "",
        "Exit status: 0 every rule trained; 1 some run failed (see the report); 2 bad input; 130 interrupted.",
        "",
    ])


# -- the command line ------------------------------------------------------------------------------

@attrs.frozen
class Request:
    """What a command line asks for, its options parsed and checked one by one."""

    model: str | None = None
    rules: tuple[str, ...] | None = None
    out: Path | None = None
    resume: Path | None = None
    quiet: bool = False
    inside: bool = False  # --in-process
    options: dict = attrs.field(factory=dict)  # setting -> value as given on the command line


def parse_request(argv: list[str], prog: str = "compare_rules.py") -> Request:
    from neurosim.training.overrides import parse_overrides

    rest = list(argv)
    model = None
    if rest and not rest[0].startswith("-"):
        model, rest = rest[0], rest[1:]
    rules = out = resume = None
    quiet = inside = False
    options: dict[str, str] = {}
    given: set[str] = set()
    i = 0
    while i < len(rest):
        token = rest[i]
        name = "--" + token.removeprefix("--").replace("_", "-")
        if token.startswith("--") and name in given:
            raise UserError(f"option {name} is given twice; give it once")
        given.add(name)
        if token in ("--quiet", "--in-process"):
            quiet, inside = quiet or token == "--quiet", inside or token == "--in-process"
            i += 1
            continue
        if not token.startswith("--"):
            raise UserError(f"unexpected argument {token!r}: MODEL comes first (e.g. {prog} mlp_digits "
                            f"--epochs 5), then options as --name value; {prog} --help lists them")
        if i + 1 >= len(rest):
            raise UserError(f"option {token} needs a value")
        value = rest[i + 1]
        if token in STUDY_OPTIONS:
            if not value:
                raise UserError(f"option {token} needs a value")
            if token == "--rules":
                rules = parse_rules(value)
            elif token == "--out":
                out = Path(value)
            else:
                resume = Path(value)
        else:
            try:
                (key,) = parse_overrides([token, value])  # the name and the value, checked
            except UserError as e:
                if str(e).startswith("unknown option"):
                    raise UserError(f"{e}; and the study's own: {' '.join(STUDY_OPTIONS)}") from None
                raise
            options[key] = value
        i += 2
    return Request(model=model, rules=rules, out=out, resume=resume, quiet=quiet, inside=inside, options=options)


def parse_rules(text: str) -> tuple[str, ...]:
    """``"bp,fa,kp"`` → the rules named, each name once, in the order given (checked to be
    registered; an alias counts as registered). Two names of one rule (``ss,usf``) both stay here:
    ``one_name_per_rule`` picks the one a study trains."""
    from neurosim.rules import RULES
    from neurosim.training.config import rules_listed

    names = [r.strip() for r in text.split(",") if r.strip()]
    if not names:
        raise UserError(f"--rules names no rule; e.g. --rules bp,fa,kp (registered: {rules_listed()})")
    unknown = [r for r in names if r not in RULES]
    if unknown:
        raise UserError(f"unknown rule{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in --rules; "
                        f"registered rules: {rules_listed()}")
    return tuple(dict.fromkeys(names))


def _rule_of(name: str) -> str:
    """The registered rule ``name`` means (itself, or the rule it is an alias of)."""
    from neurosim.rules import RULES

    return RULES.canonical(name) if name in RULES else name


def one_name_per_rule(names, held=()) -> tuple[tuple[str, ...], list[str]]:
    """``names`` with every rule once: two names of one rule (an alias and the rule's own name,
    ``ss`` and ``usf``) would train the same run twice. The name kept is the one the study already
    holds that rule under (``held``: its runs are in ``STUDY/<name>/``), else the first given.
    Returns the names and a note for each one left out."""
    chosen: dict[str, str] = {}
    for name in held:
        chosen.setdefault(_rule_of(name), name)
    out, notes = [], []
    for name in names:
        rule = _rule_of(name)
        keep = chosen.setdefault(rule, name)
        if keep in out:
            if keep != name:
                notes.append(f"{keep} and {name} name one rule ({rule}): the study trains it once, as {keep}")
            continue
        if keep != name:
            notes.append(f"this study holds the rule {rule} as {keep}: {name} trains there, as {keep}")
        out.append(keep)
    return tuple(out), notes


def _in_order(rules) -> list[str]:
    """Rules in registry order, bp first (the reference the others are measured against); an
    alias sorts with its rule."""
    from neurosim.training.config import RULE_NAMES

    registered = list(RULE_NAMES)
    rules = list(dict.fromkeys(rules))

    def position(r):
        r = _rule_of(r)
        return registered.index(r) if r in registered else len(registered)

    return sorted(rules, key=lambda r: (_rule_of(r) != "bp", position(r), rules.index(r)))


def check_model(model: str) -> None:
    from neurosim.rules import RULES
    from neurosim.training.config import MODEL_FAMILIES

    if model in MODEL_FAMILIES:
        return
    rule, _, family = model.partition("_")
    if rule in RULES and family in MODEL_FAMILIES:
        raise UserError(f"{model} is a preset; a study's MODEL is a model family, here {family} (add --rules {rule} "
                        f"to train {rule} alone)")
    raise UserError(f"unknown model {model!r}; MODEL is one of {', '.join(MODEL_FAMILIES)}")


def _typed(options: dict) -> dict:
    from neurosim.training.overrides import parse_overrides

    return parse_overrides([t for key, value in options.items() for t in (_flag(key), value)])


def _rule_options(rule: str, options: dict) -> dict:
    """The options a rule's run gets: every common one, and that rule's own settings only."""
    from neurosim.training.config import rule_settings

    own = rule_settings()
    return {k: v for k, v in options.items() if k not in own or own[k][0] == _rule_of(rule)}


@attrs.frozen
class Plan:
    """A validated study: the model, every rule it holds (report order), the options as given and
    each rule's configuration."""

    model: str
    rules: tuple[str, ...]
    options: dict
    configs: dict


def plan_study(model: str, rules, options: dict) -> Plan:
    """Check the options for every rule of the study (``preset`` validates each configuration) and
    the device and data they name, before anything is created or trained."""
    from neurosim.rules import RULES
    from neurosim.tools.cli import check_device
    from neurosim.training.config import preset, rule_settings, rules_listed

    check_model(model)
    rules = tuple(_in_order(rules))
    gone = [r for r in rules if r not in RULES]
    if gone:
        raise UserError(f"the study holds runs of {', '.join(gone)}, which {'is' if len(gone) == 1 else 'are'} not a "
                        f"registered rule now (registered: {rules_listed()})")
    typed = _typed(options)
    for key in ("rule", "model"):
        if key in typed:
            raise UserError(f"{_flag(key)} is not for a study: it trains the model {model} under each rule of "
                            f"--rules (here {','.join(rules)}); choose them with MODEL and --rules")
    own = rule_settings()
    for key in typed:
        if key in own and own[key][0] not in {_rule_of(r) for r in rules}:
            owner = own[key][0]
            raise UserError(f"{_flag(key)} applies to the {owner} rule only, which this study does not train "
                            f"(rules {','.join(rules)}); add {owner} to --rules or leave the option out")
    configs = {rule: preset(f"{rule}_{model}", **_rule_options(rule, typed)) for rule in rules}
    first = configs[rules[0]]
    check_device(first.device)
    _check_data(first.data, first.data_dir)
    return Plan(model=model, rules=rules, options=dict(options), configs=configs)


def _check_data(spec: str, data_dir: str) -> None:
    """Refuse a data set that is neither a known name nor a folder: every run would fail on it."""
    from neurosim.data import DATASET_NAMES

    if spec in DATASET_NAMES:
        return
    if spec == "imagenet":
        root = Path(data_dir).expanduser() / "imagenet"
        if not root.is_dir():
            raise UserError(f"ImageNet is not at {root}; put its train/ and val/ class folders there or give "
                            f"--data-dir the folder above it (it cannot be downloaded)")
        return
    if not Path(spec).expanduser().is_dir():
        raise UserError(f"--data {spec}: not one of {', '.join(DATASET_NAMES)}, imagenet, and not a folder of "
                        f"class subfolders of images")


def effective_settings(model: str, rules, options: dict) -> dict:
    """What the options change in the study's runs, as JSON values: each setting that differs from
    the preset's value for some rule it applies to, the machine settings left out. Two commands
    with equal effective settings make the same study."""
    from neurosim.training.config import flat_settings, preset, rule_settings

    own = rule_settings()
    bases = {r: flat_settings(preset(f"{r}_{model}")) for r in rules}
    out = {}
    for key, value in _typed(options).items():
        if key in MACHINE_SETTINGS:
            continue
        applies = [r for r in rules if key not in own or own[key][0] == _rule_of(r)]
        if any(_jsonable(bases[r].get(key)) != _jsonable(value) for r in applies):
            out[key] = _jsonable(value)
    return out


def _jsonable(value):
    return json.loads(json.dumps(value))


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _check_same_study(study_dir: Path, stored: dict, plan: Plan) -> None:
    """Refuse to continue a study with options that would make its runs differ. A rule's own settings
    count once that rule has a run: before, they may still be chosen."""
    from neurosim.training.config import rule_settings

    own = rule_settings()
    begun = {_rule_of(r) for r in plan.rules
             if (stored["runs"].get(r) or {}).get("attempts") or (study_dir / r).exists()}

    def counted(options):
        settings = effective_settings(plan.model, plan.rules, options)
        return {k: v for k, v in settings.items() if k not in own or own[k][0] in begun}

    old, new = counted(stored["options"]), counted(plan.options)
    if old == new:
        return
    diffs = []
    for key in list(dict.fromkeys([*old, *new])):
        if old.get(key) != new.get(key):
            ours = f"{_flag(key)} {_show(new[key])}" if key in new else f"no {_flag(key)}"
            theirs = _show(old[key]) if key in old else "the preset's"
            diffs.append(f"{ours} (the study has {theirs})")
    raise UserError(f"{study_dir} holds a study of {stored['model']} with other options: this command has "
                    f"{'; '.join(diffs)}. Continue that study with compare_rules.py --resume {study_dir}, or choose "
                    f"another --out for a new one")
