"""Train a model with Policy Split (or plain GRPO, for the baseline) from a YAML recipe and/or CLI flags.

    policy-split-train --config recipes/quickstart.yaml
    python -m policy_split_trl.scripts.train --config recipes/paper/qwen3_8b_policy_split.yaml --dry_run
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m policy_split_trl.scripts.train \\
        --config recipes/paper/qwen3_1.7b_policy_split.yaml

Arguments are those of `PolicySplitScriptArguments` (below), `MethodConfig` (every `GRPOConfig` and
`TrainingArguments` flag, plus those of Policy Split and of the baselines) and TRL's `ModelConfig` (model id, dtype, LoRA, 4/8-bit), as in TRL's `trl/scripts/grpo.py`.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig, ScriptArguments, TrlParser

from policy_split_trl.data import LOCAL_FORMATS
from policy_split_trl.methods import METHODS, MethodConfig, apply_method, method_settings


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
    path_like = os.path.isabs(name) or name.startswith((".", "~")) or os.path.splitext(name)[1] in LOCAL_FORMATS
    local = path_like or os.path.exists(name) or name.startswith("synthetic:")
    return not local and constants.HF_HUB_OFFLINE


def load_reward_funcs(script_args: PolicySplitScriptArguments) -> list[Any]:
    from policy_split_trl.rewards import get_reward_func

    sys.path.insert(0, os.getcwd())  # dotted paths to the user's own modules, as TRL's script does
    funcs: list[Any] = [script_args.reward_model_name_or_path] if script_args.reward_model_name_or_path else []
    funcs += [get_reward_func(name) for name in script_args.reward_funcs]
    if not funcs:
        raise ValueError("No reward: set --reward_funcs (e.g. accuracy) and/or --reward_model_name_or_path.")
    return funcs


def load_split(script_args: PolicySplitScriptArguments, split: str, max_samples: int | None, seed: int):
    from policy_split_trl.data import load_prompt_dataset

    if not script_args.dataset_name:
        raise ValueError("Set --dataset_name: a Hub id, a local json/jsonl/parquet/csv file, or synthetic:arithmetic.")
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
        }
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


def main(script_args: PolicySplitScriptArguments, training_args: MethodConfig, model_args: ModelConfig) -> Any:
    """Run (or with `dry_run`, describe) one training job; returns the trainer, or the dry-run summary."""
    from trl import get_peft_config, get_quantization_config

    from policy_split_trl.embedded import resolve_model_id
    from policy_split_trl.precision import trainer_precision_warning
    from policy_split_trl.report import mode_table, plot_mode_metrics, write_mode_report

    apply_method(script_args.method, training_args)
    if script_args.mode_prompt_file:
        with open(script_args.mode_prompt_file) as f:
            prompt = f.read().strip()
        if not prompt:
            raise ValueError(f"--mode_prompt_file {script_args.mode_prompt_file} is empty.")
        training_args.high_entropy_system_prompt = prompt

    if script_args.dry_run:
        summary = dry_run_summary(script_args, training_args, model_args)
        print_summary(summary)
        return summary

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
    trainer_cls = METHODS[script_args.method].trainer_class()
    trainer = trainer_cls(
        model=model_path,
        reward_funcs=load_reward_funcs(script_args),
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )

    if script_args.dual_mode_eval_steps:
        from policy_split_trl.eval.backends import SamplingConfig
        from policy_split_trl.eval.callback import DualModeEvalCallback, problems_from_dataset

        kind = {"math": "math", "multiple_choice": "multiple_choice", "arithmetic": "arithmetic"}.get(script_args.task)
        if kind is None:
            raise ValueError("--dual_mode_eval_steps needs a gradable --task (math, multiple_choice, arithmetic).")
        sampling = SamplingConfig(
            temperature=training_args.temperature, top_p=training_args.top_p, top_k=training_args.top_k or 0,
            max_new_tokens=training_args.max_completion_length,
        )  # fmt: skip
        DualModeEvalCallback(
            problems_from_dataset(eval_dataset, kind=kind), every_n_steps=script_args.dual_mode_eval_steps,
            k=script_args.dual_mode_eval_k, sampling=sampling, batch_size=training_args.per_device_eval_batch_size,
            chat_template_kwargs=training_args.chat_template_kwargs,
        ).attach(trainer)  # fmt: skip

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
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((PolicySplitScriptArguments, MethodConfig, ModelConfig), prog=prog)


def _dry_run_requested(argv: list[str]) -> bool:
    if "--dry_run" not in argv:
        return False
    following = argv[argv.index("--dry_run") + 1 : argv.index("--dry_run") + 2]
    return not following or following[0].lower() not in ("false", "0", "no")


def run(argv: list[str] | None = None) -> Any:
    """Parse `argv` (default: the command line) and run; returns the trainer, or the dry-run summary."""
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    cpu_note = None
    if _dry_run_requested(argv) and not torch.cuda.is_available() and "--use_cpu" not in argv:
        # A GPU recipe (bf16) fails TrainingArguments' device check on a CPU-only machine; a dry run still checks the
        # rest of it.
        argv += ["--use_cpu", "true"]
        cpu_note = "no GPU here: validated with use_cpu=True"
    parser = make_parser(prog="policy-split-train")
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    if cpu_note:
        print(cpu_note)
    return main(script_args, training_args, model_args)


def cli() -> None:
    """Console entry point `policy-split-train` (its exit status is 0 on success, so it returns nothing)."""
    run()


if __name__ == "__main__":
    cli()
