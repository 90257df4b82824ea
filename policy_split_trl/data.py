"""Training data: DeepMath-103K (the paper's), any local or Hub dataset with a column mapping, and a seeded synthetic
arithmetic task for the offline quickstart and tests.

Every loader returns a `datasets.Dataset` with a conversational `prompt` column and a `solution` column (the gold
answer the reward functions grade against), which is what [`PolicySplitGRPOTrainer`] and `policy_split_trl.rewards`
expect.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, List, Value, load_dataset

# App. C.1 of the paper (math tasks: MATH-500, AIME), also used for training on DeepMath (SPEC §4).
MATH_TASK_PROMPT = "Solve the following math problem. Put your final answer within \\boxed{}."
# App. C.1 (GPQA-Diamond, MMLU-Pro).
MULTIPLE_CHOICE_TASK_PROMPT = (
    "Select one option from the given choices that accurately answers the question, and enclose your final answer "
    "(which should be the uppercase letter index of the chosen option) within \\boxed{}."
)
# The offline quickstart: small models answer short arithmetic, rarely in a box.
ARITHMETIC_TASK_PROMPT = "Compute the following. Answer with just the number."

TASK_PROMPTS: dict[str, str | None] = {
    "math": MATH_TASK_PROMPT,
    "multiple_choice": MULTIPLE_CHOICE_TASK_PROMPT,
    "arithmetic": ARITHMETIC_TASK_PROMPT,
    "none": None,
}

DEEPMATH_DATASET = "zwhe99/DeepMath-103K"
SYNTHETIC_ARITHMETIC = "synthetic:arithmetic"
# File extension -> `datasets` builder, for the local files every loader of this package accepts.
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


# Rows of an `IterableDataset` that `validate_prompt_dataset` reads: its head only, never the whole stream.
ITERABLE_ROWS_CHECKED = 16
# Usual names of a prompt column, for the example in the missing-column error.
PROMPT_COLUMN_NAMES = ("question", "problem", "query", "instruction", "input", "messages", "text")
PROMPT_FORMAT = "every prompt must be a non-empty string or a non-empty list of {'role': str, 'content': str} messages"


def _prompt_problem(prompt: Any) -> str | None:
    """What is wrong with one prompt ("is an empty string", "has message 0 without a role"), or `None` if it is valid."""
    if prompt is None:
        return "is None"
    if isinstance(prompt, str):
        return None if prompt.strip() else ("is an empty string" if not prompt else "is a whitespace-only string")
    if not isinstance(prompt, list):
        return f"is {_short(prompt)} of type {type(prompt).__name__}"
    if not prompt:
        return "is an empty list of messages"
    for j, message in enumerate(prompt):
        if not isinstance(message, dict):
            return f"has message {j} {_short(message)}, not a {{'role': ..., 'content': ...}} dict"
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role.strip():
            return f"has message {j} without a role (role={role!r})"
        if not isinstance(content, str):
            return f"has message {j} ({role}) whose content {_short(content)} is not a string"
    if not any(message["content"].strip() for message in prompt):
        return "has only empty messages"
    return None


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _candidate_bad_rows(array: pa.Array, feature: Any) -> np.ndarray | None:
    """
    Rows that may be bad prompts (a superset: each is confirmed by `_prompt_problem`), computed on the Arrow column
    without building Python objects, for the two layouts every loader here writes: a string column and a list of
    `{role, content}` string structs. `None` for any other layout (checked row by row).
    """
    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    if feature == Value("string"):
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(array)), 0)
        return pc.or_kleene(array.is_null(), pc.fill_null(empty, True)).to_numpy(zero_copy_only=False)
    inner = getattr(feature, "feature", None)
    if not (isinstance(feature, List) and isinstance(inner, dict)):
        return None
    if inner.get("role") != Value("string") or inner.get("content") != Value("string"):
        return np.ones(len(array), dtype=bool)  # a missing or non-string field: the first row says which
    messages = pc.list_flatten(array)
    parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
    role, content = pc.struct_field(messages, "role"), pc.struct_field(messages, "content")
    bad_message = pc.or_kleene(
        pc.or_kleene(messages.is_null(), role.is_null()),
        pc.or_kleene(content.is_null(), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(role)), 0)),
    )
    bad_message = pc.fill_null(bad_message, True).to_numpy(zero_copy_only=False)
    has_text = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(content)), 0), False)
    has_text = has_text.to_numpy(zero_copy_only=False)
    candidates = np.bincount(parents[has_text & ~bad_message], minlength=len(array)) == 0  # null, [] or all empty
    candidates[parents[bad_message]] = True
    return candidates


def validate_prompt_dataset(
    dataset: Dataset | IterableDataset | dict[str, Any],
    name: str = "train_dataset",
    column: str = "prompt",
    iterable_rows: int = ITERABLE_ROWS_CHECKED,
) -> None:
    """
    Check, before any model is loaded, that a dataset can be trained on: it has the prompt column, at least one row,
    and every prompt is a non-empty string or a non-empty conversational list of `{"role": str, "content": str}`
    messages (with some text). Otherwise the trainer fails at its first step, after the model has loaded, with a
    `KeyError` or a tensor dtype error from an empty prompt.

    A `Dataset` is checked in full: on the Arrow column for string and `{role, content}` prompts (20,000 rows in
    ~10 ms), row by row for any other layout. An `IterableDataset` is never materialized: its first `iterable_rows`
    rows are checked (a stream may be endless or remote).

    Args:
        dataset (`Dataset`, `IterableDataset` or `dict` of them):
            The dataset; a `DatasetDict` (or a dict of eval datasets) is checked split by split, as `name[split]`.
        name (`str`, *optional*, defaults to `"train_dataset"`):
            What to call the dataset in the error (the argument or file it came from).
        column (`str`, *optional*, defaults to `"prompt"`):
            The prompt column.
        iterable_rows (`int`, *optional*, defaults to `16`):
            Rows of an `IterableDataset` to check.

    Raises:
        `ValueError`: naming `name`, the column and the first bad row index, with the fix.
        `TypeError`: not a dataset.
    """
    if iterable_rows < 1:
        raise ValueError(f"iterable_rows must be >= 1, got {iterable_rows}.")
    if isinstance(dataset, (dict, DatasetDict, IterableDatasetDict)):
        for split, part in dataset.items():
            validate_prompt_dataset(part, f"{name}[{split!r}]", column, iterable_rows)
        return
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(f"{name} must be a datasets.Dataset or IterableDataset, got {type(dataset).__name__}.")
    head = None
    columns = dataset.column_names
    if isinstance(dataset, IterableDataset):
        head = list(itertools.islice(iter(dataset), iterable_rows))
        if not head:
            raise ValueError(f"{name} is empty: it yields no rows.")
        columns = columns or list(head[0])
    elif len(dataset) == 0:
        raise ValueError(f"{name} is empty: it has no rows (columns: {columns}).")
    if column not in columns:
        example = next((c for c in PROMPT_COLUMN_NAMES if c in columns), "<column>")
        raise ValueError(
            f"{name} has no {column!r} column; columns found: {columns}. Rename the one holding the prompts "
            f"(`dataset.rename_column({example!r}, {column!r})`; on the command line: --prompt_column {example})."
        )
    if head is not None:
        rows: Any = enumerate(row[column] for row in head)
    else:
        candidates = _candidate_bad_rows(dataset.with_format("arrow")[column], dataset.features[column])
        if candidates is None:
            rows = enumerate(dataset[column])
        else:
            indices = np.flatnonzero(candidates)
            rows = ((int(i), dataset[int(i)][column]) for i in indices)
    for index, prompt in rows:
        problem = _prompt_problem(prompt)
        if problem is not None:
            raise ValueError(
                f"{name}: row {index} of column {column!r} {problem}; {PROMPT_FORMAT}. Fix or drop that row "
                f"(e.g. `dataset.filter(...)`)."
            )


def task_prompt(question: str, task: str = "math") -> list[dict[str, str]]:
    """
    A question as a one-turn conversational prompt: the task instruction, a blank line, the question (App. C.1).

    Args:
        question (`str`):
            The problem text.
        task (`str`, *optional*, defaults to `"math"`):
            A key of `TASK_PROMPTS`; `"none"` uses the question as is.

    Returns:
        `list[dict[str, str]]`: `[{"role": "user", "content": ...}]`.
    """
    if task not in TASK_PROMPTS:
        raise ValueError(f"Unknown task {task!r}; choose one of {sorted(TASK_PROMPTS)}.")
    instruction = TASK_PROMPTS[task]
    content = question if instruction is None else f"{instruction}\n\n{question}"
    return [{"role": "user", "content": content}]


def looks_like_local_path(name: str) -> bool:
    """
    Whether a `--dataset_name` (or model id) is meant as a local path rather than a Hub id: absolute, starting with
    `.` or `~`, or ending in a local data format. Such a name that does not exist is a typo, never a Hub download.
    """
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.splitext(name)[1].lower() in LOCAL_FORMATS


def _json_error_location(text: str) -> str | None:
    """Where JSON/JSON Lines text stops parsing ("line 3: Unterminated string ..."), or `None` if it parses."""
    try:
        json.loads(text)
        return None  # one valid JSON document: its structure, not its syntax, is the problem
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):  # a JSON array: the document's own position
            return f"line {error.lineno}, column {error.colno}: {error.msg}"
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                return f"line {number}: {error.msg} (column {error.colno}); each line must be one JSON object"
    return None


def _unreadable_file_reason(path: str, builder: str) -> str | None:
    """
    Why `datasets` could not read a local file, found by reading it again with the standard parsers (only after a
    failure): the JSON line that does not parse, or a file that has no rows. `None` when no better reason is found.
    """
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            return "it has no rows" if pq.read_metadata(path).num_rows == 0 else None
        except (OSError, pa.ArrowException) as error:
            return f"not a readable parquet file ({error})"
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if builder == "csv":
        return "it has only a header line, no rows" if len([x for x in text.splitlines() if x.strip()]) <= 1 else None
    location = _json_error_location(text)
    if location is None and text.strip() in ("[]", "{}"):
        return "it has no rows"
    return location


def load_local_file(path: str) -> Dataset:
    """
    A local json/jsonl/parquet/csv file as one `Dataset`, with an error naming the file (and for JSON the line) when
    it is missing, empty, unreadable or has no rows.

    Args:
        path (`str`):
            Path of the file (`~` is expanded).

    Returns:
        `Dataset`: its rows (at least one).
    """
    path = os.path.expanduser(path)
    extension = os.path.splitext(path)[1].lower()
    if extension not in LOCAL_FORMATS:
        raise ValueError(f"Cannot read {path!r}: local files must be one of {sorted(LOCAL_FORMATS)} (json lines too).")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such data file: {path!r} (absolute: {os.path.abspath(path)}).")
    builder = LOCAL_FORMATS[extension]
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"Data file {path} is empty (0 bytes); write at least one row into it.")
    if builder != "parquet" and size <= 1 << 20:
        with open(path, "rb") as f:
            if not f.read().strip():
                raise ValueError(f"Data file {path} holds only whitespace, no rows; write at least one row into it.")
    try:
        dataset = load_dataset(builder, data_files=path, split="train")
    except Exception as error:  # datasets wraps the parser's error (ArrowInvalid, JSONDecodeError, pandas) its own way
        cause = error.__cause__ or error
        reason = _unreadable_file_reason(path, builder) or f"{type(cause).__name__}: {str(cause).rstrip('.')}"
        raise ValueError(
            f"Cannot read data file {path} as {extension[1:]}: {reason}. Fix the file (or, if its extension is wrong, "
            "rename it)."
        ) from error
    if len(dataset) == 0:
        what = "only a header line" if builder == "csv" else "no rows"
        raise ValueError(f"Data file {path} has {what} (columns: {dataset.column_names}); add at least one row.")
    return dataset


def _load_raw(name_or_path: str, split: str, config: str | None) -> Dataset:
    if os.path.isfile(os.path.expanduser(name_or_path)):
        return load_local_file(name_or_path)
    if looks_like_local_path(name_or_path) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(
            f"No such data file: {name_or_path!r} (looked for {os.path.abspath(os.path.expanduser(name_or_path))}; "
            f"a relative path is resolved from the current directory, {os.getcwd()}, not from a recipe's folder)."
        )
    return load_dataset(name_or_path, name=config, split=split)


def _check_solutions(dataset: Dataset, column: str, name: str) -> None:
    """A null gold answer would be graded as the text "None": name its first row instead."""
    solutions = dataset.with_format("arrow")[column]
    if solutions.null_count:
        row = pc.index(solutions.is_null(), True).as_py()
        raise ValueError(
            f"{name}: row {row} of column {column!r} has no gold answer (null); the reward functions grade against it. "
            "Fix or drop that row."
        )


def prepare_prompt_dataset(
    dataset: Dataset,
    prompt_column: str = "prompt",
    solution_column: str = "solution",
    task: str = "math",
    max_samples: int | None = None,
    seed: int = 42,
    name: str = "dataset",
) -> Dataset:
    """
    Map a dataset's columns to `prompt` (conversational, with the task instruction) and `solution`.

    A text prompt column is wrapped with [`task_prompt`]; a column that is already conversational is kept as is.
    Other columns are dropped, so that only the two columns reach the reward functions.

    Args:
        dataset (`Dataset`):
            The raw dataset.
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Column with the question text (or conversational prompt).
        solution_column (`str`, *optional*, defaults to `"solution"`):
            Column with the gold answer.
        task (`str`, *optional*, defaults to `"math"`):
            Task instruction for text prompts (a key of `TASK_PROMPTS`).
        max_samples (`int`, *optional*):
            Keep a seeded random subset of this many rows (the paper trains on 20K of DeepMath's 103K).
        seed (`int`, *optional*, defaults to `42`):
            Seed of the subset.
        name (`str`, *optional*, defaults to `"dataset"`):
            What to call the dataset in errors (its file or Hub id).

    Returns:
        `Dataset`: with columns `prompt` and `solution`.

    Raises:
        `ValueError`: a missing column, an unknown task, `max_samples < 1`, an empty dataset, a prompt that is empty or
        not text/conversational ([`validate_prompt_dataset`], on every row of the raw column) or a null solution.
    """
    missing = [c for c in (prompt_column, solution_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Dataset has no column(s) {missing}; columns found: {dataset.column_names}. Map yours with "
            "--prompt_column/--solution_column (e.g. --prompt_column question --solution_column final_answer)."
        )
    if task not in TASK_PROMPTS:
        raise ValueError(f"Unknown task {task!r}; choose one of {sorted(TASK_PROMPTS)}.")
    _check_max_samples(max_samples)
    # Every row of the source, before subsampling, so that a row number points into the user's file; a text question
    # is checked before the task instruction would make an empty one look like a prompt.
    validate_prompt_dataset(dataset, name=name, column=prompt_column)
    _check_solutions(dataset, solution_column, name)
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(max_samples))

    def to_prompt(row: dict) -> dict:
        prompt = row[prompt_column]
        if isinstance(prompt, str):
            prompt = task_prompt(prompt, task)
        return {"prompt": prompt, "solution": str(row[solution_column])}

    return dataset.map(to_prompt, remove_columns=dataset.column_names, desc="Formatting prompts")


def load_prompt_dataset(
    name_or_path: str,
    split: str = "train",
    config: str | None = None,
    prompt_column: str = "prompt",
    solution_column: str = "solution",
    task: str = "math",
    max_samples: int | None = None,
    seed: int = 42,
) -> Dataset:
    """
    Load a local json/jsonl/parquet/csv file, a saved folder or a Hub dataset, mapped with [`prepare_prompt_dataset`].

    `name_or_path="synthetic:arithmetic"` builds [`synthetic_arithmetic`] (`max_samples` rows, default 1000). The
    split only changes the seed: with operands 0-20 there are 882 distinct problems, so `train` and `test` share
    problems (held out by seed, not by content; filter on the question text where that matters).

    Args:
        name_or_path (`str`):
            File path, dataset folder, Hub id (e.g. `"zwhe99/DeepMath-103K"`) or `"synthetic:arithmetic"`.
        split (`str`, *optional*, defaults to `"train"`):
            Split to load (ignored for local files, which are one split).
        config (`str`, *optional*):
            Hub dataset configuration name.
        prompt_column, solution_column, task, max_samples, seed:
            See [`prepare_prompt_dataset`].

    Returns:
        `Dataset`: with columns `prompt` and `solution`.
    """
    _check_max_samples(max_samples)
    if name_or_path == SYNTHETIC_ARITHMETIC:
        num_samples = 1000 if max_samples is None else max_samples
        return synthetic_arithmetic(num_samples, seed=seed + (0 if split == "train" else 1))
    raw = _load_raw(name_or_path, split, config)
    return prepare_prompt_dataset(raw, prompt_column, solution_column, task, max_samples, seed, name=name_or_path)


def _check_max_samples(max_samples: int | None) -> None:
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(f"max_samples must be a positive number of rows (or None for all), got {max_samples!r}.")


def load_deepmath(split: str = "train", max_samples: int | None = 20_000, seed: int = 42) -> Dataset:
    """
    DeepMath-103K (`zwhe99/DeepMath-103K`) as the paper trains on it: `question` with the math task prompt, and
    `final_answer` as `solution` for the math reward; by default a seeded 20K subset (Table 8).

    Args:
        split (`str`, *optional*, defaults to `"train"`):
            Hub split.
        max_samples (`int`, *optional*, defaults to `20000`):
            Size of the random subset; `None` keeps all rows.
        seed (`int`, *optional*, defaults to `42`):
            Seed of the subset.

    Returns:
        `Dataset`: with columns `prompt` and `solution`.
    """
    return load_prompt_dataset(
        DEEPMATH_DATASET,
        split=split,
        prompt_column="question",
        solution_column="final_answer",
        task="math",
        max_samples=max_samples,
        seed=seed,
    )


def synthetic_arithmetic(
    num_samples: int, seed: int = 0, max_operand: int = 20, operations: str = "+-", task: str = "arithmetic"
) -> Dataset:
    """
    A seeded arithmetic dataset (`"What is 23 + 45?"` -> `"68"`) that needs no download.

    Args:
        num_samples (`int`):
            Number of rows.
        seed (`int`, *optional*, defaults to `0`):
            Random seed; the same seed gives the same rows.
        max_operand (`int`, *optional*, defaults to `20`):
            Operands are drawn from `[0, max_operand]` (SmolLM2-135M answers ~20% of these right: a learnable signal).
        operations (`str`, *optional*, defaults to `"+-"`):
            Operators to draw from, any of `+ - *`.
        task (`str`, *optional*, defaults to `"arithmetic"`):
            Task instruction (a key of `TASK_PROMPTS`); `"math"` asks for a boxed answer.

    Returns:
        `Dataset`: with columns `prompt` and `solution`.
    """
    unknown = set(operations) - set("+-*")
    if unknown or not operations:
        raise ValueError(f"operations must be a non-empty string of '+', '-', '*', got {operations!r}.")
    rng = random.Random(seed)
    rows = []
    for _ in range(num_samples):
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(operations)
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        rows.append({"prompt": task_prompt(f"What is {a} {op} {b}?", task), "solution": str(answer)})
    return Dataset.from_list(rows)
