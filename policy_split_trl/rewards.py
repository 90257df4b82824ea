"""Reward functions for Policy Split training, and lookup by name or dotted path.

Math correctness is TRL's own `accuracy_reward` / `reasoning_accuracy_reward` (math-verify), wrapped so that a bare
gold answer (`"\\frac{14}{3}"`, as in MATH-500 or DeepMath `final_answer`) is graded as LaTeX, plain-string
completions work, and MATH-style brace-less shorthands (`\\frac43`, `\\sqrt2`) parse. The paper grades with the PRM800K
grader (App. B.1); we use math-verify through `trl.rewards`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from trl.rewards import accuracy_reward, reasoning_accuracy_reward, think_format_reward

Completions = list[list[dict[str, str]]] | list[str]

# `\frac43`, `\frac 59`, `\dfrac9{19}`, `\frac{270}7`: TeX takes one token per argument; math-verify needs braces.
_FRAC_TWO_DIGITS = re.compile(r"\\([dt]?frac)\s*(\d)\s*(\d)")
_FRAC_DIGIT_FIRST = re.compile(r"\\([dt]?frac)\s*(\d)\s*\{")
_FRAC_DIGIT_SECOND = re.compile(r"\\([dt]?frac)\s*(\{[^{}]*\})\s*(\d)")
_SQRT_DIGIT = re.compile(r"\\sqrt\s*(\d)")
# An unescaped `$`, `\(`, `\[` or a box: the text already says where its math is (`\$18.90` is a price, not math).
_MATH_DELIMITER = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed")


def normalize_latex_shorthand(text: str) -> str:
    """
    Add the braces TeX lets authors omit around one-character arguments (`\\frac43` -> `\\frac{4}{3}`,
    `\\sqrt2` -> `\\sqrt{2}`), which math-verify does not parse.

    Args:
        text (`str`):
            Any text with LaTeX.

    Returns:
        `str`: the text with those arguments braced; everything else unchanged.
    """
    text = _FRAC_TWO_DIGITS.sub(r"\\\1{\2}{\3}", text)
    text = _FRAC_DIGIT_FIRST.sub(r"\\\1{\2}{", text)
    text = _FRAC_DIGIT_SECOND.sub(r"\\\1\2{\3}", text)
    return _SQRT_DIGIT.sub(r"\\sqrt{\1}", text)


def as_gold_latex(answer: str) -> str:
    """
    A bare final answer as math-verify expects a gold solution: in `$...$` unless already delimited or boxed.

    Args:
        answer (`str`):
            A final answer such as `"\\frac{14}{3}"` or `"3"`, or a full solution text.

    Returns:
        `str`: the answer ready for `trl.rewards.accuracy_reward`'s `solution` argument.
    """
    answer = normalize_latex_shorthand(str(answer).strip())
    if _MATH_DELIMITER.search(answer):
        return answer
    return f"${answer}$"


def completion_texts(completions: Completions) -> list[str]:
    """The text of each completion, conversational (`[{"role": "assistant", "content": ...}]`) or plain string."""
    return [c if isinstance(c, str) else c[0]["content"] for c in completions]


def _normalized_messages(completions: Completions) -> list[list[dict[str, str]]]:
    return [[{"role": "assistant", "content": normalize_latex_shorthand(t)}] for t in completion_texts(completions)]


def math_accuracy_reward(completions: Completions, solution: list[str], **kwargs: Any) -> list[float | None]:
    """
    1.0 if the completion's final (boxed) answer is mathematically equal to the gold answer, else 0.0 (math-verify,
    through `trl.rewards.accuracy_reward`). `None` (example skipped) where the gold answer cannot be parsed.

    Args:
        completions (`list`):
            Completions, conversational or plain strings.
        solution (`list[str]`):
            Gold final answers (bare LaTeX such as `"\\frac{14}{3}"`) or gold solution texts.
        **kwargs:
            Passed on to TRL's reward (e.g. the trainer's `log_extra`).

    Returns:
        `list[float | None]`: one reward per completion.
    """
    return accuracy_reward(_normalized_messages(completions), [as_gold_latex(s) for s in solution], **kwargs)


def reasoning_math_accuracy_reward(
    completions: Completions, solution: list[str], reasoning_delimiters: list[str] | None = None, **kwargs: Any
) -> list[float | None]:
    """
    [`math_accuracy_reward`] for reasoning models (Qwen3 thinking): only the text after the reasoning delimiter
    (default `</think>`) is graded, and a completion that never closes its reasoning scores 0
    (`trl.rewards.reasoning_accuracy_reward`).

    Args:
        completions (`list`):
            Completions, conversational or plain strings.
        solution (`list[str]`):
            Gold final answers or gold solution texts.
        reasoning_delimiters (`list[str]`, *optional*):
            Strings that end the reasoning; defaults to TRL's `["</think>"]`.
        **kwargs:
            Passed on to TRL's reward.

    Returns:
        `list[float | None]`: one reward per completion.
    """
    return reasoning_accuracy_reward(
        _normalized_messages(completions),
        [as_gold_latex(s) for s in solution],
        reasoning_delimiters=reasoning_delimiters,
        **kwargs,
    )


def extract_boxed(text: str) -> list[str]:
    """
    The contents of every `\\boxed{...}` in `text`, in order, with nested braces balanced.

    Args:
        text (`str`):
            A completion.

    Returns:
        `list[str]`: the boxed contents (an unterminated box is ignored).
    """
    contents = []
    for match in re.finditer(r"\\boxed\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                contents.append(text[start:i])
                break
    return contents


_CHOICE_WRAPPERS = re.compile(r"\\text(?:bf|rm)?\s*\{([^{}]*)\}|\\mathrm\s*\{([^{}]*)\}")


def multiple_choice_reward(completions: Completions, solution: list[str], **kwargs: Any) -> list[float]:
    """
    1.0 if the completion's boxed option letter equals the gold letter (GPQA / MMLU-Pro style, App. C.1), else 0.0.

    The prompt asks for "the uppercase letter index of the chosen option within \\boxed{}", and the reward holds the
    model to it:
    - the **last** `\\boxed{}` is the answer (a model that revises itself boxes again; earlier boxes are drafts);
    - inside it, `\\text{}`/`\\textbf{}`/`\\mathrm{}`, parentheses, a trailing period and spaces are ignored, so
      `\\boxed{(C)}` and `\\boxed{\\text{C}}` count as `C`;
    - what remains must be exactly one uppercase letter: a lowercase letter, an option text or several letters
      score 0.0, and so does a completion without any box.

    Args:
        completions (`list`):
            Completions, conversational or plain strings.
        solution (`list[str]`):
            Gold letters (`"C"`; `"(C)"` is accepted too).

    Returns:
        `list[float]`: one reward per completion.
    """
    rewards = []
    for text, gold in zip(completion_texts(completions), solution, strict=True):
        gold_letter = str(gold).strip().strip("()").strip()
        boxes = extract_boxed(text)
        if not boxes:
            rewards.append(0.0)
            continue
        answer = _CHOICE_WRAPPERS.sub(lambda m: m.group(1) or m.group(2) or "", boxes[-1])
        answer = answer.replace(" ", "").strip("().")
        rewards.append(float(len(answer) == 1 and answer.isupper() and answer == gold_letter))
    return rewards


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def arithmetic_reward(completions: Completions, solution: list[str], **kwargs: Any) -> list[float]:
    """
    1.0 if the final number of the completion equals the integer answer, else 0.0 (the offline quickstart task).

    The answer is the last boxed number if the completion boxes one, otherwise the last number in the text; small
    models rarely box, and the quickstart prompt asks for just the number.

    Args:
        completions (`list`):
            Completions, conversational or plain strings.
        solution (`list[str]`):
            Gold answers (`"42"`).

    Returns:
        `list[float]`: one reward per completion.
    """
    rewards = []
    for text, gold in zip(completion_texts(completions), solution, strict=True):
        boxed = [n for box in extract_boxed(text) for n in _NUMBER.findall(box)]
        numbers = boxed or _NUMBER.findall(text.replace(",", ""))
        rewards.append(float(bool(numbers) and float(numbers[-1]) == float(gold)))
    return rewards


REWARD_FUNCS: dict[str, Callable[..., list[float | None]]] = {
    "accuracy": math_accuracy_reward,
    "reasoning_accuracy": reasoning_math_accuracy_reward,
    "multiple_choice": multiple_choice_reward,
    "arithmetic": arithmetic_reward,
    "think_format": think_format_reward,
}


def get_reward_func(name: str) -> Callable[..., list[float | None]]:
    """
    A reward function by registry name (see `REWARD_FUNCS`) or by dotted path (`my_pkg.rewards.my_reward` or
    `my_pkg.rewards:my_reward`).

    Args:
        name (`str`):
            Registry name or dotted path.

    Returns:
        `Callable`: the reward function.
    """
    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    module_name, sep, attr = name.partition(":") if ":" in name else name.rpartition(".")
    if not sep or not module_name:
        raise ValueError(
            f"Unknown reward function {name!r}. Use one of {sorted(REWARD_FUNCS)} or a dotted path such as "
            "'my_package.my_module.my_reward'."
        )
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"Cannot import reward function {name!r}: {error}") from error
    if not callable(func):
        raise TypeError(f"Reward {name!r} resolves to a non-callable {type(func).__name__}.")
    return func
