"""Type and range checks of the evaluation settings (`EvalConfig`, `SamplingConfig`, the comparison's `evaluation`),
each raising [`EvalConfigError`] that names the field, the value and what it must be, and [`MappingAction`], the
command-line form of their mapping fields.

Settings come from Python, from the command line and from YAML/JSON files, where `temperature: 6e-1` is a string
(PyYAML reads YAML 1.1), `k: 2.5` a float and `limit: true` a bool; each would otherwise fail much later (or never,
and give a wrong result), so every field is checked when the config is built.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
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


# ---------------------------------------------------------------- mapping fields on the command line


class CommandLineMapping(dict):
    """A mapping being read from the command line; `flags` records which flag gave each name (to refuse repeats)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.flags: dict[str, str] = {}


def as_text(flag: str, name: str, text: str) -> str:
    """The value of `NAME=VALUE` as given (a file path, a system prompt, a URL)."""
    return text


def as_json(flag: str, name: str, text: str) -> Any:
    """The value of `NAME=VALUE` as JSON when it is JSON (`true`, `3`, `[1, 2]`), as text otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def as_limit(flag: str, name: str, text: str) -> int:
    """A number of problems (`--limit_for math500=50`)."""
    try:
        return int(text)
    except ValueError:
        raise EvalConfigError(f"{flag} {name}={text}: the limit must be an integer.") from None


class MappingAction(argparse.Action):
    """
    Reads a mapping field (`sources`, `limits`, `judge`, ...) from the command line, where
    [`~transformers.HfArgumentParser`] has no form for it: `NAME=VALUE` tokens (`--source math500=a.jsonl
    gsm8k=b.jsonl`, the flag may be repeated) or one JSON object (`--chat_template_kwargs '{"enable_thinking": true}'`).
    The names given are added to the config file's mapping (replacing its value for a name it has). A dataclass field
    uses it through its metadata, which `TrlParser` passes to `add_argument`:
    `field(default_factory=dict, metadata={"help": ..., "action": MappingAction, "value": as_limit})`.

    A malformed JSON object is a usage error (exit status 2, like a bad number); a token that is not `NAME=VALUE`, a
    name given twice (by one flag or two) or a value its reader refuses raises [`EvalConfigError`] naming the flag.

    Args (besides `argparse.Action`'s):
        value (`Callable[[str, str, str], Any]`, *optional*, defaults to [`as_text`]):
            `(flag, name, text) -> value` of a `NAME=VALUE` token, e.g. [`as_limit`], [`as_json`], or a reader of the
            file the text names.
        key (`str`, *optional*):
            The flag sets this one name and takes just its value (`--judge_model M` is `judge: {model: M}`).
    """

    def __init__(
        self,
        option_strings: list[str],
        dest: str,
        value: Callable[[str, str, str], Any] | None = None,
        key: str | None = None,
        type: Any = None,  # the field's annotation (`dict[str, str]`), from HfArgumentParser: not a converter
        **kwargs: Any,
    ):
        kwargs["nargs"] = None if key else "+"
        super().__init__(option_strings, dest, **kwargs)
        self.value = value or as_text
        self.key = key

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: str | None = None):
        flag = option_string or self.dest
        current = getattr(namespace, self.dest, None)
        if isinstance(current, CommandLineMapping):
            mapping = current
        else:  # the config file's mapping (or the default): the command line adds to it
            mapping = CommandLineMapping(current if isinstance(current, dict) else {})
        for name, value in self._items(parser, flag, values):
            earlier = mapping.flags.get(name)
            if earlier == flag:
                raise EvalConfigError(f"{flag} gives {name!r} twice ({mapping[name]!r} and {value!r}); keep one.")
            if earlier:
                raise EvalConfigError(f"{name!r} is given by both {earlier} and {flag}; keep one.")
            mapping[name] = value
            mapping.flags[name] = flag
        setattr(namespace, self.dest, mapping)

    def _items(self, parser: argparse.ArgumentParser, flag: str, values: Any) -> list[tuple[str, Any]]:
        if self.key:
            return [(self.key, self.value(flag, self.key, values))]
        if len(values) == 1 and values[0].lstrip().startswith(("{", "[")):
            try:
                mapping = json.loads(values[0])
            except json.JSONDecodeError as error:
                parser.error(f"argument {flag}: not valid JSON ({error}): {values[0]!r}")
            if not isinstance(mapping, dict):
                parser.error(
                    f"argument {flag}: must be a JSON object such as '{{\"enable_thinking\": true}}' (or NAME=VALUE "
                    f"tokens), got {values[0]!r}"
                )
            return list(mapping.items())
        items = []
        for token in values:
            name, sep, text = token.partition("=")
            if not sep or not name or not text:
                raise EvalConfigError(f"{flag} takes NAME=VALUE, got {token!r}.")
            items.append((name, self.value(flag, name, text)))
        return items
