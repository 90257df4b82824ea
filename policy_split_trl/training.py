"""
What `policy-split-train` does, as library code: the script arguments, the checks that run before anything loads,
the dataset and reward loading, the dry-run summary and the training run itself (with its optional before/after mode
report). `policy_split_trl/scripts/train.py` is only the command-line entry point around [`main`], as TRL's
`trl/scripts/grpo.py` is around its own `main`; the comparison driver and the benchmarks call these functions directly.

    from policy_split_trl.training import explicit_arguments, main, make_parser

    argv = ["--config", "recipes/quickstart.yaml", "--max_steps", "5"]
    script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    trainer = main(script_args, training_args, model_args, explicit_arguments(argv))

Arguments are those of [`PolicySplitScriptArguments`] (below), [`~policy_split_trl.methods.MethodConfig`] (every
`GRPOConfig` and `TrainingArguments` flag, plus those of Policy Split and of the baselines) and TRL's `ModelConfig`
(model id, dtype, LoRA, 4/8-bit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig, ScriptArguments, TrlParser

from policy_split_trl.data import TASK_PROMPTS, looks_like_local_path
from policy_split_trl.eval.files import atomic_write_json
from policy_split_trl.methods import (
    COMMAND_LINE,
    METHODS,
    MethodConfig,
    apply_method,
    method_settings,
    trainer_class,
)

# `{"log_history": trainer.state.log_history}` of a run, written next to its final model.
LOG_HISTORY_FILE = "log_history.json"


@dataclass
class PolicySplitScriptArguments(ScriptArguments):
    """
    Script arguments for `policy-split-train`, on top of TRL's `ScriptArguments` (`dataset_name`, `dataset_config`,
    `dataset_train_split`, `dataset_test_split`).

    Args:
        method (`str`, *optional*, defaults to `"policy_split"`):
            A method of [`~policy_split_trl.methods.METHODS`]: `policy_split`, `grpo` (TRL's `GRPOTrainer`), the
            baselines `entropy_regularization`, `forking_tokens`, `entropy_advantage`, `clip_cov`,
            `entropy_driven_advantage`, or the ablations `grpo_rollout_sharing`, `policy_split_no_sharing`. The same
            recipe runs any of them; each applies its paper hyper-parameters where the recipe leaves the default.
        reward_funcs (`list[str]`, *optional*, defaults to `["accuracy"]`):
            Reward functions by name (`accuracy`, `reasoning_accuracy`, `multiple_choice`, `arithmetic`,
            `think_format`) or dotted import path.
        reward_model_name_or_path (`str`, *optional*):
            A reward model (Hub id or path) used in addition to the reward functions.
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Dataset column with the question (text, wrapped with the task prompt) or a conversational prompt.
        solution_column (`str`, *optional*, defaults to `"solution"`):
            Dataset column with the gold answer.
        task (`str`, *optional*, defaults to `"math"`):
            Task instruction put before text questions: `math`, `multiple_choice`, `arithmetic` or `none`.
        max_train_samples (`int`, *optional*):
            Train on a seeded random subset of this size (the paper: 20000 of DeepMath-103K).
        max_eval_samples (`int`, *optional*):
            The same for the evaluation split.
        mode_prompt_file (`str`, *optional*):
            Text file whose content replaces `high_entropy_system_prompt`.
        dry_run (`bool`, *optional*, defaults to `False`):
            Build config, model, tokenizer, dataset and rewards, print a summary and exit without training. Hub models
            or datasets that are not cached while offline are reported as "remote, not loaded".
        dry_run_num_processes (`int`, *optional*):
            Number of processes (GPUs) the dry run's batch arithmetic assumes, to check a recipe for a cluster from
            any machine. Defaults to the processes of the current launch.
        mode_report (`bool`, *optional*, defaults to `False`):
            Evaluate both modes before and after training (needs an eval split), print a before/after table and write
            `mode_report.md/json` and `policy_split_metrics.png` into `output_dir`.
        dual_mode_eval_steps (`int`, *optional*):
            Every N steps, sample both modes on the eval split with the model in training
            ([`~policy_split_trl.eval.callback.DualModeEvalCallback`]; sampling at `temperature`, up to
            `max_completion_length` tokens) and log `dual_mode_eval/*` metrics.
        dual_mode_eval_k (`int`, *optional*, defaults to `2`):
            Samples per problem and mode for that evaluation.
    """

    method: str = field(
        default="policy_split",
        metadata={"help": "Method to train with (see policy_split_trl.methods.METHODS).", "choices": list(METHODS)},
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={
            "help": "Reward functions: accuracy, reasoning_accuracy, multiple_choice, arithmetic, think_format, or a "
            "dotted import path."
        },
    )
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reward model (Hub id or path) used in addition to the reward functions."}
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Dataset column with the question or prompt."})
    solution_column: str = field(default="solution", metadata={"help": "Dataset column with the gold answer."})
    task: str = field(
        default="math",
        metadata={
            "help": "Task instruction for text questions.",
            "choices": ["math", "multiple_choice", "arithmetic", "none"],
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Seeded random subset of the train split."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Seeded random subset of the eval split."})
    mode_prompt_file: str | None = field(
        default=None, metadata={"help": "Text file whose content replaces high_entropy_system_prompt."}
    )
    dry_run: bool = field(default=False, metadata={"help": "Build everything, print a summary and exit."})
    dry_run_num_processes: int | None = field(
        default=None,
        metadata={"help": "Processes (GPUs) to assume in the --dry_run batch arithmetic; default: this launch's."},
    )
    mode_report: bool = field(
        default=False, metadata={"help": "Evaluate both modes before and after training and write a report + plot."}
    )
    dual_mode_eval_steps: int | None = field(
        default=None,
        metadata={"help": "Every N steps, sample both modes on the eval split and log dual_mode_eval/* metrics."},
    )
    dual_mode_eval_k: int = field(default=2, metadata={"help": "Samples per problem and mode for dual_mode_eval."})


def _unreachable(name: str | None) -> bool:
    """A Hub id that an offline run cannot have loaded: not a local path, and the Hub is switched off."""
    from huggingface_hub import constants

    if name is None:
        return False
    # Looks like a path (a typo must fail loudly, not pass as "remote"), exists, or needs no download.
    local = looks_like_local_path(name) or os.path.exists(name) or name.startswith("synthetic:")
    return not local and constants.HF_HUB_OFFLINE


def check_script_args(script_args: PolicySplitScriptArguments) -> None:
    """
    Check the script arguments that argparse cannot (a YAML recipe's values skip its `choices`) before anything is
    loaded, naming the flag and the fix.

    Raises:
        `ValueError`: an unknown `--method` or `--task`, or a `--max_train_samples`/`--max_eval_samples` below 1.
    """
    if script_args.method not in METHODS:
        raise ValueError(f"--method {script_args.method!r} is unknown; choose one of {sorted(METHODS)}.")
    if script_args.task not in TASK_PROMPTS:
        raise ValueError(
            f"--task {script_args.task!r} is unknown; choose one of {sorted(TASK_PROMPTS)} (`none`: the question as is)."
        )
    for flag in ("max_train_samples", "max_eval_samples"):
        value = getattr(script_args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be a positive number of rows (got {value}); leave it unset for all rows.")
    if isinstance(script_args.reward_funcs, str):  # `reward_funcs: accuracy` in a recipe: one name, not its letters
        script_args.reward_funcs = [script_args.reward_funcs]


def load_reward_funcs(script_args: PolicySplitScriptArguments) -> list[Any]:
    """The reward model (if any) and the reward functions of `--reward_funcs`; an error names the bad entry."""
    from policy_split_trl.rewards import get_reward_func

    sys.path.insert(0, os.getcwd())  # dotted paths to the user's own modules, as TRL's script does
    funcs: list[Any] = [script_args.reward_model_name_or_path] if script_args.reward_model_name_or_path else []
    for name in script_args.reward_funcs:
        try:
            funcs.append(get_reward_func(name))
        except (ValueError, TypeError) as error:
            raise ValueError(f"--reward_funcs {name}: {error}") from error
    if not funcs:
        raise ValueError("No reward: set --reward_funcs (e.g. accuracy) and/or --reward_model_name_or_path.")
    return funcs


def load_split(script_args: PolicySplitScriptArguments, split: str, max_samples: int | None, seed: int):
    """One split of `--dataset_name`, mapped to `prompt`/`solution`; an error names the flag and the dataset."""
    from policy_split_trl.data import load_prompt_dataset

    if not script_args.dataset_name:
        raise ValueError("Set --dataset_name: a Hub id, a local json/jsonl/parquet/csv file, or synthetic:arithmetic.")
    try:
        return load_prompt_dataset(
            script_args.dataset_name,
            split=split,
            config=script_args.dataset_config,
            prompt_column=script_args.prompt_column,
            solution_column=script_args.solution_column,
            task=script_args.task,
            max_samples=max_samples,
            seed=seed,
        )
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--dataset_name {script_args.dataset_name}: {error}") from error
    except ValueError as error:
        raise ValueError(f"--dataset_name {script_args.dataset_name}: {error}") from error


def read_mode_prompt_file(path: str) -> str:
    """
    The high-entropy system prompt from `--mode_prompt_file`: a UTF-8 text file, stripped.

    Raises:
        `FileNotFoundError` / `ValueError`: missing, a folder, not text, or empty; naming the flag and the file.
    """
    resolved = os.path.expanduser(path)
    if not os.path.isfile(resolved):
        what = "is a folder" if os.path.isdir(resolved) else "does not exist"
        raise FileNotFoundError(
            f"--mode_prompt_file {path} {what} (absolute: {os.path.abspath(resolved)}; a relative path is resolved "
            "from the current directory); give a text file holding the high-entropy system prompt."
        )
    with open(resolved, "rb") as f:
        raw = f.read()
    try:
        prompt = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"--mode_prompt_file {path} is not UTF-8 text (byte {error.start}); write the high-entropy system prompt "
            "as plain text."
        ) from error
    if "\x00" in prompt:
        raise ValueError(f"--mode_prompt_file {path} is a binary file; write the high-entropy system prompt as text.")
    if not prompt.strip():
        raise ValueError(
            f"--mode_prompt_file {path} is empty; write the high-entropy system prompt into it, or drop the flag to "
            "keep the paper's."
        )
    return prompt.strip()


def resolve_resume_from_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """
    The checkpoint `--resume_from_checkpoint` asks for, checked before anything is loaded.

    `true` (any of TrainingArguments' booleans: `true`/`True`/`1`/`yes`/...) means the latest `checkpoint-N` in
    `output_dir` (`transformers.trainer_utils.get_last_checkpoint`, what `Trainer.train(resume_from_checkpoint=True)`
    uses); `false`/unset means none; anything else is a checkpoint folder (`~` expanded; a folder literally named
    like a boolean needs a `./` prefix). Asking to resume when there is nothing to resume is an error, not a fresh
    start: a mistyped `output_dir` would otherwise silently train from scratch.

    Args:
        value (`str`, `bool` or `None`):
            The flag's value (a YAML recipe gives a `bool`).
        output_dir (`str`):
            The run's `output_dir`.

    Returns:
        `str` or `None`: the checkpoint folder to resume from.

    Raises:
        `FileNotFoundError` / `ValueError`: no checkpoint in `output_dir`, a missing folder, or a folder that is not a
        Trainer checkpoint (no `trainer_state.json`).
    """
    from transformers.hf_argparser import string_to_bool
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import get_last_checkpoint

    if value is None:
        return None
    if not str(value).strip():
        raise ValueError(
            "--resume_from_checkpoint is empty; pass true (the latest checkpoint in output_dir), false, or a "
            "checkpoint folder."
        )
    try:  # a bool from YAML, or the strings TrainingArguments takes for booleans (also `1`/`0` from YAML)
        resume = value if isinstance(value, bool) else string_to_bool(str(value).strip())
    except argparse.ArgumentTypeError:
        resume = None  # a path
    if resume is False:
        return None
    if resume:
        if not os.path.isdir(output_dir):
            raise FileNotFoundError(
                f"--resume_from_checkpoint {value}: output_dir {output_dir} does not exist, so there is nothing to "
                "resume. Set --output_dir to the run's folder, or remove --resume_from_checkpoint to start a new run."
            )
        checkpoint = get_last_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(
                f"--resume_from_checkpoint {value}: output_dir {output_dir} has no checkpoint-N folder, so there is "
                "nothing to resume. Set --output_dir to the run's folder, pass a checkpoint folder, or remove "
                "--resume_from_checkpoint to start a new run."
            )
    else:
        checkpoint = os.path.expanduser(str(value))
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(
                f"--resume_from_checkpoint {value}: no such checkpoint folder (absolute: {os.path.abspath(checkpoint)})"
                f"; pass a checkpoint-N folder of a run, or true for the latest one in output_dir ({output_dir})."
            )
    if not os.path.isfile(os.path.join(checkpoint, TRAINER_STATE_NAME)):
        raise ValueError(
            f"--resume_from_checkpoint {value}: {checkpoint} is not a complete Trainer checkpoint (no "
            f"{TRAINER_STATE_NAME}; was its save interrupted?). Pass an earlier checkpoint-N folder, or delete this one."
        )
    return checkpoint


def checkpoint_step(checkpoint: str) -> int | None:
    """The global step a checkpoint was saved at (its `trainer_state.json`), or `None` if unreadable."""
    from transformers.trainer import TRAINER_STATE_NAME

    try:
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME)) as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def batch_arithmetic(args: MethodConfig, method: str, world_size: int | None = None) -> dict[str, Any]:
    """How one optimizer step maps onto processes x per-device batch x accumulation, in rollouts and queries."""
    world_size = world_size or args.world_size
    rollouts = args.per_device_train_batch_size * world_size * args.gradient_accumulation_steps
    sharing = METHODS[method].dual_mode and args.rollout_sharing
    return {
        "processes": world_size,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "rollouts_per_optimizer_step": rollouts,
        "queries_per_optimizer_step": rollouts / args.num_generations,
        "training_rows_per_optimizer_step": rollouts * (2 if sharing else 1),
        "generation_batch_size": args.per_device_train_batch_size * world_size * args.steps_per_generation,
        "steps_per_generation": args.steps_per_generation,
    }


def _count_parameters(model_path: str, model_args: ModelConfig, peft_config: Any, trust_remote_code: bool):
    """(total, trainable) parameter counts from the config alone (meta device: no weights are loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        model_path, revision=model_args.model_revision, trust_remote_code=trust_remote_code
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    trainable = total
    if peft_config is not None:
        from peft import get_peft_model

        trainable = sum(p.numel() for p in get_peft_model(model, peft_config).parameters() if p.requires_grad)
    return config.model_type, total, trainable


def precision_summary(model_path: str, training_args: MethodConfig, model_args: ModelConfig) -> dict[str, str]:
    """
    What the optimizer would update, and a warning when its steps would round away
    ([`~policy_split_trl.precision.precision_warning_for_args`]): `{"precision": ..., "precision_warning": ...}`.
    """
    from policy_split_trl.precision import describe_precision, precision_warning_for_args

    checkpoint_dtype = None
    if model_args.dtype in (None, "auto"):  # the checkpoint's own dtype, when its config can be read
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model_path, trust_remote_code=training_args.trust_remote_code)
            checkpoint_dtype = getattr(config, "dtype", None)
        except (OSError, ValueError):
            pass
    result = {"precision": describe_precision(training_args, model_args, checkpoint_dtype)}
    warning = precision_warning_for_args(training_args, model_args, checkpoint_dtype)
    if warning:
        result["precision_warning"] = warning
    return result


def dry_run_summary(
    script_args: PolicySplitScriptArguments, training_args: MethodConfig, model_args: ModelConfig
) -> dict[str, Any]:
    """Build everything that does not need the weights and return (and print) what a run would do."""
    from trl import get_peft_config

    from policy_split_trl.embedded import resolve_model_id

    summary: dict[str, Any] = {"method": script_args.method, "model": model_args.model_name_or_path}
    if training_args.resume_from_checkpoint:  # already resolved by `main`
        step = checkpoint_step(training_args.resume_from_checkpoint)
        summary["resume_from_checkpoint"] = f"{training_args.resume_from_checkpoint} (global step {step})"
    model_path = resolve_model_id(model_args.model_name_or_path)
    try:
        model_type, total, trainable = _count_parameters(
            model_path, model_args, get_peft_config(model_args), training_args.trust_remote_code
        )
        summary.update(model_type=model_type, parameters=total, trainable_parameters=trainable)
    except (OSError, ValueError) as error:
        if not _unreachable(model_path):
            raise
        summary["model_status"] = f"remote, not loaded ({type(error).__name__})"
    summary.update(precision_summary(model_path, training_args, model_args))
    summary["rewards"] = [getattr(f, "__name__", str(f)) for f in load_reward_funcs(script_args)]
    try:
        train = load_split(
            script_args, script_args.dataset_train_split, script_args.max_train_samples, training_args.seed
        )
        summary["train_samples"] = len(train)
    except Exception as error:  # datasets raises several types when offline and uncached
        if not _unreachable(script_args.dataset_name):
            raise
        summary["dataset_status"] = f"remote, not loaded ({type(error).__name__})"
    g, k = training_args.num_generations, training_args.num_high_entropy_generations
    if METHODS[script_args.method].dual_mode:
        summary["mode_split"] = {"normal": g - k, "high_entropy": k, "rollout_sharing": training_args.rollout_sharing}
        summary["bonus"] = {
            "eta": training_args.eta,
            "kappa": training_args.kappa,
            "alpha": training_args.alpha,
            "normal_eta": training_args.normal_eta,
            "eta_placement": training_args.eta_placement,
            "loss_aggregation": training_args.loss_aggregation,
            "eta_schedule": training_args.eta_schedule,  # adaptive: `eta` is the controller's initial value
        }
        if training_args.eta_schedule == "adaptive":
            summary["bonus"]["target_kl_high_entropy_normal"] = training_args.target_kl_high_entropy_normal
    else:
        settings = method_settings(script_args.method, training_args)
        if settings:
            summary["method_settings"] = settings
    summary["num_generations"] = g
    summary["batch"] = batch_arithmetic(training_args, script_args.method, script_args.dry_run_num_processes)
    # Without the dataset (remote), `max_train_samples` still gives the number of prompts a run will see.
    num_prompts = summary.get("train_samples", script_args.max_train_samples)
    if training_args.max_steps > 0:
        summary["optimizer_steps"] = training_args.max_steps
    elif num_prompts:
        queries = summary["batch"]["queries_per_optimizer_step"]
        steps = math.ceil(num_prompts * training_args.num_train_epochs / queries) * training_args.num_iterations
        summary["optimizer_steps"] = steps if "train_samples" in summary else f"{steps} (from max_train_samples)"
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    width = max(len(k) for k in summary)
    print("Policy Split dry run: nothing trained")
    for key, value in summary.items():
        if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
            value = f"{value:,}"
        print(f"  {key:<{width}}  {value}")


def prepare_run(
    script_args: PolicySplitScriptArguments,
    training_args: MethodConfig,
    explicit: Mapping[str, str] | None = None,
) -> None:
    """
    Everything `main` checks and settles before loading anything: the script arguments, the method's settings
    ([`~policy_split_trl.methods.apply_method`], with `explicit` deciding what the user set), the mode prompt file and
    the checkpoint to resume from (`training_args.resume_from_checkpoint` becomes a folder or `None`).

    Args:
        script_args (`PolicySplitScriptArguments`), training_args (`MethodConfig`):
            The parsed arguments; changed in place.
        explicit (`Mapping[str, str]`, *optional*):
            Field name -> where the user set it ([`explicit_arguments`]); without it, a value differing from the
            default counts as set.
    """
    check_script_args(script_args)
    apply_method(script_args.method, training_args, explicit)
    dual_mode = METHODS[script_args.method].dual_mode
    if script_args.mode_prompt_file:
        if not dual_mode:
            warnings.warn(
                f"--method {script_args.method} has no high-entropy mode: --mode_prompt_file "
                f"{script_args.mode_prompt_file} is not used in training (remove it, or pick a Policy Split method).",
                UserWarning,
                stacklevel=2,
            )
        training_args.high_entropy_system_prompt = read_mode_prompt_file(script_args.mode_prompt_file)
    local_file = bool(script_args.dataset_name) and os.path.isfile(os.path.expanduser(script_args.dataset_name))
    split_flags = [f for f in ("dataset_config", "dataset_train_split", "dataset_test_split") if f in (explicit or {})]
    if local_file and split_flags:
        warnings.warn(
            f"--dataset_name {script_args.dataset_name} is a local file, i.e. one split: {', '.join(split_flags)} "
            "apply only to Hub datasets and are not used; an evaluation (if any) takes its problems from the same "
            "file.",
            UserWarning,
            stacklevel=2,
        )
    if script_args.dual_mode_eval_steps and script_args.task not in ("math", "multiple_choice", "arithmetic"):
        raise ValueError("--dual_mode_eval_steps needs a gradable --task (math, multiple_choice, arithmetic).")
    training_args.resume_from_checkpoint = resolve_resume_from_checkpoint(
        training_args.resume_from_checkpoint, training_args.output_dir
    )


def main(
    script_args: PolicySplitScriptArguments,
    training_args: MethodConfig,
    model_args: ModelConfig,
    explicit: Mapping[str, str] | None = None,
) -> Any:
    """
    Run (or with `dry_run`, describe) one training job; returns the trainer, or the dry-run summary.

    `explicit` (field name -> `"command line"` or `"recipe <path>"`, from [`explicit_arguments`]) tells which settings
    the user wrote, so that one contradicting the method fails even when it equals the field's default; `run` passes
    it. Every check on the arguments and on local files runs before the model loads.
    """
    from trl import get_peft_config, get_quantization_config

    from policy_split_trl.embedded import resolve_model_id
    from policy_split_trl.precision import trainer_precision_warning
    from policy_split_trl.report import mode_table, plot_mode_metrics, write_mode_report

    prepare_run(script_args, training_args, explicit)

    if script_args.dry_run:
        summary = dry_run_summary(script_args, training_args, model_args)
        print_summary(summary)
        return summary

    reward_funcs = load_reward_funcs(script_args)  # before the data and the model: a typo fails in seconds
    model_path = resolve_model_id(model_args.model_name_or_path)
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}

    train_dataset = load_split(
        script_args, script_args.dataset_train_split, script_args.max_train_samples, training_args.seed
    )
    needs_eval = training_args.eval_strategy != "no" or script_args.mode_report or script_args.dual_mode_eval_steps
    eval_dataset = (
        load_split(script_args, script_args.dataset_test_split, script_args.max_eval_samples, training_args.seed)
        if needs_eval
        else None
    )
    trainer_cls = trainer_class(script_args.method, training_args)  # with the compositions the config asks for
    if not training_args.resume_from_checkpoint and training_args.process_index == 0:
        _warn_if_checkpoints_would_be_overwritten(training_args.output_dir)
    trainer = trainer_cls(
        model=model_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )

    if script_args.dual_mode_eval_steps:
        from policy_split_trl.eval.backends import SamplingConfig
        from policy_split_trl.eval.callback import DualModeEvalCallback, problems_from_dataset

        kind = script_args.task  # a gradable task: checked by `prepare_run`
        sampling = SamplingConfig(
            temperature=training_args.temperature,
            top_p=training_args.top_p,
            top_k=training_args.top_k or 0,
            max_new_tokens=training_args.max_completion_length,
        )
        DualModeEvalCallback(
            problems_from_dataset(eval_dataset, kind=kind),
            every_n_steps=script_args.dual_mode_eval_steps,
            k=script_args.dual_mode_eval_k,
            sampling=sampling,
            batch_size=training_args.per_device_eval_batch_size,
            chat_template_kwargs=training_args.chat_template_kwargs,
        ).attach(trainer)

    # From the loaded weights: a bf16 model at a small learning rate would silently not train.
    precision_warning = trainer_precision_warning(trainer)
    if precision_warning:
        trainer.accelerator.print(f"WARNING: {precision_warning}")

    g = training_args.num_generations
    split = (
        f"{g - training_args.num_high_entropy_generations} normal + {training_args.num_high_entropy_generations} "
        "high-entropy"
        if METHODS[script_args.method].dual_mode
        else "one mode"
    )
    trainer.accelerator.print(
        f"{script_args.method}: {model_args.model_name_or_path} on {trainer.accelerator.num_processes} process(es), "
        f"{len(train_dataset)} training prompts, G={g} rollouts per query ({split})"
    )
    before = trainer.evaluate() if script_args.mode_report else None
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")

    if script_args.mode_report:
        after = trainer.evaluate()
        if trainer.accelerator.is_main_process:
            write_mode_report(training_args.output_dir, before, after, trainer.reward_func_names)
            plot = plot_mode_metrics(
                trainer.state.log_history, os.path.join(training_args.output_dir, "policy_split_metrics.png")
            )
            print(mode_table(before, after, trainer.reward_func_names))
            if plot:
                print(f"Per-mode metrics plot: {plot}")

    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        # Every logged metric of the run next to the model, also without checkpoints (their `trainer_state.json`):
        # what the comparison's plots and any later analysis read.
        history = {"log_history": trainer.state.log_history}
        atomic_write_json(os.path.join(training_args.output_dir, LOG_HISTORY_FILE), history)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def _warn_if_checkpoints_would_be_overwritten(output_dir: str) -> None:
    """A new run into the folder of an earlier one replaces its checkpoints of the same step: say so first."""
    from transformers.trainer_utils import get_last_checkpoint

    latest = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if latest:
        print(
            f"WARNING: {output_dir} holds checkpoints of an earlier run (latest: {latest}); "
            "this run starts from scratch and saves over checkpoints of the same step. To continue that run instead, "
            "pass --resume_from_checkpoint true.",
            file=sys.stderr,
        )


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((PolicySplitScriptArguments, MethodConfig, ModelConfig), prog=prog)


def explicit_arguments(argv: list[str]) -> dict[str, str]:
    """
    The settings the user wrote, and where: field name -> `"command line"` or `"recipe <path>"` (the command line
    wins, as in `TrlParser`). A value equal to the field's default still counts: `--eta 0.03` is set, a missing
    `--eta` is not. A `--method` that repeats the recipe's `method` counts as the recipe's (the recipe chose it).

    Args:
        argv (`list[str]`):
            The arguments as given to `policy-split-train` (with `--config PATH`, as `TrlParser` reads it).

    Returns:
        `dict[str, str]`.
    """
    import yaml

    argv = list(argv)
    explicit: dict[str, str] = {}
    recipe: dict[str, Any] = {}
    if "--config" in argv:  # TrlParser's own rule: the token after `--config`
        index = argv.index("--config")
        path = argv[index + 1]
        del argv[index : index + 2]
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
        explicit.update({key: f"recipe {path}" for key in recipe if key != "env"})
    # The command-line flags actually given: parse them again into a namespace where every field already holds a
    # marker, so argparse fills in no default and only the flags given replace it (abbreviations, `--flag=value` and
    # `--no_flag` are handled by argparse itself). No field is required, so nothing else is checked.
    parser = make_parser()
    unset = object()
    names = [f.name for dataclass_type in parser.dataclass_types for f in dataclasses.fields(dataclass_type) if f.init]
    namespace, _ = parser.parse_known_args(argv, namespace=argparse.Namespace(**dict.fromkeys(names, unset)))
    for key, value in vars(namespace).items():
        if value is not unset and not (key == "method" and recipe.get("method") == value):
            explicit[key] = COMMAND_LINE
    return explicit
