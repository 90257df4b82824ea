"""Bad input to `policy-split-train` fails before the model loads, naming the flag or file and the fix; what the user
wrote is never ignored silently (method contradictions, inapplicable knobs); `--resume_from_checkpoint true` resumes."""

import json
import os
import warnings

import pytest
import yaml
from trl import GRPOTrainer

from policy_split_trl.hub import load_policy_split_config, policy_split_metadata
from policy_split_trl.methods import COMMAND_LINE, METHODS, MethodConfig, apply_method, inapplicable_settings
from policy_split_trl.scripts.train import run
from policy_split_trl.training import explicit_arguments, resolve_resume_from_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "recipes", "quickstart.yaml")


@pytest.fixture
def no_model_load(monkeypatch):
    """A model load fails the test: the bad input must be reported before it."""
    import trl.trainer.grpo_trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(trl.trainer.grpo_trainer, "create_model_from_path", refuse)


def recipe(tmp_path, **changes):
    """The quickstart recipe with `changes` (a value of `None` removes the key), written to a file; returns its path."""
    with open(QUICKSTART) as f:
        content = yaml.safe_load(f)
    content.update(changes)
    content = {key: value for key, value in content.items() if value is not None}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(content))
    return str(path)


def cli(tiny_model_path, output_dir, *extra, config=QUICKSTART):
    """A 2-step tiny run of the quickstart recipe, no evaluation."""
    return [
        "--config",
        config,
        "--model_name_or_path",
        tiny_model_path,
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "2",
        "--max_completion_length",
        "8",
        "--num_generations",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--mode_report",
        "false",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        *extra,
    ]


def method_warnings(record):
    return [str(w.message) for w in record if "--method" in str(w.message)]


# ------------------------------------------------------------------------------------------------ bad flags and files
def _write(name, content):
    def make(tmp_path):
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return str(path)

    return make


