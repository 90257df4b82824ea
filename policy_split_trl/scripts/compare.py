"""Compare methods the way the paper's Table 1 does (`policy-split-compare`): train each method with the same recipe and
budget, evaluate every trained model with the dual-mode harness, and write one table, one JSON and one plot.

    policy-split-compare --config recipes/compare/quickstart.yaml
    policy-split-compare --config recipes/compare/paper_qwen3_1.7b.yaml --dry_run
    policy-split-compare --config recipes/compare/quickstart.yaml --methods grpo policy_split --output_dir outputs/cmp

The config is a YAML file:

    train_config: ../quickstart.yaml        # the base training recipe, relative to this file
    methods: [grpo, entropy_advantage, policy_split]
    train_overrides: {max_steps: 20}        # flags added to every training command: one budget for all
    seed: 42                                # optional: the recipe's own seed otherwise
    output_dir: outputs/compare/quickstart  # relative to the working directory, like a recipe's output_dir
    launcher: [python, -m, policy_split_trl.scripts.train]   # optional, e.g. [accelerate, launch, ...]
    evaluation: {benchmarks: [arithmetic], limit: 32, k: 4, sampling: {temperature: 0.6}}   # EvalConfig fields

Each method trains in its own process (the launcher) into `<output_dir>/<method>/model`, its output going to the
console and to `<method>/train.log`; `<method>/train_done.json` (wall time, steps, settings) marks it finished. Each
model is then evaluated, in its own process too (so that every vLLM engine frees its GPU memory), into
`<method>/eval` (`normal` and `high_entropy` modes for the methods trained with the high-entropy prompt, `normal`
otherwise). `comparison.md`, `comparison.json` and `comparison.png` are rewritten after every method. A rerun skips
finished trainings and evaluations and resumes an unfinished evaluation through the harness's `generations.jsonl`, so
an interrupted comparison continues where it stopped. Every file the driver writes is replaced in one step (a crash
leaves the old or the new version), and a damaged one is an error naming it and the fix (a damaged `results.json` is
only recomputed from the samples).
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import datetime
import difflib
import glob
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import yaml

from policy_split_trl.eval.files import DamagedFileError, atomic_write_json, atomic_write_text, read_json_file
from policy_split_trl.methods import METHODS, MethodSpec

DEFAULT_LAUNCHER = ["python", "-m", "policy_split_trl.scripts.train"]
CONFIG_KEYS = ("train_config", "methods", "train_overrides", "seed", "output_dir", "launcher", "evaluation")
# Set by the driver for each method; a value in `train_overrides` would silently fight it.
_DRIVER_TRAIN_FLAGS = {
    "config": "the training recipe is `train_config`",
    "method": "the methods are `methods`",
    "output_dir": "each method trains into <output_dir>/<method>/model",
    "seed": "set `seed` at the top level of the comparison config",
    "dry_run": "use policy-split-compare --dry_run",
}
# Set by the driver for each method (which model, which modes, where), so not accepted in `evaluation`.
_DRIVER_EVAL_FIELDS = ("model", "adapter", "output_dir", "modes", "mode_prompts")
# Evaluation settings that change what is sampled: a resumed evaluation must keep them (the harness reuses every
# sample already in generations.jsonl).
_SAMPLE_FIELDS = ("k", "sampling", "seed", "entropy_temperature", "chat_template_kwargs", "mode_prompts")
HE_ROW_LABEL = "+ HE prompt"
# Table 1's "Original" row: the base model, evaluated as it is (normal mode, and with the untrained HE prompt).
ORIGINAL = "original"
ORIGINAL_SPEC = MethodSpec(ORIGINAL, "Original", "", dual_mode=True, reference="the base model, not trained")
TRAIN_DONE_FILE = "train_done.json"
# The request of the training in progress: checkpoints are resumed only by the same request.
TRAIN_REQUEST_FILE = "train_request.json"


class CompareConfigError(ValueError):
    """A comparison config that cannot run (unknown method, missing file, unknown key, ...)."""


class MethodFailedError(RuntimeError):
    """A method's training or evaluation process failed; the message names the method and its log file."""


