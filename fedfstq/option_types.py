"""Argument types of the ``fedfstq`` options: bad values are refused while parsing.

argparse then reports ``fedfstq demo: error: argument --clients: ...`` before anything runs.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = [
    "comma_list",
    "fraction",
    "int_at_least",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "probability",
]

T = TypeVar("T", int, float)


def _checked(kind: Callable[[str], T], what: str, ok: Callable[[T], bool]) -> Callable[[str], T]:
    def parse(text: str) -> T:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low``."""
    return _checked(int, f"an integer >= {low}", lambda v: v >= low)


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
positive_float = _checked(float, "a number > 0", lambda v: 0 < v < math.inf)
#: A share of something, in (0, 1].
fraction = _checked(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
#: A probability of something that must not always happen, in [0, 1).
probability = _checked(float, "a number in [0, 1)", lambda v: 0 <= v < 1)


def comma_list(choices: Sequence[str], what: str = "item") -> Callable[[str], str]:
    """A comma-separated list of ``choices`` (kept as the given text; at least one item)."""

    def parse(text: str) -> str:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, unknown))}; choose from {', '.join(choices)}"
            )
        if not items:
            raise argparse.ArgumentTypeError(f"no {what}; choose from {', '.join(choices)}")
        return text

    return parse
