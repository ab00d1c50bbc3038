"""Argument checks shared by the core and the callback: each names the argument it rejects."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .quantizers.approx_quantizer import check_bitwidth


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


def check_overrides(overrides: Mapping[str, int] | None, name: str = "bitwidth_overrides") -> dict[str, int]:
    """``{fnmatch pattern: bits}`` with every bitwidth checked; None is no override."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(f"`{name}` must be a dict {{layer pattern: bits}}, got {overrides!r}")
    checked = {}
    for pattern, bits in overrides.items():
        if not isinstance(pattern, str):
            raise TypeError(f"`{name}` keys must be fnmatch patterns (str), got {pattern!r}")
        checked[pattern] = check_bitwidth(bits, f"{name}[{pattern!r}]")
    return checked


RANGE_GRADIENT_CHOICES = (False, True, "weights", "inputs")


def check_range_gradient(value: object, name: str = "range_gradient") -> bool | str:
    """False, True, "weights" or "inputs": which quantizers pass a gradient to their range."""
    if not any(value is choice or (isinstance(choice, str) and value == choice) for choice in RANGE_GRADIENT_CHOICES):
        raise ValueError(f"`{name}` must be False, True, 'weights' or 'inputs', got {value!r}")
    return value
