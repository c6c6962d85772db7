"""Writing run files so that a kill, a full disk or a read-only place never leaves half a file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from neurosim.common.errors import UserError

_CAUSES = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.ENOTDIR: "a parent is a file, not a directory", errno.EISDIR: "is a directory",
           errno.ENOENT: "no such directory"}


def describe_os_error(exc: OSError) -> str:
    """``cause`` of an OSError in words a user acts on (``disk full``, ``read-only file system``)."""
    return _CAUSES.get(exc.errno, exc.strerror or type(exc).__name__)


def write_atomic(path: Path, data: bytes | memoryview, what: str = "file") -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and an atomic rename.

    Either the new contents are in place or the old file is untouched; the temporary file never
    outlives a failure. An ``OSError`` becomes a ``UserError`` naming the path and the cause.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    except OSError as e:
        kept = f"; the previous {path.name} is kept" if path.exists() else ""
        raise UserError(f"cannot write {what} {path}: {describe_os_error(e)}{kept}") from None


class DirectoryLock:
    """An exclusive lock on a run directory, held while one process writes into it.

    ``fcntl.flock`` on ``DIR/.lock``: the kernel drops it when the holder exits or is killed,
    so a lock left by a dead process never blocks a resume. The file names the holder (pid,
    host) for the message a second writer gets.
    """

    def __init__(self, directory: Path):
        import fcntl
        import socket

        # Set before anything can fail: ``__del__`` runs on a lock that was never taken too.
        self._fd = None
        self.directory = Path(directory)
        self.path = self.directory / ".lock"
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot use run directory {directory}: {describe_os_error(e)}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(self._fd, 200).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            self._fd = None
            raise UserError(f"run directory {directory} is in use by {holder}; wait for it to finish or "
                            f"stop it (its checkpoint is kept), or choose another --out") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())

    @property
    def held(self) -> bool:
        return self._fd is not None

    def whereabouts(self) -> str | None:
        """None while the locked directory is where it was locked; else what became of it, in
        words (``was deleted``, ``was moved to DIR``, ``lost its lock file .lock``).

        The lock file is the directory's witness: the descriptor follows it through a rename,
        and ``DIR/.lock`` is another file (or none) once the directory was moved or deleted,
        even if something made a new directory of that name."""
        if self._fd is None:
            return None
        mine = os.fstat(self._fd)
        try:
            there = os.stat(self.path)
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                return None
        except OSError:
            pass
        if mine.st_nlink == 0:  # the lock file itself was deleted, with its directory or alone
            return f"lost its lock file {self.path.name}" if self.directory.is_dir() else "was deleted"
        try:
            # Linux names the file an open descriptor refers to, wherever it was moved.
            moved = Path(os.readlink(f"/proc/self/fd/{self._fd}")).parent
        except OSError:
            return "was moved or deleted"
        return f"was moved to {moved}"

    @staticmethod
    def holder_alive(directory: Path) -> bool:
        """Whether the process ``DIR/.lock`` names is alive on this host, read without taking the
        lock (a reader must never make a writer's start fail). The file outlives its holder, so a
        name alone says nothing; a holder on another host cannot be told from here: False."""
        import socket

        try:
            words = (Path(directory) / ".lock").read_text(errors="replace").split()
        except OSError:
            return False
        if len(words) != 4 or words[0] != "process" or words[2] != "on" or not words[1].isdigit():
            return False
        if words[3] != socket.gethostname():
            return False
        try:
            os.kill(int(words[1]), 0)
        except PermissionError:
            return True  # alive, another user's
        except (OSError, OverflowError):
            return False
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __del__(self):
        self.release()