@dataclass
class CompareConfig:
    """
    A comparison: which methods, trained how, evaluated how.

    Args:
        train_config (`str`):
            The base training recipe (a `policy-split-train` YAML); every method trains with it.
        methods (`list[str]`):
            Keys of [`~policy_split_trl.methods.METHODS`], in table order.
        output_dir (`str`):
            Where each method's model, logs and evaluation go, and the comparison files.
        train_overrides (`dict[str, Any]`, *optional*):
            `policy-split-train` flags (without `--`) added to every method's command, e.g. `{"max_steps": 20}`.
        seed (`int`, *optional*):
            Training seed of every method; the recipe's own seed when `None`.
        launcher (`list[str]`, *optional*, defaults to `["python", "-m", "policy_split_trl.scripts.train"]`):
            The command that runs the training script. `python` is the interpreter running the comparison; a bare
            program name found next to it (e.g. `accelerate` in a virtual environment) is taken from there.
        evaluation (`dict[str, Any]`, *optional*):
            Fields of [`~policy_split_trl.eval.harness.EvalConfig`] (`benchmarks`, `sources`, `limit`, `limits`, `k`,
            `sampling` as a dict of [`~policy_split_trl.eval.backends.SamplingConfig`] fields, `batch_size`,
            `backend`, `chat_template_kwargs`, ...) but for the per-method ones (`model`, `adapter`, `output_dir`,
            `modes`, `mode_prompts`). `chat_template_kwargs` defaults to the training recipe's.
        config_file (`str`, *optional*):
            The YAML file this came from (recorded only).
    """

    train_config: str
    methods: list[str]
    output_dir: str
    train_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    launcher: list[str] = field(default_factory=lambda: list(DEFAULT_LAUNCHER))
    evaluation: dict[str, Any] = field(default_factory=dict)
    config_file: str | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise [`CompareConfigError`] for anything that would only fail later (after hours of training)."""
        from policy_split_trl.eval.backends import SamplingConfig
        from policy_split_trl.eval.benchmarks import BENCHMARKS
        from policy_split_trl.eval.harness import EvalConfig

        if not isinstance(self.methods, list) or not self.methods or not all(isinstance(m, str) for m in self.methods):
            raise CompareConfigError(f"`methods` must be a non-empty list of method names, got {self.methods!r}.")
        unknown = [m for m in self.methods if m not in METHODS and m != ORIGINAL]
        if unknown:
            raise CompareConfigError(
                f"Unknown method(s) {unknown}; valid methods: {[ORIGINAL, *METHODS]} ({ORIGINAL!r}: the base model, "
                "untrained)."
            )
        repeated = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if repeated:
            raise CompareConfigError(f"Method(s) {repeated} are listed twice in `methods`.")
        for name in ("train_config", "output_dir"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise CompareConfigError(f"`{name}` must be a non-empty path (a string), got {value!r}.")
        if not os.path.isfile(self.train_config):
            raise CompareConfigError(
                f"train_config {self.train_config!r} does not exist (a path relative to the comparison config is "
                "resolved against that file's folder)."
            )
        if not isinstance(self.train_overrides, dict):
            raise CompareConfigError(f"`train_overrides` must be a mapping, got {self.train_overrides!r}.")
        for key, value in self.train_overrides.items():
            if key in _DRIVER_TRAIN_FLAGS:
                raise CompareConfigError(f"train_overrides cannot set {key!r}: {_DRIVER_TRAIN_FLAGS[key]}.")
            _flag_values(key, value)  # raises for values a command line cannot carry
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise CompareConfigError(f"`seed` must be an integer, got {self.seed!r}.")
        if not self.launcher or not all(isinstance(token, str) for token in self.launcher):
            raise CompareConfigError(f"`launcher` must be a non-empty list of strings, got {self.launcher!r}.")
        if not isinstance(self.evaluation, dict):
            raise CompareConfigError(f"`evaluation` must be a mapping, got {self.evaluation!r}.")
        allowed = [f.name for f in dataclasses.fields(EvalConfig) if f.name not in _DRIVER_EVAL_FIELDS]
        unknown = sorted(set(self.evaluation) - set(allowed))
        if unknown:
            owned = [k for k in unknown if k in _DRIVER_EVAL_FIELDS]
            note = f" ({owned} are set per method by the comparison)" if owned else ""
            raise CompareConfigError(f"Unknown evaluation key(s) {unknown}{note}; valid keys: {allowed}.")
        sampling = self.evaluation.get("sampling") or {}
        sampling_fields = [f.name for f in dataclasses.fields(SamplingConfig)]
        if not isinstance(sampling, dict) or set(sampling) - set(sampling_fields):
            raise CompareConfigError(
                f"evaluation.sampling must be a mapping with keys among {sampling_fields}, got {sampling!r}."
            )
        benchmarks = self.evaluation.get("benchmarks", ["math500"])
        if isinstance(benchmarks, str) or not set(benchmarks) <= set(BENCHMARKS):
            raise CompareConfigError(
                f"evaluation.benchmarks must be a list of {sorted(BENCHMARKS)}, got {benchmarks!r}."
            )
        try:  # the harness's own checks (types, k >= 1, finite temperature > 0, source files, ...), on a stand-in model
            self.eval_config(model="<model>", output_dir="<eval>", modes=["normal"])
        except (TypeError, ValueError) as error:
            hint = ""
            if str(error).startswith("sources["):
                hint = " (evaluation.sources: a relative path is looked for next to the comparison config first)"
            raise CompareConfigError(f"evaluation: {error}{hint}") from None

    def eval_config(self, model: str, output_dir: str, modes: list[str], **kwargs: Any) -> Any:
        """The [`~policy_split_trl.eval.harness.EvalConfig`] of one model: `evaluation` plus the per-method fields."""
        from policy_split_trl.eval.backends import SamplingConfig
        from policy_split_trl.eval.harness import EvalConfig

        settings = {**self.evaluation, **kwargs}
        settings["sampling"] = SamplingConfig(**(settings.get("sampling") or {}))
        return EvalConfig(model=model, output_dir=output_dir, modes=modes, **settings)

    def method_dir(self, method: str) -> str:
        return os.path.join(os.path.abspath(self.output_dir), method)


def _resolve(path: str, base: str) -> str:
    """`path` relative to `base` (the comparison config's folder) when it exists there; as given otherwise."""
    if os.path.isabs(path):
        return path
    candidate = os.path.normpath(os.path.join(base, path))
    return candidate if os.path.exists(candidate) else path


def load_compare_config(path: str, methods: list[str] | None = None, output_dir: str | None = None) -> CompareConfig:
    """
    Read and check a comparison YAML.

    Paths inside it are relative to the file: `train_config` always, a launcher's `--config_file` and
    `evaluation.sources` files where they exist there. `output_dir` is relative to the working directory, as in every
    training recipe.

    Args:
        path (`str`):
            The YAML file.
        methods (`list[str]`, *optional*):
            Replaces its `methods` (e.g. from `--methods`).
        output_dir (`str`, *optional*):
            Replaces its `output_dir`.

    Returns:
        [`CompareConfig`]: checked.
    """
    raw = _read_yaml(path)
    unknown = sorted(set(raw) - set(CONFIG_KEYS))
    if unknown:
        raise CompareConfigError(f"Unknown key(s) {unknown} in {path}; valid keys: {list(CONFIG_KEYS)}.")
    if methods is not None:
        raw["methods"] = list(methods)
    if output_dir is not None:
        raw["output_dir"] = output_dir
    missing = [key for key in ("train_config", "methods", "output_dir") if not raw.get(key)]
    if missing:
        raise CompareConfigError(f"{path} does not set {missing}.")
    _check_types(raw, path)
    base = os.path.dirname(os.path.abspath(path))
    raw["train_config"] = os.path.normpath(os.path.join(base, raw["train_config"]))
    launcher = list(raw.get("launcher") or DEFAULT_LAUNCHER)
    for i, token in enumerate(launcher[:-1]):
        if token == "--config_file" and isinstance(launcher[i + 1], str):
            launcher[i + 1] = _resolve(launcher[i + 1], base)
    raw["launcher"] = launcher
    evaluation = dict(raw.get("evaluation") or {})
    if isinstance(evaluation.get("sources"), dict):
        # Absolute once found: the evaluation runs (and reruns) in other processes, maybe from another folder.
        evaluation["sources"] = {
            name: os.path.abspath(found) if isinstance(src, str) and os.path.exists(found := _resolve(src, base))
            else src
            for name, src in evaluation["sources"].items()
        }  # fmt: skip
    raw["evaluation"] = evaluation
    raw["train_overrides"] = dict(raw.get("train_overrides") or {})
    return CompareConfig(**raw, config_file=os.path.abspath(path))


def _read_yaml(path: str) -> dict[str, Any]:
    """The comparison YAML as a mapping, with a missing, unreadable, malformed or empty file named."""
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise CompareConfigError(f"No such comparison config: {path!r} {what} (e.g. recipes/compare/quickstart.yaml).")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except UnicodeDecodeError as error:
        raise CompareConfigError(f"{path} is not UTF-8 text ({error}).") from None
    except yaml.YAMLError as error:  # its message gives the line and column
        raise CompareConfigError(f"{path} is not valid YAML: {error}") from None
    if raw is None:
        raise CompareConfigError(f"{path} is empty; it needs at least train_config, methods and output_dir.")
    if not isinstance(raw, dict):
        raise CompareConfigError(f"{path} must be a YAML mapping with keys {list(CONFIG_KEYS)}, got {raw!r}.")
    return raw


# The type of each top-level key; `[]`/`{}` where any list/mapping (their contents are checked by CompareConfig).
_CONFIG_TYPES: dict[str, tuple[type, str]] = {
    "train_config": (str, "a path (string) to a policy-split-train recipe"),
    "methods": (list, "a list of method names"),
    "train_overrides": (dict, "a mapping of policy-split-train flags to values"),
    "output_dir": (str, "a folder path (string)"),
    "launcher": (list, "a list of strings, e.g. [accelerate, launch, --num_processes, '2']"),
    "evaluation": (dict, "a mapping of evaluation settings"),
}


def _check_types(raw: dict[str, Any], path: str) -> None:
    """Each set key of the YAML has its type (a bare string as `launcher` would be split letter by letter)."""
    for key, (kind, what) in _CONFIG_TYPES.items():
        if raw.get(key) is not None and not isinstance(raw[key], kind):
            raise CompareConfigError(f"{path}: {key} must be {what}, got {raw[key]!r}.")


# ---------------------------------------------------------------- training commands


def _flag_values(key: str, value: Any) -> list[str]:
    """A YAML value as the tokens TRL's parser reads: `true`/`false`, a list as several tokens, a dict as JSON."""
    if value is None:
        raise CompareConfigError(
            f"train_overrides.{key} is null: a command line cannot unset a flag; remove it, or set it in the recipe."
        )
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, dict):
        return [json.dumps(value)]
    if isinstance(value, (list, tuple)):
        if not value:
            raise CompareConfigError(f"train_overrides.{key} is an empty list; a flag needs at least one value.")
        return [json.dumps(v) if isinstance(v, (dict, list)) else _flag_values(key, v)[0] for v in value]
    return [str(value)]


