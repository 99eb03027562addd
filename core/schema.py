"""Field rules for typed config schemas: each knob states its own valid range where it is declared.

    @dataclass
    class TrainConfig:
        steps: int = positive()
        schedule: str = choice("cosine", "linear", "constant")

The helpers give no default value (defaults live in ``conf/``); ``problem`` checks one value against
its field's rule. Used by ``distill.config`` and by the schemes' settings in ``quantize``.
"""

from __future__ import annotations

import dataclasses
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
