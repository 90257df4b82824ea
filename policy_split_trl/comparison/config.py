"""What a comparison is: [`CompareConfig`] (which methods, trained with which recipe and budget, evaluated how), read
from a YAML file and the command line by [`CompareParser`] (a `TrlParser`, as `policy-split-train` reads recipes).

    train_config: ../quickstart.yaml        # the base training recipe, relative to this file
    methods: [original, grpo, entropy_advantage, policy_split]
    train_overrides: {max_steps: 20}        # flags added to every training command: one budget for all
    seed: 42                                # optional: the recipe's own seed otherwise
    output_dir: outputs/compare/quickstart  # relative to the working directory, like a recipe's output_dir
    launcher: [python, -m, policy_split_trl.scripts.train]   # optional, e.g. [accelerate, launch, ...]
    evaluation: {benchmarks: [arithmetic], limit: 32, k: 4, sampling: {temperature: 0.6}}   # EvalConfig fields
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from policy_split_trl.eval.checks import EvalConfigError, MappingAction, as_json
from policy_split_trl.eval.harness import EvalConfig
from policy_split_trl.eval.parser import ConfigFileParser
from policy_split_trl.methods import METHODS

DEFAULT_LAUNCHER = ["python", "-m", "policy_split_trl.scripts.train"]
# Table 1's "Original" row: the base model, evaluated as it is (normal mode, and with the untrained HE prompt).
ORIGINAL = "original"
# Set by the driver for each method; a value in `train_overrides` would silently fight it.
DRIVER_TRAIN_FLAGS = {
    "config": "the training recipe is `train_config`",
    "method": "the methods are `methods`",
    "output_dir": "each method trains into <output_dir>/<method>/model",
    "seed": "set `seed` at the top level of the comparison config",
    "dry_run": "use policy-split-compare --dry_run",
}
# Set by the driver for each method (which model, which modes, where), so not accepted in `evaluation`.
PER_METHOD_EVAL_FIELDS = ("model", "adapter", "output_dir", "modes", "mode_prompts")


class CompareConfigError(ValueError):
    """A comparison config that cannot run (unknown method, missing file, unknown key, ...)."""


@dataclass
class CompareConfig:
    """
    A comparison: which methods, trained how, evaluated how.

    Args:
        train_config (`str`):
            The base training recipe (a `policy-split-train` YAML); every method trains with it.
        methods (`list[str]`):
            Keys of [`~policy_split_trl.methods.METHODS`] (or `"original"`, the base model untrained), in table order.
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
            `sampling` as a mapping of [`~policy_split_trl.eval.backends.SamplingConfig`] fields, `batch_size`,
            `backend`, `chat_template_kwargs`, ...) but for the per-method ones (`model`, `adapter`, `output_dir`,
            `modes`, `mode_prompts`). `chat_template_kwargs` defaults to the training recipe's.
        dry_run (`bool`, *optional*, defaults to `False`):
            Only check the config, and print the commands and where their outputs would go.

    Attributes:
        config_file (`str` or `None`):
            The YAML file this came from (set by [`CompareParser`]; recorded only).

    Raises:
        [`CompareConfigError`]: anything that would only fail later (after hours of training), naming the field.
    """

    train_config: str = field(
        metadata={"help": "The base training recipe (policy-split-train YAML); in the config file, relative to it."}
    )
    methods: list[str] = field(
        metadata={"help": f"Methods in table order: {ORIGINAL} (the base model, not trained), {', '.join(METHODS)}."}
    )
    output_dir: str = field(
        metadata={"help": "Where each method's model, logs and evaluation go, and comparison.{md,json,png}."}
    )
    train_overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "policy-split-train flags (without --) added to every method's command: one budget for all.",
            "action": MappingAction,
            "value": as_json,
            "metavar": "FLAG=VALUE",
        },
    )
    seed: int | None = field(default=None, metadata={"help": "Training seed of every method (default: the recipe's)."})
    launcher: list[str] = field(
        default_factory=lambda: list(DEFAULT_LAUNCHER),
        metadata={"help": "The command that runs the training script, e.g. [accelerate, launch, -m, ...]."},
    )
    evaluation: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "EvalConfig fields (benchmarks, limit, k, sampling, backend, ...) but the per-method ones "
            f"({', '.join(PER_METHOD_EVAL_FIELDS)}).",
            "action": MappingAction,
            "value": as_json,
            "metavar": "KEY=VALUE",
        },
    )
    dry_run: bool = field(default=False, metadata={"help": "Check the config and print the commands; train nothing."})
    config_file: str | None = field(
        default=None, init=False, metadata={"help": "The YAML file this came from (recorded only)."}
    )

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise [`CompareConfigError`] for anything that would only fail later (after hours of training)."""
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
                raise CompareConfigError(f"{name} must be a non-empty path (a string), got {value!r}.")
        if not os.path.isfile(self.train_config):
            raise CompareConfigError(
                f"train_config {self.train_config!r} does not exist (a path relative to the comparison config is "
                "resolved against that file's folder)."
            )
        if not isinstance(self.train_overrides, dict):
            raise CompareConfigError(
                f"train_overrides must be a mapping of policy-split-train flags to values, got {self.train_overrides!r}."
            )
        for key, value in self.train_overrides.items():
            if key in DRIVER_TRAIN_FLAGS:
                raise CompareConfigError(f"train_overrides cannot set {key!r}: {DRIVER_TRAIN_FLAGS[key]}.")
            flag_values(key, value)  # raises for values a command line cannot carry
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise CompareConfigError(f"`seed` must be an integer, got {self.seed!r}.")
        if (
            not isinstance(self.launcher, list)
            or not self.launcher
            or not all(isinstance(t, str) for t in self.launcher)
        ):
            raise CompareConfigError(
                f"launcher must be a list of strings, e.g. [accelerate, launch, --num_processes, '2'], got "
                f"{self.launcher!r}."
            )
        self._validate_evaluation()

    def _validate_evaluation(self) -> None:
        if not isinstance(self.evaluation, dict):
            raise CompareConfigError(f"evaluation must be a mapping of EvalConfig fields, got {self.evaluation!r}.")
        owned = [key for key in PER_METHOD_EVAL_FIELDS if key in self.evaluation]
        if owned:
            raise CompareConfigError(f"evaluation: {owned} are set per method by the comparison; remove them.")
        try:  # the harness's own checks (types, k >= 1, finite temperature > 0, source files, ...), on a stand-in model
            self.eval_config(model="<model>", output_dir="<eval>", modes=["normal"])
        except EvalConfigError as error:
            hint = ""
            if str(error).startswith("sources["):
                hint = " (evaluation.sources: a relative path is looked for next to the comparison config first)"
            raise CompareConfigError(f"evaluation: {error}{hint}") from None

    def eval_config(self, model: str, output_dir: str, modes: list[str], **kwargs: Any) -> EvalConfig:
        """The [`~policy_split_trl.eval.harness.EvalConfig`] of one model: `evaluation` plus the per-method fields."""
        settings = {**self.evaluation, **kwargs, "model": model, "output_dir": output_dir, "modes": modes}
        return EvalConfig.from_settings(settings)

    def method_dir(self, method: str) -> str:
        return os.path.join(os.path.abspath(self.output_dir), method)


