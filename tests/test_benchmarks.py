import json
import os

import datasets
import pytest
from datasets import Dataset, DatasetDict

from policy_split_trl.data import ARITHMETIC_TASK_PROMPT, MATH_TASK_PROMPT, MULTIPLE_CHOICE_TASK_PROMPT
from policy_split_trl.eval.benchmarks import (
    AIME25_CONFIGS,
    ARITHMETIC_EVAL_SEED,
    BENCHMARKS,
    TABLE1_COLUMNS,
    Problem,
    gsm8k_final_answer,
    load_aime24,
    load_aime25,
    load_arithmetic,
    load_benchmark,
    load_creative_writing,
    load_gpqa_diamond,
    load_gsm8k,
    load_math500,
    load_mmlu_pro,
    multiple_choice_prompt,
    table1_column,
)
from policy_split_trl.eval.harness import _grade
from policy_split_trl.rewards import math_accuracy_reward, multiple_choice_reward

DATA = os.path.join(os.path.dirname(__file__), "data")
MATH500 = os.path.join(DATA, "math500.jsonl")
AIME24_SLICE = os.path.join(DATA, "aime24_slice.jsonl")
GSM8K_SLICE = os.path.join(DATA, "gsm8k_slice.jsonl")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def content(problem: Problem) -> str:
    assert len(problem.prompt) == 1 and problem.prompt[0]["role"] == "user"
    return problem.prompt[0]["content"]


# ---------------------------------------------------------------- local files in the real formats


def test_math500_from_local_file():
    rows = read_jsonl(MATH500)
    problems = load_math500(MATH500)
    assert len(problems) == 500
    first = problems[0]
    assert first.benchmark == "math500" and first.kind == "math"
    assert first.answer == rows[0]["answer"]
    assert first.id == rows[0]["unique_id"]
    assert content(first) == f"{MATH_TASK_PROMPT}\n\n{rows[0]['problem']}"
    assert first.metadata["subject"] == rows[0]["subject"] and first.metadata["level"] == rows[0]["level"]
    assert "problem" not in first.metadata and "answer" not in first.metadata
    assert len({p.id for p in problems}) == 500

    head = load_math500(MATH500, limit=5)
    assert [p.id for p in head] == [p.id for p in problems[:5]]
    assert load_math500(MATH500, limit=0) == []


def test_aime24_from_local_slice():
    rows = read_jsonl(AIME24_SLICE)
    problems = load_aime24(AIME24_SLICE)
    assert len(problems) == len(rows) == 11
    assert [p.id for p in problems] == [str(r["id"]) for r in rows]
    for problem, row in zip(problems, rows):
        assert problem.kind == "math"
        assert content(problem) == f"{MATH_TASK_PROMPT}\n\n{row['problem']}"
        assert problem.answer == str(int(row["answer"]))
        assert problem.metadata["raw_answer"] == row["answer"]
        assert problem.metadata["url"] == row["url"]
        # The file's `question` duplicates `problem`: not kept twice.
        assert "question" not in problem.metadata
    # 2024 AIME I Problem 2: the gold is zero-padded in the file.
    padded = next(p for p in problems if p.metadata["raw_answer"] == "025")
    assert padded.answer == "25"
    assert math_accuracy_reward(["So the answer is $\\boxed{25}$."], [padded.answer]) == [1.0]
    assert [p.id for p in load_aime24(AIME24_SLICE, limit=3)] == [p.id for p in problems[:3]]


def test_gsm8k_from_local_slice():
    rows = read_jsonl(GSM8K_SLICE)
    problems = load_gsm8k(GSM8K_SLICE)
    assert len(problems) == len(rows) == 44
    assert problems[0].answer == "18"
    assert content(problems[0]) == f"{MATH_TASK_PROMPT}\n\n{rows[0]['question']}"
    assert problems[0].metadata["solution"] == rows[0]["answer"]
    assert [p.answer for p in problems[-4:]] == ["2125", "114200", "-10", "-3"]  # commas stripped, signs kept
    for problem in problems:
        int(problem.answer)
        assert "," not in problem.answer
    assert len({p.id for p in problems}) == 44
    assert [p.answer for p in load_gsm8k(GSM8K_SLICE, limit=2)] == [p.answer for p in problems[:2]]


def test_gsm8k_final_answer():
    assert gsm8k_final_answer("She sells 9 eggs.\n#### 1,450,000") == "1450000"
    assert gsm8k_final_answer("a #### b\n#### 7 ") == "7"
    with pytest.raises(ValueError, match="####"):
        gsm8k_final_answer("no final line")