def override_flags(overrides: dict[str, Any]) -> list[str]:
    """`{"max_steps": 20, "reward_funcs": ["a", "b"]}` -> `["--max_steps", "20", "--reward_funcs", "a", "b"]`."""
    return [token for key, value in overrides.items() for token in (f"--{key}", *_flag_values(key, value))]


def resolve_launcher(launcher: list[str]) -> list[str]:
    """`python` -> this interpreter; a bare program next to it (a virtual environment's `accelerate`) -> its path."""
    first, rest = launcher[0], list(launcher[1:])
    if first in ("python", "python3"):
        return [sys.executable, *rest]
    beside = os.path.join(os.path.dirname(sys.executable), first)
    if os.sep not in first and os.path.isfile(beside) and os.access(beside, os.X_OK):
        return [beside, *rest]
    return [first, *rest]


def train_arguments(config: CompareConfig, method: str) -> list[str]:
    """The training script's arguments for `method` (what follows the launcher)."""
    seed = ["--seed", str(config.seed)] if config.seed is not None else []
    return [
        "--config", config.train_config, "--method", method, *seed,
        "--output_dir", os.path.join(config.method_dir(method), "model"), *override_flags(config.train_overrides),
    ]  # fmt: skip


def training_command(config: CompareConfig, method: str) -> list[str]:
    """The full command that trains `method`: launcher + [`train_arguments`]."""
    return [*resolve_launcher(config.launcher), *train_arguments(config, method)]


