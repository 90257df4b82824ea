import json
import time

import pytest
from datasets import Dataset, DatasetDict, IterableDataset

from policy_split_trl.data import (
    ARITHMETIC_TASK_PROMPT,
    MATH_TASK_PROMPT,
    _prompt_problem,
    load_local_file,
    load_prompt_dataset,
    prepare_prompt_dataset,
    synthetic_arithmetic,
    task_prompt,
    validate_prompt_dataset,
)


def test_task_prompt_is_the_papers_math_prompt():
    assert task_prompt("What is 1+1?") == [
        {
            "role": "user",
            "content": "Solve the following math problem. Put your final answer within \\boxed{}.\n\nWhat is 1+1?",
        }
    ]
    assert task_prompt("q", "none") == [{"role": "user", "content": "q"}]
    with pytest.raises(ValueError, match="Unknown task"):
        task_prompt("q", "poetry")


def test_synthetic_arithmetic_is_seeded_and_correct():
    a, b = synthetic_arithmetic(50, seed=3), synthetic_arithmetic(50, seed=3)
    assert a.to_list() == b.to_list()
    assert synthetic_arithmetic(50, seed=4).to_list() != a.to_list()
    for row in a:
        question = row["prompt"][0]["content"].split("What is ")[1].rstrip("?")
        assert str(eval(question)) == row["solution"]
        assert row["prompt"][0]["content"].startswith(ARITHMETIC_TASK_PROMPT)
    with pytest.raises(ValueError, match="operations"):
        synthetic_arithmetic(2, operations="/")


def test_synthetic_splits_do_not_share_a_seed():
    train = load_prompt_dataset("synthetic:arithmetic", split="train", max_samples=20)
    test = load_prompt_dataset("synthetic:arithmetic", split="test", max_samples=20)
    assert len(train) == len(test) == 20 and train.to_list() != test.to_list()


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_local_files_with_column_mapping(tmp_path, fmt):
    rows = [{"question": f"What is {i} + 1?", "final_answer": str(i + 1), "difficulty": 1.0} for i in range(10)]
    path = tmp_path / f"data.{fmt}"
    ds = Dataset.from_list(rows)
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "json":
        ds.to_json(str(path))
    elif fmt == "csv":
        ds.to_csv(str(path))
    else:
        ds.to_parquet(str(path))
    out = load_prompt_dataset(str(path), prompt_column="question", solution_column="final_answer")
    assert out.column_names == ["prompt", "solution"]
    assert out[3]["prompt"] == task_prompt("What is 3 + 1?", "math")
    assert out[3]["solution"] == "4"
    assert MATH_TASK_PROMPT in out[0]["prompt"][0]["content"]


def test_missing_columns_list_the_columns_found():
    ds = Dataset.from_list([{"question": "q", "answer": "a"}])
    with pytest.raises(
        ValueError, match=r"no column\(s\) \['final_answer'\]; columns found: \['question', 'answer'\]"
    ):
        prepare_prompt_dataset(ds, prompt_column="question", solution_column="final_answer")


def test_conversational_prompts_are_kept_and_subsampling_is_seeded():
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "solution": str(i)} for i in range(100)]
    ds = Dataset.from_list(rows)
    a = prepare_prompt_dataset(ds, max_samples=10, seed=1)
    b = prepare_prompt_dataset(ds, max_samples=10, seed=1)
    c = prepare_prompt_dataset(ds, max_samples=10, seed=2)
    assert len(a) == 10 and a.to_list() == b.to_list() and a.to_list() != c.to_list()
    assert a[0]["prompt"][0]["content"].startswith("q")  # no task prompt added to a conversational prompt


def test_unknown_local_format(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match="local files must be one of"):
        load_prompt_dataset(str(path))


