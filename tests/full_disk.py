"""A file that runs out of space: what the full-disk tests put in place of ``open``'s result."""

import errno


class FullDisk:
    """Wraps an open file; each write puts ``fraction`` of its data on disk, then fails with ENOSPC."""

    def __init__(self, f, fraction: float = 1 / 3):
        self.f, self.fraction = f, fraction

    def write(self, data):
        self.f.write(data[: int(len(data) * self.fraction)])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
