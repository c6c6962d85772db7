"""Running a study: ``compare_rules(argv)`` is ``experiments/compare_rules.py`` (``neurosim compare``).

For a model family ``MODEL`` it trains the preset ``<rule>_<MODEL>`` of each rule with the same
options, one run after another, each by ``experiments/run_circuit.py`` in a process of its own (a
crash loses only that run: the study records it and goes on), into ``STUDY/<rule>/``. The study
directory holds

``study.json``          the model, rules and options, the exact command of every run attempt (its
                        exit status, wall time and last lines of output) and each rule's state;
``report.md``           results per rule, per-synapse angles, figures and commands;
``figures/*.png``       accuracy and angle curves across rules;
``dashboard.html``      every rule's run overlaid in one self-contained page (``neurosim.tools.dashboard``),
                        written at the study's end (``plot_run.py STUDY --html`` redraws it);
``logs/<rule>.log``     the whole output of each rule's runs.

A study continues where it stopped: a rule whose run finished is kept, an interrupted run
continues from its checkpoint (``run_circuit.py PRESET --resume STUDY/<rule>``), the others start.
Below it: ``neurosim.tools.study.plan`` (the command line and its checks) and ``neurosim.tools.study.report``
(the study's files and its report).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from neurosim.common.errors import UserError
from neurosim.common.files import DirectoryLock, describe_os_error
from neurosim.tools.cli import check_new_dir
from neurosim.tools.study.plan import (
    Plan,
    _check_same_study,
    _in_order,
    _rule_options,
    check_model,
    one_name_per_rule,
    parse_request,
    plan_study,
    usage,
)
from neurosim.tools.study.report import (
    FORMAT,
    LOGS,
    STUDY_FILE,
    _degrees,
    _duration,
    _exit_words,
    _flag,
    _now,
    _self_command,
    epochs_done,
    failure_text,
    read_study,
    run_state,
    write_report,
    write_study,
)

TAIL_LINES = 12  # lines of a run's output kept in study.json


# -- the study directory: its place, its lock, its runs' commands ----------------------------------

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


def run_circuit_command() -> list[str]:
    """How a run is started: this Python with experiments/run_circuit.py (relative to the working
    directory where it lies below it), or the same entry through ``-c`` where the script is absent."""
    script = Path(__file__).resolve().parents[2] / "experiments" / "run_circuit.py"
    if not script.is_file():
        return [sys.executable, "-c", "from neurosim.tools.cli import main, run_circuit; main(run_circuit)"]
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

        from neurosim.tools.cli import main, run_circuit

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


def compare_rules(argv: list[str], prog: str = "compare_rules.py") -> int:
    """``compare_rules.py MODEL [...]``; returns the exit status (run it through ``neurosim.tools.cli.main``).
    ``prog`` is the name its help and its option errors give it (``neurosim compare`` there)."""
    from neurosim.tools.cli import unique_run_dir, wants_help

    if "--combine" in argv:
        from neurosim.tools.study.seeds import combine

        return combine([a for a in argv if a != "--combine"], prog)
    if not argv or wants_help(argv):
        print(usage(prog), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    req = parse_request(argv, prog)
    from neurosim.training.distributed import launched

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
    from neurosim.training.config import RULE_NAMES

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
    page = study_dashboard(study_dir)
    if page is not None:
        print(f"dashboard: {page}", file=sys.stderr)
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


def _shorten(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _result_line(run_dir: Path) -> str:
    from neurosim.training.run_log import metrics_records

    try:
        m = metrics_records(run_dir / "metrics.jsonl")[-1]
    except (UserError, OSError, IndexError):
        return ""
    angle = _degrees(m.get("mean_angle"))
    return (f"top-1 {m['test_acc']:.2f}%  top-5 {m['test_top5']:.2f}%  mean W–Bᵀ angle "
            f"{angle + '°' if angle != 'n/a' else 'n/a (no feedback matrix)'}")


def study_dashboard(study_dir: Path) -> Path | None:
    """Write ``STUDY/dashboard.html`` (every run overlaid); a failure is one line, never the
    study's end."""
    try:
        from neurosim.tools.dashboard import write_study_dashboard

        return write_study_dashboard(study_dir)
    except Exception as e:  # noqa: BLE001 - the page is an extra: the study's results stand without it
        text = str(e).strip().splitlines()
        print(f"note: dashboard not written: {text[0][:300] if text and text[0] else type(e).__name__}",
              file=sys.stderr)
        return None
