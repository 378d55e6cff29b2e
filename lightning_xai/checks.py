"""Argument checks shared by every layer: one wording for every configuration error.

Every public constructor and ``setup`` validates its arguments with these functions, so that a bad value raises
a :class:`ValueError` (or :class:`TypeError`) at once, naming *who* rejected it (``owner``: a class or function
name), the argument, the bad value and the valid values. Pure Python, no torch or Lightning import, usable from
every layer.

Example::

    check_int("every_n_epochs", 0, minimum=1, owner="ExplanationMonitor")
    # ValueError: ExplanationMonitor: every_n_epochs must be an integer >= 1, got 0
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

__all__ = [
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_optional_int",
    "check_range",
    "close_matches",
    "prefix",
    "suggest",
]

T = TypeVar("T")


def prefix(owner: str | None) -> str:
    """``"Owner: "`` or ``""``: the start of every error message."""
    return f"{owner}: " if owner else ""


def close_matches(value: object, candidates: Iterable[str], n: int = 5, cutoff: float = 0.5) -> list[str]:
    """The candidates closest to ``str(value)`` (difflib ratio >= ``cutoff``), best first."""
    return difflib.get_close_matches(str(value), list(candidates), n=n, cutoff=cutoff)


def suggest(value: object, candidates: Iterable[str], *, limit: int = 20) -> str:
    """A sentence for an error message: close matches if any, else the first ``limit`` valid values."""
    candidates = list(candidates)
    close = close_matches(value, candidates)
    if close:
        return f"did you mean {', '.join(repr(c) for c in close)}?"
    shown = ", ".join(repr(c) for c in candidates[:limit])
    more = f", ... ({len(candidates)} in all)" if len(candidates) > limit else ""
    return f"valid values: [{shown}{more}]"


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    owner: str | None = None,
) -> int:
    """``value`` as an ``int`` within ``[minimum, maximum]`` (``bool`` is rejected)."""
    ok = not isinstance(value, bool) and isinstance(value, int)
    if ok and ((minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
        ok = False
    if not ok:
        bounds = _bounds(minimum, maximum, strict=False)
        raise ValueError(f"{prefix(owner)}{name} must be an integer{bounds}, got {value!r}")
    return int(value)


def check_optional_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    owner: str | None = None,
    none_means: str = "",
) -> int | None:
    """Like :func:`check_int`, also accepting ``None`` (``none_means`` says what ``None`` does, for the message)."""
    if value is None:
        return None
    try:
        return check_int(name, value, minimum=minimum, maximum=maximum, owner=owner)
    except ValueError:
        bounds = _bounds(minimum, maximum, strict=False)
        meaning = f" ({none_means})" if none_means else ""
        raise ValueError(f"{prefix(owner)}{name} must be an integer{bounds} or None{meaning}, got {value!r}") from None


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict: bool = False,
    owner: str | None = None,
) -> float:
    """``value`` as a finite ``float`` within the bounds (exclusive when ``strict``); NaN, inf and bool rejected."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        low_bad = minimum is not None and (value < minimum or (strict and value == minimum))
        high_bad = maximum is not None and (value > maximum or (strict and value == maximum))
        ok = not (low_bad or high_bad)
    if not ok:
        bounds = _bounds(minimum, maximum, strict=strict)
        raise ValueError(f"{prefix(owner)}{name} must be a finite number{bounds}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any, *, owner: str | None = None) -> bool:
    """``value`` if it is a ``bool`` (``0`` / ``1`` / strings are rejected: they hide typos in YAML)."""
    if not isinstance(value, bool):
        raise ValueError(f"{prefix(owner)}{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[T], *, owner: str | None = None) -> T:
    """``value`` if it is one of ``choices``; otherwise an error listing them (and the closest, for strings)."""
    try:
        if value in choices:
            return value
    except TypeError:  # unhashable or incomparable
        pass
    hint = ""
    if isinstance(value, str):
        close = close_matches(value, [c for c in choices if isinstance(c, str)], n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise ValueError(f"{prefix(owner)}unknown {name} {value!r}; valid values: {list(choices)}{hint}")


def check_range(
    name: str,
    value: Any,
    *,
    owner: str | None = None,
    allow_none: bool = False,
) -> tuple[float, float] | None:
    """A ``(low, high)`` pair of finite numbers with ``low < high`` (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    if ok:
        try:
            low = check_float(f"{name}[0]", value[0], owner=owner)
            high = check_float(f"{name}[1]", value[1], owner=owner)
        except ValueError:
            ok = False
        else:
            ok = low < high
    if not ok:
        none = " or None" if allow_none else ""
        raise ValueError(f"{prefix(owner)}{name} must be a pair (low, high) of finite numbers with low < high{none}, "
                         f"got {value!r}")
    return float(value[0]), float(value[1])


def _bounds(minimum: float | None, maximum: float | None, *, strict: bool) -> str:
    low = ">" if strict else ">="
    high = "<" if strict else "<="
    if minimum is not None and maximum is not None:
        return f" in {'(' if strict else '['}{minimum}, {maximum}{')' if strict else ']'}"
    if minimum is not None:
        return f" {low} {minimum}"
    if maximum is not None:
        return f" {high} {maximum}"
    return ""