def test_load_deepmath_maps_the_hub_columns(monkeypatch):
    from policy_split_trl import data

    calls = []
    hub_rows = [
        {"question": f"Evaluate {i}!", "final_answer": str(i), "difficulty": 5.0, "topic": "x", "r1_solution_1": "..."}
        for i in range(30)
    ]

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return Dataset.from_list(hub_rows)

    monkeypatch.setattr(data, "load_dataset", fake_load_dataset)
    ds = data.load_deepmath(max_samples=10, seed=0)
    assert calls == [("zwhe99/DeepMath-103K", None, "train")]
    assert ds.column_names == ["prompt", "solution"] and len(ds) == 10
    content = ds[0]["prompt"][0]["content"]
    assert content.startswith(MATH_TASK_PROMPT)
    assert content.split("\n\n", 1)[1] == f"Evaluate {ds[0]['solution']}!"


# ------------------------------------------------------------------------------------------------ unreadable files
def _corrupt_parquet(path):
    Dataset.from_list([{"prompt": "q", "solution": "1"}] * 4).to_parquet(str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the footer (schema, magic bytes) is gone


BAD_FILES = {
    # name: (file name, how to write it, what the error must say)
    "empty_jsonl": ("data.jsonl", lambda p: p.write_text(""), r"is empty \(0 bytes\)"),
    "empty_csv": ("data.csv", lambda p: p.write_text(""), r"is empty \(0 bytes\)"),
    "empty_parquet": ("data.parquet", lambda p: p.write_bytes(b""), r"is empty \(0 bytes\)"),
    "whitespace_jsonl": ("data.jsonl", lambda p: p.write_text("  \n\n\t\n"), "only whitespace"),
    "truncated_jsonl": (
        "data.jsonl",
        lambda p: p.write_text('{"prompt": "a", "solution": "1"}\n{"prompt": "b", "sol'),
        r"line 2: Unterminated string",
    ),
    "invalid_jsonl_line": (
        "data.jsonl",
        lambda p: p.write_text('{"prompt": "a", "solution": "1"}\n\n{"prompt": "b", "solution": "2"}\n{"prompt": \n'),
        r"line 4: Expecting value",
    ),
    "truncated_json_array": (
        "data.json",
        lambda p: p.write_text('[{"prompt": "a", "solution": "1"},\n {"prompt": '),
        r"line 2, column 13: Expecting value",
    ),
    "empty_json_array": ("data.json", lambda p: p.write_text("[]"), "it has no rows"),
    "csv_header_only": ("data.csv", lambda p: p.write_text("prompt,solution\n"), "only a header line, no rows"),
    "corrupt_parquet": ("data.parquet", _corrupt_parquet, "not a readable parquet file"),
    "text_as_parquet": ("data.parquet", lambda p: p.write_text("prompt,solution\nq,1\n"), "parquet"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_unreadable_data_files_name_the_file_and_the_problem(tmp_path, case):
    name, write, message = BAD_FILES[case]
    path = tmp_path / name
    write(path)
    for load in (load_local_file, load_prompt_dataset):
        with pytest.raises(ValueError, match=message) as error:
            load(str(path))
        assert str(path) in str(error.value)  # the file, so that the user knows which one (train or eval)


def test_missing_local_files_are_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"No such data file: 'data/train.jsonl'") as error:
        load_prompt_dataset("data/train.jsonl")
    assert str(tmp_path / "data" / "train.jsonl") in str(error.value)  # resolved from the current directory
    with pytest.raises(FileNotFoundError, match="No such data file"):
        load_prompt_dataset("~/surely-not-a-file-policy-split.jsonl")
    with pytest.raises(FileNotFoundError, match="No such data file"):
        load_local_file(str(tmp_path / "missing.csv"))


def test_relative_and_home_paths_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "What is 1 + 1?", "solution": "2"}) + "\n")
    for name in ("train.jsonl", "./train.jsonl", str(tmp_path / "train.jsonl")):
        assert load_prompt_dataset(name, task="none")[0]["prompt"] == [{"role": "user", "content": "What is 1 + 1?"}]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(load_prompt_dataset("~/train.jsonl")) == 1