# ---------------------------------------------------------------- synthetic arithmetic (the quickstart's task)


def test_arithmetic_generated_is_fixed_distinct_and_correct():
    problems = load_arithmetic()
    assert len(problems) == 100 and load_benchmark("arithmetic") == problems
    assert load_arithmetic() == problems  # same seed, same problems
    assert load_arithmetic(limit=7) == problems[:7]  # `limit` is a prefix, as for the other benchmarks
    assert load_arithmetic(limit=0) == []
    assert [p.id for p in problems] == [f"arithmetic-{i}" for i in range(100)]
    questions = [content(p) for p in problems]
    assert len(set(questions)) == 100
    # Pinned: the generator and seed must not drift, or resumed evaluations would mix two problem sets.
    assert ARITHMETIC_EVAL_SEED == 260411510
    assert [(content(p).rsplit("\n", 1)[1], p.answer) for p in problems[:3]] == [
        ("What is 18 + 8?", "26"),
        ("What is 8 + 13?", "21"),
        ("What is 15 + 20?", "35"),
    ]
    for problem, text in zip(problems, questions):
        assert problem.kind == "arithmetic" and problem.benchmark == "arithmetic"
        prefix, question = text.split("\n\n")
        assert prefix == ARITHMETIC_TASK_PROMPT  # the prompt training's synthetic:arithmetic uses
        a, op, b = question.removeprefix("What is ").removesuffix("?").split()
        assert problem.answer == str(int(a) + int(b) if op == "+" else int(a) - int(b))
    other = load_arithmetic(seed=1)
    assert [p.answer for p in other] != [p.answer for p in problems]
    # 21 x 21 operand pairs x 2 operators: a larger limit stops at every distinct problem.
    assert len(load_arithmetic(limit=5000)) == 882


def test_arithmetic_is_graded_by_the_last_number():
    problem = next(p for p in load_arithmetic(limit=20) if p.answer == "26")
    completions = ["26", "18 + 8 = 26", "The answer is 27.", "26, no wait, 25", "\\boxed{26} then 3", "no number"]
    assert _grade(problem, completions) == [True, True, False, False, True, False]


def test_arithmetic_from_a_local_file(tmp_path):
    training_format = tmp_path / "arith.jsonl"
    training_format.write_text(
        json.dumps({"prompt": "What is 2 + 3?", "solution": "5"})
        + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "7 - 9 ="}], "solution": -2, "level": 1})
        + "\n"
    )
    first, second = load_arithmetic(str(training_format))
    assert content(first) == f"{ARITHMETIC_TASK_PROMPT}\n\nWhat is 2 + 3?" and first.answer == "5"
    assert content(second) == "7 - 9 =" and second.answer == "-2"  # conversational prompts are used as they are
    assert second.metadata == {"level": 1} and second.id == "arithmetic-1"
    assert _grade(second, ["-2", "2"]) == [True, False]

    qa_format = tmp_path / "arith_qa.json"
    qa_format.write_text(json.dumps([{"id": "q1", "question": "What is 4 + 4?", "answer": 8}]))
    (problem,) = load_benchmark("arithmetic", source=str(qa_format), limit=3)
    assert (problem.id, problem.answer, content(problem)) == ("q1", "8", f"{ARITHMETIC_TASK_PROMPT}\n\nWhat is 4 + 4?")

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "two"}) + "\n")
    with pytest.raises(ValueError, match="row 0 .* 'two'; arithmetic answers are numbers"):
        load_arithmetic(str(bad))
    with pytest.raises(FileNotFoundError, match="no Hub dataset"):
        load_arithmetic(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="columns found"):
        load_arithmetic(MATH500)


# ---------------------------------------------------------------- Hub loaders, `datasets.load_dataset` faked


class FakeHub:
    """Stands in for `datasets.load_dataset`: Hub ids from a table, local files through the real loader."""

    def __init__(self, real_load_dataset):
        self.real = real_load_dataset
        self.tables = {}
        self.calls = []

    def add(self, path, rows, name=None, split=None):
        self.tables[(path, name, split)] = rows

    def __call__(self, path, name=None, split=None, **kwargs):
        if path in ("json", "parquet", "csv"):
            return self.real(path, name=name, split=split, **kwargs)
        self.calls.append((path, name, split))
        rows = self.tables[(path, name, split)]
        return rows if isinstance(rows, DatasetDict) else Dataset.from_list(rows)


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub(datasets.load_dataset)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    return fake


# Gold letters of `gpqa_row(0..7)` with the default seed: they depend only on the record ids.
PINNED_GPQA_GOLDS = ["B", "C", "A", "C", "A", "B", "D", "A"]


