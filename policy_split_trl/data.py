"""Training data: DeepMath-103K (the paper's), any local or Hub dataset with a column mapping, and a seeded synthetic
arithmetic task for the offline quickstart and tests.

Every loader returns a `datasets.Dataset` with a conversational `prompt` column and a `solution` column (the gold
answer the reward functions grade against), which is what [`PolicySplitGRPOTrainer`] and `policy_split_trl.rewards`
expect.
"""

from __future__ import annotations

import os
import random

from datasets import Dataset, load_dataset

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


def load_local_file(path: str) -> Dataset:
    """
    A local json/jsonl/parquet/csv file as one `Dataset`.

    Args:
        path (`str`):
            Path of an existing file.

    Returns:
        `Dataset`: its rows.
    """
    extension = os.path.splitext(path)[1].lower()
    if extension not in LOCAL_FORMATS:
        raise ValueError(f"Cannot read {path!r}: local files must be one of {sorted(LOCAL_FORMATS)} (json lines too).")
    return load_dataset(LOCAL_FORMATS[extension], data_files=path, split="train")


def _load_raw(name_or_path: str, split: str, config: str | None) -> Dataset:
    if os.path.isfile(name_or_path):
        return load_local_file(name_or_path)
    return load_dataset(name_or_path, name=config, split=split)


def prepare_prompt_dataset(
    dataset: Dataset,
    prompt_column: str = "prompt",
    solution_column: str = "solution",
    task: str = "math",
    max_samples: int | None = None,
    seed: int = 42,
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

    Returns:
        `Dataset`: with columns `prompt` and `solution`.
    """
    missing = [c for c in (prompt_column, solution_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Dataset has no column(s) {missing}; columns found: {dataset.column_names}. Map yours with "
            "--prompt_column/--solution_column (e.g. --prompt_column question --solution_column final_answer)."
        )
    if task not in TASK_PROMPTS:
        raise ValueError(f"Unknown task {task!r}; choose one of {sorted(TASK_PROMPTS)}.")
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

    `name_or_path="synthetic:arithmetic"` builds [`synthetic_arithmetic`] (`max_samples` rows, default 1000; the
    split only changes the seed, so `train` and `test` do not overlap by construction).

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
    if name_or_path == SYNTHETIC_ARITHMETIC:
        return synthetic_arithmetic(max_samples or 1000, seed=seed + (0 if split == "train" else 1))
    raw = _load_raw(name_or_path, split, config)
    return prepare_prompt_dataset(raw, prompt_column, solution_column, task, max_samples, seed)


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
