"""Nothing lost, nothing silently wrong: the guards every trainer of this package shares.

[`SafeTrainingMixin`] goes before `GRPOTrainer` in a trainer's bases. It

- checks the datasets when the trainer is built, before the model loads ([`~policy_split_trl.data.validate_prompt_dataset`]);
- treats an infinite reward as missing (what TRL does with NaN, i.e. a reward function returning `None`), with one
  warning per reward function;
- stops training before an optimizer step whose loss or gradients are not finite, on every process at once, so that
  non-finite weights are never trained on, logged as a result, or saved;
- saves the model locally before `push_to_hub` talks to the Hub, so an unreachable Hub never loses it.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from typing import Any

import torch
from trl import GRPOTrainer

from .data import validate_prompt_dataset

logger = logging.getLogger(__name__)

# What makes a step non-finite, most likely first; in the error of [`SafeTrainingMixin.training_step`].
NON_FINITE_CAUSES = (
    "a reward function returning huge values (check `rewards/*` in the logs)",
    "a learning rate or bonus coefficient too large for the model (learning_rate, eta, normal_eta, beta)",
    "fp16 overflow (train in bf16, or float32 with `bf16: true`)",
    "non-finite weights in the model you started from",
)


def infinite_to_missing(rewards_per_func: torch.Tensor) -> torch.Tensor:
    """
    Rewards of shape `(N, num_funcs)` with every +/-inf replaced by NaN, TRL's "no reward" (a reward function that
    returned `None`): TRL then leaves that function out of the rollout's total reward and of its metrics.
    """
    return torch.where(torch.isinf(rewards_per_func), torch.full_like(rewards_per_func, math.nan), rewards_per_func)


def gradients_finite(model: torch.nn.Module) -> bool:
    """Whether every gradient this process holds is finite (with sharded training, only this process's shards)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


class SafeTrainingMixin:
    """
    The guards of [`~policy_split_trl.safety`] for a `GRPOTrainer` subclass: put it before `GRPOTrainer` in the bases.
    Every check is the same collective on every process (one all-reduce of a flag per micro-step), so a problem seen
    by one process stops all of them together instead of leaving the others waiting in a collective.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        # Bound like `GRPOTrainer.__init__` so the datasets are found whether passed by keyword or position.
        bound = inspect.signature(GRPOTrainer.__init__).bind_partial(self, *args, **kwargs).arguments
        for name in ("train_dataset", "eval_dataset"):  # a dict of eval datasets is checked split by split
            if bound.get(name) is not None:
                validate_prompt_dataset(bound[name], name=name)
        self._warned_infinite_rewards: set[str] = set()
        super().__init__(*args, **kwargs)

    def _calculate_rewards(
        self, inputs: list[dict[str, Any]], prompts: list, completions: list, completion_ids_list: list[list[int]]
    ) -> torch.Tensor:
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        infinite = torch.isinf(rewards_per_func).any(dim=0).tolist()  # gathered: the same on every process
        for name, found in zip(self.reward_func_names, infinite, strict=True):
            if found and name not in self._warned_infinite_rewards:
                self._warned_infinite_rewards.add(name)
                logger.warning(
                    "Reward function %s returned an infinite reward; such rewards are treated as missing (like None "
                    "or NaN: left out of the rollout's total reward and of the metrics). Return finite values.",
                    name,
                )
        return infinite_to_missing(rewards_per_func) if any(infinite) else rewards_per_func

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # After this micro-step's backward, before any optimizer step: a non-finite loss, or (at the end of the
        # accumulation window, when the gradients are complete) a non-finite gradient on any process stops all.
        bad = not bool(torch.isfinite(loss).all())
        if self.accelerator.sync_gradients and not self.is_deepspeed_enabled:  # DeepSpeed hides its gradients
            bad = bad or not gradients_finite(model)
        flag = torch.tensor(float(bad), device=self.accelerator.device)
        if self.accelerator.reduce(flag, reduction="sum").item() > 0:
            step = self.state.global_step + 1
            raise FloatingPointError(
                f"Training stopped at optimizer step {step}: the loss or the gradients are not finite (loss "
                f"{loss.item()!r} on process {self.accelerator.process_index}). The weights were not updated by this "
                f"step and nothing was saved after it; the last checkpoint in {os.path.abspath(self.args.output_dir)} "
                f"(if any) is intact. Likely causes: " + "; ".join(NON_FINITE_CAUSES) + "."
            )
        return loss

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """
        TRL's `push_to_hub`, after saving the model to `output_dir` on every process: TRL creates the Hub repository
        first, so an unreachable Hub or a bad token would otherwise raise before anything is written. On failure the
        error says where the local copy is.
        """
        self.save_model(self.args.output_dir, _internal_call=True)
        try:
            return super().push_to_hub(*args, **kwargs)
        except Exception as error:
            local = os.path.abspath(self.args.output_dir)
            raise RuntimeError(
                f"push_to_hub failed ({type(error).__name__}: {error}). The trained model is saved in {local}: upload "
                f"it when the Hub is reachable with `hf upload <your-repo> {local}`, or call trainer.push_to_hub() "
                "again."
            ) from error
