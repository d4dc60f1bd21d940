"""Validation of the options of a call and of the engine: every refusal is an
:class:`~deltamem_agents.engine.errors.InvalidOptionError` naming the option, raised before anything runs (no
session is created, nothing is loaded, the model is not touched)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .errors import InvalidOptionError

__all__ = [
    "SEED_RANGE",
    "check_bool",
    "check_choice",
    "check_int",
    "check_max_new_tokens",
    "check_seed",
    "check_stop",
    "check_tools",
    "finite",
    "is_number",
]

#: Seeds a sampling generator accepts (torch's ``Generator.manual_seed`` range).
SEED_RANGE = (-(2**63), 2**64 - 1)


def is_number(value: Any) -> bool:
    """An int or float, not a bool."""
    return not isinstance(value, bool) and isinstance(value, int | float)


def check_int(name: str, value: Any, least: int, most: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least or (most is not None and value > most):
        bound = f">= {least}" if most is None else f"in [{least}, {most}]"
        raise InvalidOptionError(name, f"{name} must be an integer {bound}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidOptionError(name, f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> str:
    if isinstance(value, str) and aliases:
        value = aliases.get(value, value)
    if not isinstance(value, str) or value not in choices:
        raise InvalidOptionError(name, f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_max_new_tokens(value: Any, context_window: int) -> int:
    """At least 0, and less than the context window (the prompt needs at least one position)."""
    check_int("max_new_tokens", value, 0)
    if value >= context_window:
        raise InvalidOptionError(
            "max_new_tokens", f"max_new_tokens={value} does not fit the model's context window of {context_window} "
            f"tokens (prompt and answer share it): ask for at most {context_window - 1}"
        )
    return value


def check_seed(value: Any) -> int | None:
    lo, hi = SEED_RANGE
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi):
        raise InvalidOptionError("seed", f"seed must be None or an integer in [-2**63, 2**64 - 1], got {value!r}")
    return value


def check_stop(value: Any) -> tuple[str, ...]:
    """``None``, a non-empty string, or a list/tuple of them → a tuple."""
    if value is None:
        return ()
    stops = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list | tuple) else None
    if stops is None or not all(isinstance(s, str) and s for s in stops):
        raise InvalidOptionError("stop", f"stop must be a non-empty string or a list of them, got {value!r}")
    return stops


def check_tools(value: Any) -> Any:
    """``None`` or a list of tool definitions (objects); their content is the chat template's business."""
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(isinstance(t, Mapping) for t in value):
        raise InvalidOptionError("tools", f"tools must be a list of tool definitions (objects), got {value!r:.200}")
    return list(value)


def finite(name: str, value: Any, *, low: float, low_open: bool, high: float = math.inf,
           high_open: bool = True) -> float:
    """A finite number in the interval (NaN and infinities refused)."""
    ok = is_number(value) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise InvalidOptionError(name, f"{name} must be a finite number in {lo}{low}, {high}{hi}, got {value!r}")
    return value
