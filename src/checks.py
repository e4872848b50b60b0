"""Argument checks shared by the whole project: each raises a one-line ValueError naming the
argument, the value it got and what is allowed, so that a bad config value never shows a traceback."""
from __future__ import annotations

from typing import Iterable, Sequence


def is_int(value) -> bool:
    """True for a Python/numpy-style integer that is not a bool (True would pass ``isinstance(x, int)``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int within [minimum, maximum] (either bound optional), or a one-line ValueError."""
    if not is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if minimum is not None and maximum is not None:
            allowed = f"an integer in [{minimum}, {maximum}]"
        elif minimum == 1:
            allowed = "a positive integer"
        elif minimum == 0:
            allowed = "a non-negative integer"
        elif minimum is not None:
            allowed = f"an integer >= {minimum}"
        elif maximum is not None:
            allowed = f"an integer <= {maximum}"
        else:
            allowed = "an integer"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_positive_int(name: str, value) -> int:
    """``value`` as an int >= 1, or a one-line ValueError naming ``name``."""
    return check_int(name, value, minimum=1)


def check_non_negative_int(name: str, value) -> int:
    """``value`` as an int >= 0, or a one-line ValueError naming ``name``."""
    return check_int(name, value, minimum=0)


def check_int_list(name: str, values: Iterable, minimum: int = 1, increasing: bool = False) -> tuple[int, ...]:
    """A non-empty sequence of ints >= ``minimum`` (strictly increasing if asked) as a tuple."""
    items = list(values) if not isinstance(values, (str, bytes)) else [values]
    if not items or not all(is_int(v) and v >= minimum for v in items):
        raise ValueError(f"{name} must be a non-empty list of integers >= {minimum}, got {items!r}")
    if increasing and any(b <= a for a, b in zip(items, items[1:])):
        raise ValueError(f"{name} must be strictly increasing, got {items!r}")
    return tuple(items)


def check_fraction(name: str, value, low: float = 0.0, high: float = 1.0, closed_low: bool = True,
                   closed_high: bool = False) -> float:
    """A number in the interval [low, high) by default (brackets set by ``closed_low``/``closed_high``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ok = False
    else:
        ok = (value >= low if closed_low else value > low) and (value <= high if closed_high else value < high)
    if not ok:
        interval = f"{'[' if closed_low else '('}{low}, {high}{']' if closed_high else ')'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices: Sequence) -> object:
    """``value`` if it is one of ``choices``, else a one-line ValueError listing them."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(choices)}")
    return value
