"""Rule studies: every plasticity rule trained on one model, seed, data and budget, then compared.

``compare_rules(argv)`` is ``experiments/compare_rules.py``. For a model family ``MODEL`` it trains
the preset ``<rule>_<MODEL>`` of each rule with the same options, one run after another, each by
``experiments/run_circuit.py`` in a process of its own (a crash loses only that run: the study
records it and goes on), into ``STUDY/<rule>/``. The study directory holds

``study.json``          the model, rules and options, the exact command of every run attempt (its
                        exit status, wall time and last lines of output) and each rule's state;
``report.md``           results per rule, per-synapse angles, figures and commands;
``figures/*.png``       accuracy and angle curves across rules;
``logs/<rule>.log``     the whole output of each rule's runs.

A study continues where it stopped: a rule whose run finished is kept, an interrupted run
continues from its checkpoint (``run_circuit.py PRESET --resume STUDY/<rule>``), the others start.
``write_report(study_dir)`` draws the report of a study from its files at any time.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from collections import deque
from pathlib import Path

import attrs

from neurosim.errors import UserError
from neurosim.files import DirectoryLock, describe_os_error, write_atomic
from neurosim.cli import check_new_dir

FORMAT = 1
STUDY_FILE = "study.json"
REPORT_FILE = "report.md"
FIGURES = "figures"
LOGS = "logs"
# Settings a continued study may change: where and how its runs go, not what they learn. These
# are the ones run_circuit.py --resume accepts (neurosim.train.CHANGEABLE_ON_RESUME) but the
# epochs, which are the study's budget.
MACHINE_SETTINGS = ("device", "data_dir", "log_every", "compile", "deterministic")
STUDY_OPTIONS = ("--rules", "--out", "--resume", "--quiet", "--in-process")
TAIL_LINES = 12  # lines of a run's output kept in study.json


def usage() -> str:
    from neurosim.config import MODEL_FAMILIES, RULE_NAMES, rule_aliases

    rules = ",".join(_in_order(RULE_NAMES))
    aliases = ", ".join(f"{a} is {r}" for a, r in rule_aliases().items())
    return "\n".join([
        "usage: compare_rules.py MODEL [--rules RULE,RULE,...] [--out STUDY_DIR] [--quiet] [--in-process]",
        "                        [--field-name VALUE ...]",
        "       compare_rules.py --resume STUDY_DIR [--rules RULE,...] [--quiet] [--in-process] [--field-name VALUE ...]",
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
        "Exit status: 0 every rule trained; 1 some run failed (see the report); 2 bad input; 130 interrupted.",
        "",
    ])


# -- the command line ----------------------------------------------------------------------------

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


def parse_request(argv: list[str]) -> Request:
    from neurosim.config import parse_overrides

    rest = list(argv)
    model = None
    if rest and not rest[0].startswith("-"):
        model, rest = rest[0], rest[1:]
    rules = out = resume = None
    quiet = inside = False
    options: dict[str, str] = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if token in ("--quiet", "--in-process"):
            quiet, inside = quiet or token == "--quiet", inside or token == "--in-process"
            i += 1
            continue
        if not token.startswith("--"):
            raise UserError(f"unexpected argument {token!r}: MODEL comes first (e.g. compare_rules.py mlp_digits "
                            f"--epochs 5), then options as --name value; compare_rules.py --help lists them")
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
            options.pop(key, None)  # the last one given counts, in its place
            options[key] = value
        i += 2
    return Request(model=model, rules=rules, out=out, resume=resume, quiet=quiet, inside=inside, options=options)


def parse_rules(text: str) -> tuple[str, ...]:
    """``"bp,fa,kp"`` → the rules named, each name once, in the order given (checked to be
    registered; an alias counts as registered). Two names of one rule (``ss,usf``) both stay here:
    ``one_name_per_rule`` picks the one a study trains."""
    from neurosim.config import rules_listed
    from neurosim.rules import RULES

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
    from neurosim.config import RULE_NAMES

    registered = list(RULE_NAMES)
    rules = list(dict.fromkeys(rules))

    def position(r):
        r = _rule_of(r)
        return registered.index(r) if r in registered else len(registered)

    return sorted(rules, key=lambda r: (_rule_of(r) != "bp", position(r), rules.index(r)))


def check_model(model: str) -> None:
    from neurosim.config import MODEL_FAMILIES
    from neurosim.rules import RULES

    if model in MODEL_FAMILIES:
        return
    rule, _, family = model.partition("_")
    if rule in RULES and family in MODEL_FAMILIES:
        raise UserError(f"{model} is a preset; a study's MODEL is a model family, here {family} (add --rules {rule} "
                        f"to train {rule} alone)")
    raise UserError(f"unknown model {model!r}; MODEL is one of {', '.join(MODEL_FAMILIES)}")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _typed(options: dict) -> dict:
    from neurosim.config import parse_overrides

    return parse_overrides([t for key, value in options.items() for t in (_flag(key), value)])


def _rule_options(rule: str, options: dict) -> dict:
    """The options a rule's run gets: every common one, and that rule's own settings only."""
    from neurosim.config import rule_settings

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
    from neurosim.cli import check_device
    from neurosim.config import preset, rule_settings, rules_listed
    from neurosim.rules import RULES

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
    from neurosim.config import flat_settings, preset, rule_settings

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
    from neurosim.config import rule_settings

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


# -- the study directory -------------------------------------------------------------------------

def read_study(study_dir: Path) -> dict | None:
    """The contents of ``study.json`` (None when there is none), checked to be a study."""
    path = Path(study_dir) / STUDY_FILE
    if not path.exists():
        return None
    fix = f"repair it, or move {path} away to start the study's bookkeeping anew (its runs are kept)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {describe_os_error(e)}") from None
    except ValueError as e:
        raise UserError(f"{path} is damaged: it is not JSON ({str(e).splitlines()[0][:120]}); {fix}") from None
    shape = {"format": int, "model": str, "rules": list, "options": dict, "runs": dict}
    bad = [k for k, kind in shape.items() if not isinstance(data, dict) or not isinstance(data.get(k), kind)]
    if bad:
        raise UserError(f"{path} is not a study file (it lacks a valid {', '.join(bad)}); {fix}")
    if data["format"] != FORMAT:
        raise UserError(f"{path} has format {data['format']}; this version reads format {FORMAT}")
    return data


def write_study(study_dir: Path, data: dict) -> None:
    data["updated"] = _now()
    write_atomic(Path(study_dir) / STUDY_FILE, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode(), what="study state")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def check_study_dir(path: Path) -> None:
    """Refuse a place that cannot hold a study: a file, a folder of other things, an unwritable one."""
    check_new_dir(path, "study", STUDY_FILE)


def _lock(study_dir: Path) -> DirectoryLock:
    try:
        return DirectoryLock(study_dir)
    except UserError:
        try:
            holder = (study_dir / ".lock").read_text(errors="replace").strip()
        except OSError:
            holder = ""
        raise UserError(f"the study {study_dir} is in use by {holder or 'another process'}; wait for it to finish, "
                        f"or stop it (Ctrl-C) and continue it with compare_rules.py --resume {study_dir}") from None


def run_state(run_dir: Path, epochs: int) -> str:
    """``new`` (no run there yet), ``started`` (configured, no checkpoint), ``partial`` (a checkpoint,
    epochs to go) or ``done`` (its metrics hold the last epoch)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        return "new"
    if not (run_dir / "last.pt").exists():
        return "started"
    return "done" if epochs_done(run_dir) >= epochs else "partial"