def gpqa_row(i):
    return {
        "Record ID": f"rec{i:04d}",
        "High-level domain": "Physics",
        "Subdomain": "Optics",
        # The real texts end with stray whitespace.
        "Question": f"Question number {i}?\n",
        "Correct Answer": f"right {i} ",
        "Incorrect Answer 1": f"wrong {i}.1",
        "Incorrect Answer 2": f"wrong {i}.2",
        "Incorrect Answer 3": f" wrong {i}.3",
    }


def mmlu_pro_row(i, options, answer_index):
    return {
        "question_id": 70 + i,
        "question": f"MMLU-Pro question {i}",
        "options": options,
        "answer": "ABCDEFGHIJ"[answer_index],
        "answer_index": answer_index,
        "cot_content": "A: Let's think step by step.",
        "category": "physics",
        "src": "ori_mmlu-high_school_physics",
    }


def test_math500_hub(hub):
    row = read_jsonl(MATH500)[3]
    hub.add("HuggingFaceH4/MATH-500", [row], split="test")
    (problem,) = load_math500()
    assert hub.calls == [("HuggingFaceH4/MATH-500", None, "test")]
    assert problem.id == row["unique_id"] and problem.answer == row["answer"]
    assert content(problem) == f"{MATH_TASK_PROMPT}\n\n{row['problem']}"


def test_aime24_hub(hub):
    rows = [
        {"id": 60, "problem": "P1", "solution": "S1", "answer": "204", "url": "u1", "year": "2024"},
        {"id": 61, "problem": "P2", "solution": "S2", "answer": "025", "url": "u2", "year": "2024"},
    ]
    hub.add("HuggingFaceH4/aime_2024", rows, split="train")
    problems = load_aime24()
    assert hub.calls == [("HuggingFaceH4/aime_2024", None, "train")]
    assert [(p.id, p.answer) for p in problems] == [("60", "204"), ("61", "25")]
    assert content(problems[1]) == f"{MATH_TASK_PROMPT}\n\nP2"
    assert problems[0].metadata["year"] == "2024"


def test_aime24_hub_mirror_with_other_column_names(hub):
    rows = [{"ID": "2024-I-1", "Problem": "P1", "Solution": "S1", "Answer": 204}]
    hub.add("Maxwell-Jia/AIME_2024", DatasetDict({"train": Dataset.from_list(rows)}))
    (problem,) = load_aime24("Maxwell-Jia/AIME_2024")
    assert hub.calls == [("Maxwell-Jia/AIME_2024", None, None)]
    assert (problem.id, problem.answer, content(problem)) == ("2024-I-1", "204", f"{MATH_TASK_PROMPT}\n\nP1")


def test_aime25_hub_combines_both_contests(hub):
    for contest in AIME25_CONFIGS:
        rows = [{"question": f"{contest} problem {n}", "answer": str(100 + n)} for n in (1, 2, 3)]
        hub.add("opencompass/AIME2025", rows, name=contest, split="test")
    problems = load_aime25()
    assert hub.calls == [
        ("opencompass/AIME2025", "AIME2025-I", "test"),
        ("opencompass/AIME2025", "AIME2025-II", "test"),
    ]
    assert [p.id for p in problems] == [f"{c}-{n}" for c in AIME25_CONFIGS for n in (1, 2, 3)]
    assert [p.metadata["contest"] for p in problems] == ["AIME2025-I"] * 3 + ["AIME2025-II"] * 3
    assert content(problems[4]) == f"{MATH_TASK_PROMPT}\n\nAIME2025-II problem 2"
    assert problems[4].answer == "102" and problems[4].kind == "math"

    hub.calls.clear()
    assert [p.id for p in load_aime25(limit=4)] == ["AIME2025-I-1", "AIME2025-I-2", "AIME2025-I-3", "AIME2025-II-1"]
    hub.calls.clear()
    assert [p.id for p in load_aime25(limit=2)] == ["AIME2025-I-1", "AIME2025-I-2"]
    assert hub.calls == [("opencompass/AIME2025", "AIME2025-I", "test")]  # the second contest is not needed


def test_aime25_local_file(tmp_path):
    path = tmp_path / "aime25.jsonl"
    path.write_text("\n".join(json.dumps({"problem": f"Q{i}", "answer": f"00{i}"}) for i in range(3)))
    problems = load_aime25(str(path))
    assert [(p.id, p.answer) for p in problems] == [("aime25-0", "0"), ("aime25-1", "1"), ("aime25-2", "2")]


