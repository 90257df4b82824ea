"""
AsymGRPO (Gu et al. 2026, arXiv 2604.04894; the v1 formula, SEED_METHODS §A): GRPO's advantage as a function of the
group success rate `p`, with one exponent per outcome channel, `((1-p)/p)^beta_pos` for correct rollouts and
`-(p/(1-p))^beta_neg` for wrong ones ([`~policy_split_trl.advantages.asym_group_advantages`]). It is purely an
advantage estimator: the loss, the clipping and the KL are TRL's.

- [`AsymGRPOArguments`]: its settings, a dataclass mixin that [`AsymGRPOConfig`] and
  [`~policy_split_trl.PolicySplitGRPOConfig`] (for `base_advantage: asym_grpo`) both inherit;
- [`AsymGRPOMixin`]: the two cooperative overrides of TRL's hooks that replace the advantages;
- [`AsymGRPOTrainer`]: the method on its own (`--method asym_grpo`). Stacked on Policy Split by
  [`policy_split_trl.methods.trainer_class`].

`policy_split_trl.config` imports this module for [`AsymGRPOArguments`], so this module imports `config` only inside
functions (never at import time) and never imports the Policy Split trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.grpo_trainer import RewardFunc

from .advantages import asym_group_advantages, rollout_success
from .config_checks import check_finite_numbers, resolve_config
from .loss_pass import train_or_eval
from .safety import SafeTrainingMixin, infinite_to_missing

# The paper's exponents (SEED_METHODS §A.3, from a secondary reading of v1).
PAPER_BETA_POS = 0.9
PAPER_BETA_NEG = 0.4


def check_asym_arguments(args: Any) -> None:
    """
    Check the AsymGRPO settings of `args` (any config with the [`AsymGRPOArguments`] fields).

    Raises:
        `ValueError`: naming the field, its value and the fix: a non-finite number, a negative exponent, a clamp that
        is not `> 0`, an empty reward name.
    """
    for name in ("asym_beta_pos", "asym_beta_neg", "asym_success_threshold"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number (got {value!r}).")
    for name, paper in (("asym_beta_pos", PAPER_BETA_POS), ("asym_beta_neg", PAPER_BETA_NEG)):
        if getattr(args, name) < 0:
            raise ValueError(
                f"{name} must be >= 0 (got {getattr(args, name)}): it is the exponent of the advantage of its outcome "
                f"channel. The paper uses {paper}; 0.5 is GRPO, 0 gives +/-1."
            )
    max_abs = args.asym_max_abs_advantage
    if max_abs is not None and (isinstance(max_abs, bool) or not math.isfinite(max_abs) or not max_abs > 0):
        raise ValueError(
            f"asym_max_abs_advantage must be a finite number > 0, or unset for no clamp (got {max_abs!r}); "
            "SEED_METHODS §A.5.6 suggests 5 if the loss spikes."
        )
    name = args.asym_correctness_reward
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(
            f"asym_correctness_reward must be the name of a reward function, or unset (got {name!r}): unset, "
            "correctness is the combined reward thresholded at asym_success_threshold."
        )


def correctness_index(args: Any, reward_func_names: list[str]) -> int | None:
    """
    The column of `args.asym_correctness_reward` among the trainer's reward functions (`None` when unset).

    Raises:
        `ValueError`: the name is not one of `reward_func_names`.
    """
    name = args.asym_correctness_reward
    if name is None:
        return None
    if name not in reward_func_names:
        raise ValueError(
            f"asym_correctness_reward={name!r} is not one of the trainer's reward functions {reward_func_names}. Set "
            "it to the name of the 0/1 verifier among them, or unset it to threshold the combined reward."
        )
    return reward_func_names.index(name)


@dataclass
class AsymGRPOArguments:
    """
    The settings of AsymGRPO, a mixin of config fields (every one with a default, so it can precede `GRPOConfig` in a
    dataclass's bases): [`AsymGRPOConfig`] for the method on its own, [`~policy_split_trl.PolicySplitGRPOConfig`] for
    Policy Split over AsymGRPO (`base_advantage: asym_grpo`).

    Parameters:
        asym_beta_pos (`float`, *optional*, defaults to `0.9`):
            Exponent `beta_pos >= 0` of the positive channel: a correct rollout gets `((1 - p) / p) ** beta_pos`.
        asym_beta_neg (`float`, *optional*, defaults to `0.4`):
            Exponent `beta_neg >= 0` of the negative channel: a wrong rollout gets `-(p / (1 - p)) ** beta_neg`.
        asym_correctness_reward (`str`, *optional*):
            Name of the 0/1 verifier among the reward functions; its value `>= asym_success_threshold` is "correct".
            Unset: TRL's combined (weighted) reward is thresholded instead.
        asym_success_threshold (`float`, *optional*, defaults to `0.5`):
            A reward at or above it counts as correct.
        asym_match_grpo_scale (`bool`, *optional*, defaults to `False`):
            Multiply by `sqrt((n - 1) / n)`, TRL's finite-group std factor: with both exponents 0.5 the advantages are
            then TRL's GRPO ones. `False` is the plain closed form (SEED_METHODS §A.5.3).
        asym_max_abs_advantage (`float`, *optional*):
            Clamp the advantages to `[-value, value]`. Unset (default, as the paper): no clamp.
    """

    asym_beta_pos: float = field(
        default=PAPER_BETA_POS,
        metadata={"help": "AsymGRPO: exponent >= 0 of the positive channel, ((1-p)/p)^beta_pos. Paper: 0.9."},
    )
    asym_beta_neg: float = field(
        default=PAPER_BETA_NEG,
        metadata={"help": "AsymGRPO: exponent >= 0 of the negative channel, -(p/(1-p))^beta_neg. Paper: 0.4."},
    )
    asym_correctness_reward: str | None = field(
        default=None,
        metadata={
            "help": "AsymGRPO: name of the 0/1 verifier reward function that decides correctness. Default: the "
            "combined reward, thresholded at asym_success_threshold."
        },
    )
    asym_success_threshold: float = field(
        default=0.5, metadata={"help": "AsymGRPO: a reward >= this threshold counts as correct."}
    )
    asym_match_grpo_scale: bool = field(
        default=False,
        metadata={
            "help": "AsymGRPO: multiply by sqrt((n-1)/n) so that exponents 0.5 give TRL's GRPO advantages exactly. "
            "Default: the plain closed form."
        },
    )
    asym_max_abs_advantage: float | None = field(
        default=None, metadata={"help": "AsymGRPO: clamp |A| to this value (> 0). Default: no clamp, as the paper."}
    )

    def __post_init__(self):
        check_asym_arguments(self)
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()


@dataclass
class AsymGRPOConfig(AsymGRPOArguments, GRPOConfig):
    """
    Configuration for [`AsymGRPOTrainer`]: every [`~trl.GRPOConfig`] parameter plus those of [`AsymGRPOArguments`].
    """

    def __post_init__(self):

        check_finite_numbers(self)
        super().__post_init__()


@dataclass
class AsymGenerationStep:
    """
    What `_calculate_rewards` hands `_generate_and_score_completions` within one generation step of an
    [`AsymGRPOMixin`] trainer. Bound to `trainer._asym_step` from TRL's reward call until the generation step reads it,
    `None` otherwise.

    Attributes:
        rewards_per_func (`torch.Tensor`):
            Shape `(N, F)`: the rewards of every process's rollouts (TRL gathers them), consecutive groups, infinite
            values made NaN (missing) as [`~policy_split_trl.safety.SafeTrainingMixin`] does.
    """

    rewards_per_func: torch.Tensor


class AsymGRPOMixin(GRPOTrainer):
    """
    Replaces TRL's GRPO advantages by AsymGRPO's ([`~policy_split_trl.advantages.asym_group_advantages`]) in the
    generation step; the loss pass is TRL's. Correctness is the named verifier reward or the thresholded combined
    reward ([`~policy_split_trl.advantages.rollout_success`]); `p` is computed on the rewards of all processes, which
    TRL gathers, so a group split across processes gets its exact `p` and no collective is added.

    Both overrides call `super()`. It derives from `GRPOTrainer` so that in any trainer that lists it, C3 puts it right
    before `GRPOTrainer`: its advantages are the base that the classes before it (Policy Split) build on.

    Logs, over all processes' rollouts: `asym/mean_adv_pos` and `asym/mean_adv_neg` (mean advantage of the correct and
    of the wrong rollouts of mixed groups), `asym/max_abs_adv`, `asym/frac_mixed_groups`, `asym/frac_none_solved` and
    `asym/frac_all_solved`. The entropy of positive vs negative rollouts is not logged: TRL computes no entropies in
    the generation step (only in the loss pass), and an extra forward for a metric is not worth it.
    """

    _asym_step: AsymGenerationStep | None = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, AsymGRPOArguments):
            raise TypeError(f"{type(self).__name__} needs a config with the AsymGRPO fields (AsymGRPOArguments).")
        check_asym_arguments(self.args)  # again: a config may be changed after it is built (e.g. by apply_method)
        self._asym_correctness_index = correctness_index(self.args, self.reward_func_names)

    def _calculate_rewards(
        self, inputs: list[dict[str, Any]], prompts: list, completions: list, completion_ids_list: list[list[int]]
    ) -> torch.Tensor:
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._asym_step = AsymGenerationStep(infinite_to_missing(rewards_per_func))
        return rewards_per_func

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        self._asym_step = None
        output = super()._generate_and_score_completions(inputs)
        step, self._asym_step = self._asym_step, None
        if step is None:
            raise RuntimeError(
                "AsymGRPO: the generation step computed no rewards (_calculate_rewards was not called)."
            )
        args, mode = self.args, train_or_eval(self.model)
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        success = rollout_success(
            step.rewards_per_func,
            self.reward_weights.to(step.rewards_per_func.device),
            args.asym_success_threshold,
            self._asym_correctness_index,
        )
        advantages = asym_group_advantages(
            success,
            group_size,
            args.asym_beta_pos,
            args.asym_beta_neg,
            args.asym_match_grpo_scale,
            args.asym_max_abs_advantage,
        )
        start = self.accelerator.process_index * len(inputs)
        local = output["advantages"]
        output["advantages"] = advantages[start : start + len(inputs)].to(device=local.device, dtype=local.dtype)
        self._log_asym_metrics(mode, success, advantages, group_size)
        return output

    def _log_asym_metrics(self, mode: str, success: torch.Tensor, advantages: torch.Tensor, group_size: int) -> None:
        """The metrics of the class docstring, from the gathered `(N,)` success flags and advantages (no collective)."""
        metrics = self._metrics[mode]
        grouped = success.view(-1, group_size)
        valid = ~torch.isnan(grouped)
        correct = (grouped == 1).sum(1)
        scorable = valid.sum(1)
        mixed = (correct > 0) & (correct < scorable)
        in_mixed = mixed.repeat_interleave(group_size)
        for name, rows in (("mean_adv_pos", success == 1), ("mean_adv_neg", success == 0)):
            rows = rows & in_mixed
            if rows.any():
                metrics[f"asym/{name}"].append(advantages[rows].mean().item())
        metrics["asym/max_abs_adv"].append(advantages.abs().max().item())
        metrics["asym/frac_mixed_groups"].append(mixed.float().mean().item())
        metrics["asym/frac_none_solved"].append(((correct == 0) & (scorable > 0)).float().mean().item())
        metrics["asym/frac_all_solved"].append(((correct == scorable) & (scorable > 0)).float().mean().item())


class AsymGRPOTrainer(AsymGRPOMixin, SafeTrainingMixin, GRPOTrainer):
    """
    GRPO with AsymGRPO's advantages (Gu et al. 2026, arXiv 2604.04894; `--method asym_grpo`), with this package's
    guards ([`~policy_split_trl.safety.SafeTrainingMixin`]). The advantages are set at generation, before TRL's loss
    (also its Liger fused loss) reads them.

    Args:
        model, reward_funcs, **kwargs:
            As for [`~trl.GRPOTrainer`].
        args ([`AsymGRPOConfig`], *optional*):
            Configuration. Defaults to `AsymGRPOConfig("<model>-AsymGRPO")`.
    """

    _config_class = AsymGRPOConfig
    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "asym-grpo"]

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: RewardFunc | list[RewardFunc] | None = None,
        args: GRPOConfig | None = None,
        **kwargs: Any,
    ):

        args = resolve_config(model, args, AsymGRPOConfig, "AsymGRPO")
        super().__init__(model, reward_funcs, args=args, **kwargs)