def epochs_done(run_dir: Path) -> int:
    from neurosim.run_log import metrics_records

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    try:
        return max((int(r["epoch"]) for r in metrics_records(path)), default=0)
    except UserError:
        return 0  # damaged: the run's own resume names the problem


def _self_command() -> list[str]:
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is not None and script.name == "compare_rules.py":
        return ["python", str(script)]
    return ["python", "experiments/compare_rules.py"]


def run_circuit_command() -> list[str]:
    """How a run is started: this Python with experiments/run_circuit.py (relative to the working
    directory where it lies below it), or the same entry through ``-c`` where the script is absent."""
    script = Path(__file__).resolve().parents[1] / "experiments" / "run_circuit.py"
    if not script.is_file():
        return [sys.executable, "-c", "from neurosim.cli import main, run_circuit; main(run_circuit)"]
    shown = os.path.relpath(script)
    return [sys.executable, shown if not shown.startswith("..") else str(script)]


def run_args(plan: Plan, rule: str, run_dir: Path, resume: bool) -> list[str]:
    """The arguments of one rule's run_circuit.py: its preset, its directory, the options that apply
    to it."""
    options = _rule_options(rule, plan.options)
    return [f"{rule}_{plan.model}", "--resume" if resume else "--out", str(run_dir),
            *[t for key, value in options.items() for t in (_flag(key), value)]]


# -- running ---------------------------------------------------------------------------------------

