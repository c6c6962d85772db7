"""The options of ``neurosim run`` (``run_circuit.py``), built from the configuration's fields.

Every field of ``RunConfig`` and every registered rule's settings is an option ``--field-name
VALUE`` (or ``--field-name=VALUE``), shown in ``--help`` in the group its metadata names, with
its one-line description, its unit and the default of the chosen preset. A rule's settings come
from its attrs fields (``--kp-decay``), so a new rule file brings its options and their help.
Nothing here loads PyTorch: ``--help`` and a mistyped option answer at once.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import textwrap
import typing
from pathlib import Path

import attrs

from neurosim.common.errors import UserError
from neurosim.models.registry import MODELS
from neurosim.training.overrides import convert_option, option_types
from neurosim.training.config import (
    MODEL_FAMILIES,
    PRESETS,
    RULE_NAMES,
    RunConfig,
    flat_settings,
    preset,
    rule_settings,
    unknown_preset,
)

# group → its title in --help, in the order shown
GROUPS = {
    "data": "data",
    "model": "model (the preset fixes the rule and the model)",
    "optimisation": "optimisation",
    "rule": "rule settings",
    "execution": "execution",
    "dynamics": "dynamics (a circuit in time, docs/results.md \"Circuits in time\")",
    "monitors": "monitors (per-synapse records, docs/monitors.md)",
    "output": "output",
}

# The options of the command itself, not of the configuration: (option, metavar, help).
COMMAND_OPTIONS = [
    ("--out", "DIR", "the run directory: new, empty, or a run that never finished its first epoch "
                     "(default: runs/PRESET-YYYYmmdd-HHMMSS)"),
    ("--resume", "RUN_DIR", "continue the run in RUN_DIR from its last checkpoint (Ctrl-C saves one); the preset "
                            "may be left out, and only --epochs, --device, --data-dir, --log-every, --compile and "
                            "--deterministic may change"),
    ("--config", "FILE", "start a new run from a saved configuration (a run's config.json, or its directory); "
                         "options given with it override its settings"),
    ("--quiet", None, "print nothing but errors (the run's log.txt still records its progress)"),
    ("--verbose", None, "also print the circuit: its populations, synapses and rules"),
    ("--nproc-per-node", "N", "train on N processes of this machine, as torchrun --standalone --nproc-per-node N "
                              "does (one GPU each on a GPU machine); a mistake is said once, with exit status 2"),
]


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def option(key: str) -> str:
    return "--" + key.replace("_", "-")


@attrs.frozen
class RunRequest:
    """What ``neurosim run`` is asked to do: train a preset, or a saved configuration
    (``config``), or continue a run (``resume``), with ``overrides`` (typed configuration
    fields) and where its output goes."""

    preset: str | None
    overrides: dict
    out: Path | None = None
    resume: Path | None = None
    config: Path | None = None
    quiet: bool = False
    verbose: bool = False
    processes: int | None = None  # --nproc-per-node: start this many processes (neurosim.tools.cli.launch)


@attrs.frozen
class Field:
    """A configuration field as an option: its key (``batch_size``), type, group and help."""

    key: str
    type: object
    group: str
    help: str
    unit: str | None
    metavar: str
    choices: tuple | None


def fields() -> list[Field]:
    """Every configuration field the command line sets: RunConfig's, then every rule's."""
    types = option_types()
    out = []
    for f in attrs.fields(RunConfig):
        if f.name in types:
            meta = f.metadata
            out.append(Field(f.name, types[f.name], meta.get("group", "other"), meta.get("help", ""),
                             meta.get("unit"), _metavar(f, types[f.name], own=True), _choices(f)))
    for key, (rule, f) in rule_settings().items():
        out.append(Field(key, types[key], "rule", f.metadata.get("help", ""), f.metadata.get("unit"),
                         _metavar(f, types[key], own=False), _choices(f)))
    return out


def _choices(f) -> tuple | None:
    options = getattr(f.validator, "options", None)
    return tuple(options) if options else None


_SPECIAL_METAVARS = {"data": "digits|cifar10|cifar100|synthetic|FOLDER", "data_dir": "DIR",
                     "device": "auto|cpu|cuda|cuda:N", "monitor_synapses": "PATTERNS"}


def _metavar(f, typ, own: bool) -> str:
    """How an option's value is written in --help: its choices, or the form of its type."""
    if own and f.name == "rule":
        return "|".join(RULE_NAMES)
    if own and f.name in _SPECIAL_METAVARS:
        return _SPECIAL_METAVARS[f.name]
    choices = _choices(f)
    if choices:
        return "|".join(map(str, choices))
    if typ is bool:
        return "true|false"
    if typing.get_origin(typ) is tuple:
        return "N,N,..."
    if type(None) in typing.get_args(typ):
        return ("X" if float in typing.get_args(typ) else "N") + "|none"
    return {int: "N", float: "X"}.get(typ, "VALUE")


# -- help ------------------------------------------------------------------------------------------

