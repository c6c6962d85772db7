"""``LiveNames``: the names a registry holds now (rules, models, datasets), as a read-only
sequence read afresh on every use, so that one registered after import counts."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class LiveNames(Sequence):
    """A read-only view of ``names()``; it compares equal to the tuple it shows."""

    def __init__(self, names: Callable[[], tuple[str, ...]]):
        self._names = names

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self):
        return len(self._names())

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name):
        return name in self._names()

    def __eq__(self, other):
        if isinstance(other, (Sequence, tuple, list)) and not isinstance(other, str):
            return self._names() == tuple(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self):
        return repr(self._names())