def test_gpqa_diamond_hub_prompt_and_shuffle(hub):
    rows = [gpqa_row(i) for i in range(16)]
    hub.add("Idavidrein/gpqa", rows, name="gpqa_diamond", split="train")
    problems = load_gpqa_diamond()
    assert hub.calls == [("Idavidrein/gpqa", "gpqa_diamond", "train")]
    for problem, row in zip(problems, rows):
        assert problem.kind == "multiple_choice" and problem.id == row["Record ID"]
        choices = problem.metadata["choices"]
        assert sorted(choices) == sorted(row[k].strip() for k in row if "Answer" in k)
        # The gold letter points at the correct answer's text.
        assert choices["ABCD".index(problem.answer)] == row["Correct Answer"].strip()
        assert problem.metadata["correct_answer"] == row["Correct Answer"].strip()
        assert problem.metadata["gold_index"] == "ABCD".index(problem.answer)
        assert problem.metadata["Subdomain"] == "Optics" and "Question" not in problem.metadata
        rendered = "\n".join(f"{letter}. {choice}" for letter, choice in zip("ABCD", choices))
        expected = (
            f"{MULTIPLE_CHOICE_TASK_PROMPT}\n\n### Question\n{row['Question'].strip()}\n\n### Choices\n{rendered}"
        )
        assert content(problem) == expected
        assert multiple_choice_reward([f"\\boxed{{{problem.answer}}}"], [problem.answer]) == [1.0]
    # Shuffled: the correct answer (listed first in the dataset) is not always A.
    assert len({p.answer for p in problems}) > 1

    # Deterministic, and per question: the same order again, whatever the row's position.
    hub.add("Idavidrein/gpqa", rows[::-1], name="gpqa_diamond", split="train")
    again = {p.id: p for p in load_gpqa_diamond()}
    for problem in problems:
        assert again[problem.id].prompt == problem.prompt and again[problem.id].answer == problem.answer
    # Pinned, so that a change of the shuffle (which would change every reported GPQA number) shows up here.
    assert [p.answer for p in problems[:8]] == PINNED_GPQA_GOLDS
    # Another seed gives another order.
    reseeded = load_gpqa_diamond(seed=1)
    assert [p.id for p in reseeded] == [p.id for p in problems[::-1]]
    assert [p.prompt for p in reseeded] != [again[p.id].prompt for p in reseeded]
    assert all(p.metadata["choices"]["ABCD".index(p.answer)] == p.metadata["correct_answer"] for p in reseeded)


def test_gpqa_diamond_local_parquet_and_limit(tmp_path):
    path = str(tmp_path / "gpqa_diamond.parquet")
    Dataset.from_list([gpqa_row(i) for i in range(5)]).to_parquet(path)
    problems = load_gpqa_diamond(path, limit=3)
    assert [p.id for p in problems] == ["rec0000", "rec0001", "rec0002"]


def test_mmlu_pro_hub(hub):
    ten = [f"option {k}" for k in range(10)]
    rows = [
        mmlu_pro_row(0, ten, 7),
        # Padding after the answer (the usual case) and before it: the gold still names the same text.
        mmlu_pro_row(1, ["a", "b", "c", "d", "N/A", "N/A"], 2),
        mmlu_pro_row(2, ["a", "N/A", "b", "c"], 3),
    ]
    hub.add("TIGER-Lab/MMLU-Pro", rows, split="test")
    problems = load_mmlu_pro()
    assert hub.calls == [("TIGER-Lab/MMLU-Pro", None, "test")]
    first = problems[0]
    assert (first.id, first.answer, first.kind) == ("70", "H", "multiple_choice")
    rendered = "\n".join(f"{letter}. option {k}" for k, letter in enumerate("ABCDEFGHIJ"))
    assert (
        content(first)
        == f"{MULTIPLE_CHOICE_TASK_PROMPT}\n\n### Question\nMMLU-Pro question 0\n\n### Choices\n{rendered}"
    )
    assert first.metadata["category"] == "physics" and first.metadata["answer_index"] == 7
    assert "cot_content" not in first.metadata

    assert problems[1].metadata["choices"] == ["a", "b", "c", "d"] and problems[1].answer == "C"
    assert "N/A" not in content(problems[1])
    assert problems[2].metadata["choices"] == ["a", "b", "c"] and problems[2].answer == "C"
    assert problems[2].metadata["correct_answer"] == "c"