def _shown(value, unit: str | None) -> str:
    """A default as --help writes it: ``60,120,160 epochs``, ``none``, ``0.9``, ``true``."""
    if isinstance(value, tuple):
        value = ",".join(map(str, value)) or "none"
    elif isinstance(value, bool) or value is None:
        value = str(value).lower()
    elif isinstance(value, float):
        value = f"{value:g}"
    return f"{value} {unit}" if unit and value not in ("none",) else str(value)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's layout, wide enough that most options keep their help on their own line."""

    def __init__(self, prog):
        width = min(max(shutil.get_terminal_size((120, 24)).columns, 100), 140)
        super().__init__(prog, width=width, max_help_position=36)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake as a ``UserError`` (one line, exit status 2) instead of
    printing its usage and exiting."""

    def error(self, message):
        head, _, what = message.partition(": ")
        if what == "expected one argument" and head.startswith("argument "):
            raise UserError(f"option {head.removeprefix('argument ').split('/')[0]} needs a value")
        if what.startswith("ignored explicit argument") and head.startswith("argument "):
            raise UserError(f"option {head.removeprefix('argument ')} takes no value")
        if head.startswith("argument ") and "not allowed with argument" in what:
            raise UserError(f"{head.removeprefix('argument ')} and {what.split()[-1]} cannot go together")
        raise UserError(message)


def _usage(prog: str) -> str:
    pad = " " * len(prog)
    return (f"{prog} PRESET [--out DIR] [--quiet | --verbose] [--field-name VALUE ...]\n"
            f"       {prog} --resume RUN_DIR [--epochs N ...]\n"
            f"       {prog} --config RUN_DIR/config.json [--out DIR] [--field-name VALUE ...]\n"
            f"       {pad} (--field-name=VALUE works too; -h, --help: this help)")


def build_parser(prog: str = "run_circuit.py", name: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``neurosim run``; its help shows the defaults of preset ``name`` (None:
    RunConfig's and every rule's own), and the settings of that preset's rule only."""
    base = flat_settings(preset(name)) if name else {
        **flat_settings(RunConfig()), **{k: f.default for k, (_, f) in rule_settings().items()}}
    rule = PRESETS[name]["rule"] if name else None
    rules = ", ".join(RULE_NAMES)
    description = "\n".join([
        *textwrap.wrap(f"Train a circuit. PRESET is <rule>_<model>: rule in {rules}; model in "
                       f"{', '.join(MODEL_FAMILIES)} (e.g. kp_mlp_digits, wm_resnet18). docs/presets.md lists "
                       f"what each preset sets; any setting below can be changed, e.g. --epochs 3 --width 0.25.",
                       100),
        "",
        f"Defaults below are those of {name}." if name else
        f"Defaults below are the base ones; a preset sets some otherwise ({prog} PRESET --help shows its own).",
    ])
    models = [line for name, model in MODELS.items()
              for line in textwrap.wrap(f"{name}: {model.about} (presets {', '.join(f'*_{r}' for r in model.recipes)})",
                                        100, initial_indent="  ", subsequent_indent="    ")]
    epilog = "\n".join(["models, and the presets each brings", *models, "",
                        *textwrap.wrap("presets: " + " ".join(sorted(PRESETS)), 100, subsequent_indent="  ")])
    parser = _Parser(prog=prog, usage=_usage(prog), description=description, epilog=epilog, add_help=False,
                     allow_abbrev=False, formatter_class=_Formatter)
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    out = groups["output"]
    exclusive = out.add_mutually_exclusive_group()
    for flag, metavar, text in COMMAND_OPTIONS:
        target = exclusive if flag in ("--quiet", "--verbose") else out
        if metavar is None:
            target.add_argument(flag, action="store_true", help=text)
        else:
            target.add_argument(flag, metavar=metavar, help=text)
    out.add_argument("-h", "--help", action="store_true", help="this help")
    for f in fields():
        if f.group not in groups:  # a field declared without a known group
            groups[f.group] = parser.add_argument_group(f.group)
        hidden = f.group == "rule" and rule is not None and not f.key.startswith(f"{rule}_")
        shown = f"{f.help} (default: {_shown(base.get(f.key), f.unit)})".replace("%", "%%")
        parser_group = groups[f.group]
        kwargs = dict(dest=f.key, metavar=f.metavar, default=argparse.SUPPRESS,
                      help=argparse.SUPPRESS if hidden else shown)
        if f.type is bool:  # a switch given alone means true
            kwargs.update(nargs="?", const="true")
        parser_group.add_argument(option(f.key), **kwargs)
    if rule is not None:
        groups["rule"].title = f"rule settings ({rule}; other rules' settings apply to their own presets)"
    return parser


def run_usage(name: str | None = None, prog: str = "run_circuit.py") -> str:
    """The help of ``neurosim run`` (``run_circuit.py``), for preset ``name`` or for every preset."""
    return build_parser(prog, name).format_help()


# -- parsing ---------------------------------------------------------------------------------------