BAD_INPUTS = {
    # case: (arguments, given tmp_path; the exception; what the message must say: flag, file, problem, fix)
    "mode_prompt_file_missing": (
        lambda t: ["--mode_prompt_file", str(t / "nope.txt")],
        FileNotFoundError,
        r"--mode_prompt_file .*nope.txt does not exist .*give a text file holding the high-entropy system prompt",
    ),
    "mode_prompt_file_folder": (lambda t: ["--mode_prompt_file", str(t)], FileNotFoundError, "is a folder"),
    "mode_prompt_file_empty": (
        lambda t: ["--mode_prompt_file", _write("he.txt", "")(t)],
        ValueError,
        r"--mode_prompt_file .*he.txt is empty; write the high-entropy system prompt into it",
    ),
    "mode_prompt_file_whitespace": (
        lambda t: ["--mode_prompt_file", _write("he.txt", " \n\t\n")(t)],
        ValueError,
        "he.txt is empty",
    ),
    "mode_prompt_file_binary": (
        lambda t: ["--mode_prompt_file", _write("he.bin", bytes(range(256)))(t)],
        ValueError,
        r"--mode_prompt_file .*he.bin is not UTF-8 text \(byte 128\); write the high-entropy system prompt as plain",
    ),
    "mode_prompt_file_nul_bytes": (
        lambda t: ["--mode_prompt_file", _write("he.txt", b"Explore\x00\x01")(t)],
        ValueError,
        r"he.txt is a binary file",
    ),
    "reward_unknown_name": (
        lambda t: ["--reward_funcs", "acuracy"],
        ValueError,
        r"--reward_funcs acuracy: Unknown reward function 'acuracy'. Use one of \['accuracy'",
    ),
    "reward_bad_module": (
        lambda t: ["--reward_funcs", "no_such_module_xyz.reward"],
        ValueError,
        r"--reward_funcs no_such_module_xyz.reward: Cannot import .*No module named",
    ),
    "reward_bad_attribute": (
        lambda t: ["--reward_funcs", "arithmetic", "policy_split_trl.rewards.no_such_reward"],
        ValueError,
        r"--reward_funcs policy_split_trl.rewards.no_such_reward: Cannot import",
    ),
    "reward_not_callable": (
        lambda t: ["--reward_funcs", "math.pi"],
        ValueError,
        "--reward_funcs math.pi: Reward 'math.pi' resolves to a non-callable float",
    ),
    "dataset_missing_relative": (
        lambda t: ["--dataset_name", "data/missing.jsonl"],
        FileNotFoundError,
        r"--dataset_name data/missing.jsonl: No such data file: .*resolved from the current directory",
    ),
    "dataset_missing_absolute": (
        lambda t: ["--dataset_name", str(t / "missing.parquet")],
        FileNotFoundError,
        r"--dataset_name .*missing.parquet: No such data file",
    ),
    "dataset_empty_file": (
        lambda t: ["--dataset_name", _write("train.jsonl", "")(t)],
        ValueError,
        r"--dataset_name .*train.jsonl: Data file .*train.jsonl is empty \(0 bytes\)",
    ),
    "dataset_bad_json_line": (
        lambda t: ["--dataset_name", _write("train.jsonl", '{"prompt": "q", "solution": "1"}\n{"prompt": \n')(t)],
        ValueError,
        r"--dataset_name .*train.jsonl: Cannot read data file .*train.jsonl as jsonl: line 2: Expecting value",
    ),
    "dataset_empty_prompt": (
        lambda t: ["--dataset_name", _write("train.jsonl", '{"prompt": "", "solution": "1"}\n')(t), "--task", "none"],
        ValueError,
        r"--dataset_name .*train.jsonl: .*train.jsonl: row 0 of column 'prompt' is an empty string",
    ),
    "dataset_missing_column": (
        lambda t: ["--dataset_name", _write("train.jsonl", '{"question": "q", "solution": "1"}\n')(t)],
        ValueError,
        r"no column\(s\) \['prompt'\]; columns found: \['question', 'solution'\]. Map yours with --prompt_column",
    ),
    "max_train_samples_zero": (
        lambda t: ["--max_train_samples", "0"],
        ValueError,
        "--max_train_samples must be a positive number of rows .got 0.; leave it unset",
    ),
    "max_train_samples_negative": (
        lambda t: ["--max_train_samples", "-5"],
        ValueError,
        r"--max_train_samples must be a positive number of rows \(got -5\)",
    ),
    "max_eval_samples_zero": (
        lambda t: ["--max_eval_samples", "0"],
        ValueError,
        r"--max_eval_samples must be a positive number",
    ),
    "task_unknown_in_recipe": (
        lambda t: ["--config", recipe(t, task="poetry")],
        ValueError,
        r"--task 'poetry' is unknown; choose one of \['arithmetic', 'math'",
    ),
    "method_unknown_in_recipe": (
        lambda t: ["--config", recipe(t, method="ppo")],
        ValueError,
        r"--method 'ppo' is unknown; choose one of",
    ),
    "resume_missing_folder": (
        lambda t: ["--resume_from_checkpoint", str(t / "checkpoint-7")],
        FileNotFoundError,
        r"--resume_from_checkpoint .*checkpoint-7: no such checkpoint folder .*or true for the latest one",
    ),
    "resume_nothing_to_resume": (
        lambda t: ["--resume_from_checkpoint", "true"],
        FileNotFoundError,
        (
            r"--resume_from_checkpoint true: output_dir .* does not exist, so there is nothing to resume. .*remove "
            r"--resume_from_checkpoint to start a new run"
        ),
    ),
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry_run"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_before_the_model_loads(case, dry_run, tiny_model_path, tmp_path, monkeypatch, no_model_load):
    monkeypatch.chdir(tmp_path)  # relative paths resolve here
    make_arguments, error_type, message = BAD_INPUTS[case]
    extra = make_arguments(tmp_path)
    config = QUICKSTART
    if extra[0] == "--config":
        config, extra = extra[1], extra[2:]
    argv = cli(tiny_model_path, tmp_path / "out", *extra, *(["--dry_run"] if dry_run else []), config=config)
    with pytest.raises(error_type, match=message):
        run(argv)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")  # nothing written


def test_unknown_task_on_the_command_line_is_argparse_s(tiny_model_path, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(cli(tiny_model_path, tmp_path, "--task", "poetry", "--dry_run"))
    assert "argument --task: invalid choice: 'poetry'" in capsys.readouterr().err


def test_a_reward_name_in_a_recipe_is_one_name_not_its_letters(tiny_model_path, tmp_path):
    summary = run(cli(tiny_model_path, tmp_path, "--dry_run", config=recipe(tmp_path, reward_funcs="arithmetic")))
    assert summary["rewards"] == ["arithmetic_reward"]


def test_relative_dataset_paths_resolve_from_the_current_directory(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        "\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) for i in range(5))
    )
    for name in ("data/train.jsonl", "./data/train.jsonl", str(tmp_path / "data" / "train.jsonl")):
        summary = run(
            cli(
                tiny_model_path,
                tmp_path / "out",
                "--dataset_name",
                name,
                "--prompt_column",
                "question",
                "--solution_column",
                "answer",
                "--dry_run",
            )
        )
        assert summary["train_samples"] == 5


# --------------------------------------------------------------------------------------------- policy_split.json
def _he_meta(**he):
    meta = policy_split_metadata(
        MethodConfig(output_dir="x", num_generations=4, per_device_train_batch_size=4, use_cpu=True, report_to="none")
    )
    meta["modes"]["high_entropy"].update(he)
    return meta


POLICY_SPLIT_JSON = {
    "truncated": (
        '{"format_version": 1, "modes": {"normal": ',
        r"is not valid JSON \(line 1, column 43: Expecting value; truncated\?",
    ),
    "not_utf8": (b"\xff\xfe{}", r"is not UTF-8 text"),
    "a_list": ("[]", "the content must be a JSON object, got a list"),
    "no_modes": ({"format_version": 1}, "no 'modes' object"),
    "modes_a_list": ({"modes": ["normal", "high_entropy"]}, "'modes' must be an object, got a list"),
    "no_high_entropy_mode": ({"modes": {"normal": {"system_prompt": None}}}, "'modes' has no 'high_entropy' entry"),
    "mode_without_prompt": (
        {"modes": {"normal": {}, "high_entropy": {"system_prompt": "x"}}},
        "modes.normal must be an object with a 'system_prompt'",
    ),
    "prompt_a_number": (_he_meta(system_prompt=3), "modes.high_entropy.system_prompt must be a string or null"),
    "empty_he_prompt": (_he_meta(system_prompt=" "), "modes.high_entropy.system_prompt must be the non-empty prompt"),
    "null_he_prompt": (_he_meta(system_prompt=None), "modes.high_entropy.system_prompt must be the non-empty prompt"),
    "purpose_a_list": (_he_meta(purpose=["x"]), "modes.high_entropy.purpose must be a string"),
    "version_a_string": ({**_he_meta(), "format_version": "1"}, "format_version must be an integer, got '1'"),
    "training_a_list": ({**_he_meta(), "training": [1]}, "'training' must be an object"),
    "newer_format": ({**_he_meta(), "format_version": 99}, "format 99 is newer than this library reads .*upgrade"),
}


@pytest.mark.parametrize("case", sorted(POLICY_SPLIT_JSON))
def test_bad_policy_split_json_names_the_file(case, tmp_path):
    content, message = POLICY_SPLIT_JSON[case]
    path = tmp_path / "policy_split.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=message) as error:
        load_policy_split_config(str(tmp_path))
    assert str(path) in str(error.value)
    if case != "newer_format":
        assert "write_policy_split_json" in str(error.value)  # the fix


def test_a_valid_policy_split_json_loads(tmp_path):
    meta = _he_meta()
    (tmp_path / "policy_split.json").write_text(json.dumps(meta))
    assert load_policy_split_config(str(tmp_path)) == meta


# -------------------------------------------------------------------------------------------- method contradictions
CONTRADICTIONS = {
    # case: (recipe changes or None, command-line flags, what the error says)
    "cli_eta_equal_to_its_default": (
        None,
        ["--method", "grpo_rollout_sharing", "--eta", "0.03"],
        r"--method grpo_rollout_sharing means eta=0.0, but eta=0.03 is set \(command line\)",
    ),
    "cli_sharing_equal_to_its_default": (
        None,
        ["--method", "policy_split_no_sharing", "--rollout_sharing", "true"],
        r"means rollout_sharing=False, but rollout_sharing=True is set \(command line\)",
    ),
    "cli_normal_eta": (None, ["--method", "grpo_rollout_sharing", "--normal_eta", "0.01"], "means normal_eta=0.0"),
    "yaml_eta": (
        {"method": "grpo_rollout_sharing", "eta": 0.03},
        [],
        r"means eta=0.0, but eta=0.03 is set \(recipe .*recipe.yaml\); remove eta from the recipe/flags",
    ),
    "yaml_sharing": (
        {"method": "policy_split_no_sharing", "rollout_sharing": True},
        [],
        r"means rollout_sharing=False, but rollout_sharing=True is set \(recipe",
    ),
    "yaml_method_cli_knob": (
        {"method": "grpo_rollout_sharing", "eta": None},
        ["--eta", "0.03"],
        r"eta=0.03 is set \(command line\)",
    ),
    # Repeating the recipe's own method on the command line does not make the recipe's contradiction go away.
    "yaml_contradiction_cli_repeats_method": (
        {"method": "grpo_rollout_sharing", "eta": 0.05},
        ["--method", "grpo_rollout_sharing"],
        r"eta=0.05 is set \(recipe",
    ),
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry_run"])
@pytest.mark.parametrize("case", sorted(CONTRADICTIONS))
def test_a_setting_that_contradicts_the_method_is_an_error(case, dry_run, tiny_model_path, tmp_path, no_model_load):
    changes, flags, message = CONTRADICTIONS[case]
    config = recipe(tmp_path, **changes) if changes else QUICKSTART
    argv = cli(tiny_model_path, tmp_path / "out", *flags, *(["--dry_run"] if dry_run else []), config=config)
    with pytest.raises(ValueError, match=message):
        run(argv)


def test_a_method_chosen_on_the_command_line_wins_over_the_recipe_with_a_warning(tiny_model_path, tmp_path):
    # What policy-split-compare runs: the base recipe (eta: 0.05 here) with `--method` per method on the command line.
    config = recipe(tmp_path, eta=0.05)
    argv = cli(
        tiny_model_path,
        tmp_path / "out",
        "--method",
        "grpo_rollout_sharing",
        "--seed",
        "42",
        "--save_strategy",
        "no",
        "--dry_run",
        config=config,
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        summary = run(argv)
    assert summary["bonus"]["eta"] == 0.0 and summary["mode_split"]["rollout_sharing"] is True
    assert method_warnings(record) == [
        (
            f"eta=0.05 (recipe {config}) is replaced by eta=0.0: --method grpo_rollout_sharing (command line) means "
            "eta=0.0 and the command line wins over the recipe. Remove eta from the recipe to silence this."
        )
    ]
    # kappa/alpha are Policy Split settings the ablation still reads: no warning about them.
    assert summary["bonus"]["kappa"] == 2.0


INAPPLICABLE = {
    # The recipe's kappa/alpha are its own method's knobs: --method on the command line replaced that method, so only
    # the knob given with it is warned about.
    "grpo_eta": (["--method", "grpo", "--eta", "0.5"], "GRPOTrainer", ["eta (command line)"]),
    "policy_split_clip_cov": (
        ["--method", "policy_split", "--clip_cov_ratio", "0.1"],
        "PolicySplitGRPOTrainer",
        ["clip_cov_ratio (command line)"],
    ),
    "entropy_advantage_edge": (
        ["--method", "entropy_advantage", "--edge_epsilon", "1e-6"],
        "EntropyAdvantageGRPOTrainer",
        ["edge_epsilon (command line)"],
    ),
}


@pytest.mark.parametrize("case", sorted(INAPPLICABLE))
def test_a_setting_the_method_does_not_use_is_warned_about(case, tiny_model_path, tmp_path):
    flags, trainer, names = INAPPLICABLE[case]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run(cli(tiny_model_path, tmp_path, *flags, "--dry_run"))
    [message] = method_warnings(record)
    assert f"its trainer ({trainer}) never reads these settings" in message
    assert all(name in message for name in names), message
    assert "recipe" not in message, message


def test_a_recipe_knob_its_own_method_does_not_use_is_warned_about(tiny_model_path, tmp_path):
    """The method and the knob both in the recipe: the recipe contradicts itself, so the knob is warned about."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run(cli(tiny_model_path, tmp_path, "--dry_run", config=recipe(tmp_path, method="grpo")))
    [message] = method_warnings(record)
    assert "--method grpo does not use alpha, eta, eta_placement, kappa (recipe" in message, (
        message
    )  # yaml.safe_dump sorts keys


def test_a_mode_prompt_file_without_a_high_entropy_mode_is_warned_about(tiny_model_path, tmp_path):
    prompt = tmp_path / "he.txt"
    prompt.write_text("Explore.")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run(
            cli(
                tiny_model_path,
                tmp_path,
                "--method",
                "entropy_regularization",
                "--mode_prompt_file",
                str(prompt),
                "--dry_run",
                config=recipe(tmp_path, eta=None, kappa=None, alpha=None),
            )
        )
    assert method_warnings(record) == [
        (
            f"--method entropy_regularization has no high-entropy mode: --mode_prompt_file {prompt} is not used in "
            "training (remove it, or pick a Policy Split method)."
        )
    ]


def test_a_recipe_without_contradictions_gives_no_method_warning(tiny_model_path, tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        summary = run(cli(tiny_model_path, tmp_path, "--eta", "0.05", "--dry_run"))
    assert method_warnings(record) == [] and summary["bonus"]["eta"] == 0.05


def test_a_value_set_to_the_fields_default_still_wins_over_the_methods_default(tiny_model_path, tmp_path):
    # entropy_coef 0.0 is the field's default: it used to be replaced by the method's 0.003 as if it were unset.
    summary = run(
        cli(
            tiny_model_path,
            tmp_path,
            "--method",
            "entropy_regularization",
            "--entropy_coef",
            "0.0",
            "--dry_run",
            config=recipe(tmp_path, eta=None, kappa=None, alpha=None),
        )
    )
    assert summary["method_settings"] == {"entropy_coef": 0.0}
    unset = run(
        cli(
            tiny_model_path,
            tmp_path,
            "--method",
            "entropy_regularization",
            "--dry_run",
            config=recipe(tmp_path, eta=None, kappa=None, alpha=None),
        )
    )
    assert unset["method_settings"] == {"entropy_coef": 0.003}


def test_explicit_arguments_knows_what_was_written_and_where(tmp_path):
    config = recipe(tmp_path, eta=0.03)
    explicit = explicit_arguments(
        ["--config", config, "--method", "grpo", "--kappa=3", "--no_rollout_sharing", "--max_step", "3"]
    )
    assert explicit["eta"] == f"recipe {config}"  # equal to the default, still written
    assert explicit["kappa"] == explicit["rollout_sharing"] == explicit["method"] == COMMAND_LINE
    assert explicit["max_steps"] == COMMAND_LINE  # argparse's prefix matching, as the real parse does
    assert "normal_eta" not in explicit and "env" not in explicit
    # A --method that repeats the recipe's counts as the recipe's choice.
    assert explicit_arguments(["--config", config, "--method", "policy_split"])["method"] == f"recipe {config}"


def test_apply_method_with_and_without_explicit_settings(tmp_path):
    def args(**kwargs):
        return MethodConfig(
            output_dir=str(tmp_path),
            num_generations=4,
            per_device_train_batch_size=4,
            use_cpu=True,
            report_to="none",
            **kwargs,
        )

    with pytest.raises(ValueError, match="means eta=0.0, but eta=0.03 is set"):
        apply_method("grpo_rollout_sharing", args(), {"method": COMMAND_LINE, "eta": COMMAND_LINE})
    # Without `explicit` (a config built in Python) only a value differing from the default counts as set.
    assert apply_method("grpo_rollout_sharing", args()).eta == 0.0
    with pytest.raises(ValueError, match="eta=0.05 is set \\(config\\)"):
        apply_method("grpo_rollout_sharing", args(eta=0.05))
    assert inapplicable_settings("grpo", ["eta", "learning_rate", "clip_cov_ratio", "dry_run"]) == [
        "eta",
        "clip_cov_ratio",
    ]
    assert inapplicable_settings("policy_split", ["eta", "kappa", "num_high_entropy_generations"]) == []
    for method in METHODS:  # a method's own settings are never reported as inapplicable to it
        assert inapplicable_settings(method, [*METHODS[method].fixed, *METHODS[method].defaults]) == []


# ------------------------------------------------------------------------------------------------------- resuming
def _checkpoint(folder, step):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return str(path)


@pytest.mark.parametrize("value", ["true", "True", "TRUE", "1", "yes", " true ", True, 1])
def test_resume_true_means_the_latest_checkpoint_in_output_dir(value, tmp_path):
    for step in (1, 10, 2):
        _checkpoint(tmp_path, step)
    assert resolve_resume_from_checkpoint(value, str(tmp_path)) == str(tmp_path / "checkpoint-10")


@pytest.mark.parametrize("value", ["false", "False", "0", "no", False, 0, None])
def test_resume_false_means_none(value, tmp_path):
    _checkpoint(tmp_path, 1)
    assert resolve_resume_from_checkpoint(value, str(tmp_path)) is None


def test_resume_from_a_path(tmp_path, monkeypatch):
    path = _checkpoint(tmp_path / "run", 4)
    assert resolve_resume_from_checkpoint(path, str(tmp_path / "other")) == path
    monkeypatch.chdir(tmp_path)
    assert resolve_resume_from_checkpoint("run/checkpoint-4", "x") == "run/checkpoint-4"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_resume_from_checkpoint("~/run/checkpoint-4", "x") == path


@pytest.mark.parametrize(
    "value, setup, error, message",
    [
        ("true", lambda t: None, FileNotFoundError, "output_dir .* does not exist, so there is nothing to resume"),
        ("true", lambda t: t.mkdir(), ValueError, "has no checkpoint-N folder, so there is nothing to resume"),
        ("1", lambda t: (t / "checkpoint-x").mkdir(parents=True), ValueError, "has no checkpoint-N folder"),
        ("nope", lambda t: None, FileNotFoundError, r"--resume_from_checkpoint nope: no such checkpoint folder"),
        ("", lambda t: None, ValueError, "--resume_from_checkpoint is empty; pass true"),
        # The latest checkpoint was being saved when the run died: never resume from half a checkpoint.
        (
            "true",
            lambda t: (_checkpoint(t, 1), (t / "checkpoint-2").mkdir()),
            ValueError,
            r"checkpoint-2 is not a complete Trainer checkpoint \(no trainer_state.json",
        ),
    ],
)
def test_resume_with_nothing_to_resume_is_an_error(value, setup, error, message, tmp_path):
    setup(tmp_path / "out")
    with pytest.raises(error, match=message):
        resolve_resume_from_checkpoint(value, str(tmp_path / "out"))


def test_resume_true_continues_a_real_run_at_its_global_step(tiny_model_path, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = run(cli(tiny_model_path, out, "--save_strategy", "steps", "--save_steps", "1"))
    assert first.state.global_step == 2 and (out / "checkpoint-2").is_dir()

    summary = run(cli(tiny_model_path, out, "--max_steps", "3", "--resume_from_checkpoint", "true", "--dry_run"))
    assert summary["resume_from_checkpoint"] == f"{out / 'checkpoint-2'} (global step 2)"
    in_recipe = run(cli(tiny_model_path, out, "--dry_run", config=recipe(tmp_path, resume_from_checkpoint=True)))
    assert in_recipe["resume_from_checkpoint"] == summary["resume_from_checkpoint"]  # YAML's `true` is a bool

    import transformers

    loaded, steps = [], []
    load, training_step = transformers.Trainer._load_from_checkpoint, GRPOTrainer.training_step
    monkeypatch.setattr(
        transformers.Trainer,
        "_load_from_checkpoint",
        lambda self, path, *a, **k: (loaded.append(path), load(self, path, *a, **k))[1],
    )
    monkeypatch.setattr(
        GRPOTrainer,
        "training_step",
        lambda self, *a, **k: (steps.append(self.state.global_step), training_step(self, *a, **k))[1],
    )
    resumed = run(
        cli(
            tiny_model_path,
            out,
            "--max_steps",
            "3",
            "--resume_from_checkpoint",
            "True",
            "--save_strategy",
            "steps",
            "--save_steps",
            "1",
        )
    )
    assert loaded == [str(out / "checkpoint-2")]
    assert steps == [2]  # one step trained, from global step 2: not a fresh start
    assert resumed.state.global_step == 3 and (out / "checkpoint-3").is_dir()
    logged = [h["step"] for h in resumed.state.log_history if "loss" in h]
    assert logged == [1, 2, 3]  # the first two from checkpoint-2's state