def test_mmlu_pro_local_csv(tmp_path):
    # A csv holds the option lists as text: JSON, or a Python list literal (what pandas writes).
    rows = [mmlu_pro_row(i, ["x", "y, z", "w"], i) for i in range(3)]
    for i, row in enumerate(rows):
        row["options"] = json.dumps(row["options"]) if i % 2 else repr(row["options"])
    path = str(tmp_path / "mmlu_pro.csv")
    Dataset.from_list(rows).to_csv(path)
    problems = load_mmlu_pro(path)
    assert [p.answer for p in problems] == ["A", "B", "C"]
    assert all(p.metadata["choices"] == ["x", "y, z", "w"] for p in problems)

    # numpy's list repr ("['x' 'y']", what `Dataset.to_csv` writes for a list column) is ambiguous: refused.
    numpy_path = str(tmp_path / "mmlu_pro_numpy.csv")
    Dataset.from_list([mmlu_pro_row(0, ["x", "y"], 0)]).to_csv(numpy_path)
    with pytest.raises(ValueError, match="JSON list"):
        load_mmlu_pro(numpy_path)


def test_gsm8k_hub(hub):
    hub.add("openai/gsm8k", read_jsonl(GSM8K_SLICE)[:3], name="main", split="test")
    problems = load_gsm8k(limit=2)
    assert hub.calls == [("openai/gsm8k", "main", "test")]
    assert [p.answer for p in problems] == ["18", "3"]


# ---------------------------------------------------------------- errors, registry, Table 1


def test_missing_columns_error_lists_columns_found(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "What?", "target": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"no column\(s\).*'problem'.*columns found.*'prompt', 'target'"):
        load_math500(str(path))
    with pytest.raises(ValueError, match="Correct Answer"):
        load_gpqa_diamond(str(path))
    with pytest.raises(ValueError, match="options"):
        load_mmlu_pro(str(path))
    with pytest.raises(ValueError, match="columns found"):
        load_aime24(str(path))


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_math500(str(tmp_path / "missing.jsonl"))
    odd = tmp_path / "math.txt"
    odd.write_text("hello")
    with pytest.raises(ValueError, match="local files must be one of"):
        load_math500(str(odd))
    with pytest.raises(ValueError, match="limit"):
        load_math500(MATH500, limit=-1)


def test_multiple_choice_prompt_layout():
    (message,) = multiple_choice_prompt("Which?", ["one", "two"])
    assert message == {
        "role": "user",
        "content": f"{MULTIPLE_CHOICE_TASK_PROMPT}\n\n### Question\nWhich?\n\n### Choices\nA. one\nB. two",
    }
    with pytest.raises(ValueError):
        multiple_choice_prompt("Which?", [])


def test_registry():
    assert set(BENCHMARKS) == {
        "math500",
        "aime24",
        "aime25",
        "gpqa_diamond",
        "mmlu_pro",
        "gsm8k",
        "arithmetic",
        "creative_writing",
    }
    assert load_benchmark("math500", source=MATH500, limit=3) == load_math500(MATH500, limit=3)
    assert load_benchmark("gsm8k", GSM8K_SLICE, 2) == load_gsm8k(GSM8K_SLICE, limit=2)
    with pytest.raises(ValueError, match="Unknown benchmark 'math-500'.*aime24.*math500"):
        load_benchmark("math-500")
    with pytest.raises(ValueError, match="creative_writing takes no source"):
        load_benchmark("creative_writing", source=MATH500)


def test_table1_column():
    assert table1_column("math500") == "MATH-500"
    assert table1_column("aime24") == table1_column("aime25") == "AIME-24/25"
    assert table1_column("gpqa_diamond") == "GPQA-Diamond"
    assert table1_column("mmlu_pro") == "MMLU-Pro"
    assert table1_column("gsm8k") is None and table1_column("creative_writing") is None
    assert table1_column("arithmetic") is None
    assert {table1_column(name) for name in BENCHMARKS} - {None} == set(TABLE1_COLUMNS)
    assert TABLE1_COLUMNS == ["MATH-500", "AIME-24/25", "GPQA-Diamond", "MMLU-Pro"]
    with pytest.raises(ValueError, match="Unknown benchmark"):
        table1_column("MATH-500")


def test_creative_writing():
    creative = pytest.importorskip(
        "policy_split_trl.eval.creative", reason="policy_split_trl.eval.creative (the 13 prompts) is not written yet"
    )
    problems = load_creative_writing()
    assert len(problems) == 13 == len(creative.CREATIVE_WRITING_PROMPTS)
    for problem, text in zip(problems, creative.CREATIVE_WRITING_PROMPTS):
        assert problem.kind == "creative" and problem.answer == "" and problem.benchmark == "creative_writing"
        assert content(problem) == text
    assert len({p.id for p in problems}) == 13
    assert load_benchmark("creative_writing", limit=2) == problems[:2]
