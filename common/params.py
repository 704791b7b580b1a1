"""Parameter checks in one style, after scikit-learn's `_parameter_constraints`.

A class (or a function) declares what each parameter may be, and `validate_params` checks the
values against it, raising one `ParameterError` line that names the owner, the parameter, what
it may be and what it got:

    class KNNProbe:
        _parameter_constraints = {
            "k": [Interval(int, 1, None, closed="left"), None],
            "weights": [StrOptions({"uniform", "similarity"})],
        }

    validate_params(probe.get_params(), KNNProbe._parameter_constraints, "KNNProbe")

A constraint is `None` (the value may be None), a type (isinstance; bool is never an int),
`Interval`, or `StrOptions`; a parameter passes when it meets any of its constraints.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import UserError


class ParameterError(UserError, ValueError):
    """A parameter value outside what its owner accepts (a ValueError too, as numpy's are)."""


@dataclass(frozen=True)
class Interval:
    """Numbers of `kind` (int or float; int also accepts integral floats' ints) between left
    and right (None: unbounded); `closed` says which ends belong: "both", "left", "right",
    "neither"."""

    kind: type
    left: float | None
    right: float | None
    closed: str = "both"

    def __post_init__(self):
        if self.closed not in ("both", "left", "right", "neither"):
            raise ValueError(f"closed must be both, left, right or neither, not {self.closed!r}")

    def is_satisfied_by(self, value: Any) -> bool:
        if isinstance(value, bool):
            return False
        if self.kind is int:
            if not isinstance(value, numbers.Integral):
                return False
        elif not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            return False
        low_ok = self.left is None or (value >= self.left if self.closed in ("both", "left")
                                       else value > self.left)
        high_ok = self.right is None or (value <= self.right if self.closed in ("both", "right")
                                         else value < self.right)
        return bool(low_ok and high_ok)

    def __str__(self) -> str:
        what = "an int" if self.kind is int else "a finite number"
        if self.left is None and self.right is None:
            return what
        lo = "(" if self.closed in ("right", "neither") else "["
        hi = ")" if self.closed in ("left", "neither") else "]"
        left = "-inf" if self.left is None else f"{self.left:g}"
        right = "inf" if self.right is None else f"{self.right:g}"
        return f"{what} in {lo}{left}, {right}{hi}"


@dataclass(frozen=True)
class StrOptions:
    """One of a set of strings."""

    options: frozenset[str]

    def __init__(self, options: Iterable[str]):
        object.__setattr__(self, "options", frozenset(options))

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.options

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(o) for o in sorted(self.options))


def _satisfied(constraint: Any, value: Any) -> bool:
    if constraint is None:
        return value is None
    if isinstance(constraint, type):
        return isinstance(value, constraint) and not (constraint is int and isinstance(value, bool))
    return bool(constraint.is_satisfied_by(value))


def _describe(constraint: Any) -> str:
    if constraint is None:
        return "None"
    if isinstance(constraint, type):
        return f"a {constraint.__name__}"
    return str(constraint)


def validate_params(params: Mapping[str, Any], constraints: Mapping[str, list], owner: str,
                    error: type[ParameterError] = ParameterError) -> None:
    """Check every parameter that has constraints; raise `error` (one line) for the first
    value that meets none of them. Parameters without constraints are not checked."""
    for name, allowed in constraints.items():
        if name not in params:
            continue
        value = params[name]
        if any(_satisfied(c, value) for c in allowed):
            continue
        options = " or ".join(_describe(c) for c in allowed)
        raise error(f"{owner}: {name} must be {options}; got {value!r}")