def parse_training(config: CompareConfig, method: str) -> tuple[Any, Any, Any]:
    """
    Parse `method`'s training arguments in this process, as `policy-split-train` will, with the method applied.

    Nothing is loaded: this checks every flag before any training starts, and gives the budget and method settings
    for the records. `use_cpu` is forced so that this process never takes a GPU (a bf16 recipe still parses).

    Returns:
        `(script_args, training_args, model_args)`.
    """
    from policy_split_trl.methods import apply_method
    from policy_split_trl.scripts.train import explicit_arguments, make_parser

    parser = make_parser("policy-split-train")
    # Exact names only: argparse would take `max_step` for `--max_steps` (a prefix) and let the recipe's value win.
    known = {option[2:] for action in parser._actions for option in action.option_strings if option.startswith("--")}
    unknown = [key for key in config.train_overrides if key not in known]
    if unknown:
        hints = {key: difflib.get_close_matches(key, known, n=1) for key in unknown}
        hint = "; ".join(f"{key}: did you mean {match[0]}?" for key, match in hints.items() if match)
        raise CompareConfigError(
            f"Unknown training flag(s) {unknown} in train_overrides (flags of policy-split-train)"
            + (f"; {hint}" if hint else ".")
        )
    argv = [*train_arguments(config, method), "--use_cpu", "true"]
    try:
        with warnings.catch_warnings():  # deprecation notices are the training process's to show, once per method
            warnings.simplefilter("ignore", FutureWarning)
            parsed = parser.parse_args_and_config(args=argv)
        script_args, training_args, model_args = parsed
        # What the training process will decide from the same arguments (the command line's --method wins over the
        # base recipe's settings, with a warning; train_overrides count as flags and may contradict the method).
        apply_method(method, training_args, explicit_arguments(train_arguments(config, method)))
    except SystemExit:  # argparse has printed why
        raise CompareConfigError(
            f"{method}: the training arguments do not parse (see the message above): {shlex.join(argv)}"
        ) from None
    except ValueError as error:
        raise CompareConfigError(f"{method}: {error}") from None
    return script_args, training_args, model_args


def training_budget(script_args: Any, training_args: Any, model_args: Any) -> dict[str, Any]:
    """What must be equal across methods for a fair comparison."""
    budget = {
        "model": model_args.model_name_or_path,
        "dataset": script_args.dataset_name,
        "max_steps": training_args.max_steps,
        "num_generations": training_args.num_generations,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "max_completion_length": training_args.max_completion_length,
        "learning_rate": training_args.learning_rate,
        "seed": training_args.seed,
    }
    if training_args.max_steps <= 0:  # an epoch budget instead
        budget["num_train_epochs"] = training_args.num_train_epochs
        budget["max_train_samples"] = script_args.max_train_samples
    return budget


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def training_request(config: CompareConfig, method: str) -> dict[str, Any]:
    """What a finished training was asked for; a rerun with another request must not reuse the model silently."""
    return {
        "method": method,
        "train_config_sha256": _sha256(config.train_config),
        "seed": config.seed,
        "train_overrides": override_flags(config.train_overrides),
    }


def trained_steps(model_dir: str, max_steps: int) -> int | None:
    """
    Optimizer steps of a finished training: the last checkpoint's trainer state is exact (the Trainer saves one at the
    end of a `save_strategy: steps` run); without checkpoints, `max_steps` is what the Trainer ran to. `None` (shown
    as "–") when unknown: an epoch budget without checkpoints, or a checkpoint whose `trainer_state.json` is
    damaged (the highest readable one could be below the truth).
    """
    steps = []
    for path in glob.glob(os.path.join(model_dir, "checkpoint-*", "trainer_state.json")):
        unknown = "the number of training steps is recorded as unknown"
        try:
            state = read_json_file(path, "a checkpoint's trainer state", unknown)
        except DamagedFileError as error:
            print(f"WARNING: {error}", flush=True)
            return None
        step = state.get("global_step")
        if isinstance(step, bool) or not isinstance(step, int):
            print(f"WARNING: {path} has no integer global_step: {unknown}.", flush=True)
            return None
        steps.append(step)
    if steps:
        return max(steps)
    return max_steps if max_steps > 0 else None


def _latest_checkpoint(model_dir: str) -> str | None:
    checkpoints = [p for p in glob.glob(os.path.join(model_dir, "checkpoint-*")) if p.rsplit("-", 1)[1].isdigit()]
    return max(checkpoints, key=lambda p: int(p.rsplit("-", 1)[1])) if checkpoints else None


# ---------------------------------------------------------------- running processes


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def stream_process(command: list[str], log_path: str) -> int:
    """
    Run `command`, copying its output (stdout and stderr) to the console and appending it to `log_path`.

    Returns:
        `int`: its exit status.
    """
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # live progress in the console and the log
    with open(log_path, "ab") as log:
        log.write(
            f"\n===== {datetime.datetime.now().isoformat(timespec='seconds')}\n$ {shlex.join(command)}\n".encode()
        )
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            # read1: whatever is there, so that progress bars (which end lines with \r) show as they move
            while chunk := process.stdout.read1(65536):
                log.write(chunk)
                log.flush()
                sys.stdout.write(decoder.decode(chunk))
                sys.stdout.flush()
            return process.wait()
        finally:
            if process.poll() is None:  # interrupted (Ctrl-C reaches the child too): do not leave it running
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


# ---------------------------------------------------------------- one method


@dataclass
class MethodRun:
    """One method of a comparison: its command, parsed settings and where its files go."""

    name: str
    index: int
    dir: str
    command: list[str]
    request: dict[str, Any]
    budget: dict[str, Any]
    settings: dict[str, Any]
    base_model: str
    chat_template_kwargs: dict[str, Any] | None

    @property
    def spec(self) -> Any:
        return ORIGINAL_SPEC if self.name == ORIGINAL else METHODS[self.name]

    @property
    def model_dir(self) -> str:
        return os.path.join(self.dir, "model")

    @property
    def eval_dir(self) -> str:
        return os.path.join(self.dir, "eval")

    @property
    def train_log(self) -> str:
        return os.path.join(self.dir, "train.log")

    @property
    def eval_log(self) -> str:
        return os.path.join(self.dir, "eval.log")

    @property
    def done_path(self) -> str:
        return os.path.join(self.dir, TRAIN_DONE_FILE)

    @property
    def modes(self) -> list[str]:
        return ["normal", "high_entropy"] if self.spec.dual_mode else ["normal"]