class Runner:
    """Runs one rule's run at a time: by default in a child process (a crash loses only that run),
    with ``inside`` in this process (no start-up per run; for small models, a crash ends the study).

    A SIGINT, SIGTERM or SIGHUP to the study stops the current run the way a Ctrl-C stops
    run_circuit.py: it saves its checkpoint and ends; then the study ends too. A child has a process
    group of its own, so a Ctrl-C at the terminal reaches it once, passed on by the study (the
    others as SIGTERM); a second Ctrl-C stops it at once."""

    SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)

    def __init__(self, echo: bool, inside: bool = False):
        self.echo, self.inside = echo, inside
        self.proc: subprocess.Popen | None = None
        self.running_inside = False
        self.stop: int | None = None  # the first signal that asked the study to stop
        self._previous = {}

    def __enter__(self):
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False

    def _on_signal(self, signum, frame):
        first = self.stop is None
        if first:
            self.stop = signum
        if self.proc is not None and self.proc.poll() is None:
            self._forward(signum)
        elif self.running_inside:
            # A run in this process handles Ctrl-C itself once it trains; before that (loading
            # data, building the circuit) or for another signal, it stops here and saves nothing new.
            raise KeyboardInterrupt
        elif not first and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C between runs: stop now

    def _forward(self, signum):
        try:
            self.proc.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
        except ProcessLookupError:
            pass

    def run(self, prefix: list[str], args: list[str], log_path: Path, label: str) -> tuple[int, float, list[str]]:
        """Run ``prefix + args`` (``args`` alone, to run_circuit, when inside); its output goes to
        ``log_path`` (appended) and, unless quiet, to stderr with ``[label]`` before each line.
        Returns (exit status, wall seconds, last lines of output)."""
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(log_path, "ab") as log:
            how = "in the study's process" if self.inside else ""
            log.write(f"\n$ {shlex.join([*prefix, *args])}    # {_now()}, in {os.getcwd()} {how}\n".encode())
            log.flush()
            lines = _Lines(log, tail, label if self.echo else None)
            code = self._inside(args, lines) if self.inside else self._child([*prefix, *args], lines)
            lines.close()
            wall = time.monotonic() - t0
            log.write(f"# exit status {code} after {wall:.1f} s\n".encode())
        return code, wall, list(tail)

    def _child(self, argv: list[str], lines: "_Lines") -> int:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, **group)
        try:
            if self.stop is not None:  # asked to stop while it was starting
                self._forward(self.stop)
            for raw in self.proc.stdout:
                lines.write(raw.decode(errors="replace"))
            return self.proc.wait()
        finally:
            if self.proc.poll() is None:  # the study itself is failing: leave no run behind
                self.proc.terminate()
                try:
                    self.proc.wait(60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc.stdout.close()
            self.proc = None

    def _inside(self, args: list[str], lines: "_Lines") -> int:
        """run_circuit.py's entry in this process, its output captured: the exit status it would have."""
        import contextlib
        import gc
        import traceback

        from neurosim.cli import main, run_circuit

        if self.stop is not None:
            return 130
        self.running_inside = True
        try:
            with contextlib.redirect_stdout(lines), contextlib.redirect_stderr(lines):
                try:
                    main(run_circuit, list(args))
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except KeyboardInterrupt:  # before the run installed its own Ctrl-C handler
                    print("interrupted while starting; its directory holds what it held before", file=sys.stderr)
                    code = 130
                except Exception:
                    traceback.print_exc()  # a bug: the traceback goes to the log, the study goes on
                    code = 1
        finally:
            self.running_inside = False
        gc.collect()
        return code


class _Lines:
    """Output of a run, whole lines at a time: appended to its log, kept in ``tail`` and, with a
    label, shown on stderr. Also the file a run inside the study's process writes to."""

    def __init__(self, log, tail: deque, label: str | None):
        self.log, self.tail, self.label = log, tail, label
        self.out = sys.stderr
        self.pending = ""

    def write(self, text: str) -> int:
        self.log.write(text.encode(errors="replace"))
        self.log.flush()
        self.pending += text
        *whole, self.pending = self.pending.split("\n")
        for line in whole:
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        line = line.replace("\r", "")
        self.tail.append(line)
        if self.label is not None:
            print(f"[{self.label}] {line}", file=self.out, flush=True)

    def flush(self) -> None:
        self.log.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        if self.pending:
            self._line(self.pending)
            self.log.write(b"\n")
            self.pending = ""


def compare_rules(argv: list[str]) -> int:
    """``compare_rules.py MODEL [...]``; returns the exit status (run it through ``neurosim.cli.main``)."""
    from neurosim.cli import unique_run_dir, wants_help

    if not argv or wants_help(argv):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    req = parse_request(argv)
    from neurosim.distributed import launched

    if launched().distributed:
        raise UserError("compare_rules.py trains its runs one after another from a single process; start it "
                        "without torchrun")
    if req.out is not None and req.resume is not None:
        raise UserError("--out and --resume cannot go together: --resume continues the study in its own directory")
    if req.resume is not None:
        study_dir = req.resume
        if not study_dir.is_dir():
            raise UserError(f"no study directory {study_dir}; give the directory of a study made by compare_rules.py")
        stored = read_study(study_dir)
        if stored is None and (study_dir / "config.json").exists():
            parent = study_dir.parent
            study = (f"; the study it belongs to continues with compare_rules.py --resume {parent}"
                     if (parent / STUDY_FILE).exists() else "")
            raise UserError(f"{study_dir} is a run, not a study: run_circuit.py PRESET --resume {study_dir} continues "
                            f"it{study}")
        if stored is None:
            raise UserError(f"{study_dir} holds no study ({STUDY_FILE}); start one with compare_rules.py MODEL "
                            f"--out {study_dir}")
        model = req.model or stored["model"]
        options = {**stored["options"], **req.options}
    else:
        if req.model is None:
            raise UserError("give the MODEL first (e.g. compare_rules.py mlp_digits --epochs 5), or --resume "
                            "STUDY_DIR to continue a study")
        model = req.model
        check_model(model)
        study_dir = req.out if req.out is not None else unique_run_dir(Path("studies"), model)
        check_study_dir(study_dir)
        stored = read_study(study_dir) if study_dir.is_dir() else None
        options = dict(req.options)
    check_model(model)
    if stored is not None and stored["model"] != model:
        raise UserError(f"{study_dir} holds a study of {stored['model']}, not {model}; continue it with "
                        f"compare_rules.py --resume {study_dir}, or choose another --out for a study of {model}")
    from neurosim.config import RULE_NAMES

    if req.rules is not None:
        train = req.rules
    elif stored is not None and req.resume is not None:
        train = tuple(stored["rules"])
    else:
        train = tuple(_in_order(RULE_NAMES))
    train, notes = one_name_per_rule(train, held=stored["rules"] if stored else ())
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    plan = plan_study(model, [*(stored["rules"] if stored else []), *train], options)
    if stored is not None:
        _check_same_study(study_dir, stored, plan)
    if req.resume is not None and not os.access(study_dir, os.W_OK | os.X_OK):
        raise UserError(f"cannot continue the study {study_dir}: it is not writable (read-only or permission denied)")
    created = not study_dir.exists()
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the study directory {study_dir}: {describe_os_error(e)}") from None
    lock = _lock(study_dir)
    try:
        data = stored or {"format": FORMAT, "model": model, "created": _now(), "runs": {}}
        data.update(rules=list(plan.rules), options=dict(plan.options),
                    epochs={r: plan.configs[r].epochs for r in plan.rules})
        for rule in plan.rules:
            data["runs"].setdefault(rule, {"preset": f"{rule}_{model}", "dir": rule, "state": "pending",
                                           "wall_s": 0.0, "attempts": []})
        try:
            write_study(study_dir, data)
        except UserError:
            if created:
                lock.release()
                (study_dir / ".lock").unlink(missing_ok=True)
                study_dir.rmdir()
            raise
        print(f"study directory: {study_dir} ({model}; training {','.join(train)})", file=sys.stderr)
        return _train(study_dir, plan, data, train, quiet=req.quiet, inside=req.inside)
    finally:
        lock.release()


def _train(study_dir: Path, plan: Plan, data: dict, train, quiet: bool, inside: bool) -> int:
    failed, stopped_in = [], None
    width = max(map(len, train))
    with Runner(echo=not quiet, inside=inside) as runner:
        for n, rule in enumerate(train, 1):
            if runner.stop is not None:
                break
            run_dir = study_dir / rule
            cfg = plan.configs[rule]
            entry = data["runs"][rule]
            state = run_state(run_dir, cfg.epochs)
            if state == "done":
                if entry["state"] != "done":
                    entry["state"] = "done"
                    write_study(study_dir, data)
                print(f"[{n}/{len(train)}] {rule:<{width}}  done earlier  {_result_line(run_dir)}", flush=True)
                continue
            prefix, args = run_circuit_command(), run_args(plan, rule, run_dir, resume=state != "new")
            attempt = {"command": [*prefix, *args], "cwd": os.getcwd(), "in_process": inside, "started": _now(),
                       "exit": None, "wall_s": None, "outcome": "running", "tail": []}
            entry["attempts"].append(attempt)
            entry["state"] = "running"
            write_study(study_dir, data)
            if quiet:
                what = "continuing" if state == "partial" else "training"
                print(f"[{n}/{len(train)}] {rule:<{width}}  {what} ({shlex.join(args)})", file=sys.stderr, flush=True)
            code, wall, tail = runner.run(prefix, args, study_dir / LOGS / f"{rule}.log", rule)
            finished = run_state(run_dir, cfg.epochs) == "done"
            if finished:  # trained to the end, even if stopped or failing afterwards (in its figures)
                outcome = "done"
            elif code == 130 or (runner.stop is not None and code < 0):
                outcome = "interrupted"
            else:
                outcome = "failed"
            attempt.update(exit=code, wall_s=round(wall, 3), outcome=outcome, tail=tail)
            if outcome == "failed" and code == 0:
                attempt["tail"] = [*tail, f"error: the run ended with status 0 at epoch {epochs_done(run_dir)} "
                                          f"of {cfg.epochs}"]
            entry["state"] = outcome
            entry["wall_s"] = round(sum(a["wall_s"] or 0.0 for a in entry["attempts"]), 3)
            write_study(study_dir, data)
            head = f"[{n}/{len(train)}] {rule:<{width}}"
            if outcome == "done":
                late = f" ({_exit_words(code)} after training; see {study_dir / LOGS / f'{rule}.log'})" if code else ""
                print(f"{head}  done  {_result_line(run_dir)}  wall {_duration(wall)}{late}", flush=True)
            elif outcome == "failed":
                failed.append(rule)
                print(f"{head}  FAILED ({_exit_words(code)} after {_duration(wall)}): "
                      f"{_shorten(failure_text(attempt['tail']), 300)}  (output: {study_dir / LOGS / f'{rule}.log'})",
                      flush=True)
            else:
                stopped_in = rule  # by a signal to the study, or to the run alone: the study stops too
                print(f"{head}  interrupted after {_duration(wall)}", flush=True)
            if runner.stop is not None or stopped_in is not None:
                break
        report = write_report(study_dir)
    print(f"report: {report}", file=sys.stderr)
    again = shlex.join([*_self_command(), "--resume", str(study_dir)])
    if runner.stop is not None or stopped_in is not None:
        left = [r for r in train if run_state(study_dir / r, plan.configs[r].epochs) != "done"]
        if stopped_in is None:
            where = "it stopped between runs"
        elif (study_dir / stopped_in / "last.pt").exists():
            where = f"{stopped_in}'s run stopped with its checkpoint saved, and continues from there"
        else:
            where = f"{stopped_in}'s run stopped before its first checkpoint, and starts again"
        print(f"study interrupted: {where}; {len(left)} rule{'s' if len(left) != 1 else ''} to go "
              f"({','.join(left) or 'none'}). Continue it with: {again}", file=sys.stderr)
        return 130
    if failed:
        print(f"{len(failed)} of {len(train)} runs failed ({','.join(failed)}); see {report}. Running the study again "
              f"({again}) tries them again", file=sys.stderr)
        return 1
    return 0


def _exit_words(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"exit status {code}"


def failure_text(tail: list[str]) -> str:
    """What went wrong, from a run's last lines: its ``error:`` line, or the end of a traceback."""
    errors = [line for line in tail if line.startswith("error: ")]
    if errors:
        return errors[-1][len("error: "):]
    lines = [line.strip() for line in tail if line.strip()]
    return " / ".join(lines[-3:]) or "no output"


def _shorten(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _degrees(angle) -> str:
    """An angle as the report writes it; ``n/a`` where it is undefined (no feedback matrix)."""
    if angle is None or not isinstance(angle, (int, float)) or angle != angle:
        return "n/a"
    return f"{angle:.2f}" if abs(angle) < 1 else f"{angle:.1f}"


def _result_line(run_dir: Path) -> str:
    from neurosim.run_log import metrics_records

    try:
        m = metrics_records(run_dir / "metrics.jsonl")[-1]
    except (UserError, OSError, IndexError):
        return ""
    angle = _degrees(m.get("mean_angle"))
    return (f"top-1 {m['test_acc']:.2f}%  top-5 {m['test_top5']:.2f}%  mean W–Bᵀ angle "
            f"{angle + '°' if angle != 'n/a' else 'n/a (no feedback matrix)'}")


# -- the report ------------------------------------------------------------------------------------

@attrs.define
class RuleResult:
    """What a study's report says of one rule, read from its run's files and ``study.json``."""

    rule: str
    state: str  # done, failed, interrupted, running, pending
    epochs: int  # the study's budget
    records: list  # metrics.jsonl, epoch 0 (before training) included
    wall_s: float | None
    error: str | None = None  # what went wrong, for a failed run
    exit: int | None = None
    command: list | None = None
    monitor_note: str | None = None
    delta: dict | None = None  # synapse -> delta angle (degrees) at the last probed step
    grad: dict | None = None  # synapse -> ΔW-vs-gradient angle at that step
    delta_step: int | None = None
    delta_curve: tuple | None = None  # (steps, mean delta angle over synapses)

    @property
    def trained(self) -> list:
        return [r for r in self.records if r.get("epoch", 0) >= 1]

    @property
    def final(self) -> dict | None:
        return self.trained[-1] if self.trained else None

    def recent_mean(self, key: str, epochs: int = 3) -> float | None:
        """``key`` averaged over the last ``epochs`` trained epochs (fewer if fewer were trained): at a
        constant learning rate the test accuracy moves by points from one epoch to the next."""
        tail = self.trained[-epochs:]
        return sum(r[key] for r in tail) / len(tail) if tail else None

    def best(self, key: str) -> tuple[float, int] | None:
        if not self.trained:
            return None
        top = max(self.trained, key=lambda r: r[key])
        return top[key], top["epoch"]

    @property
    def has_angles(self) -> bool:
        return self.final is not None and any(_finite(a) for a in self.final["angles"].values())


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def collect(study_dir: Path, data: dict) -> list[RuleResult]:
    from neurosim.run_log import metrics_records

    out = []
    for rule in data["rules"]:
        entry = data["runs"].get(rule, {})
        run_dir = Path(study_dir) / rule
        epochs = int(data.get("epochs", {}).get(rule, 0))
        records, note = [], None
        if (run_dir / "metrics.jsonl").exists():
            try:
                records = metrics_records(run_dir / "metrics.jsonl")
            except UserError as e:
                note = str(e)
        attempts = entry.get("attempts") or []
        last = attempts[-1] if attempts else {}
        state, files = entry.get("state", "pending"), run_state(run_dir, epochs)
        if files == "done":
            state = "done"
        elif state in ("done", "running"):  # its files say otherwise now / a study that was killed
            state = "pending" if files == "new" else "interrupted"
        r = RuleResult(rule=rule, state=state, epochs=epochs, records=records, wall_s=entry.get("wall_s"),
                       exit=last.get("exit"), command=last.get("command"))
        if state == "failed":
            r.error = failure_text(last.get("tail") or [])
        if note:
            r.error = note if r.error is None else f"{r.error}; {note}"
        _read_monitor(r, run_dir)
        out.append(r)
    return out


def _read_monitor(r: RuleResult, run_dir: Path) -> None:
    import numpy as np

    from neurosim.monitor_files import load_monitor

    if not (run_dir / "monitor.npz").exists():
        return
    try:
        rec = load_monitor(run_dir)
    except UserError as e:
        r.monitor_note = str(e)
        return
    finite = np.isfinite(rec.delta_angle)
    rows = np.flatnonzero(finite.any(1))
    if not len(rows):
        return
    last = rows[-1]
    r.delta_step = int(rec.steps[last])
    r.delta = {s: float(rec.delta_angle[last, i]) for i, s in enumerate(rec.synapses)}
    r.grad = {s: float(rec.grad_angle[last, i]) for i, s in enumerate(rec.synapses)}
    with np.errstate(all="ignore"):
        means = np.nanmean(np.where(finite[rows], rec.delta_angle[rows], np.nan), axis=1)
    r.delta_curve = (rec.steps[rows].astype(float).tolist(), means.tolist())


def _points(v: float) -> str:
    return f"{v:+.2f}".replace("-", "−")


def write_report(study_dir: Path) -> Path:
    """Write ``report.md`` and its figures from a study's files; returns the report's path."""
    study_dir = Path(study_dir)
    data = read_study(study_dir)
    if data is None:
        raise UserError(f"{study_dir} holds no study ({STUDY_FILE})")
    results = collect(study_dir, data)
    figures = draw_figures(study_dir, data["model"], results)
    text = report_markdown(study_dir, data, results, figures)
    path = study_dir / REPORT_FILE
    write_atomic(path, text.encode(), what="report")
    return path


def report_markdown(study_dir: Path, data: dict, results: list[RuleResult], figures: list[tuple[str, str]]) -> str:
    model, options = data["model"], data["options"]
    shown = " ".join(f"{_flag(k)} {shlex.quote(v)}" for k, v in options.items()) or "none"
    counts = {}
    for r in results:
        counts[r.state] = counts.get(r.state, 0) + 1
    bp = next((r for r in results if r.rule == "bp" and r.final is not None), None)
    lines = [
        f"# Plasticity rules compared on `{model}`",
        "",
        f"Each rule trained its preset `<rule>_{model}` with the same options, seed and budget; options: "
        f"`{shown}`{_budget(study_dir, data)}. {len(results)} rule{'s' if len(results) != 1 else ''}: "
        + ", ".join(f"{n} {s}" for s, n in counts.items()) + f". Written {_now()}.",
        "",
        f"Runs are in `<rule>/` beside this file, each run's output in `{LOGS}/<rule>.log`, the study's state "
        f"and the command of every attempt in `{STUDY_FILE}`.",
        "",
        "## Results",
        "",
        "Test accuracy in percent at the final epoch, averaged over the last three epochs (last 3) and "
        "at the best one (its epoch in brackets)"
        + ("; vs BP: final top-1 minus bp's, in points" if bp else "")
        + "; mean W–Bᵀ angle: over synapses, at the final epoch (n/a: the rule has no feedback matrix); "
          "wall time: every attempt of the run, start-up included.",
        "",
        "| rule | state | epochs | top-1 | top-5 | top-1 last 3 | best top-1 | best top-5 |" + (" vs BP |" if bp else "")
        + " mean W–Bᵀ angle (°) | wall time |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if bp else "") + " ---: | ---: |",
    ]
    for r in results:
        f = r.final
        done = f"{f['epoch'] if f else 0}/{r.epochs}"
        cells = [f"**{r.rule}**", r.state, done]
        if f is None:
            cells += ["—"] * (5 + bool(bp) + 1)
        else:
            b1, b5 = r.best("test_acc"), r.best("test_top5")
            cells += [f"{f['test_acc']:.2f}", f"{f['test_top5']:.2f}", f"{r.recent_mean('test_acc'):.2f}",
                      f"{b1[0]:.2f} ({b1[1]})", f"{b5[0]:.2f} ({b5[1]})"]
            if bp:
                cells.append("—" if r.rule == "bp" else _points(f["test_acc"] - bp.final["test_acc"]))
            cells.append(_degrees(f.get("mean_angle")))
        cells.append(_duration(r.wall_s))
        lines.append("| " + " | ".join(cells) + " |")
    failures = [r for r in results if r.state == "failed" or (r.error and r.state != "done")]
    if failures:
        lines += ["", "## Failures", ""]
        for r in failures:
            what = _exit_words(r.exit) if r.exit is not None else "no exit status"
            lines.append(f"- **{r.rule}** ({what}): {_md_inline(r.error or 'unknown')} — whole output: "
                         f"`{LOGS}/{r.rule}.log`")
    unfinished = [r.rule for r in results if r.state in ("interrupted", "running", "pending")]
    if unfinished:
        lines += ["", f"Not finished: {', '.join(unfinished)}; `compare_rules.py --resume {study_dir}` continues "
                      f"the study."]
    with_angles = [r for r in results if r.final is not None]
    if with_angles:
        names = list(dict.fromkeys(s for r in with_angles for s in r.final["angles"]))
        lines += ["", "## W–Bᵀ angle per synapse at the final epoch (degrees)", "",
                  "Angle between each synapse's forward weight W and its feedback matrix Bᵀ (the last record of "
                  "`metrics.jsonl`); n/a where the rule has no feedback matrix.", ""]
        lines += _synapse_table(names, [(r.rule, r.final["angles"]) for r in with_angles])
    probed = [r for r in results if r.delta is not None]
    if probed:
        names = list(dict.fromkeys(s for r in probed for s in r.delta))
        steps = ", ".join(f"{r.rule} {r.delta_step}" for r in probed)
        lines += ["", "## Delta angle per synapse at the end (degrees)", "",
                  "Angle between the error each synapse's output receives under the rule and the error backprop "
                  "would deliver, on the monitor's fixed probe batch, at the last recorded step (`monitor.npz`; "
                  f"steps: {steps}). The synapse into the output population gets the loss's own error: 0°.", ""]
        lines += _synapse_table(names, [(r.rule, r.delta) for r in probed])
        lines += ["", "## Update angle per synapse at the end (degrees)", "",
                  "Angle between each synapse's update ΔW under the rule and the true gradient, on the same "
                  "probe batch and step.", ""]
        lines += _synapse_table(names, [(r.rule, r.grad) for r in probed])
    notes = [f"- {r.rule}: {_md_inline(r.monitor_note)}" for r in results if r.monitor_note]
    if notes:
        lines += ["", "Monitor files that could not be read:", "", *notes]
    lines += ["", "## Figures", ""]
    if figures:
        for caption, rel in figures:
            lines += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
    else:
        lines += ["None yet: no run has finished an epoch.", ""]
    lines += ["## Commands", "", "The study:", "", "```",
              shlex.join([*_self_command(), model, "--rules", ",".join(data["rules"]), "--out", str(study_dir),
                          *[t for k, v in options.items() for t in (_flag(k), v)]]),
              "```", "", "Each rule's run (its last attempt; every attempt is in `study.json`):", "", "```"]
    for r in results:
        lines.append(shlex.join(r.command) if r.command else f"# {r.rule}: not started")
    lines += ["```", ""]
    return "\n".join(lines)


def _budget(study_dir: Path, data: dict) -> str:
    """`` (data X, seed S, N epochs)`` as the runs' configurations say, where one can be read."""
    epochs = sorted(set(data.get("epochs", {}).values()))
    said = []
    for rule in data["rules"]:
        try:
            cfg = json.loads((Path(study_dir) / rule / "config.json").read_text(encoding="utf-8"))
            said = [f"data {cfg['data']}", f"seed {cfg['seed']}"]
            break
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if epochs:
        said.append(f"{'/'.join(map(str, epochs))} epoch{'s' if epochs != [1] else ''}")
    return f" ({', '.join(said)})" if said else ""


def _md_inline(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _synapse_table(names: list[str], columns: list[tuple[str, dict]]) -> list[str]:
    lines = ["| synapse | " + " | ".join(rule for rule, _ in columns) + " |",
             "| --- | " + " | ".join("---:" for _ in columns) + " |"]
    for name in names:
        lines.append(f"| `{name}` | " + " | ".join(_degrees(values.get(name)) if name in values else "—"
                                                  for _, values in columns) + " |")
    return lines


# -- figures -----------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_figures(study_dir: Path, model: str, results: list[RuleResult]) -> list[tuple[str, str]]:
    """The comparison figures (PNG, 100 dpi) in ``STUDY/figures/``: (caption, path relative to STUDY)."""
    from neurosim.plots import save_figure

    plt = _pyplot()
    runs = [r for r in results if r.trained]
    if not runs:
        return []
    folder = study_dir / FIGURES
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make {folder}: {describe_os_error(e)}") from None
    palette = plt.get_cmap("tab10")
    index = {r.rule: i for i, r in enumerate(results)}

    def style(rule):
        i = index[rule]
        return {"color": palette(i % 10), "ls": "-" if i < 10 else "--"}

    def marker(n):
        return "." if n <= 40 else ""

    written = []

    def save(fig, name, caption):
        save_figure(fig, folder / name, dpi=100)
        written.append((caption, f"{FIGURES}/{name}"))

    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    for r in runs:
        ax.plot([m["epoch"] for m in r.records], [m["test_acc"] for m in r.records], label=r.rule,
                marker=marker(len(r.records)), **style(r.rule))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(f"{model}: test accuracy by epoch", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(runs) > 5 else 1)
    save(fig, "accuracy_by_epoch.png", "Test top-1 accuracy by epoch, one line per rule")

    angled = [r for r in runs if r.has_angles]
    without = [r.rule for r in runs if not r.has_angles]
    note = f" (n/a: {', '.join(without)})" if without else ""
    if angled:
        fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
        for r in angled:
            pts = [(m["epoch"], m["mean_angle"]) for m in r.records if _finite(m.get("mean_angle"))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=r.rule, marker=marker(len(pts)), **style(r.rule))
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean angle between W and Bᵀ (degrees)")
        _angle_axis(ax)
        ax.set_title(f"{model}: forward/feedback alignment by epoch{note}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2 if len(angled) > 5 else 1)
        save(fig, "angle_by_epoch.png", f"Mean W–Bᵀ angle over synapses by epoch, one line per rule{note}")

        names = list(dict.fromkeys(s for r in angled for s in r.final["angles"]))
        fig, ax = plt.subplots(figsize=(max(7, 0.3 * len(names) + 3), 4.4), layout="constrained")
        for r in angled:
            a = r.final["angles"]
            ys = [a.get(s, math.nan) for s in names]
            ax.plot(range(len(names)), [y if _finite(y) else math.nan for y in ys], label=r.rule, marker="o", ms=3,
                    **style(r.rule))
        _synapse_axis(ax, names)
        ax.set_ylabel("angle between W and Bᵀ (degrees)")
        _angle_axis(ax)
        ax.set_title(f"{model}: W–Bᵀ angle per synapse at the final epoch{note}", fontsize=10)
        ax.legend(fontsize=8, ncol=2 if len(angled) > 5 else 1)
        save(fig, "angle_per_synapse.png", f"W–Bᵀ angle per synapse at the final epoch, input to output{note}")

    probed = [r for r in results if r.delta_curve is not None]
    if probed:
        names = list(dict.fromkeys(s for r in probed for s in r.delta))
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained")
        for r in probed:
            steps, means = r.delta_curve
            axes[0].plot(steps, means, label=r.rule, marker=marker(len(steps)), **style(r.rule))
            axes[1].plot(range(len(names)), [r.delta.get(s, math.nan) for s in names], label=r.rule, marker="o",
                         ms=3, **style(r.rule))
        axes[0].set_xlabel("training step (engaged optimizer steps)")
        axes[0].set_ylabel("mean delta angle over synapses (degrees)")
        axes[0].set_title("error delivered vs backprop's, by step", fontsize=10)
        axes[0].grid(alpha=0.3)
        _synapse_axis(axes[1], names)
        axes[1].set_ylabel("delta angle (degrees)")
        axes[1].set_title("per synapse, at the last recorded step", fontsize=10)
        for ax in axes:
            _angle_axis(ax)
        axes[0].legend(fontsize=8, ncol=2 if len(probed) > 5 else 1)
        fig.suptitle(f"{model}: delta angle (the error each synapse receives vs backprop's, on the probe batch)",
                     fontsize=11)
        save(fig, "delta_angle.png", "Delta angle: mean over synapses by step, and per synapse at the end")
    return written


def _angle_axis(ax) -> None:
    """From 0° to a little above the largest angle drawn, and never narrower than 1° (backprop's
    angles are zero up to rounding; a narrower axis would magnify the rounding)."""
    import numpy as np

    values = [y for line in ax.get_lines() for y in np.asarray(line.get_ydata(), dtype=float) if np.isfinite(y)]
    ax.set_ylim(0, max(1.0, 1.08 * max(values, default=0.0)))


def _synapse_axis(ax, names: list[str]) -> None:
    ax.set_xticks(range(len(names)))
    if len(names) <= 40:
        ax.set_xticklabels(names, rotation=90 if len(names) > 6 else 0, fontsize=7 if len(names) > 12 else 8)
    ax.set_xlabel("synapse (input to output)")
    ax.grid(alpha=0.3)
