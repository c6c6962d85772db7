"""Command-line values of a run's settings: ``--name value`` pairs typed as ``RunConfig``'s
fields (and each rule's ``--<rule>-<setting>``) declare them."""

from __future__ import annotations

import math
import re
import typing

from neurosim.common.errors import UserError
from neurosim.training.config import RunConfig, _option, rule_settings


def parse_overrides(args: list[str]) -> dict:
    """``["--lr", "0.05", "--milestones", "30,60"]`` → typed values for RunConfig fields."""
    types = option_types()
    out, i = {}, 0
    names = sorted(k.replace("_", "-") for k in types)
    while i < len(args):
        key = args[i]
        if not key.startswith("--"):
            raise UserError(f"unexpected argument {key!r}; options are --name value")
        name = key[2:].replace("-", "_")
        if name not in types:
            raise UserError(f"unknown option {key}. Options: {' '.join('--' + n for n in names)}")
        if i + 1 >= len(args):
            raise UserError(f"option {key} needs a value")
        if name in out:
            raise UserError(f"option {_option(name)} is given twice; give it once")
        out[name] = convert_option(key, args[i + 1], types[name])
        i += 2
    return out


def option_types() -> dict:
    """The type of every command-line field: RunConfig's own, then each rule's ``<rule>_<field>``."""
    types = {k: v for k, v in typing.get_type_hints(RunConfig).items() if k not in ("preset", "rule_params")}
    types.update({k: f.type for k, (_, f) in rule_settings().items()})
    return types


def convert_option(key: str, text: str, typ):
    """The value of option ``key`` (``--lr``) written as ``text``, as a ``typ``; a ``UserError``
    says what was expected instead."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if not text.strip():  # an empty value is a shell variable left unset more often than a meant "none"
        none = " (or none)" if origin is tuple or type(None) in args else ""
        raise UserError(f"option {key} has an empty value; give {_expected(typ)}{none}")
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"bad value {text!r} for {key}: expected true or false")
    if origin is tuple:
        if text.strip().lower() == "none":
            return ()
        parts = [v.strip() for v in text.split(",")]
        if not all(_is_int(v) for v in parts):
            raise UserError(f"bad value {text!r} for {key}: expected whole numbers separated by commas, "
                            f"e.g. 60,120,160 (or none)")
        return tuple(int(v) for v in parts)
    if type(None) in args:  # int | None, float | None
        if text.strip().lower() == "none":
            return None
        (typ,) = [a for a in args if a is not type(None)]
    if typ is int:
        if not _is_int(text.strip()):
            raise UserError(f"bad value {text!r} for {key}: expected a whole number")
        return int(text)
    if typ is float:
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"bad value {text!r} for {key}: expected a number") from None
        if not math.isfinite(value):
            raise UserError(f"bad value {text!r} for {key}: expected a finite number")
        return value
    return typ(text)


def _expected(typ) -> str:
    """What a value of type ``typ`` is, for a message: ``a number``, ``a whole number``, …"""
    if typ is bool:
        return "true or false"
    if typing.get_origin(typ) is tuple:
        return "whole numbers separated by commas"
    if typ is float:
        return "a number"
    if type(None) in typing.get_args(typ):
        return _expected(next(a for a in typing.get_args(typ) if a is not type(None)))
    if typ is int:
        return "a whole number"
    return "a value"


def _is_int(text: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", text) is not None