def flag_values(key: str, value: Any) -> list[str]:
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
        return [json.dumps(v) if isinstance(v, (dict, list)) else flag_values(key, v)[0] for v in value]
    return [str(value)]


def override_flags(overrides: dict[str, Any]) -> list[str]:
    """`{"max_steps": 20, "reward_funcs": ["a", "b"]}` -> `["--max_steps", "20", "--reward_funcs", "a", "b"]`."""
    return [token for key, value in overrides.items() for token in (f"--{key}", *flag_values(key, value))]


def _resolve(path: str, base: str) -> str:
    """`path` relative to `base` (the comparison config's folder) when it exists there; as given otherwise."""
    if os.path.isabs(path):
        return path
    candidate = os.path.normpath(os.path.join(base, path))
    return candidate if os.path.exists(candidate) else path


class CompareParser(ConfigFileParser):
    """
    The parser of `policy-split-compare`: a comparison YAML (`--config`), whose keys are [`CompareConfig`]'s fields,
    and a flag per field to override it (`--methods grpo policy_split`, `--output_dir out`, `--dry_run`).

    Paths in the file are relative to it: `train_config` always, a launcher's `--config_file` and `evaluation.sources`
    files where they exist there. `output_dir` is relative to the working directory, as in every training recipe;
    paths given as flags too.

    Raises:
        [`CompareConfigError`]: a file that cannot be read or is not a YAML mapping, an unknown key, a bad field.
    """

    error_class = CompareConfigError

    def __init__(self, prog: str | None = "policy-split-compare", **kwargs: Any):
        super().__init__(CompareConfig, prog=prog, **kwargs)

    def set_defaults_with_config(self, **config: Any) -> list[str]:
        base = os.path.dirname(os.path.abspath(self.config_path))
        if isinstance(config.get("train_config"), str):
            config["train_config"] = os.path.normpath(os.path.join(base, config["train_config"]))
        launcher = config.get("launcher")
        if isinstance(launcher, list):
            config["launcher"] = [
                _resolve(token, base) if i and launcher[i - 1] == "--config_file" and isinstance(token, str) else token
                for i, token in enumerate(launcher)
            ]
        evaluation = config.get("evaluation")
        if isinstance(evaluation, dict) and isinstance(evaluation.get("sources"), dict):
            # Absolute once found: the evaluation runs (and reruns) in other processes, maybe from another folder.
            sources = {}
            for name, source in evaluation["sources"].items():
                found = _resolve(source, base) if isinstance(source, str) else source
                sources[name] = os.path.abspath(found) if isinstance(found, str) and os.path.exists(found) else source
            config["evaluation"] = {**evaluation, "sources": sources}
        return super().set_defaults_with_config(**config)

    def parse(self, args: list[str] | None = None) -> CompareConfig:
        """The [`CompareConfig`] of `args` (default: the command line), with `--config FILE` read first."""
        (config,) = self.parse_args_and_config(args)
        config.config_file = os.path.abspath(self.config_path) if self.config_path else None
        return config


def load_compare_config(path: str, methods: list[str] | None = None, output_dir: str | None = None) -> CompareConfig:
    """
    Read and check a comparison YAML ([`CompareParser`] on `--config path`).

    Args:
        path (`str`):
            The YAML file.
        methods (`list[str]`, *optional*):
            Replaces its `methods` (as `--methods`).
        output_dir (`str`, *optional*):
            Replaces its `output_dir`.
    """
    args = ["--config", path, *(["--methods", *methods] if methods else [])]
    return CompareParser().parse([*args, *(["--output_dir", output_dir] if output_dir else [])])


# Table 1's "Original" row has a label and modes like a method's, but no trainer.
ORIGINAL_SPEC = SimpleNamespace(
    name=ORIGINAL, label="Original", dual_mode=True, reference="the base model, not trained"
)
TRAIN_DONE_FILE = "train_done.json"


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
        """The method's [`~policy_split_trl.methods.MethodSpec`] (its label, `dual_mode`, reference)."""
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
