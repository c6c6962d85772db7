"""The lines a run prints: on the terminal (stderr) and in the run directory's ``log.txt``.

A terminal shows progress as one line redrawn in place (a carriage return, twice a second); a
file (``log.txt``, or stderr sent to a file) gets a line a few seconds into a stretch of work
and then one every 30 s, so a log stays short however long the run. ``quiet`` silences the
terminal, never the log. The log is appended to (a resumed run adds to it) and joins the run
directory once that holds a run (``config.json``): a run that fails while loading leaves the
directory as it found it.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from pathlib import Path

TERMINAL_PERIOD = 0.5  # seconds between redraws of a progress line on a terminal
FILE_FIRST = 5.0  # a stretch of work this long gets its first line in a file
FILE_PERIOD = 30.0  # and then one line per this many seconds


def hms(seconds: float) -> str:
    """``1:02:03``, or ``11d 2:03:04`` past a day."""
    s = max(int(seconds), 0)
    days, s = divmod(s, 86400)
    clock = f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{days}d {clock}" if days else clock


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # a stand-in without isatty, or closed
        return False


class Console:
    """Where a run's lines go. ``writer``: this process speaks for the run (rank 0); the others
    print and record nothing."""

    def __init__(self, log_path: Path, quiet: bool = False, writer: bool = True):
        self.log_path, self.quiet, self.writer = Path(log_path), quiet, writer
        self._pending: list[str] | None = []  # lines kept before the directory held a run; None once written
        self._bar = 0  # width of the line drawn in place on the terminal (0: none)
        self._task = None  # (what, started, last terminal draw, last file line, lines written)

    @property
    def terminal(self) -> bool:
        """Whether progress is drawn in place: stderr is a terminal, and not silenced."""
        return not self.quiet and self.writer and _is_terminal(sys.stderr)

    # -- lines ------------------------------------------------------------------------------------
    def say(self, text: str, stream=None, always: bool = False) -> None:
        """Print ``text`` (to stderr unless ``stream``) unless quiet or ``always``, and keep it in the log."""
        if not self.writer:
            return
        self.clear()
        if always or not self.quiet:
            print(text, file=stream or sys.stderr, flush=True)
        self.keep(text)

    def keep(self, text: str) -> None:
        """Write ``text`` to the log only."""
        if not self.writer:
            return
        if self._pending is not None:
            self._pending.append(text)
            if not (self.log_path.parent / "config.json").exists():
                return
            text, self._pending = "\n".join(self._pending), None
        try:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(text.lstrip("\n") + "\n")
        except OSError as e:  # the log is a convenience: a run does not stop for it
            self.writer = False
            print(f"warning: cannot write {self.log_path} ({e.strerror or e}); the run goes on without its log",
                  file=sys.stderr)

    def periodic(self, line: str, to_terminal: bool, to_file: bool) -> None:
        """A progress line: redrawn in place on a terminal (``to_terminal``), and written as a line
        of its own to the log, and to stderr when that is not a terminal (``to_file``)."""
        if not self.writer:
            return
        if to_terminal and self.terminal:
            self.draw(line)
        if to_file:
            if not self.quiet and not self.terminal:
                print(line, file=sys.stderr, flush=True)
            self.keep(line)

    def draw(self, line: str) -> None:
        """Show ``line`` in place of the previous progress line (a terminal only)."""
        pad = max(self._bar - len(line), 0)
        sys.stderr.write("\r" + line + " " * pad)
        sys.stderr.flush()
        self._bar = len(line)

    def clear(self) -> None:
        """Remove the progress line drawn in place, so that a line said next starts clean."""
        if self._bar:
            sys.stderr.write("\r" + " " * self._bar + "\r")
            sys.stderr.flush()
            self._bar = 0

    # -- stretches of work other than training: evaluating, decoding, caching ----------------------
    def report(self, what: str, done: int, total: int, unit: str = "") -> None:
        """Progress of ``what`` (called as it goes; ``done == total`` ends it): drawn on a terminal,
        and in a file once it has taken ``FILE_FIRST`` seconds, with a last line when it ends. A
        task of one step (``total == 1``, no ``unit``: writing a file) is said as it starts."""
        if not self.writer:
            return
        now = time.perf_counter()
        if self._task is None or self._task[0] != what:
            self._task = [what, now, now, now, 0]
        _, start, drawn, written, lines = self._task
        elapsed = now - start
        if done >= total:
            self._task = None
            if lines:
                self.periodic(f"{what}: done in {hms(elapsed)}", False, True)
            self.clear()
            return
        if total == 1 and not unit:  # one step, no progress to show: said as it starts
            line, to_terminal, to_file = f"{what} …", True, not lines
        else:
            eta = elapsed / done * (total - done) if done else None
            line = (f"{what}: {done:,}/{total:,}{unit} ({100 * done / max(total, 1):.0f}%)"
                    + (f", ETA {hms(eta)}" if eta is not None else ""))
            to_terminal = now - drawn >= TERMINAL_PERIOD
            to_file = elapsed >= FILE_FIRST and (not lines or now - written >= FILE_PERIOD)
        if to_terminal or to_file:
            self.periodic(line, to_terminal, to_file)
            self._task = [what, start, now if to_terminal else drawn, now if to_file else written,
                          lines + to_file]

    @contextlib.contextmanager
    def warnings_said(self):
        """Warnings raised inside (a dataset's checksum, a damaged cache) become one line each,
        ``warning: …``, on the terminal and in the log, without the source line that raised them."""
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *args, **kwargs: self.say(
                f"warning: {' '.join(str(message).split())}")
            yield
