"""How a command ends: every user error in one message and exit status 2.

``main(entry)`` runs an entry (``run_circuit``, ``evaluate``, ``neurosim.plot_cli.plot_run``;
by default the ``neurosim`` command) and turns what a user can cause into one line on stderr: a
``UserError`` or an ``OSError`` (the path and the cause) gives status 2, Ctrl-C gives status 130.
Nothing else is caught: a traceback means a bug.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import warnings

from neurosim.errors import UserError


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


# errno → (cause, what to do about it)
_OS_CAUSES = {
    errno.ENOSPC: ("disk full", "free some space or choose another location"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another location"),
    errno.EROFS: ("read-only file system", "choose a writable location"),
    errno.EACCES: ("permission denied", "choose a location you can write to, or change its permissions"),
    errno.EPERM: ("operation not permitted", "choose a location you can write to, or change its permissions"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "check the path"),
    errno.EISDIR: ("is a directory", "give the path of a file"),
    errno.EEXIST: ("already exists", "choose another path"),
    errno.EIO: ("input/output error", "check the disk"),
}


def os_error_message(exc: OSError) -> str:
    """One line naming the path of an ``OSError`` and its cause (``disk full``, ``read-only file system``)."""
    cause, fix = _OS_CAUSES.get(exc.errno, (exc.strerror or str(exc) or type(exc).__name__, ""))
    path = exc.filename
    if path is not None and exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    where = f"{os.fsdecode(path) if isinstance(path, bytes) else path}: " if path is not None else ""
    return f"{where}{cause}" + (f"; {fix}" if fix else "")


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as a command prints it: ``warning: <message>``, without the source line of the
    code that raised it, which says nothing to someone running a command."""
    return f"warning: {' '.join(str(message).split())}\n"


def main(entry=None, argv=None) -> None:
    """Run ``entry(argv)`` (default: the ``neurosim`` command on ``sys.argv``) and exit with its
    status; user errors, I/O errors and Ctrl-C end in one line."""
    if entry is None:
        from neurosim.cli.commands import neurosim as entry
    shown = warnings.formatwarning
    warnings.formatwarning = one_line_warning
    try:
        code = entry(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        if _echo(e):
            sys.exit(2)  # said once, by rank 0
        rank = os.environ.get("RANK", "0")
        fail(str(e) if rank == "0" else f"(rank {rank}) {e}")
    except OSError as e:
        fail(os_error_message(e))
    except KeyboardInterrupt:
        # Entries write their files through a temporary file and a rename, and a run that is
        # training handles Ctrl-C itself (it saves a checkpoint), so an interrupt that reaches
        # here leaves every file as it was or complete.
        print("\ninterrupted; nothing was lost", file=sys.stderr)
        sys.exit(130)
    finally:
        warnings.formatwarning = shown
    sys.exit(code)


def _echo(e: UserError) -> bool:
    """Whether ``e`` is reported already: rank 0 of a torchrun job said it (``Echo``), or it is
    an error every rank meets together and rank 0 says (this being another rank)."""
    if "neurosim.distributed" not in sys.modules:
        return False  # no torchrun job was joined: this process is the only one to say it
    from neurosim.distributed import Echo, launched

    if isinstance(e, Echo):
        return True
    if launched().rank == 0:
        return False
    from neurosim.train import RunDiverged, RunInterrupted

    return isinstance(e, (RunDiverged, RunInterrupted))


@contextlib.contextmanager
def loading():
    """While a command loads PyTorch and the modules that need it (seconds): Ctrl-C ends the
    process at once with one line. An interrupt inside a C extension's import can surface as
    any error, or leave the extension half initialised; nothing has been written yet."""
    def stop(signum, frame):
        sys.stderr.write("\ninterrupted while starting; nothing was written\n")
        sys.stderr.flush()
        os._exit(130)

    try:
        previous = signal.signal(signal.SIGINT, stop)
    except ValueError:  # not the main thread: its owner handles signals
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