def test_bad_rows_of_a_file_are_reported_before_the_task_prompt_hides_them(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "", "answer": "3"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    # An empty question would otherwise become the bare task instruction, a prompt without a problem.
    with pytest.raises(ValueError, match=r"data.jsonl: row 1 of column 'question' is an empty string"):
        load_prompt_dataset(str(path), prompt_column="question", solution_column="answer")
    rows[1] = {"question": "What is 2 + 1?", "answer": None}
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=r"row 1 of column 'answer' has no gold answer \(null\)"):
        load_prompt_dataset(str(path), prompt_column="question", solution_column="answer")


@pytest.mark.parametrize("max_samples", [0, -3])
def test_max_samples_must_be_positive(max_samples):
    with pytest.raises(ValueError, match="max_samples must be a positive number"):
        load_prompt_dataset("synthetic:arithmetic", max_samples=max_samples)  # 0 used to mean 1000 rows
    with pytest.raises(ValueError, match="max_samples must be a positive number"):
        prepare_prompt_dataset(Dataset.from_list([{"prompt": "q", "solution": "1"}]), max_samples=max_samples)


# ------------------------------------------------------------------------------------------ validate_prompt_dataset
def conversation(content="What is 2 + 2?", role="user"):
    return [{"role": "system", "content": "Be brief."}, {"role": role, "content": content}]


GOOD_PROMPTS = {
    "text": "What is 2 + 2?",
    "conversation": conversation(),
    "one_message": [{"role": "user", "content": "hi"}],
    "empty_system_message": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}],
}
# Each bad prompt among good ones of the same layout (so that Arrow stores them as the real data would), with the
# reason the error must give.
BAD_PROMPTS = {
    "empty_string": ("", "is an empty string", "text"),
    "whitespace_string": ("  \n ", "is a whitespace-only string", "text"),
    "none_text": (None, "is None", "text"),
    "none_conversation": (None, "is None", "conversation"),
    "no_messages": ([], "is an empty list of messages", "conversation"),
    "empty_messages": (
        [{"role": "system", "content": ""}, {"role": "user", "content": " "}],
        "has only empty messages",
        "conversation",
    ),
    "none_content": (
        conversation(content=None),
        r"has message 1 \(user\) whose content None is not a string",
        "conversation",
    ),
    "no_role": (conversation(role=None), "has message 1 without a role", "conversation"),
    "empty_role": (conversation(role=""), "has message 1 without a role", "conversation"),
}


@pytest.mark.parametrize("layout", sorted(GOOD_PROMPTS))
def test_valid_prompts_pass(layout):
    validate_prompt_dataset(Dataset.from_list([{"prompt": GOOD_PROMPTS[layout], "solution": "4"}] * 3))


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_first_bad_row_is_reported(case):
    bad, reason, layout = BAD_PROMPTS[case]
    rows = [{"prompt": GOOD_PROMPTS[layout], "solution": "4"} for _ in range(20)]
    rows[7]["prompt"] = bad
    rows[12]["prompt"] = bad
    dataset = Dataset.from_list(rows)
    with pytest.raises(ValueError, match=rf"^eval_dataset: row 7 of column 'prompt' {reason}") as error:
        validate_prompt_dataset(dataset, name="eval_dataset")
    assert "non-empty string or a non-empty list of {'role': str, 'content': str} messages" in str(error.value)
    # After a selection (an indices mapping over the Arrow table), the row is counted in the selected dataset.
    with pytest.raises(ValueError, match=rf"row 2 of column 'prompt' {reason}"):
        validate_prompt_dataset(dataset.select([0, 1, 12, 7]))
    assert _prompt_problem(bad) is not None and _prompt_problem(GOOD_PROMPTS[layout]) is None


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": 3}], "row 0 of column 'prompt' is 3 of type int"),
        ([{"prompt": {"role": "user", "content": "q"}}], "is {'role': 'user', 'content': 'q'} of type dict"),
        ([{"prompt": ["What is 2 + 2?"]}], r"has message 0 'What is 2 \+ 2\?', not a \{'role'"),
        ([{"prompt": [{"role": "user", "content": 4}]}], "has message 0 \\(user\\) whose content 4 is not a string"),
        ([{"prompt": [{"role": "user"}]}], "has message 0 \\(user\\) whose content None is not a string"),
        ([{"prompt": [{"content": "q"}]}], "has message 0 without a role"),
    ],
)
def test_prompts_of_other_layouts_are_checked_row_by_row(rows, message):
    with pytest.raises(ValueError, match=message):
        validate_prompt_dataset(Dataset.from_list(rows))


