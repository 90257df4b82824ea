"""`policy-split-compare`: two methods trained and evaluated on the tiny model, the Table 1 layout it writes, resuming
without retraining or regenerating, a failing method, config errors, and the recipes' dry runs."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import yaml
from transformers import AutoConfig

from policy_split_trl import HIGH_ENTROPY_SYSTEM_PROMPT
from policy_split_trl.comparison import runner, table
from policy_split_trl.comparison.config import CompareConfigError, override_flags
from policy_split_trl.comparison.runner import MethodFailedError
from policy_split_trl.methods import METHODS
from policy_split_trl.scripts import evaluate as evaluate_script
from policy_split_trl.scripts.compare import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "recipes", "compare", "quickstart.yaml")
PAPER = os.path.join(ROOT, "recipes", "compare", "paper_qwen3_1.7b.yaml")
BIN = os.path.dirname(sys.executable)


def tiny_config(tmp_path, tiny_model_path, name="compare.yaml", **changes):
    """recipes/compare/quickstart.yaml, CPU-test sized: the tiny model, 2 steps, 3 problems x k=2, 4 new tokens."""
    with open(QUICKSTART) as f:
        raw = yaml.safe_load(f)
    raw["train_config"] = os.path.join(ROOT, "recipes", "quickstart.yaml")
    raw["train_overrides"] = {
        **raw["train_overrides"],
        "model_name_or_path": tiny_model_path,
        "max_steps": 2,
        "max_completion_length": 8,
        "num_generations": 4,
        "per_device_train_batch_size": 4,
        "report_to": "none",
    }
    evaluation = raw["evaluation"]
    raw["evaluation"] = {
        **evaluation,
        "limit": 3,
        "k": 2,
        "batch_size": 8,
        "sampling": {**evaluation["sampling"], "max_new_tokens": 4},
    }
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def expected_metrics(eval_dir, mode):
    """avg@k and token-weighted entropy, by hand from the samples."""
    records = [r for r in read_jsonl(os.path.join(eval_dir, "generations.jsonl")) if r["mode"] == mode]
    by_problem = {}
    for r in records:
        by_problem.setdefault(r["problem_id"], []).append(r["correct"])
    accuracy = sum(sum(c) / len(c) for c in by_problem.values()) / len(by_problem)
    entropy = sum(sum(r["entropy_bits"]) for r in records) / sum(len(r["entropy_bits"]) for r in records)
    return len(by_problem), len(records), accuracy, entropy


class CountingPopen:
    """`subprocess.Popen` that counts the processes the driver starts."""

    def __init__(self):
        self.commands = []
        self.popen = subprocess.Popen  # the real one: the patched name is this object

    def __call__(self, command, *args, **kwargs):
        self.commands.append(command)
        return self.popen(command, *args, **kwargs)


def test_override_flags():
    overrides = {
        "max_steps": 20,
        "bf16": False,
        "reward_funcs": ["arithmetic", "think_format"],
        "model_init_kwargs": {"dtype": "float32"},
        "learning_rate": 1e-5,
    }
    assert override_flags(overrides) == [
        "--max_steps",
        "20",
        "--bf16",
        "false",
        "--reward_funcs",
        "arithmetic",
        "think_format",
        "--model_init_kwargs",
        '{"dtype": "float32"}',
        "--learning_rate",
        "1e-05",
    ]


def fake_results(per_benchmark):
    """A harness `results.json` for (benchmark -> mode -> (accuracy, entropy)), Table 1 pooled like the harness."""
    from policy_split_trl.eval.benchmarks import table1_column

    results = {"per_benchmark": {}, "table1": {}}
    for benchmark, modes in per_benchmark.items():
        for mode, (accuracy, entropy) in modes.items():
            metrics = {"avg_at_k": accuracy, "entropy_bits": entropy, "problems": 2}
            results["per_benchmark"].setdefault(benchmark, {})[mode] = metrics
            column = table1_column(benchmark)
            if column:  # one problem per benchmark here: a pooled column is the mean of its benchmarks
                cell = results["table1"].setdefault(mode, {}).setdefault(column, {"n": 0, "a": 0.0, "e": 0.0})
                cell.update(n=cell["n"] + 1, a=cell["a"] + accuracy, e=cell["e"] + entropy)
                cell.update(accuracy=cell["a"] / cell["n"], entropy_bits=cell["e"] / cell["n"])
    return results


def method_run(name, index):
    return runner.MethodRun(
        name=name,
        index=index,
        dir=f"/x/{name}",
        command=[],
        request={},
        budget={},
        settings={},
        base_model="m",
        chat_template_kwargs=None,
    )


def test_table_columns_and_average_like_table1():
    nan = math.nan
    runs = [method_run("grpo", 1), method_run("policy_split", 2)]
    results = {
        "grpo": fake_results(
            {
                "math500": {"normal": (0.5, 1.0)},
                "aime24": {"normal": (0.2, 2.0)},
                "aime25": {"normal": (0.1, 3.0)},
                "gsm8k": {"normal": (0.9, 0.5)},
                "creative_writing": {"normal": (nan, 4.0)},
            }
        ),
        "policy_split": fake_results(
            {b: {"normal": (0.6, 1.0), "high_entropy": (0.4, 2.0)} for b in ("math500", "aime24", "aime25", "gsm8k")}
        ),
    }
    trained = {"grpo": {"wall_time_s": 10.0, "steps": 5}, "policy_split": {"wall_time_s": 20.0, "steps": 5}}
    columns = table.table_columns(["math500", "aime24", "aime25", "gsm8k", "creative_writing"])
    assert columns == ["MATH-500", "AIME-24/25", "gsm8k", "creative_writing"]
    rows, average_over = table.comparison_rows(runs, results, trained, columns)
    # Table 1's average: its own columns only (gsm8k is not one; creative writing has no accuracy).
    assert average_over == ["MATH-500", "AIME-24/25"]
    assert [r["label"] for r in rows] == ["GRPO", "Policy Split", "+ HE prompt"]
    assert rows[0]["accuracy"]["AIME-24/25"] == pytest.approx(0.15) and rows[0]["entropy_bits"]["AIME-24/25"] == 2.5
    assert rows[0]["average"]["accuracy"] == pytest.approx((0.5 + 0.15) / 2)
    assert rows[0]["average"]["entropy_bits"] == pytest.approx((1.0 + 2.5) / 2)
    assert rows[2]["average"] == {"accuracy": pytest.approx(0.4), "entropy_bits": pytest.approx(2.0)}
    assert math.isnan(rows[1]["accuracy"]["creative_writing"])  # not evaluated for that method
    summary = {
        "columns": columns,
        "rows": rows,
        "average_over": average_over,
        "budget_line": "Budget: b.",
        "problems": {"math500": 2},
        "evaluation": {"k": 8, "sampling": {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 100}},
    }
    lines = table.comparison_markdown(summary).splitlines()
    assert "| GRPO | 50.00 | 1.000 | 15.00 | 2.500 | 90.00 | 0.500 | – | 4.000 | 32.50 | 1.750 | 10.0 | 5 |" in lines
    assert "| + HE prompt | 40.00 | 2.000 | 40.00 | 2.000 | 40.00 | 2.000 | – | – | 40.00 | 2.000 |  |  |" in lines
    assert any(line.endswith("Average: mean over MATH-500, AIME-24/25.") for line in lines)

    # Fewer than 2 Table 1 columns: the average is over every graded column; with one graded column, no average.
    _, average_over = table.comparison_rows(runs, results, trained, ["gsm8k", "MATH-500"])
    assert average_over == ["gsm8k", "MATH-500"]
    assert table.comparison_rows(runs, results, trained, ["gsm8k"])[1] == []


def test_compare_two_methods_writes_table_and_resumes(tiny_model_path, tmp_path, monkeypatch, capsys):
    config = tiny_config(tmp_path, tiny_model_path)
    out = tmp_path / "out"
    # The YAML lists three methods; --methods and --output_dir replace its choice.
    argv = ["--config", config, "--methods", "grpo", "policy_split", "--output_dir", str(out)]
    summary = run(argv)
    printed = capsys.readouterr().out
    assert "[1/2] grpo (GRPO): training" in printed and "[2/2] policy_split (Policy Split): training" in printed
    assert "Model saved to" in printed  # the training process's output reaches the console
    assert sorted(os.listdir(out)) == ["comparison.json", "comparison.md", "comparison.png", "grpo", "policy_split"]
    assert (out / "comparison.png").stat().st_size > 1000

    rows = summary["rows"]
    assert [(r["label"], r["method"], r["mode"]) for r in rows] == [
        ("GRPO", "grpo", "normal"),
        ("Policy Split", "policy_split", "normal"),
        ("+ HE prompt", "policy_split", "high_entropy"),
    ]
    assert summary["columns"] == ["arithmetic"] and summary["average_over"] == []  # one column: no Average
    vocab_bits = math.log2(AutoConfig.from_pretrained(tiny_model_path).vocab_size)  # the most entropy there is
    for row in rows:
        eval_dir = out / row["method"] / "eval"
        problems, samples, accuracy, entropy = expected_metrics(eval_dir, row["mode"])
        assert (problems, samples) == (3, 6)
        assert 0.0 <= row["accuracy"]["arithmetic"] <= 1.0 and 0.0 < row["entropy_bits"]["arithmetic"] < vocab_bits
        assert row["accuracy"]["arithmetic"] == pytest.approx(accuracy, abs=1e-12)
        assert row["entropy_bits"]["arithmetic"] == pytest.approx(entropy, rel=1e-9)
    assert rows[0]["train_steps"] == rows[1]["train_steps"] == 2 and rows[2]["train_steps"] is None
    assert rows[0]["train_wall_time_s"] > 0 and rows[1]["train_wall_time_s"] > 0

    saved = json.loads((out / "comparison.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert {
        k: saved["budget"][k]
        for k in (
            "model",
            "max_steps",
            "num_generations",
            "per_device_train_batch_size",
            "max_completion_length",
            "seed",
        )
    } == {
        "model": tiny_model_path,
        "max_steps": 2,
        "num_generations": 4,
        "per_device_train_batch_size": 4,
        "max_completion_length": 8,
        "seed": 42,
    }
    assert "budgets_differ" not in saved and "trl" in saved["versions"] and saved["problems"] == {"arithmetic": 3}
    assert saved["evaluation"]["k"] == 2 and saved["evaluation"]["sampling"]["temperature"] == 0.6

    table = (out / "comparison.md").read_text()
    lines = table.splitlines()
    budget = next(line for line in lines if line.startswith("Budget"))
    assert "max_steps 2, num_generations 4, per-device batch 4 x 1 accumulation, max_completion_length 8" in budget
    assert "seed 42" in budget and "Versions: policy-split-trl" in budget
    assert lines.index(budget) < lines.index(
        "| method | arithmetic Acc | arithmetic Ent | train time (s) | train steps |"
    )
    for row in rows:
        train = ["", ""] if row["mode"] != "normal" else [f"{row['train_wall_time_s']:.1f}", "2"]
        cells = [f"{100 * row['accuracy']['arithmetic']:.2f}", f"{row['entropy_bits']['arithmetic']:.3f}", *train]
        assert f"| {row['label']} | " + " | ".join(cells) + " |" in lines

    done = {m: json.loads((out / m / "train_done.json").read_text()) for m in ("grpo", "policy_split")}
    assert done["grpo"]["steps"] == done["policy_split"]["steps"] == 2
    assert done["grpo"]["settings"] == {}
    assert done["policy_split"]["settings"]["eta"] == 0.03 and done["policy_split"]["settings"]["rollout_sharing"]
    command = done["policy_split"]["command"]
    assert command[command.index("--model_name_or_path") + 1] == tiny_model_path and "--method" in command
    results = {m: json.loads((out / m / "eval" / "results.json").read_text()) for m in ("grpo", "policy_split")}
    assert results["grpo"]["config"]["modes"] == ["normal"]
    assert results["policy_split"]["config"]["modes"] == ["normal", "high_entropy"]
    # The prompt stored with the trained model (here the paper's) is the one evaluated.
    assert results["policy_split"]["config"]["mode_prompts"] == {"high_entropy": HIGH_ENTROPY_SYSTEM_PROMPT}

    # A rerun starts no process: trainings are done, evaluations up to date.
    logs = {m: ((out / m / "train.log").read_bytes(), (out / m / "train.log").stat().st_mtime_ns) for m in done}
    popen = CountingPopen()
    monkeypatch.setattr(runner.subprocess, "Popen", popen)
    again = run(argv)
    printed = capsys.readouterr().out
    assert popen.commands == []
    assert "grpo: already trained" in printed and "policy_split: evaluation up to date" in printed
    assert again["rows"] == rows
    assert {
        m: ((out / m / "train.log").read_bytes(), (out / m / "train.log").stat().st_mtime_ns) for m in done
    } == logs

    # An evaluation without results (e.g. interrupted) resumes through generations.jsonl: nothing is regenerated.
    (out / "policy_split" / "eval" / "results.json").unlink()
    resumed = run(argv)
    assert len(popen.commands) == 1 and popen.commands[0][1:] == [
        "-m",
        "policy_split_trl.scripts.evaluate",
        "--config",
        str(out / "policy_split" / "eval_config.yaml"),
    ]
    assert json.loads((out / "policy_split" / "eval" / "results.json").read_text())["generated_this_run"] == 0
    assert resumed["rows"] == rows

    # Other training or sampling settings must not silently reuse what is there.
    changed_training = tiny_config(tmp_path, tiny_model_path, "steps.yaml", train_overrides={"max_steps": 3})
    with pytest.raises(CompareConfigError, match=r"grpo: .*train_done.json records a training with other settings"):
        run(["--config", changed_training, "--methods", "grpo", "--output_dir", str(out)])
    changed_sampling = tiny_config(
        tmp_path, tiny_model_path, "sampling.yaml", evaluation={"sampling": {"temperature": 1.0}}
    )
    with pytest.raises(CompareConfigError, match=r"grpo: evaluation settings \['sampling'\] differ"):
        run(["--config", changed_sampling, "--methods", "grpo", "--output_dir", str(out)])
    assert len(popen.commands) == 1


def test_a_failing_method_names_itself_and_its_log(tiny_model_path, tmp_path, capsys):
    missing = str(tmp_path / "no_such_data.jsonl")
    config = tiny_config(tmp_path, tiny_model_path, train_overrides={"dataset_name": missing})
    out = tmp_path / "out"
    log = out / "grpo" / "train.log"
    with pytest.raises(
        MethodFailedError, match=rf"Training grpo \(GRPO\) failed with exit status 1 .*see {re.escape(str(log))}"
    ):
        run(["--config", config, "--methods", "grpo", "policy_split", "--output_dir", str(out)])
    assert "no_such_data" in log.read_text() and "no_such_data" in capsys.readouterr().out
    assert not (out / "grpo" / "train_done.json").exists() and not (out / "policy_split").exists()


def test_an_interrupted_training_resumes_from_its_latest_checkpoint(tiny_model_path, tmp_path, monkeypatch, capsys):
    config = tiny_config(tmp_path, tiny_model_path)
    out = tmp_path / "out"
    argv = ["--config", config, "--methods", "grpo", "--output_dir", str(out)]
    commands = []

    def failing_stream(command, log_path):  # stands in for the training process: records the command, fails
        commands.append(command)
        return 3

    monkeypatch.setattr(runner, "stream_process", failing_stream)
    with pytest.raises(MethodFailedError, match="Training grpo .* exit status 3"):
        run(argv)
    assert "--resume_from_checkpoint" not in commands[0]
    for step in (2, 12, 7):
        (out / "grpo" / "model" / f"checkpoint-{step}").mkdir(parents=True)
    with pytest.raises(MethodFailedError):
        run(argv)
    assert commands[1][-2:] == ["--resume_from_checkpoint", str(out / "grpo" / "model" / "checkpoint-12")]
    assert "resuming from" in capsys.readouterr().out
    # Checkpoints of other settings are not resumed.
    other = tiny_config(tmp_path, tiny_model_path, "other.yaml", train_overrides={"learning_rate": 1.0e-4})
    with pytest.raises(CompareConfigError, match="checkpoint-12 comes from a training with other settings"):
        run(["--config", other, "--methods", "grpo", "--output_dir", str(out)])
    assert len(commands) == 2


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"methods": ["grpo", "grpo_plus"]},
            r"Unknown method\(s\) \['grpo_plus'\]; valid methods: \['original', 'grpo', ",
        ),
        ({"methods": ["grpo", "grpo"]}, r"listed twice"),
        ({"train_config": "no_such_recipe.yaml"}, r"train_config '.*no_such_recipe.yaml' does not exist"),
        ({"evaluation": {"temprature": 0.6}}, r"evaluation: Unknown key\(s\) \['temprature'\]; valid keys: \["),
        ({"evaluation": {"modes": ["normal"]}}, r"\['modes'\] are set per method by the comparison"),
        ({"evaluation": {"sampling": {"temp": 1.0}}}, r"evaluation: sampling names \['temp'\], which is not among"),
        ({"evaluation": {"benchmarks": ["math-500"]}}, r"evaluation: Unknown benchmark\(s\) \['math-500'\]"),
        ({"evaluation": {"k": 0}}, r"evaluation: k must be an integer >= 1, got 0"),
        ({"train_overrides": {"output_dir": "x"}}, r"cannot set 'output_dir': each method trains into"),
        ({"train_overrides": {"max_steps": None}}, r"train_overrides.max_steps is null"),
        (
            {"train_overrides": {"max_step": 2}},
            r"Unknown training flag\(s\) \['max_step'\] .*did you mean max_steps\?",
        ),
        ({"train_overrides": {"eta": "high"}}, r"grpo: the training arguments do not parse"),
        (
            {"train_overrides": {"eta": 0.1}, "methods": ["grpo_rollout_sharing"]},
            r"grpo_rollout_sharing: .*means eta=0.0",
        ),
        ({"eval": {}}, r"Unknown key\(s\) \['eval'\]"),
    ],
)
def test_config_errors_come_before_any_training(tmp_path, changes, message):
    with open(QUICKSTART) as f:
        raw = yaml.safe_load(f)
    raw["train_config"] = os.path.join(ROOT, "recipes", "quickstart.yaml")
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if key in ("evaluation", "train_overrides") else value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(CompareConfigError, match=message):
        run(["--config", str(path), "--output_dir", str(tmp_path / "out"), "--dry_run"])
    assert not (tmp_path / "out").exists()


def test_quickstart_dry_run(capsys, tmp_path):
    result = run(["--config", QUICKSTART, "--dry_run", "--output_dir", str(tmp_path / "out")])
    assert list(result["commands"]) == ["grpo", "entropy_advantage", "policy_split"]
    for method, command in result["commands"].items():
        assert command[:3] == [sys.executable, "-m", "policy_split_trl.scripts.train"]
        flags = command[3:]
        assert flags == [
            "--config",
            os.path.join(ROOT, "recipes", "quickstart.yaml"),
            "--method",
            method,
            "--seed",
            "42",
            "--output_dir",
            str(tmp_path / "out" / method / "model"),
            "--max_steps",
            "20",
            "--mode_report",
            "false",
            "--save_strategy",
            "no",
        ]
    out = capsys.readouterr().out
    assert "max_steps 20, num_generations 8, per-device batch 8 x 1 accumulation, max_completion_length 24" in out
    assert "evaluate modes ['normal', 'high_entropy']" in out and not (tmp_path / "out").exists()


def test_paper_dry_run_with_the_console_script(tmp_path):
    exe = os.path.join(BIN, "policy-split-compare")
    proc = subprocess.run(
        [exe, "--config", PAPER, "--dry_run", "--output_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    commands = [line.strip() for line in proc.stdout.splitlines() if "policy_split_trl.scripts.train" in line]
    assert len(commands) == len(METHODS)
    accelerate = f"launch --config_file {os.path.join(ROOT, 'recipes', 'accelerate', 'multi_gpu.yaml')} -m "
    recipe = os.path.join(ROOT, "recipes", "paper", "qwen3_1.7b_grpo.yaml")
    for command, method in zip(commands, METHODS):
        assert accelerate in command and f"--config {recipe} --method {method} --seed 42 " in command
        assert command.count("--method ") == 1
    assert "Qwen/Qwen3-1.7B" in proc.stdout and "1 epoch(s) of 20000 prompts" in proc.stdout
    assert not (tmp_path / "out").exists()
    # A config error exits with its message, not a traceback.
    bad = subprocess.run(
        [exe, "--config", PAPER, "--methods", "ppo", "--dry_run"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert bad.returncode == 1 and "policy-split-compare: Unknown method(s) ['ppo']" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_original_model_is_evaluated_without_training(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "out"
    summary = run(
        ["--config", tiny_config(tmp_path, tiny_model_path), "--methods", "original", "grpo", "--output_dir", str(out)]
    )
    printed = capsys.readouterr().out
    assert "original (Original): training" not in printed and "[2/2] grpo (GRPO): training" in printed
    assert not os.path.exists(out / "original" / "model")  # nothing trained, nothing saved
    rows = summary["rows"]
    assert [(r["label"], r["mode"], r["train_steps"]) for r in rows] == [
        ("Original", "normal", 0),
        ("+ HE prompt", "high_entropy", None),
        ("GRPO", "normal", 2),
    ]
    results = json.loads((out / "original" / "eval" / "results.json").read_text())
    assert results["config"]["model"] == tiny_model_path  # the base model itself
    assert "| Original |" in (out / "comparison.md").read_text()
    with pytest.raises(CompareConfigError, match="'original': the base model"):
        run(["--config", tiny_config(tmp_path, tiny_model_path), "--methods", "orignal", "--output_dir", str(out)])


# ------------------------------------------------------------------ bad input, damaged state, kills while writing


@pytest.mark.parametrize(
    "evaluation, message",
    [
        (
            {"sampling": {"temperature": float("nan")}},
            r"evaluation: sampling.temperature must be a finite number, got nan",
        ),
        (
            {"sampling": {"temperature": "6e-1"}},
            r"evaluation: sampling.temperature must be a finite number, got '6e-1'",
        ),
        (
            {"sampling": {"max_new_tokens": float("inf")}},
            r"evaluation: sampling.max_new_tokens must be an integer >= 1",
        ),
        ({"sampling": {"top_p": 0}}, r"evaluation: sampling.top_p must be in \(0.0, 1.0\]"),
        ({"k": 2.5}, r"evaluation: k must be an integer >= 1, got 2.5"),
        ({"limit": True}, r"evaluation: limit must be an integer >= 0 or None, got True"),
        ({"limits": {"arithmetc": 3}}, r"evaluation: limits names \['arithmetc'\]"),
        ({"batch_size": "16"}, r"evaluation: batch_size must be an integer >= 1, got '16'"),
        ({"compute_kl": "no"}, r"evaluation: compute_kl must be true or false"),
        ({"backend": "cuda"}, r"evaluation: backend must be one of"),
        (
            {"sources": {"arithmetic": "no_such.jsonl"}},
            r"evaluation: sources\['arithmetic'\]: no such file 'no_such.jsonl' .*next to the comparison config first",
        ),
        (
            {"judge": {"model": "m"}},
            r"evaluation: judge is set but benchmarks \['arithmetic'\] has no creative_writing",
        ),
    ],
)
def test_bad_evaluation_settings_fail_before_any_training(tmp_path, evaluation, message):
    with open(QUICKSTART) as f:
        raw = yaml.safe_load(f)
    raw["train_config"] = os.path.join(ROOT, "recipes", "quickstart.yaml")
    sampling = {**raw["evaluation"]["sampling"], **evaluation.get("sampling", {})}
    raw["evaluation"] = {**raw["evaluation"], **evaluation, "sampling": sampling}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(CompareConfigError, match=message):
        run(["--config", str(path), "--output_dir", str(tmp_path / "out"), "--dry_run"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        (None, r"Cannot read the config file '.*missing.yaml': \[Errno 2\] No such file or directory"),
        ("", r"bad.yaml must contain a YAML mapping"),
        ("train_config: [unclosed\nmethods: [grpo]\n", r"bad.yaml is not valid YAML: (?s:.*)line 1, column 15"),
        ("- grpo\n- policy_split\n", r"bad.yaml must contain a YAML mapping"),
        (b"output_dir: \xff\xfe\n", r"bad.yaml is not UTF-8 text"),
        (
            "train_config: {q}\nmethods: [grpo]\noutput_dir: out\nlauncher: python -m policy_split_trl.scripts.train\n",
            r"launcher must be a list of strings, e.g.",
        ),
        (
            "train_config: {q}\nmethods: [grpo]\noutput_dir: out\ntrain_overrides: [max_steps, 2]\n",
            r"train_overrides must be a mapping",
        ),
        (
            "train_config: {q}\nmethods: [grpo]\noutput_dir: out\nevaluation: arithmetic\n",
            r"evaluation must be a mapping",
        ),
        ("train_config: [a, b]\nmethods: [grpo]\noutput_dir: out\n", r"train_config must be a non-empty path"),
        ("train_config: {q}\nmethods: [grpo]\noutput_dir: 12\n", r"output_dir must be a non-empty path"),
    ],
    ids=[
        "missing",
        "empty",
        "malformed",
        "a_list",
        "not_utf8",
        "launcher_string",
        "overrides_list",
        "evaluation_string",
        "train_config_list",
        "output_dir_number",
    ],
)
def test_unreadable_or_mistyped_comparison_yaml(tmp_path, text, message):
    path = tmp_path / ("missing.yaml" if text is None else "bad.yaml")
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text.replace("{q}", os.path.join(ROOT, "recipes", "quickstart.yaml")))
    with pytest.raises(CompareConfigError, match=message):
        run(["--config", str(path), "--dry_run"])
    exe = os.path.join(BIN, "policy-split-compare")
    proc = subprocess.run(
        [exe, "--config", str(path), "--dry_run"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.startswith("policy-split-compare:")


def fake_processes(monkeypatch, tiny_model_path):
    """Training = copying the tiny model into the method's model folder; evaluation runs in this process (fast, and
    the writes are the real ones)."""
    import shutil

    def stream(command, log_path):
        if command[1:3] == ["-m", "policy_split_trl.scripts.evaluate"]:  # policy-split-eval --config ...
            results = evaluate_script.run(command[3:])
            return 1 if (results.get("judge_status") or {}).get("error") else 0
        shutil.copytree(tiny_model_path, command[command.index("--output_dir") + 1], dirs_exist_ok=True)
        return 0

    monkeypatch.setattr(runner, "stream_process", stream)


def without_times(rows):
    return [{k: v for k, v in row.items() if k != "train_wall_time_s"} for row in rows]


@pytest.fixture
def finished(tiny_model_path, tmp_path, monkeypatch):
    """A finished comparison of `original` and `grpo` (fake training), and the command that made it."""
    fake_processes(monkeypatch, tiny_model_path)
    out = tmp_path / "out"
    argv = [
        "--config",
        tiny_config(tmp_path, tiny_model_path),
        "--methods",
        "original",
        "grpo",
        "--output_dir",
        str(out),
    ]
    summary = run(argv)
    return {"out": out, "argv": argv, "rows": summary["rows"]}


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "train_done.json",
            b'{"method": "grpo", "wall_ti',
            (
                r"train_done.json \(the record of a finished training\) "
                r"is not valid JSON .*: delete it to train grpo again"
            ),
        ),
        ("train_done.json", b"", r"train_done.json \(the record of a finished training\) is empty: delete it"),
        ("train_done.json", b"[1, 2]", r"holds a JSON list, not an object: delete it to train grpo again"),
        ("train_done.json", b'{"method": "grpo"}', r"train_done.json .* lacks request/wall_time_s/steps: delete it"),
        (
            "eval_config.yaml",
            b'{"model": ',
            (
                r"eval_config.yaml \(the settings of the last evaluation\) is not "
                r"valid YAML .*: delete it \(the harness still checks .*eval\)"
            ),
        ),
    ],
    ids=["done_cut", "done_empty", "done_list", "done_incomplete", "eval_config_cut"],
)
def test_a_damaged_state_file_is_an_error_naming_it_and_the_fix(finished, name, content, message):
    out = finished["out"]
    (out / "grpo" / name).write_bytes(content)
    (out / "grpo" / "eval" / "results.json").unlink()  # so that the evaluation's settings are read too
    with pytest.raises(CompareConfigError, match=message):
        run(finished["argv"])


def test_a_damaged_results_json_is_computed_again_without_sampling(finished, capsys):
    out = finished["out"]
    (out / "grpo" / "eval" / "results.json").write_text('{"per_benchmark": {"arithm')
    summary = run(finished["argv"])
    assert "results.json (an evaluation's results) is not valid JSON" in capsys.readouterr().out
    saved = json.loads((out / "grpo" / "eval" / "results.json").read_text())
    assert saved["generated_this_run"] == 0 and without_times(summary["rows"]) == without_times(finished["rows"])


def test_a_damaged_checkpoint_state_makes_the_steps_unknown_not_wrong(tmp_path, capsys):
    for step, text in ((2, '{"global_step": 2}'), (4, '{"global_st')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(text)
    assert runner.trained_steps(str(tmp_path), 4) is None  # not 2: checkpoint-4 may hold the truth
    assert (
        "checkpoint-4/trainer_state.json (a checkpoint's trainer state) is not valid JSON" in capsys.readouterr().out
    )
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    assert runner.trained_steps(str(tmp_path), 4) == 4


@pytest.mark.parametrize(
    "target",
    [
        "train_request.json",
        "train_done.json",
        "eval_config.yaml",
        "comparison.json",
        "comparison.md",
        "comparison.png",
        "results.json",
    ],
)
def test_a_kill_while_writing_a_state_file_leaves_the_old_version_and_a_rerun_finishes(
    tiny_model_path, tmp_path, monkeypatch, target
):
    fake_processes(monkeypatch, tiny_model_path)
    config = tiny_config(tmp_path, tiny_model_path)
    out = tmp_path / "out"
    run(["--config", config, "--methods", "original", "--output_dir", str(out)])  # comparison.* exist already
    before = {path: path.read_bytes() for path in out.rglob(target)}
    real_replace = os.replace
    killed = []

    def killed_while_writing(src, dst):
        if os.path.basename(dst) == target and not killed:
            killed.append(dst)
            raise KeyboardInterrupt(f"killed while writing {dst}")
        return real_replace(src, dst)

    argv = ["--config", config, "--methods", "original", "grpo", "--output_dir", str(out)]
    monkeypatch.setattr(runner.os, "replace", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        run(argv)
    monkeypatch.setattr(runner.os, "replace", real_replace)
    after = {path: path.read_bytes() for path in out.rglob(target)}
    assert after == before  # the file being written is the previous version (or still absent): never cut
    assert not [path for path in out.rglob("*") if ".tmp-" in path.name]
    summary = run(argv)
    reference = run(["--config", config, "--methods", "original", "grpo", "--output_dir", str(tmp_path / "ref")])
    assert without_times(summary["rows"]) == without_times(reference["rows"])
    assert json.loads((out / "comparison.json").read_text())["rows"] == json.loads(json.dumps(summary["rows"]))


def test_every_file_the_driver_rewrites_goes_through_a_temporary_file(tiny_model_path, tmp_path, monkeypatch):
    import builtins

    fake_processes(monkeypatch, tiny_model_path)
    opened = []
    real_open = builtins.open

    def recording_open(file, mode="r", *args, **kwargs):
        path = os.path.abspath(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else ""
        if any(flag in mode for flag in "wax+") and f"{os.sep}model{os.sep}" not in path:  # the trained model aside
            opened.append((os.path.basename(path), mode))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    run(
        [
            "--config",
            tiny_config(tmp_path, tiny_model_path),
            "--methods",
            "original",
            "grpo",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    monkeypatch.setattr(builtins, "open", real_open)
    direct = {(name, mode) for name, mode in opened if ".tmp-" not in name}
    assert direct <= {("generations.jsonl", "a"), ("generations.jsonl", "rb+")}  # only the appended file
    targets = {name.split(".tmp-")[0][1:] for name, _ in opened if ".tmp-" in name}
    assert {"train_request", "train_done", "eval_config", "comparison", "results", "generations_settings"} <= targets


def test_flags_override_the_comparison_yaml(tmp_path):
    """`policy-split-compare` parses `CompareConfig` with TrlParser: any field as a flag, mappings added to the file's."""
    from policy_split_trl.comparison import CompareParser

    config = CompareParser().parse(
        ["--config", QUICKSTART, "--seed", "7", "--evaluation", "limit=5", "--train_overrides", "max_steps=3"]
    )
    assert config.seed == 7 and config.config_file == QUICKSTART
    assert config.train_config == os.path.join(ROOT, "recipes", "quickstart.yaml")  # relative to the YAML
    assert config.evaluation["limit"] == 5 and config.evaluation["k"] == 4  # the file's other settings are kept
    assert config.train_overrides == {"max_steps": 3, "mode_report": False, "save_strategy": "no"}
    assert config.eval_config(model="m", output_dir="o", modes=["normal"]).sampling.max_new_tokens == 32
    with pytest.raises(CompareConfigError, match=r"evaluation: Unknown key\(s\) \['limt'\]"):
        CompareParser().parse(["--config", QUICKSTART, "--evaluation", "limt=5"])
