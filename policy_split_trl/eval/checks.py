"""Type and range checks of the evaluation settings (`EvalConfig`, `SamplingConfig`, the CLI, the comparison YAML's
`evaluation`), each raising [`EvalConfigError`] that names the field, the value and what it must be.

Settings come from Python, from the command line and from YAML/JSON files, where `temperature: 6e-1` is a string
(PyYAML reads YAML 1.1), `k: 2.5` a float and `limit: true` a bool; each would otherwise fail much later (or never,
and give a wrong result), so every field is checked when the config is built.
"""

from __future__ import annotations

import math
from typing import Any


class EvalConfigError(ValueError):
    """An evaluation setting (a field, a flag, or a file it names) that cannot work; the message names it and the fix."""


def check_int(name: str, value: Any, minimum: int | None = None, optional: bool = False) -> None:
    """An integer (not a bool, not a float such as `2.0`) >= `minimum`; `None` too when `optional`."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise EvalConfigError(f"{name} must be an integer{bound}{' or None' if optional else ''}, got {value!r}.")


def check_number(
    name: str, value: Any, low: float, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> None:
    """A finite int or float (not a bool or a string such as YAML's `6e-1`) in the interval `low`..`high`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EvalConfigError(f"{name} must be a finite number, got {value!r}.")
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        interval = ("(" if low_open else "[") + f"{low}, " + (f"{high}" if high is not None else "inf")
        interval += ")" if high_open or high is None else "]"
        raise EvalConfigError(f"{name} must be in {interval}, got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """`True` or `False` (not `"false"`, which is truthy)."""
    if not isinstance(value, bool):
        raise EvalConfigError(f"{name} must be true or false, got {value!r}.")


def check_text(name: str, value: Any, optional: bool = False) -> None:
    """A non-blank string; `None` too when `optional`."""
    if optional and value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise EvalConfigError(f"{name} must be a non-empty string{' or None' if optional else ''}, got {value!r}.")


def check_text_list(name: str, value: Any) -> None:
    """A non-empty list (or tuple) of non-empty strings; a bare string is refused (it would be read letter by letter)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise EvalConfigError(f"{name} must be a non-empty list of names, got {value!r}.")
    for item in value:
        check_text(f"{name} entries", item)


def check_mapping(name: str, value: Any, keys_from: Any = None) -> None:
    """A dict with string keys; with `keys_from`, every key must be one of those (a typo would be silently ignored)."""
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise EvalConfigError(f"{name} must be a mapping with string keys, got {value!r}.")
    if keys_from is not None:
        unknown = sorted(set(value) - set(keys_from))
        if unknown:
            raise EvalConfigError(
                f"{name} names {unknown}, which {'is' if len(unknown) == 1 else 'are'} not among {list(keys_from)}: a "
                "setting under an unknown name would be silently ignored (a typo?)."
            )
