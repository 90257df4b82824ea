"""Train a model with Policy Split (or plain GRPO, for the baseline) from a YAML recipe and/or CLI flags.

    policy-split-train --config recipes/quickstart.yaml
    python -m policy_split_trl.scripts.train --config recipes/paper/qwen3_8b_policy_split.yaml --dry_run
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m policy_split_trl.scripts.train \\
        --config recipes/paper/qwen3_1.7b_policy_split.yaml

The command-line entry point only, as TRL's `trl/scripts/grpo.py`: the arguments
([`~policy_split_trl.training.PolicySplitScriptArguments`], [`~policy_split_trl.methods.MethodConfig`] and TRL's
`ModelConfig`), the checks, the dry run and the training run are library code in [`policy_split_trl.training`].
"""

from __future__ import annotations

import sys
from typing import Any

from policy_split_trl.training import explicit_arguments, main, make_parser


def _dry_run_requested(argv: list[str]) -> bool:
    """Whether `argv` asks for `--dry_run` (bare, or followed by a true value)."""
    if "--dry_run" not in argv:
        return False
    following = argv[argv.index("--dry_run") + 1 : argv.index("--dry_run") + 2]
    return not following or following[0].lower() not in ("false", "0", "no")


def run(argv: list[str] | None = None) -> Any:
    """
    Parse `argv` (default: the command line) and run [`~policy_split_trl.training.main`].

    Args:
        argv (`list[str]`, *optional*):
            The arguments as given to `policy-split-train`; defaults to `sys.argv[1:]`.

    Returns:
        The trainer, or with `--dry_run` the dry-run summary (`dict`).
    """
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    given = list(argv)  # what the user wrote, before the dry run's own `--use_cpu`
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
    return main(script_args, training_args, model_args, explicit_arguments(given))


def cli() -> None:
    """Console entry point `policy-split-train` (its exit status is 0 on success, so it returns nothing)."""
    run()


if __name__ == "__main__":
    cli()
