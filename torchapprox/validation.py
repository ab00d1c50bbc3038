"""Argument checks shared by the core and the callback: each names the argument it rejects."""

from __future__ import annotations

from collections.abc import Iterable


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}")
    return value


def check_patterns(exclude: str | Iterable[str], name: str = "exclude") -> tuple[str, ...]:
    """A single fnmatch pattern or an iterable of them, as a tuple."""
    patterns = (exclude,) if isinstance(exclude, str) else exclude
    try:
        patterns = tuple(patterns)
    except TypeError:
        raise TypeError(
            f"`{name}` must be a pattern or a list of fnmatch patterns, got {exclude!r}"
        ) from None
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"`{name}` must hold fnmatch patterns (str), got {pattern!r}")
    return patterns