def parse_run_args(argv: list[str], prog: str = "run_circuit.py") -> RunRequest | int:
    """What ``argv`` asks ``neurosim run`` to do, or the exit status when it asked for help (0)
    or gave nothing (2, with the usage). A mistake is a ``UserError`` saying what would do."""
    name = argv[0] if argv and not argv[0].startswith("-") else None
    if wants_help(argv):
        if name is not None and name not in PRESETS:
            raise UserError(unknown_preset(name))
        print(run_usage(name, prog), end="")
        return 0
    if not argv:
        print(f"usage: {_usage(prog)}\n\nerror: give a PRESET (e.g. kp_mlp_digits), --resume RUN_DIR or --config "
              f"FILE; {prog} --help lists the presets and options", file=sys.stderr)
        return 2
    parser = build_parser(prog)
    rest = _normalised(argv[1:] if name is not None else argv, parser)
    _refuse_repeats(rest, parser)
    args, extras = parser.parse_known_args(rest)
    given = vars(args)
    if name is None and given.get("resume") is None and given.get("config") is None:
        raise UserError(f"the first argument is the preset (e.g. kp_mlp_digits), not the option {argv[0]}; "
                        f"{prog} --help lists presets and options")
    if extras:
        raise UserError(_unexpected(extras[0], parser))
    if name is not None and name not in PRESETS:
        raise UserError(unknown_preset(name))
    paths = {}
    for key in ("out", "resume", "config"):
        if given.get(key) is not None:
            if not given[key]:
                raise UserError(f"option --{key} needs a {'file' if key == 'config' else 'directory'}")
            paths[key] = Path(given[key])
    if "out" in paths and "resume" in paths:
        raise UserError("--out and --resume cannot go together: --resume continues a run in its own directory")
    if "config" in paths and "resume" in paths:
        raise UserError("--config and --resume cannot go together: --config starts a new run from a saved "
                        "configuration, --resume continues a run with its own")
    if "config" in paths and name is not None:
        raise UserError(f"give a preset or --config, not both: the configuration in {paths['config']} names its "
                        f"own preset")
    types = {f.key: f for f in fields()}
    overrides = {key: _value(types[key], text) for key, text in given.items() if key in types}
    processes = None
    if given.get("nproc_per_node") is not None:
        text = given["nproc_per_node"]
        if not text.strip().isdigit() or not 1 <= int(text) <= 1024:
            raise UserError(f"bad value {text!r} for --nproc-per-node: expected a whole number of processes from 1 "
                            f"to 1024")
        processes = int(text)
    return RunRequest(preset=name, overrides=overrides, quiet=given["quiet"], verbose=given["verbose"],
                      processes=processes, **paths)


def _value(f: Field, text: str):
    """The typed value of one option; a value outside a field's choices is refused here, with
    the closest choice, rather than by the configuration's validator."""
    value = convert_option(option(f.key), text, f.type)
    if f.choices and value not in f.choices:
        close = difflib.get_close_matches(str(value), list(map(str, f.choices)), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UserError(f"bad value {text!r} for {option(f.key)}: expected {_one_of(f.choices)}{hint}")
    return value


def _one_of(choices) -> str:
    names = list(map(str, choices))
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _normalised(args: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``args`` as argparse should read them: ``--batch_size`` as ``--batch-size``, and a value
    that starts with '-' (``--lr -1``, ``--momentum -inf``) joined to its option, which argparse
    would otherwise take for an option itself."""
    known = parser._option_string_actions  # argparse's own table of option strings
    out, i = [], 0
    while i < len(args):
        token = args[i]
        if token.startswith("--"):
            head, eq, value = token.partition("=")
            dashed = "--" + head[2:].replace("_", "-")
            if head not in known and dashed in known:
                token = dashed + eq + value
                head = dashed
            action = known.get(head)
            takes_value = action is not None and action.nargs != 0 and not eq
            if takes_value and i + 1 < len(args) and args[i + 1].startswith("-") and not args[i + 1].startswith("--"):
                out.append(f"{head}={args[i + 1]}")
                i += 2
                continue
        out.append(token)
        i += 1
    return out


def _refuse_repeats(args: list[str], parser: argparse.ArgumentParser) -> None:
    """Refuse an option given twice (``--lr 1 --lr 2``, ``--lr=1 --lr 2``): argparse would keep
    the last and drop the other without a word."""
    known, seen, i = parser._option_string_actions, set(), 0
    while i < len(args):
        head, eq, _ = args[i].partition("=")
        action = known.get(head) if head.startswith("--") else None
        if action is not None:
            if action.dest in seen:
                raise UserError(f"option {head} is given twice; give it once")
            seen.add(action.dest)
            if action.nargs != 0 and not eq and action.nargs != "?":
                i += 1  # its value
        i += 1


def _unexpected(token: str, parser: argparse.ArgumentParser) -> str:
    """One line for the first argument that is not an option of ``parser``, with the closest one."""
    if not token.startswith("-"):
        return f"unexpected argument {token!r}; options are --name value"
    head = token.split("=", 1)[0]
    names = [s for s in parser._option_string_actions if s.startswith("--")]
    close = difflib.get_close_matches(head, names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "; --help lists the options"
    return f"unknown option {head}{hint}"
