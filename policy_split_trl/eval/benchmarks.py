"""Evaluation benchmarks of the paper (SPEC §4) in one representation: MATH-500, AIME-24/25, GPQA-Diamond, MMLU-Pro
(Table 1), the 13 creative-writing prompts (Table 2), GSM8K for a quick demo evaluation, and held-out synthetic
arithmetic for the offline quickstart.

Every loader returns a `list[Problem]`: a one-turn conversational prompt with the task prompt of App. C.1, the gold
answer the rewards of `policy_split_trl.rewards` grade against (`math_accuracy_reward` for `kind="math"`,
`multiple_choice_reward` for `kind="multiple_choice"`, `arithmetic_reward` for `kind="arithmetic"`), and the source
row's extra fields in `metadata`.

By default each loader reads its Hub dataset (ids, configs and splits below, each checked against the dataset card
and public evaluation suites that load it). `source` may instead be a local json/jsonl/parquet/csv file in that
benchmark's Hub column format (the offline MATH-500, AIME-24 and GSM8K files under `tests/data/` are), or the Hub id
of a mirror with the same columns (its default config; the benchmark's split, or its only one). Synthetic arithmetic
has no Hub dataset: it is generated from a fixed seed, or read from a local file.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets

from ..data import LOCAL_FORMATS, load_local_file, synthetic_arithmetic, task_prompt

ProblemKind = Literal["math", "multiple_choice", "arithmetic", "creative"]

# Hub datasets. MATH-500 (test, 500 rows): problem, solution, answer, subject, level, unique_id (dataset card).
MATH500_DATASET = "HuggingFaceH4/MATH-500"
# AIME 2024 I+II (train, 30 rows): id, problem, solution, answer, url, year (dataset card).
AIME24_DATASET = "HuggingFaceH4/aime_2024"
# AIME 2025: one config per contest, AIME2025-I and AIME2025-II (test, 15 rows each): question, answer (dataset card;
# loaded this way by evalscope's `aime25` adapter).
AIME25_DATASET = "opencompass/AIME2025"
AIME25_CONFIGS = ("AIME2025-I", "AIME2025-II")
# GPQA (gated: accept its terms on the Hub and log in), config gpqa_diamond (train, 198 rows): Record ID, Question,
# Correct Answer, Incorrect Answer 1..3, High-level domain, Subdomain, ...
GPQA_DATASET = "Idavidrein/gpqa"
GPQA_DIAMOND_CONFIG = "gpqa_diamond"
# MMLU-Pro (test, ~12K rows): question_id, question, options (up to 10), answer (letter), answer_index, cot_content,
# category, src (dataset card; TIGER-AI-Lab/MMLU-Pro's evaluate_from_local.py).
MMLU_PRO_DATASET = "TIGER-Lab/MMLU-Pro"
# GSM8K, config main (test, 1319 rows): question, answer (worked solution ending in "#### N").
GSM8K_DATASET = "openai/gsm8k"
GSM8K_CONFIG = "main"
# Held-out synthetic arithmetic: its own seed, so that it is not the `test` split a training run with seed 42 draws
# (`synthetic:arithmetic` uses seeds `seed` and `seed + 1`); 100 distinct problems unless `limit` says otherwise.
ARITHMETIC_EVAL_SEED = 2604_11510
ARITHMETIC_EVAL_SIZE = 100

TABLE1_COLUMNS = ["MATH-500", "AIME-24/25", "GPQA-Diamond", "MMLU-Pro"]
# AIME-24 and AIME-25 are one merged column of Table 1 (SPEC §4); GSM8K, arithmetic and creative writing are not in
# Table 1.
_TABLE1_COLUMN_OF = {
    "math500": "MATH-500",
    "aime24": "AIME-24/25",
    "aime25": "AIME-24/25",
    "gpqa_diamond": "GPQA-Diamond",
    "mmlu_pro": "MMLU-Pro",
    "gsm8k": None,
    "arithmetic": None,
    "creative_writing": None,
}

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# MMLU-Pro pads questions with fewer than 10 options with "N/A" in some versions; its own evaluation drops them.
_MMLU_PRO_PADDING = "N/A"


@dataclass
class Problem:
    """
    One evaluation problem.

    Args:
        benchmark (`str`):
            Registry name of its benchmark (`"math500"`, `"aime24"`, ...).
        id (`str`):
            Stable identifier within the benchmark (the dataset's own id where it has one).
        prompt (`list[dict[str, str]]`):
            One user message with the paper's task prompt (App. C.1).
        answer (`str`):
            Gold answer: a final answer for `"math"`, an uppercase letter for `"multiple_choice"`, an integer for
            `"arithmetic"`, `""` for `"creative"`.
        kind (`str`):
            `"math"`, `"multiple_choice"`, `"arithmetic"` or `"creative"`; says which reward grades it.
        metadata (`dict`):
            Other fields of the source row (subject, level, choices, category, ...).
    """

    benchmark: str
    id: str
    prompt: list[dict[str, str]]
    answer: str
    kind: ProblemKind
    metadata: dict[str, Any] = field(default_factory=dict)


def multiple_choice_prompt(question: str, choices: Sequence[str]) -> list[dict[str, str]]:
    """
    The paper's multiple-choice prompt (App. C.1, GPQA-Diamond and MMLU-Pro): the task instruction, then a
    `### Question` and a `### Choices` section, the choices one per line as `A. text`.

    Args:
        question (`str`):
            The question text.
        choices (`Sequence[str]`):
            Option texts, in the order they are lettered.

    Returns:
        `list[dict[str, str]]`: `[{"role": "user", "content": ...}]`.
    """
    if not 0 < len(choices) <= len(_LETTERS):
        raise ValueError(f"A multiple-choice question needs 1 to {len(_LETTERS)} choices, got {len(choices)}.")
    rendered = "\n".join(f"{_LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    return task_prompt(f"### Question\n{question}\n\n### Choices\n{rendered}", "multiple_choice")


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be a non-negative integer or None, got {limit}.")


def _head(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    # Cut before formatting, so that `limit=10` on MMLU-Pro does not format 12K rows.
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.select(range(limit))


def _only_split(loaded: datasets.Dataset | datasets.DatasetDict, split: str, source: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split in loaded:
        return loaded[split]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise ValueError(f"{source!r} has splits {sorted(loaded)} and none is {split!r}; pass a local file instead.")


def _load_table(source: str | None, hub_id: str, config: str | None, split: str) -> datasets.Dataset:
    """The raw rows of a benchmark: its Hub dataset, a local file, or a Hub mirror with the same columns."""
    # `datasets.load_dataset` through the module, not a name bound at import, so that tests can monkeypatch it.
    if source is None:
        return datasets.load_dataset(hub_id, name=config, split=split)
    extension = os.path.splitext(source)[1].lower()
    if os.path.isfile(source):
        return load_local_file(source)
    if extension in LOCAL_FORMATS or os.path.isdir(source):
        raise FileNotFoundError(f"No such benchmark file: {source!r}.")
    if source == hub_id:
        return datasets.load_dataset(hub_id, name=config, split=split)
    # A mirror's configs and splits are its own: take its default config, and the benchmark's split or its only one.
    return _only_split(datasets.load_dataset(source), split, source)


def _resolve_columns(
    dataset: datasets.Dataset, benchmark: str, source: str | None, wanted: dict[str, Sequence[str]]
) -> dict[str, str]:
    """Map each wanted field to the first of its accepted column names that the dataset has."""
    resolved, missing = {}, []
    for key, names in wanted.items():
        found = next((name for name in names if name in dataset.column_names), None)
        if found is None:
            missing.append(names[0] if len(names) == 1 else " or ".join(repr(n) for n in names))
        else:
            resolved[key] = found
    if missing:
        where = source or "the Hub dataset"
        raise ValueError(
            f"{benchmark}: {where} has no column(s) {missing}; columns found: {dataset.column_names}. Use a file in "
            "the benchmark's Hub column format (see the loader's docstring)."
        )
    return resolved


def _first_present(row: dict[str, Any], names: Sequence[str]) -> Any:
    return next((row[name] for name in names if row.get(name) not in (None, "")), None)


def _metadata(row: dict[str, Any], used: Sequence[str]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key not in used}


def _aime_answer(answer: Any) -> str:
    # AIME answers are integers 0-999, often zero-padded ("025"): keep the number, so exact match works too.
    text = str(answer).strip()
    return str(int(text)) if text.isdigit() else text


# AIME mirrors disagree on capitalization and on `problem` vs `question`; all name the same two fields.
_AIME_COLUMNS = {"problem": ("problem", "question", "Problem", "Question"), "answer": ("answer", "Answer")}
_AIME_ID_COLUMNS = ("id", "ID", "unique_id")


def _aime_problems(
    dataset: datasets.Dataset, benchmark: str, source: str | None, id_prefix: str, first_index: int = 0
) -> list[Problem]:
    columns = _resolve_columns(dataset, benchmark, source, _AIME_COLUMNS)
    problems = []
    for index, row in enumerate(dataset, start=first_index):
        row_id = _first_present(row, _AIME_ID_COLUMNS)
        # A second name for the same text (some files have both `problem` and `question`) is not metadata.
        used = [
            name for key in ("problem", "answer") for name in _AIME_COLUMNS[key] if row.get(name) == row[columns[key]]
        ]
        problems.append(
            Problem(
                benchmark=benchmark,
                id=str(row_id) if row_id is not None else f"{id_prefix}{index}",
                prompt=task_prompt(row[columns["problem"]], "math"),
                answer=_aime_answer(row[columns["answer"]]),
                kind="math",
                metadata={"raw_answer": str(row[columns["answer"]]), **_metadata(row, used)},
            )
        )
    return problems


def load_math500(source: str | None = None, limit: int | None = None) -> list[Problem]:
    """
    MATH-500 (`HuggingFaceH4/MATH-500`, split `test`, 500 problems), with the paper's math prompt.

    Columns: `problem`, `answer` (gold), and `solution`, `subject`, `level`, `unique_id` (kept in `metadata`;
    `unique_id`, e.g. `"test/precalculus/807.json"`, is the problem id).

    Args:
        source (`str`, *optional*):
            A local json/jsonl/parquet/csv file (or a Hub mirror) in these columns instead of the Hub dataset.
        limit (`int`, *optional*):
            Keep the first `limit` problems.

    Returns:
        `list[Problem]`: `kind="math"`.
    """
    _check_limit(limit)
    dataset = _head(_load_table(source, MATH500_DATASET, None, "test"), limit)
    columns = _resolve_columns(dataset, "math500", source, {"problem": ("problem",), "answer": ("answer",)})
    return [
        Problem(
            benchmark="math500",
            id=str(row.get("unique_id") or f"math500-{index}"),
            prompt=task_prompt(row[columns["problem"]], "math"),
            answer=str(row[columns["answer"]]).strip(),
            kind="math",
            metadata=_metadata(row, ["problem", "answer"]),
        )
        for index, row in enumerate(dataset)
    ]


def load_aime24(source: str | None = None, limit: int | None = None) -> list[Problem]:
    """
    AIME 2024, contests I and II (`HuggingFaceH4/aime_2024`, split `train`, 30 problems), with the paper's math prompt.

    Columns: `problem`, `answer`, and `id`, `solution`, `url`, `year` (kept in `metadata`). Local files and mirrors may
    name the question `question`/`Problem` and the answer `Answer` (e.g. `Maxwell-Jia/AIME_2024`). Zero-padded answers
    (`"025"`) become plain integers (`"25"`); the original is in `metadata["raw_answer"]`.

    Args:
        source (`str`, *optional*):
            A local json/jsonl/parquet/csv file (or a Hub mirror) in these columns instead of the Hub dataset.
        limit (`int`, *optional*):
            Keep the first `limit` problems.

    Returns:
        `list[Problem]`: `kind="math"`.
    """
    _check_limit(limit)
    dataset = _head(_load_table(source, AIME24_DATASET, None, "train"), limit)
    return _aime_problems(dataset, "aime24", source, "aime24-")


def load_aime25(source: str | None = None, limit: int | None = None) -> list[Problem]:
    """
    AIME 2025, contests I and II (`opencompass/AIME2025`: configs `AIME2025-I` and `AIME2025-II`, split `test`,
    15 problems each, concatenated in that order), with the paper's math prompt.

    Columns: `question`, `answer` (`problem`/`Problem` and `Answer` are accepted too, e.g. `yentinglin/aime_2025`).
    The Hub rows have no id: a problem's id is its contest and 1-based position, `"AIME2025-I-3"`. A local file or
    mirror is one table (both contests, or one); its `id` column is used if it has one.

    Args:
        source (`str`, *optional*):
            A local json/jsonl/parquet/csv file (or a Hub mirror) in these columns instead of the Hub dataset.
        limit (`int`, *optional*):
            Keep the first `limit` problems (AIME2025-I comes first).

    Returns:
        `list[Problem]`: `kind="math"`.
    """
    _check_limit(limit)
    if source is not None and source != AIME25_DATASET:
        dataset = _head(_load_table(source, AIME25_DATASET, None, "test"), limit)
        return _aime_problems(dataset, "aime25", source, "aime25-")
    problems = []
    for config in AIME25_CONFIGS:
        if limit is not None and len(problems) >= limit:
            break
        dataset = datasets.load_dataset(AIME25_DATASET, name=config, split="test")
        contest = _aime_problems(dataset, "aime25", f"{AIME25_DATASET} ({config})", f"{config}-", first_index=1)
        for problem in contest:
            problem.metadata["contest"] = config
        problems.extend(contest)
    return problems if limit is None else problems[:limit]


def _choice_order(key: str, num_choices: int, seed: int) -> list[int]:
    # sha256 rather than `hash()`, which Python salts per process; and a Fisher-Yates shuffle on `random()` rather than
    # `random.shuffle`, since only `random()` is guaranteed to give the same sequence in every Python version.
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    order = list(range(num_choices))
    for i in range(num_choices - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        order[i], order[j] = order[j], order[i]
    return order


def load_gpqa_diamond(source: str | None = None, limit: int | None = None, seed: int = 0) -> list[Problem]:
    """
    GPQA-Diamond (`Idavidrein/gpqa`, config `gpqa_diamond`, split `train`, 198 questions), with the paper's
    multiple-choice prompt. The dataset is gated: accept its terms on the Hub and log in (`hf auth login`) first.

    Columns: `Question`, `Correct Answer`, `Incorrect Answer 1`, `Incorrect Answer 2`, `Incorrect Answer 3`, and
    `Record ID` (the problem id), `High-level domain`, `Subdomain` and the rest (kept in `metadata`).

    The dataset always lists the correct answer first, so the four answers are shuffled, deterministically: the order
    depends only on `seed` and the question's `Record ID` (its text when there is no id), not on the row's position,
    the process or the platform. The gold is the letter the correct answer lands on; `metadata` records the shown
    `choices`, the `correct_answer` text and its `gold_index`.

    Args:
        source (`str`, *optional*):
            A local json/jsonl/parquet/csv file (or a Hub mirror) in these columns instead of the Hub dataset.
        limit (`int`, *optional*):
            Keep the first `limit` questions.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the choice order (another seed gives another, equally fixed, order).

    Returns:
        `list[Problem]`: `kind="multiple_choice"`, gold one of `"A"`-`"D"`.
    """
    _check_limit(limit)
    dataset = _head(_load_table(source, GPQA_DATASET, GPQA_DIAMOND_CONFIG, "train"), limit)
    answer_columns = ["Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
    wanted = {name: (name,) for name in ["Question", *answer_columns]}
    _resolve_columns(dataset, "gpqa_diamond", source, wanted)
    problems = []
    for index, row in enumerate(dataset):
        # The raw texts carry stray spaces and newlines at their ends.
        question = str(row["Question"]).strip()
        answers = [str(row[name]).strip() for name in answer_columns]
        record_id = row.get("Record ID")
        order = _choice_order(str(record_id) if record_id else question, len(answers), seed)
        choices = [answers[i] for i in order]
        gold_index = order.index(0)
        problems.append(
            Problem(
                benchmark="gpqa_diamond",
                id=str(record_id) if record_id else f"gpqa_diamond-{index}",
                prompt=multiple_choice_prompt(question, choices),
                answer=_LETTERS[gold_index],
                kind="multiple_choice",
                metadata={
                    "choices": choices,
                    "correct_answer": answers[0],
                    "gold_index": gold_index,
                    **_metadata(row, ["Question", *answer_columns]),
                },
            )
        )
    return problems


# Two quoted strings side by side: numpy's list repr (`['x' 'y']`), which Python would read as one string `'xy'`.
_ADJACENT_STRINGS = re.compile(r"['\"]\s+['\"]")


def _parse_list(text: str) -> list | None:
    try:
        value = json.loads(text)
    except ValueError:
        if _ADJACENT_STRINGS.search(text):
            return None
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return None
    return list(value) if isinstance(value, (list, tuple)) else None


def _as_list(value: Any, index: int) -> list[str]:
    # A csv holds the option list as text: JSON, or a Python list as pandas writes it.
    options = _parse_list(value) if isinstance(value, str) else value
    if options is None:
        raise ValueError(
            f"mmlu_pro row {index}: cannot read `options` as a list; in a csv, write it as a JSON list "
            '(["first", "second", ...]).'
        )
    return [str(option) for option in options]


def load_mmlu_pro(source: str | None = None, limit: int | None = None) -> list[Problem]:
    """
    MMLU-Pro (`TIGER-Lab/MMLU-Pro`, split `test`, ~12K questions), with the paper's multiple-choice prompt.

    Columns: `question`, `options` (a list of up to 10 texts), `answer` (gold letter), and `question_id` (the problem
    id), `answer_index`, `category`, `src`, `cot_content` (kept in `metadata`, but for `cot_content`, a worked answer).
    `"N/A"` padding options are dropped, as MMLU-Pro's own evaluation does; the gold letter is re-derived from
    `answer_index` (or `answer`) so that it still points at the same option text.

    Args:
        source (`str`, *optional*):
            A local json/jsonl/parquet/csv file (or a Hub mirror) in these columns instead of the Hub dataset.
        limit (`int`, *optional*):
            Keep the first `limit` questions.

    Returns:
        `list[Problem]`: `kind="multiple_choice"`, gold one of `"A"`-`"J"`.
    """
    _check_limit(limit)
    dataset = _head(_load_table(source, MMLU_PRO_DATASET, None, "test"), limit)
    wanted = {"question": ("question",), "options": ("options",), "answer": ("answer",)}
    _resolve_columns(dataset, "mmlu_pro", source, wanted)
    problems = []
    for index, row in enumerate(dataset):
        options = _as_list(row["options"], index)
        answer_index = row.get("answer_index")
        if answer_index is None or answer_index == "":
            answer_index = _LETTERS.index(str(row["answer"]).strip().strip("()").upper())
        answer_index = int(answer_index)
        if not 0 <= answer_index < len(options) or options[answer_index] == _MMLU_PRO_PADDING:
            raise ValueError(f"mmlu_pro row {index}: answer index {answer_index} is not one of its {options}.")
        kept = [i for i, option in enumerate(options) if option != _MMLU_PRO_PADDING]
        choices = [options[i] for i in kept]
        gold_index = kept.index(answer_index)
        question_id = row.get("question_id")
        problems.append(
            Problem(
                benchmark="mmlu_pro",
                id=str(question_id) if question_id not in (None, "") else f"mmlu_pro-{index}",
                prompt=multiple_choice_prompt(str(row["question"]).strip(), choices),
                answer=_LETTERS[gold_index],
                kind="multiple_choice",
                metadata={
                    "choices": choices,
                    "correct_answer": choices[gold_index],
                    "gold_index": gold_index,
                    **_metadata(row, ["question", "options", "answer", "cot_content"]),
                },
            )
        )
    return problems


def gsm8k_final_answer(answer: str) -> str:
    """
    The final answer of a GSM8K worked solution: the number after the last `####`, without thousands separators
    (`"... #### 1,450,000"` -> `"1450000"`).

    Args:
        answer (`str`):
            GSM8K's `answer` field.

    Returns:
        `str`: the gold number as text.
    """
    final = answer.rsplit("####", 1)[1].strip().replace(",", "") if "####" in answer else ""
    if not final:
        raise ValueError(f"GSM8K answer has no final '#### N' line: {answer[-80:]!r}.")
    # Only the rest of the "####" line: nothing follows it in GSM8K, but a hand-made file might add a line.
    return final.splitlines()[0].strip()


def load_gsm8k(source: str | None = None, limit: int | None = None) -> list[Problem]:
    """
    GSM8K test (`openai/gsm8k`, config `main`, split `test`, 1319 problems), with the paper's math prompt.

    The paper does not evaluate GSM8K: it is here for a quick demo evaluation of small models, which rarely solve
    MATH-500 or AIME. Columns: `question`, and `answer`, a worked solution whose last line is `#### N`; the gold is
    `N` without commas and the full solution is kept as `metadata["solution"]`.

    Args:
        source (`str`, *optional*):
            A local json/jsonl/parquet/csv file (or a Hub mirror) in these columns instead of the Hub dataset.
        limit (`int`, *optional*):
            Keep the first `limit` problems.

    Returns:
        `list[Problem]`: `kind="math"`.
    """
    _check_limit(limit)
    dataset = _head(_load_table(source, GSM8K_DATASET, GSM8K_CONFIG, "test"), limit)
    _resolve_columns(dataset, "gsm8k", source, {"question": ("question",), "answer": ("answer",)})
    problems = []
    for index, row in enumerate(dataset):
        row_id = row.get("id")
        problems.append(
            Problem(
                benchmark="gsm8k",
                id=str(row_id) if row_id not in (None, "") else f"gsm8k-{index}",
                prompt=task_prompt(row["question"], "math"),
                answer=gsm8k_final_answer(row["answer"]),
                kind="math",
                metadata={"solution": row["answer"], **_metadata(row, ["question", "answer"])},
            )
        )
    return problems


# A file of arithmetic problems: training's own columns (`prompt`/`solution`) or the usual `question`/`answer`.
_ARITHMETIC_COLUMNS = {"question": ("prompt", "question"), "answer": ("solution", "answer")}


def _distinct_arithmetic(count: int, seed: int) -> list[dict[str, Any]]:
    # `synthetic_arithmetic` draws with replacement from a small space (21 x 21 x 2 = 882 problems by default), so a
    # draw repeats problems: keep the first `count` distinct ones. Its rows are a fixed sequence per seed, so a smaller
    # count is a prefix of a larger one, as `limit` is for the other benchmarks.
    if count == 0:
        return []
    draws, found_before = max(2 * count, 64), -1
    while True:
        rows, seen = [], set()
        drawn = synthetic_arithmetic(draws, seed=seed)
        for prompt, solution in zip(drawn["prompt"], drawn["solution"], strict=True):  # columns: faster than rows
            if prompt[-1]["content"] not in seen:
                seen.add(prompt[-1]["content"])
                rows.append({"prompt": prompt, "solution": solution})
                if len(rows) == count:
                    return rows
        if len(rows) == found_before:  # 4x the draws found nothing new: every distinct problem is there
            return rows
        draws, found_before = 4 * draws, len(rows)


def _number_text(value: Any, index: int, source: str) -> str:
    text = str(value).strip()
    try:
        float(text)
    except ValueError:
        raise ValueError(
            f"arithmetic: row {index} of {source} has the answer {value!r}; arithmetic answers are numbers."
        ) from None
    return text


def load_arithmetic(
    source: str | None = None, limit: int | None = None, seed: int = ARITHMETIC_EVAL_SEED
) -> list[Problem]:
    """
    Held-out synthetic arithmetic (`"What is 23 - 7?"`), the task of the offline quickstart
    (`dataset_name: synthetic:arithmetic`): the same generator, operand range and task prompt as training, graded by
    `arithmetic_reward` (the last number of the completion, or the last boxed one, equals the answer).

    The problems are the first distinct ones that [`~policy_split_trl.data.synthetic_arithmetic`] draws with the fixed
    `seed` (`ARITHMETIC_EVAL_SEED`, not a seed that training's `synthetic:arithmetic` splits use), 100 of them by
    default. Held out by seed, not by content: with operands 0-20 there are only 882 distinct problems, so a long
    training run sees most of them; the benchmark measures the skill on the training distribution.

    Args:
        source (`str`, *optional*):
            A local json/jsonl/parquet/csv file with `prompt`/`solution` (training's columns) or `question`/`answer`
            columns instead; a text question gets the arithmetic task prompt, a conversational one is used as is.
        limit (`int`, *optional*):
            Keep the first `limit` problems (up to 882 generated ones without `source`).
        seed (`int`, *optional*, defaults to `ARITHMETIC_EVAL_SEED`):
            Seed of the generated problems; the same seed gives the same problems.

    Returns:
        `list[Problem]`: `kind="arithmetic"`, gold an integer as text.
    """
    _check_limit(limit)
    if source is None:
        rows = _distinct_arithmetic(ARITHMETIC_EVAL_SIZE if limit is None else limit, seed)
        return [
            Problem(
                benchmark="arithmetic",
                id=f"arithmetic-{index}",
                prompt=row["prompt"],
                answer=row["solution"],
                kind="arithmetic",
                metadata={"seed": seed},
            )
            for index, row in enumerate(rows)
        ]
    if not os.path.isfile(source):
        raise FileNotFoundError(f"No such arithmetic file: {source!r} (arithmetic has no Hub dataset).")
    dataset = _head(load_local_file(source), limit)
    columns = _resolve_columns(dataset, "arithmetic", source, _ARITHMETIC_COLUMNS)
    problems = []
    for index, row in enumerate(dataset):
        question, row_id = row[columns["question"]], row.get("id")
        problems.append(
            Problem(
                benchmark="arithmetic",
                id=str(row_id) if row_id not in (None, "") else f"arithmetic-{index}",
                prompt=task_prompt(question, "arithmetic") if isinstance(question, str) else question,
                answer=_number_text(row[columns["answer"]], index, source),
                kind="arithmetic",
                metadata=_metadata(row, list(columns.values())),
            )
        )
    return problems


def load_creative_writing(limit: int | None = None) -> list[Problem]:
    """
    The 13 creative-writing prompts of the paper (App. C.3, Table 2), each as a user message without a task
    instruction; there is no gold (`answer=""`): stories are scored for diversity and by an LLM judge.

    Args:
        limit (`int`, *optional*):
            Keep the first `limit` prompts.

    Returns:
        `list[Problem]`: `kind="creative"`.
    """
    _check_limit(limit)
    # Imported here so that the other benchmarks load even where the prompts module is unavailable.
    from .creative import CREATIVE_WRITING_PROMPTS

    prompts = list(CREATIVE_WRITING_PROMPTS)
    if limit is not None:
        prompts = prompts[:limit]
    return [
        Problem(
            benchmark="creative_writing",
            id=f"creative_writing-{index}",
            prompt=task_prompt(text, "none"),
            answer="",
            kind="creative",
            metadata={"index": index},
        )
        for index, text in enumerate(prompts)
    ]


BENCHMARKS: dict[str, Callable[..., list[Problem]]] = {
    "math500": load_math500,
    "aime24": load_aime24,
    "aime25": load_aime25,
    "gpqa_diamond": load_gpqa_diamond,
    "mmlu_pro": load_mmlu_pro,
    "gsm8k": load_gsm8k,
    "arithmetic": load_arithmetic,
    "creative_writing": load_creative_writing,
}


def load_benchmark(name: str, source: str | None = None, limit: int | None = None) -> list[Problem]:
    """
    Load a benchmark by its registry name.

    Args:
        name (`str`):
            A key of `BENCHMARKS`: `math500`, `aime24`, `aime25`, `gpqa_diamond`, `mmlu_pro`, `gsm8k`,
            `arithmetic`, `creative_writing`.
        source (`str`, *optional*):
            A local file (or Hub mirror) instead of the default Hub dataset (for `arithmetic`: a local file instead of
            the generated problems); not accepted for `creative_writing`, whose prompts ship with the package.
        limit (`int`, *optional*):
            Keep the first `limit` problems.

    Returns:
        `list[Problem]`: the benchmark's problems.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}.")
    if name == "creative_writing":
        if source is not None:
            raise ValueError("creative_writing takes no source: its 13 prompts ship with the package (App. C.3).")
        return load_creative_writing(limit=limit)
    return BENCHMARKS[name](source=source, limit=limit)


def table1_column(benchmark_name: str) -> str | None:
    """
    The Table 1 column a benchmark's accuracy is reported under (SPEC §4): AIME-24 and AIME-25 share `"AIME-24/25"`.

    Args:
        benchmark_name (`str`):
            A key of `BENCHMARKS`.

    Returns:
        `str` or `None`: one of `TABLE1_COLUMNS`, or `None` for benchmarks outside Table 1 (GSM8K, arithmetic,
        creative writing).
    """
    if benchmark_name not in _TABLE1_COLUMN_OF:
        raise ValueError(f"Unknown benchmark {benchmark_name!r}; choose one of {sorted(BENCHMARKS)}.")
    return _TABLE1_COLUMN_OF[benchmark_name]
