"""The ``neurosim`` command: ``neurosim run|evaluate|plot|compare ...`` (also ``python -m neurosim``).

Each sub-command is one of the scripts in ``experiments/`` under a shorter name, with the same
options; ``neurosim COMMAND --help`` shows them.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys

from neurosim.common.errors import UserError

# name → (what it does, "module:function" of its entry, the script it also is)
COMMANDS = {
    "run": ("train a circuit from a preset, a saved configuration, or continue a run",
            "neurosim.tools.cli.run:run_circuit", "experiments/run_circuit.py"),
    "evaluate": ("score a run's checkpoint on a dataset", "neurosim.tools.cli.evaluation:evaluate",
                 "experiments/evaluate.py"),
    "plot": ("draw the figures of runs", "neurosim.tools.cli.plot:plot_run", "experiments/plot_run.py"),
    "compare": ("train every rule on one model and compare them (a study)", "neurosim.tools.study:compare_rules",
                "experiments/compare_rules.py"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join([
        "usage: neurosim COMMAND [ARGS ...]", "",
        "Circuits that learn without weight transport. Commands:", "",
        *[f"  {name:<{width}}  {what}" for name, (what, _, _) in COMMANDS.items()], "",
        "neurosim COMMAND --help shows a command's options; e.g. neurosim run kp_mlp_digits --epochs 3",
        "  -h, --help     this help", "  --version      neurosim's version", ""])


def neurosim(argv: list[str]) -> int:
    """``neurosim COMMAND [ARGS ...]``; returns the exit status."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib import metadata

        print(f"neurosim {metadata.version('neurosim')}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"unknown command {name!r}; {hint}commands: {', '.join(COMMANDS)} (neurosim --help)")
    module, function = COMMANDS[name][1].split(":")
    entry = getattr(importlib.import_module(module), function)
    if "prog" in inspect.signature(entry).parameters:  # its help and messages name it as called
        return entry(rest, prog=f"neurosim {name}")
    return entry(rest)
