"""The rule registry: every rule by its name, and the other names (aliases) a rule answers to.

``RULES`` is a mapping from names to rule classes. Looking a rule up (``RULES[name]``,
``name in RULES``, ``RULES.get(name)``) accepts its aliases too, so a configuration, preset or
command line written with an older name finds the same class; going through it (``for``,
``len``, ``keys``, ``items``) gives each rule once, under its own name, so nothing that lists,
documents or trains every rule meets one rule twice. ``RULES.canonical(name)`` says which rule a
name means.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import attrs


class RuleRegistry(MutableMapping):
    """Rule classes by name; lookups also take aliases (see the module docstring)."""

    def __init__(self):
        self._rules: dict[str, type] = {}
        self._aliases: dict[str, str] = {}  # alias -> the rule's own name

    def canonical(self, name: str) -> str:
        """The name of the rule that ``name`` means (``name`` itself, or the rule it is an alias
        of); ``KeyError`` if no rule answers to it."""
        name = self._aliases.get(name, name)
        if name not in self._rules:
            raise KeyError(name)
        return name

    def aliases(self, name: str | None = None):
        """The aliases of rule ``name`` (a tuple, in declaration order), or with no name every
        alias and the rule it means (a dict)."""
        if name is None:
            return dict(self._aliases)
        name = self.canonical(name)
        return tuple(a for a, n in self._aliases.items() if n == name)

    def __getitem__(self, name):
        return self._rules[self._aliases.get(name, name)]

    def __contains__(self, name):
        return isinstance(name, str) and self._aliases.get(name, name) in self._rules

    def __iter__(self):
        return iter(self._rules)

    def __len__(self):
        return len(self._rules)

    def __setitem__(self, name, cls):
        if name in self._aliases:
            raise KeyError(f"{name!r} is an alias of the rule {self._aliases[name]!r}, not a rule's own name")
        self._rules[name] = cls

    def __delitem__(self, name):
        name = self.canonical(name)
        del self._rules[name]
        self._set_aliases(name, ())

    def _set_aliases(self, name: str, aliases: tuple[str, ...]) -> None:
        for alias in [a for a, n in self._aliases.items() if n == name]:
            del self._aliases[alias]
        for alias in aliases:
            self._aliases[alias] = name

    def __repr__(self):
        return f"RuleRegistry({', '.join(self._rules)}; aliases {self._aliases})"


RULES = RuleRegistry()


def _word_problem(name) -> bool:
    return not isinstance(name, str) or not name.isidentifier() or "_" in name or not name.islower()


def register_rule(cls: type | None = None, *, aliases: tuple[str, ...] = ()):
    """Class decorator that makes a rule known by its ``name`` everywhere: configuration fields
    and command-line options (``--<name>-<field>`` for each attrs field), presets
    ``<name>_<model>``, help, docs and the rule-generic tests.

    A rule file declares itself once::

        @register_rule
        @attrs.frozen
        class MyRule(PlasticityRule):
            name: ClassVar[str] = "my"
            gain: float = attrs.field(default=1.0, validator=attrs.validators.gt(0),
                                      metadata={"help": "what the gain multiplies", "unit": None})

    A field's ``metadata`` ``help`` is its line in ``--help`` and ``unit`` its unit, if it has one.

    ``@register_rule(aliases=("old",))`` also lets the rule be found as ``old``: presets
    ``old_<model>``, ``--rules old`` of a study and configurations saved with ``"rule": "old"``
    reach the same class, while listings (``RULES``, ``RULE_NAMES``, ``--help``, docs/presets.md,
    a study's default rules) show it once, under ``name``.
    """
    if cls is None:
        return lambda c: register_rule(c, aliases=aliases)
    name = cls.__dict__.get("name")
    if _word_problem(name):
        raise ValueError(f"rule {cls.__name__} needs a class attribute name: a short lower-case word "
                         f"without '_' (it starts preset names such as <name>_mlp_digits), not {name!r}")
    if not attrs.has(cls):
        raise TypeError(f"rule {cls.__name__} must be an attrs class (decorate it with @attrs.frozen first)")
    if isinstance(aliases, str):
        aliases = (aliases,)
    aliases = tuple(dict.fromkeys(aliases))
    for alias in aliases:
        if _word_problem(alias) or alias == name:
            raise ValueError(f"rule {name!r}: an alias is another short lower-case word without '_', not {alias!r}")
    known = RULES._rules.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"rule name {name!r} is taken by {known.__module__}.{known.__qualname__}")
    for word in (name, *aliases):
        if word in RULES._aliases and RULES._aliases[word] != name:
            raise ValueError(f"rule name {word!r} is taken: it is an alias of the rule {RULES._aliases[word]!r}")
        if word != name and word in RULES._rules:
            other = RULES._rules[word]
            raise ValueError(f"rule name {word!r} is taken by {other.__module__}.{other.__qualname__}")
    RULES._rules[name] = cls
    RULES._set_aliases(name, aliases)
    return cls
