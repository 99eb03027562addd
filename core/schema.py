"""Field rules for typed config schemas: each knob states its own valid range where it is declared.

    @dataclass
    class TrainConfig:
        steps: int = positive()
        schedule: str = choice("cosine", "linear", "constant")

The helpers give no default value (defaults live in ``conf/``); ``problem`` checks one value against
its field's rule. ``build`` makes a dataclass tree from plain dicts and ``check_ranges`` applies the
rules, both collecting every problem instead of stopping at the first. Used by ``distill.config`` and by
the schemes' settings in ``quantize``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any


def positive():
    return dataclasses.field(metadata={"rule": ("positive",)})


def non_negative():
    return dataclasses.field(metadata={"rule": ("non_negative",)})


def unit():
    """A share or probability: between 0 and 1."""
    return dataclasses.field(metadata={"rule": ("unit",)})


def choice(*names: str):
    return dataclasses.field(metadata={"rule": ("choice", *names)})


def problem(f: dataclasses.Field, value: Any, key: str) -> str | None:
    """What is wrong with ``value`` for field ``f`` (None when fine or when the field has no rule)."""
    rule = f.metadata.get("rule")
    if not rule or value is None:
        return None
    kind = rule[0]
    if kind == "choice":
        if isinstance(value, str) and value not in rule[1:]:
            return f"{key}: {value!r} is not one of {', '.join(rule[1:])}"
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    if kind == "positive" and value <= 0:
        return f"{key}: must be > 0, got {value}"
    if kind == "non_negative" and value < 0:
        return f"{key}: must be >= 0, got {value}"
    if kind == "unit" and not 0 <= value <= 1:
        return f"{key}: must be between 0 and 1, got {value}"
    return None


def type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(tp)
        return isinstance(value, list | tuple) and all(type_ok(v, inner) for v in value)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def build(cls: type, node: Any, path: str, problems: list[str], renamed: dict[str, str] | None = None) -> Any:
    """Instantiate dataclass ``cls`` from a plain dict, collecting every problem instead of stopping: unknown
    keys (with a "did you mean"), keys in ``renamed`` (full key -> what replaced it), missing keys, wrong types."""
    renamed = renamed or {}
    if not isinstance(node, dict):
        problems.append(f"{path or 'config'}: expected a mapping, got {type(node).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in node:
        full = f"{path}.{key}" if path else str(key)
        if full in renamed:
            problems.append(f"{full}: {renamed[full]}")
            continue
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = (
                f"; did you mean {path + '.' if path else ''}{near[0]}?"
                if near
                else f"; known keys: {', '.join(names)}"
            )
            problems.append(f"{path + '.' if path else ''}{key}: unknown key{hint}")
    values = {}
    for name in names:
        key = f"{path}.{name}" if path else name
        tp = hints[name]
        if name not in node or node[name] == "???":
            problems.append(f"{key}: missing; set it in conf/ or on the command line ({key}=...)")
            values[name] = None
            continue
        value = node[name]
        if dataclasses.is_dataclass(tp):
            values[name] = build(tp, value, key, problems, renamed)
        elif not type_ok(value, tp):
            problems.append(f"{key}: expected {getattr(tp, '__name__', str(tp))}, got {value!r}")
            values[name] = value
        else:
            values[name] = float(value) if tp is float else value
    return cls(**values)


def check_ranges(obj: Any, path: str, problems: list[str]) -> None:
    """Each field's own rule, and the ``problems(key)`` of a settings object that has one: a rule belongs
    to the field, never to a name elsewhere."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(value):
            check_ranges(value, key, problems)
            if hasattr(value, "problems"):
                problems += value.problems(key)
            continue
        msg = problem(f, value, key)
        if msg:
            problems.append(msg)
