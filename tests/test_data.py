import json

import pytest
from datasets import Dataset

from policy_split_trl.data import (
    ARITHMETIC_TASK_PROMPT,
    MATH_TASK_PROMPT,
    load_prompt_dataset,
    prepare_prompt_dataset,
    synthetic_arithmetic,
    task_prompt,
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