def test_missing_prompt_column_lists_the_columns_and_the_mapping():
    dataset = Dataset.from_list([{"question": "q", "final_answer": "1"}])
    with pytest.raises(
        ValueError,
        match=r"train_dataset has no 'prompt' column; columns found: \['question', "
        r"'final_answer'\]\. .*rename_column\('question', 'prompt'\).*--prompt_column question",
    ):
        validate_prompt_dataset(dataset)


def test_empty_datasets_are_rejected():
    with pytest.raises(ValueError, match=r"train_dataset is empty: it has no rows \(columns: \['prompt'\]\)"):
        validate_prompt_dataset(Dataset.from_list([{"prompt": "q"}]).select([]))
    with pytest.raises(ValueError, match="train_dataset is empty: it yields no rows"):
        validate_prompt_dataset(IterableDataset.from_generator(lambda: iter([])))


def test_iterable_datasets_are_checked_on_their_head_only():
    pulled = []

    def endless():
        i = 0
        while True:  # materializing this dataset would never return
            pulled.append(i)
            yield {"prompt": "" if i == 40 else f"q{i}", "solution": str(i)}
            i += 1

    dataset = IterableDataset.from_generator(endless)
    validate_prompt_dataset(dataset)  # the bad row 40 is past the 16 rows checked
    assert len(pulled) <= 16 + 1
    with pytest.raises(ValueError, match="row 40 of column 'prompt' is an empty string"):
        validate_prompt_dataset(dataset, iterable_rows=64)
    with pytest.raises(ValueError, match=r"no 'prompt' column; columns found: \['question'\]"):
        validate_prompt_dataset(IterableDataset.from_generator(lambda: iter([{"question": "q"}])))


def test_dicts_of_datasets_are_checked_split_by_split():
    good = Dataset.from_list([{"prompt": "q"}])
    validate_prompt_dataset(DatasetDict(train=good, test=good))
    with pytest.raises(ValueError, match=r"^eval_dataset\['hard'\]: row 0 of column 'prompt' is an empty string"):
        validate_prompt_dataset({"easy": good, "hard": Dataset.from_list([{"prompt": ""}])}, name="eval_dataset")
    with pytest.raises(TypeError, match="train_dataset must be a datasets.Dataset or IterableDataset, got list"):
        validate_prompt_dataset([{"prompt": "q"}])


@pytest.mark.parametrize("layout", ["text", "conversation"])
def test_validation_of_20k_rows_is_cheap(layout):
    rows = [
        {"prompt": f"What is {i} + 1?" if layout == "text" else conversation(f"What is {i} + 1?"), "solution": str(i)}
        for i in range(20_000)
    ]
    dataset = Dataset.from_list(rows).shuffle(seed=0)  # with an indices mapping, as after max_train_samples
    start = time.perf_counter()
    validate_prompt_dataset(dataset)
    elapsed = time.perf_counter() - start
    # Measured ~10 ms (text) / ~90 ms (conversations, shuffled) on 2 shared CPU cores; row by row it is ~0.5 s.
    assert elapsed < 2.0, elapsed
    bad = dataset.to_list()
    bad[19_999]["prompt"] = "" if layout == "text" else []
    with pytest.raises(ValueError, match="row 19999 "):  # every row is checked, the last one too
        validate_prompt_dataset(Dataset.from_list(bad))