def plan(config: CompareConfig) -> list[MethodRun]:
    """Parse every method's training arguments (no training) and lay out its files."""
    from policy_split_trl.methods import method_settings

    runs = []
    for index, method in enumerate(config.methods, start=1):
        # The original model is the recipe's base model: its settings are parsed as for GRPO, and nothing is trained.
        script_args, training_args, model_args = parse_training(config, "grpo" if method == ORIGINAL else method)
        runs.append(
            MethodRun(
                name=method,
                index=index,
                dir=config.method_dir(method),
                command=[] if method == ORIGINAL else training_command(config, method),
                request=training_request(config, method),
                budget=training_budget(script_args, training_args, model_args),
                settings={} if method == ORIGINAL else method_settings(method, training_args),
                base_model=model_args.model_name_or_path,
                chat_template_kwargs=training_args.chat_template_kwargs,
            )
        )
    return runs


def _read_state(path: str, what: str, fix: str) -> dict[str, Any] | None:
    """A state file of the comparison (`None` if absent); a damaged one raises [`CompareConfigError`] naming `fix`."""
    try:
        return read_json_file(path, what, fix)
    except DamagedFileError as error:
        raise CompareConfigError(str(error)) from None


def _read_results(path: str) -> dict[str, Any] | None:
    """
    An evaluation's `results.json`, or `None` when it is absent or unusable (damaged, or without the fields the
    comparison reads): it is computed from `generations.jsonl`, so the evaluation is simply run again (resuming: no
    sample is drawn again).
    """
    try:
        results = read_json_file(path, "an evaluation's results", "it is computed again from generations.jsonl")
    except DamagedFileError as error:
        print(f"WARNING: {error}", flush=True)
        return None
    if results is not None and not all(isinstance(results.get(key), dict) for key in ("config", "per_benchmark")):
        print(f"WARNING: {path} lacks config/per_benchmark; it is computed again from generations.jsonl.", flush=True)
        return None
    return results


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def train_method(run: MethodRun, total: int, started: float) -> dict[str, Any]:
    """Train `run` unless its `train_done.json` says it is done; returns that record."""
    if run.name == ORIGINAL:
        return {"method": ORIGINAL, "label": run.spec.label, "wall_time_s": None, "steps": 0}
    done = _read_state(
        run.done_path, "the record of a finished training", f"delete it to train {run.name} again (into {run.dir})"
    )
    if done is not None and not all(key in done for key in ("request", "wall_time_s", "steps")):
        raise CompareConfigError(
            f"{run.done_path} (the record of a finished training) lacks request/wall_time_s/steps: delete it to train "
            f"{run.name} again."
        )
    prefix = f"[{run.index}/{total}] {run.name}"
    if done is None and os.path.isfile(os.path.join(run.eval_dir, "generations.jsonl")):
        raise CompareConfigError(
            f"{run.name}: {run.eval_dir} holds an evaluation, but {run.done_path} is missing, so the model it "
            f"evaluated is not known to be the one about to be trained; delete {run.eval_dir} to train and evaluate "
            "again."
        )
    if done is not None:
        if done.get("request") != _json_safe(run.request):
            raise CompareConfigError(
                f"{run.name}: {run.done_path} records a training with other settings ({done.get('request')} vs now "
                f"{_json_safe(run.request)}); delete {run.dir} to retrain it, or restore the comparison config."
            )
        wall = f"{done['wall_time_s']:.0f} s" if isinstance(done["wall_time_s"], (int, float)) else "?"
        print(f"{prefix}: already trained ({wall}, {done['steps']} steps), not retrained.", flush=True)
        return done
    command, resumed = list(run.command), None
    request_path = os.path.join(run.dir, TRAIN_REQUEST_FILE)
    checkpoint = _latest_checkpoint(run.model_dir)
    if checkpoint and "--resume_from_checkpoint" not in command:
        fix = f"delete {run.model_dir} to train from scratch"
        if _read_state(request_path, "the settings of the interrupted training", fix) != _json_safe(run.request):
            raise CompareConfigError(
                f"{run.name}: {checkpoint} comes from a training with other settings (see {request_path}); delete "
                f"{run.model_dir} to train from scratch, or restore the comparison config."
            )
        command += ["--resume_from_checkpoint", checkpoint]  # an interrupted run with checkpoints goes on from there
        resumed = checkpoint
    atomic_write_json(request_path, _json_safe(run.request))
    print(
        f"{prefix} ({run.spec.label}): training [elapsed {_hms(time.monotonic() - started)}]"
        + (f", resuming from {checkpoint}" if resumed else "")
        + f"\n$ {shlex.join(command)}",
        flush=True,
    )
    start = time.monotonic()
    status = stream_process(command, run.train_log)
    wall = time.monotonic() - start
    if status != 0:
        raise MethodFailedError(
            f"Training {run.name} ({run.spec.label}) failed with exit status {status} after {wall:.0f} s; see "
            f"{run.train_log}."
        )
    record = {
        "method": run.name,
        "label": run.spec.label,
        "wall_time_s": round(wall, 2),
        "steps": trained_steps(run.model_dir, run.budget["max_steps"]),
        "resumed_from_checkpoint": resumed,  # then the wall time covers only the last attempt
        "settings": run.settings,
        "budget": run.budget,
        "command": command,
        "request": run.request,
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    record = _json_safe(record)
    atomic_write_json(run.done_path, record)  # the mark of a finished training: complete, or not there
    print(f"{prefix}: trained {record['steps']} steps in {wall:.0f} s -> {run.model_dir}", flush=True)
    return record


def method_eval_config(config: CompareConfig, run: MethodRun) -> Any:
    """The harness config of one trained model: its modes, its stored high-entropy prompt, adapter or full model."""
    from policy_split_trl.hub import POLICY_SPLIT_FILE, load_policy_split_config, mode_prompts

    kwargs: dict[str, Any] = {}
    if run.name == ORIGINAL:
        model = run.base_model
    elif os.path.isfile(os.path.join(run.model_dir, "adapter_config.json")):  # LoRA: the adapter on its base model
        model, kwargs["adapter"] = run.base_model, run.model_dir
    else:
        model = run.model_dir
    if run.spec.dual_mode and os.path.isfile(os.path.join(run.model_dir, POLICY_SPLIT_FILE)):
        # The prompt the model was trained with (a recipe may replace the paper's).
        prompts = mode_prompts(load_policy_split_config(run.model_dir))
        kwargs["mode_prompts"] = {mode: prompts[mode] for mode in run.modes if prompts.get(mode)}
    if "chat_template_kwargs" not in config.evaluation and run.chat_template_kwargs:
        kwargs["chat_template_kwargs"] = dict(run.chat_template_kwargs)  # evaluate in the chat format trained in
    return config.eval_config(model=model, output_dir=run.eval_dir, modes=run.modes, **kwargs)


def evaluate_method(config: CompareConfig, run: MethodRun, total: int, started: float) -> dict[str, Any]:
    """Evaluate `run`'s model (in a subprocess) unless its results are up to date; returns its `results.json`."""
    prefix = f"[{run.index}/{total}] {run.name}"
    eval_config = _json_safe(dataclasses.asdict(method_eval_config(config, run)))
    results = _read_results(os.path.join(run.eval_dir, "results.json"))
    judge_error = ((results or {}).get("judge_status") or {}).get("error")  # a judge to ask again
    if (
        results is not None
        and not judge_error
        and {k: v for k, v in results["config"].items() if k != "backend_used"} == eval_config
    ):
        print(f"{prefix}: evaluation up to date ({run.eval_dir}).", flush=True)
        return results
    request_path = os.path.join(run.dir, "eval_config.json")
    previous = _read_state(
        request_path, "the settings of the last evaluation", f"delete it (the harness still checks {run.eval_dir})"
    )
    if previous is not None and os.path.isfile(os.path.join(run.eval_dir, "generations.jsonl")):
        changed = [name for name in _SAMPLE_FIELDS if previous.get(name) != eval_config.get(name)]
        if changed:
            raise CompareConfigError(
                f"{run.name}: evaluation settings {changed} differ from those of the samples already in "
                f"{run.eval_dir}/generations.jsonl, which a resumed evaluation would reuse; delete {run.eval_dir} "
                "to evaluate again, or restore them."
            )
    atomic_write_json(request_path, eval_config)  # makes run.dir: the original model has no training to have made it
    command = [sys.executable, "-m", "policy_split_trl.scripts.compare", "--evaluate", request_path]
    print(
        f"{prefix}: evaluating modes {run.modes} on {eval_config['benchmarks']} -> {run.eval_dir} "
        f"[elapsed {_hms(time.monotonic() - started)}]",
        flush=True,
    )
    status = stream_process(command, run.eval_log)
    if status != 0:
        raise MethodFailedError(
            f"Evaluating {run.name} ({run.spec.label}) failed with exit status {status}; see {run.eval_log}."
        )
    results = _read_results(os.path.join(run.eval_dir, "results.json"))
    if results is None:
        raise MethodFailedError(f"Evaluating {run.name} wrote no usable {run.eval_dir}/results.json; see {run.eval_log}.")
    return results


def evaluate_from_file(path: str) -> dict[str, Any]:
    """
    Run one evaluation from an `EvalConfig` saved as JSON (what the driver's evaluation subprocess does).

    Raises:
        `SystemExit`: when a judge was asked for and scored no story (or was stopped), after every result is written,
        so that the driver reports the method as failed and a rerun asks the judge again.
    """
    from policy_split_trl.eval.backends import SamplingConfig
    from policy_split_trl.eval.harness import EvalConfig, evaluate_modes

    settings = _read_state(path, "the evaluation's settings", "rerun policy-split-compare, which rewrites it")
    if settings is None:
        raise CompareConfigError(f"No such evaluation settings file: {path}.")
    settings["sampling"] = SamplingConfig(**settings["sampling"])
    results = evaluate_modes(EvalConfig(**settings))
    print(f"Generated {results['generated_this_run']} completions; results in {settings['output_dir']}/results.json")
    judge_error = (results.get("judge_status") or {}).get("error")
    if judge_error:
        raise SystemExit(f"policy-split-compare: {judge_error}")
    return results


# ---------------------------------------------------------------- the comparison table


def table_columns(benchmarks: list[str]) -> list[str]:
    """One column per benchmark, Table 1's where it has one (AIME-24 and AIME-25 share `AIME-24/25`)."""
    from policy_split_trl.eval.benchmarks import table1_column

    columns: list[str] = []
    for benchmark in benchmarks:
        column = table1_column(benchmark) or benchmark
        if column not in columns:
            columns.append(column)
    return columns


def _cell(results: dict[str, Any], mode: str, column: str) -> tuple[float, float]:
    """(avg@k accuracy as a fraction, mean token entropy in bits) of one mode under one column; NaN when absent."""
    from policy_split_trl.eval.benchmarks import TABLE1_COLUMNS

    if column in TABLE1_COLUMNS:  # the harness pools AIME-24 and AIME-25 into one column
        cell = (results.get("table1") or {}).get(mode, {}).get(column)
        return (cell["accuracy"], cell["entropy_bits"]) if cell else (math.nan, math.nan)
    metrics = results["per_benchmark"].get(column, {}).get(mode)
    return (metrics["avg_at_k"], metrics["entropy_bits"]) if metrics else (math.nan, math.nan)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values and not any(math.isnan(v) for v in values) else math.nan


def comparison_rows(
    runs: list[MethodRun], results: dict[str, dict], trained: dict[str, dict], columns: list[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """
    One row per method (its Table 1 label) and a `+ HE prompt` row under each dual-mode method.

    Returns:
        `(rows, average_over)`: the rows, and the columns their `average` is taken over: Table 1's columns when there
        are 2 or more of them (like Table 1, whose average leaves other benchmarks out), all graded columns otherwise;
        none with fewer than 2 graded columns.
    """
    from policy_split_trl.eval.benchmarks import TABLE1_COLUMNS

    rows = []
    for run in runs:
        if run.name not in results:
            continue
        for mode in run.modes:
            cells = {c: _cell(results[run.name], mode, c) for c in columns}
            first = mode == "normal"
            rows.append({
                "method": run.name, "label": run.spec.label if first else HE_ROW_LABEL, "mode": mode,
                "accuracy": {c: v[0] for c, v in cells.items()}, "entropy_bits": {c: v[1] for c, v in cells.items()},
                "train_wall_time_s": trained[run.name]["wall_time_s"] if first else None,
                "train_steps": trained[run.name]["steps"] if first else None,
            })  # fmt: skip
    graded = [c for c in columns if any(not math.isnan(row["accuracy"][c]) for row in rows)]
    table1 = [c for c in graded if c in TABLE1_COLUMNS]
    average_over = table1 if len(table1) >= 2 else graded if len(graded) >= 2 else []
    for row in rows:
        row["average"] = (
            {key: _mean([row[key][c] for c in average_over]) for key in ("accuracy", "entropy_bits")}
            if average_over
            else None
        )
    return rows, average_over


def _budget_line(budget: dict[str, Any], versions: dict[str, str] | None = None) -> str:
    if budget["max_steps"] > 0:
        length = f"max_steps {budget['max_steps']}"
    else:
        length = f"{budget['num_train_epochs']} epoch(s) of {budget.get('max_train_samples') or 'all'} prompts"
    shown = [f"{name} {versions[name]}" for name in ("policy-split-trl", "trl", "transformers", "torch", "vllm")
             if name in (versions or {})]  # fmt: skip
    return (
        f"Budget (the same for every method): `{budget['model']}` on `{budget['dataset']}`, {length}, "
        f"num_generations {budget['num_generations']}, per-device batch {budget['per_device_train_batch_size']} x "
        f"{budget['gradient_accumulation_steps']} accumulation, max_completion_length "
        f"{budget['max_completion_length']}, learning rate {budget['learning_rate']}, seed {budget['seed']}."
        + (f" Versions: {', '.join(shown)}." if shown else "")
    )


def comparison_markdown(summary: dict[str, Any]) -> str:
    """`comparison.md`: the budget and evaluation settings, then the table (Table 1 layout)."""
    from policy_split_trl.eval.report import PERCENT, format_number

    columns, rows, evaluation = summary["columns"], summary["rows"], summary["evaluation"]
    shown = columns + (["Average"] if summary["average_over"] else [])
    head = "| method | " + " | ".join(f"{c} Acc | {c} Ent" for c in shown) + " | train time (s) | train steps |"
    lines = [head, "|---|" + "---|" * (2 * len(shown) + 2)]
    for row in rows:
        cells = []
        for c in columns:
            cells += [format_number(row["accuracy"][c], PERCENT), format_number(row["entropy_bits"][c], digits=3)]
        if summary["average_over"]:
            average = row["average"]
            cells += [format_number(average["accuracy"], PERCENT), format_number(average["entropy_bits"], digits=3)]
        same_model = row["mode"] != "normal"  # the HE row is the model of the row above
        cells += [
            "" if same_model else format_number(row["train_wall_time_s"], digits=1),
            "" if same_model else str(row["train_steps"] if row["train_steps"] is not None else "–"),
        ]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    sampling = evaluation["sampling"]
    problems = ", ".join(f"{b} ({n} problems)" for b, n in summary["problems"].items())
    notes = (
        f"Evaluation: {problems}; k={evaluation['k']} samples per problem and mode, temperature "
        f"{sampling['temperature']}, top-p {sampling['top_p']}, top-k {sampling['top_k']}, max "
        f"{sampling['max_new_tokens']} new tokens. Acc: avg@k (%); Ent: mean token entropy (bits) of the sampled "
        f"distribution; `{HE_ROW_LABEL}`: the model of the row above, sampled with its high-entropy system prompt."
    )
    if summary["average_over"]:
        notes += f" Average: mean over {', '.join(summary['average_over'])}."
    return (
        "\n\n".join(["# Method comparison (Table 1 layout)", summary["budget_line"], notes, "\n".join(lines)]) + "\n"
    )


def plot_comparison(summary: dict[str, Any], path: str) -> str | None:
    """Grouped bars per method/mode: accuracy (%) in the top panel, mean token entropy (bits) below."""
    from policy_split_trl.eval.report import PERCENT, load_pyplot, save_figure

    plt = load_pyplot()
    rows = summary["rows"]
    if plt is None or not rows:
        return None
    columns = summary["columns"] + (["Average"] if summary["average_over"] else [])
    names, previous = [], ""
    for row in rows:
        names.append(f"{previous}\n{HE_ROW_LABEL}" if row["mode"] != "normal" else row["label"])
        previous = row["label"] if row["mode"] == "normal" else previous

    def value(row: dict, key: str, column: str) -> float:
        return (row["average"] or {}).get(key, math.nan) if column == "Average" else row[key][column]

    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.3 * len(rows) + 2), 7), sharex=True)
    width = 0.8 / len(columns)
    for ax, key, scale, ylabel in (
        (axes[0], "accuracy", PERCENT, "avg@k accuracy (%)"),
        (axes[1], "entropy_bits", 1.0, "mean token entropy (bits)"),
    ):
        for j, column in enumerate(columns):
            xs = [i + (j - (len(columns) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, [value(row, key, column) * scale for row in rows], width, label=column)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("Method comparison")
    axes[0].legend(fontsize=8)
    axes[1].set_xticks(range(len(rows)))
    axes[1].set_xticklabels(names, fontsize=8)
    return save_figure(fig, plt, path)


def write_comparison(
    config: CompareConfig, runs: list[MethodRun], trained: dict[str, dict], results: dict[str, dict]
) -> dict[str, Any]:
    """Write `comparison.md`, `comparison.json` and `comparison.png` for the methods evaluated so far."""
    from policy_split_trl.eval.harness import _versions

    # The settings as the harness ran them (with the defaults filled in); the per-model fields differ by method.
    first_results = next(iter(results.values()))
    evaluation = {k: v for k, v in first_results["config"].items() if k not in (*_DRIVER_EVAL_FIELDS, "backend_used")}
    columns = table_columns(evaluation["benchmarks"])
    rows, average_over = comparison_rows(runs, results, trained, columns)
    budgets = {run.name: run.budget for run in runs}
    budget = runs[0].budget
    problems = {b: next(iter(modes.values()))["problems"] for b, modes in first_results["per_benchmark"].items()}
    versions = _versions()
    summary = {
        "config_file": config.config_file,
        "train_config": config.train_config,
        "launcher": config.launcher,
        "train_overrides": config.train_overrides,
        "budget": budget,
        "budget_line": _budget_line(budget, versions),
        "evaluation": evaluation,
        "problems": problems,
        "versions": versions,
        "columns": columns,
        "average_over": average_over,
        "units": {"accuracy": "avg@k, fraction of 1 (x100 in the table)", "entropy_bits": "bits per token"},
        "rows": rows,
        "methods": {
            run.name: {
                "label": run.spec.label,
                "dual_mode": run.spec.dual_mode,
                "reference": run.spec.reference,
                "dir": run.dir,
                "train": trained.get(run.name),
                "per_benchmark": results[run.name]["per_benchmark"] if run.name in results else None,
            }
            for run in runs
        },
    }
    if any(b != budget for b in budgets.values()):
        summary["budgets_differ"] = budgets
    os.makedirs(config.output_dir, exist_ok=True)
    plot = plot_comparison(summary, os.path.join(config.output_dir, "comparison.png"))
    summary["plot"] = os.path.basename(plot) if plot else None
    atomic_write_json(os.path.join(config.output_dir, "comparison.json"), _json_safe(summary))
    atomic_write_text(os.path.join(config.output_dir, "comparison.md"), comparison_markdown(summary))
    return summary


# ---------------------------------------------------------------- driver


def compare(config: CompareConfig, dry_run: bool = False) -> dict[str, Any]:
    """
    Train and evaluate every method of `config` (resuming what is done), then write the comparison.

    Args:
        config ([`CompareConfig`]):
            The comparison.
        dry_run (`bool`, *optional*, defaults to `False`):
            Only check the config, and print the commands and where their outputs would go.

    Returns:
        `dict`: the content of `comparison.json`; with `dry_run`, `{"commands": {method: command}}`.
    """
    runs = plan(config)
    total = len(runs)
    if dry_run:
        evaluation = config.eval_config(model="<model>", output_dir="<eval>", modes=["normal"])
        print(f"policy-split-compare dry run: {total} method(s), nothing trained\n{_budget_line(runs[0].budget)}")
        print(
            f"Evaluation: {evaluation.benchmarks}, limit {evaluation.limit}, k={evaluation.k}, "
            f"{dataclasses.asdict(evaluation.sampling)}, backend {evaluation.backend}"
        )
        for run in runs:
            if run.name == ORIGINAL:
                print(f"[{run.index}/{total}] {run.name}: the base model {run.base_model}, not trained")
            else:
                state = "trained" if os.path.isfile(run.done_path) else "to train"
                print(f"[{run.index}/{total}] {run.name} ({run.spec.label}), {state}:\n  {shlex.join(run.command)}")
            print(f"  then evaluate modes {run.modes} -> {run.eval_dir}")
        print(f"Comparison: {os.path.join(config.output_dir, 'comparison.md')} (.json, .png)")
        return {"commands": {run.name: run.command for run in runs if run.name != ORIGINAL}}

    started = time.monotonic()
    trained: dict[str, dict] = {}
    results: dict[str, dict] = {}
    for run in runs:
        trained[run.name] = train_method(run, total, started)
        results[run.name] = evaluate_method(config, run, total, started)
        summary = write_comparison(config, runs, trained, results)
    print(f"\n{comparison_markdown(summary)}")
    print(
        f"Comparison of {total} method(s) in {_hms(time.monotonic() - started)}: "
        + ", ".join(os.path.join(config.output_dir, f"comparison.{ext}") for ext in ("md", "json", "png"))
    )
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="policy-split-compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", help="The comparison YAML (e.g. recipes/compare/quickstart.yaml).")
    p.add_argument("--methods", nargs="+", help=f"Replaces the config's methods; any of {', '.join(METHODS)}.")
    p.add_argument("--output_dir", help="Replaces the config's output_dir.")
    p.add_argument("--dry_run", action="store_true", help="Check the config and print the commands; train nothing.")
    p.add_argument("--evaluate", metavar="EVAL_CONFIG_JSON", help=argparse.SUPPRESS)  # the evaluation subprocess
    return p


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `argv` (default: the command line) and run; returns the comparison (or the dry run's commands)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.evaluate:
        return evaluate_from_file(args.evaluate)
    if not args.config:
        parser.error("--config is required")
    return compare(load_compare_config(args.config, args.methods, args.output_dir), dry_run=args.dry_run)


def cli() -> None:
    """Console entry point `policy-split-compare`: a config, state-file or method failure exits with its message."""
    from policy_split_trl.eval.checks import EvalConfigError

    try:
        run()
    except (CompareConfigError, MethodFailedError, DamagedFileError, EvalConfigError) as error:
        raise SystemExit(f"policy-split-compare: {error}") from None


if __name__ == "__main__":
    cli()
