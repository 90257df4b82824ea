"""
The entropy-guided GRPO baselines of the paper's comparison (Table 1, Appendix B.3) that TRL does not already have, each
as a small subclass of TRL's `GRPOTrainer` with its own config:

- [`EntropyAdvantageGRPOTrainer`]: Cheng et al. 2025, `A_t + min(alpha * detach(H_t), |A|/kappa)`;
- [`ClipCovGRPOTrainer`]: Cui et al. 2025, Clip-Cov (drop the policy-gradient loss of a few high-covariance tokens);
- [`EntropyDrivenAdvantageGRPOTrainer`]: EDGE-GRPO's entropy-driven advantage `A_i / P^_i` (signal level only).

Entropy regularization (`entropy_coef`) and forking tokens only (`top_entropy_quantile`) are TRL settings; see
[`policy_split_trl.methods.METHODS`] for all of them by name. The formulas are in [`policy_split_trl.advantages`].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.grpo_trainer import RewardFunc

from .advantages import (
    clip_cov_selection,
    entropy_advantage,
    entropy_driven_advantages,
    relative_response_entropy,
    response_mean_entropy,
)
from .config_checks import check_finite_numbers, resolve_config
from .loss_pass import LossPassAdvantagesMixin, loss_mask, train_or_eval
from .safety import SafeTrainingMixin

# Loss types whose per-token loss is the PPO clipped surrogate `-min(r A, clip(r) A)`, which Clip-Cov is defined on.
_CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


# ---------------------------------------------------------------------------------------------------------- configs
@dataclass
class EntropyAdvantageGRPOConfig(GRPOConfig):
    """
    Configuration for [`EntropyAdvantageGRPOTrainer`]: every [`~trl.GRPOConfig`] parameter plus

    Parameters:
        entropy_advantage_alpha (`float`, *optional*, defaults to `0.4`):
            Scale `alpha >= 0` of the detached token entropy added to the advantage (App. B.3: 0.4).
        entropy_advantage_kappa (`float`, *optional*, defaults to `2.0`):
            Cap ratio `kappa > 1`: the entropy term is at most `|A|/kappa` (App. B.3: 2.0).
    """

    entropy_advantage_alpha: float = field(
        default=0.4,
        metadata={"help": "Entropy advantage (Cheng et al. 2025): scale alpha of detach(H_t). Paper: 0.4."},
    )
    entropy_advantage_kappa: float = field(
        default=2.0,
        metadata={"help": "Entropy advantage: the entropy term is capped at |A|/kappa, kappa > 1. Paper: 2.0."},
    )

    def __post_init__(self):
        check_finite_numbers(self)
        if not self.entropy_advantage_alpha >= 0:
            raise ValueError(f"entropy_advantage_alpha must be >= 0 (got {self.entropy_advantage_alpha}); paper: 0.4.")
        if not self.entropy_advantage_kappa > 1:
            raise ValueError(
                f"entropy_advantage_kappa must be > 1 (got {self.entropy_advantage_kappa}) so the entropy term never "
                "flips the sign of the advantage; paper: 2.0."
            )
        super().__post_init__()


@dataclass
class ClipCovGRPOConfig(GRPOConfig):
    """
    Configuration for [`ClipCovGRPOTrainer`]: every [`~trl.GRPOConfig`] parameter plus (defaults: the authors'
    recommended values, used by the paper, App. B.3)

    Parameters:
        clip_cov_ratio (`float`, *optional*, defaults to `2e-4`):
            Fraction of the valid tokens of a batch whose policy-gradient loss is dropped.
        clip_cov_lb (`float`, *optional*, defaults to `1.0`):
            Lower bound (exclusive) of the covariance of a candidate token.
        clip_cov_ub (`float`, *optional*, defaults to `5.0`):
            Upper bound (exclusive) of the covariance of a candidate token.
    """

    clip_cov_ratio: float = field(
        default=2e-4, metadata={"help": "Clip-Cov: fraction of valid tokens whose gradient is dropped. Paper: 2e-4."}
    )
    clip_cov_lb: float = field(
        default=1.0, metadata={"help": "Clip-Cov: lower bound of a candidate token's covariance. Paper: 1.0."}
    )
    clip_cov_ub: float = field(
        default=5.0, metadata={"help": "Clip-Cov: upper bound of a candidate token's covariance. Paper: 5.0."}
    )

    def __post_init__(self):
        check_finite_numbers(self)
        if not 0 < self.clip_cov_ratio <= 1:
            raise ValueError(f"clip_cov_ratio must be in (0, 1] (got {self.clip_cov_ratio}); paper: 2e-4.")
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(
                f"clip_cov_lb ({self.clip_cov_lb}) must be below clip_cov_ub ({self.clip_cov_ub}); paper: 1.0 and 5.0."
            )
        super().__post_init__()


@dataclass
class EntropyDrivenAdvantageGRPOConfig(GRPOConfig):
    """
    Configuration for [`EntropyDrivenAdvantageGRPOTrainer`]: every [`~trl.GRPOConfig`] parameter plus

    Parameters:
        edge_epsilon (`float`, *optional*, defaults to `1e-6`):
            Floor of a response's mean entropy and of its group's mean, so that `A / P^` never divides by zero.
        edge_max_scale (`float`, *optional*):
            Optional cap on the advantage multiplier `1 / P^`. Unset (default) is the paper's formula.
    """

    edge_epsilon: float = field(
        default=1e-6, metadata={"help": "EDGE-GRPO: floor of the response and group mean entropies (nats)."}
    )
    edge_max_scale: float | None = field(
        default=None, metadata={"help": "EDGE-GRPO: optional cap on the advantage multiplier 1/P^. Default: none."}
    )

    def __post_init__(self):
        check_finite_numbers(self)
        if not self.edge_epsilon > 0:
            raise ValueError(f"edge_epsilon must be > 0 (got {self.edge_epsilon}).")
        if self.edge_max_scale is not None and not self.edge_max_scale >= 1:
            raise ValueError(f"edge_max_scale must be >= 1 or unset (got {self.edge_max_scale}).")
        super().__post_init__()


# --------------------------------------------------------------------------------------------------------- trainers
class _BaselineGRPOTrainer(SafeTrainingMixin, GRPOTrainer):
    """Checks the config type, then is TRL's `GRPOTrainer` with this package's guards ([`SafeTrainingMixin`])."""

    _config_class: type[GRPOConfig] = GRPOConfig
    _name_suffix = "GRPO"

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: RewardFunc | list[RewardFunc] | None = None,
        args: GRPOConfig | None = None,
        **kwargs: Any,
    ):
        args = resolve_config(model, args, self._config_class, self._name_suffix)
        if args.use_liger_kernel:
            raise NotImplementedError(
                f"{type(self).__name__} changes the advantages inside TRL's loss; the Liger fused loss bypasses it. "
                "Set use_liger_kernel=False."
            )
        super().__init__(model, reward_funcs, args=args, **kwargs)


class _LossPassAdvantageTrainer(LossPassAdvantagesMixin, _BaselineGRPOTrainer):
    """Reshapes a micro-batch's advantages inside TRL's loss pass, from that pass's own log-probs and entropies."""

    def _shape_advantages(
        self, inputs: dict[str, Any], logps: torch.Tensor, entropies: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        # A copy: with num_iterations > 1 the same micro-batch is trained again and must start from the original A.
        return self._run_loss_pass(model, dict(inputs))

    def _get_per_token_logps_and_entropies(
        self, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        inputs = self._take_loss_inputs()
        if inputs is not None:
            inputs["advantages"] = self._shape_advantages(
                inputs, logps.detach(), entropies.detach(), loss_mask(inputs)
            )
        return logps, entropies, aux_loss

    def _log_mean(self, name: str, total: torch.Tensor, count: torch.Tensor) -> None:
        mode = train_or_eval(self.model)
        total, count = self.accelerator.reduce(torch.stack([total, count]).double(), reduction="sum").tolist()
        if count > 0:
            self._metrics[mode][name].append(total / count)


class EntropyAdvantageGRPOTrainer(_LossPassAdvantageTrainer):
    """
    GRPO with the entropy advantage of Cheng et al. 2025 ("Reasoning with Exploration: An Entropy Perspective", arXiv
    2506.14758; the paper's "w/ Ent Advantage" baseline, App. B.3): every token's advantage becomes
    `A_t + min(alpha * detach(H_t), |A|/kappa)` ([`~policy_split_trl.advantages.entropy_advantage`]).

    `H_t` is the entropy of the policy in the loss pass (at the sampling temperature), taken from that pass itself, so
    the method costs no extra forward; with `num_iterations=1` (the paper's setting) it is the rollout policy's entropy.

    Args:
        model, reward_funcs, **kwargs:
            As for [`~trl.GRPOTrainer`].
        args ([`EntropyAdvantageGRPOConfig`], *optional*):
            Configuration.

    Logs `entropy_advantage/term_mean` (mean entropy term over completion tokens) and `entropy_advantage/capped_fraction`
    (tokens with `A != 0` whose term sits at the `|A|/kappa` cap).
    """

    _config_class = EntropyAdvantageGRPOConfig
    _name_suffix = "EntropyAdvantage"
    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "entropy-advantage"]

    def _shape_advantages(
        self, inputs: dict[str, Any], logps: torch.Tensor, entropies: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        advantages = inputs["advantages"]
        alpha, kappa = self.args.entropy_advantage_alpha, self.args.entropy_advantage_kappa
        shaped = entropy_advantage(advantages, entropies, alpha, kappa)
        term = shaped - advantages.unsqueeze(1)
        valid = mask.bool()
        capped = (
            valid & (advantages != 0).unsqueeze(1) & (alpha * entropies >= (advantages.abs() / kappa).unsqueeze(1))
        )
        self._log_mean("entropy_advantage/term_mean", term[valid].sum(), valid.sum())
        self._log_mean(
            "entropy_advantage/capped_fraction", capped.sum(), (valid & (advantages != 0).unsqueeze(1)).sum()
        )
        return shaped


class ClipCovGRPOTrainer(_LossPassAdvantageTrainer):
    """
    GRPO with Clip-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
    Models", arXiv 2505.22617; the paper's "w/ Clip-Cov" baseline, App. B.3): in every loss micro-batch, a random
    `clip_cov_ratio` of the valid tokens among those with `clip_cov_lb < (A - mean A)(log pi - mean log pi) <
    clip_cov_ub` that PPO did not already clip lose their policy-gradient loss
    ([`~policy_split_trl.advantages.clip_cov_selection`], as the authors' `compute_policy_loss_clip_cov`).

    The loss of a selected token is removed by setting its advantage to 0 for that loss pass: the clipped surrogate is
    then exactly 0 there, while the KL term (if `beta > 0`) and every normalizer are unchanged — the same as the
    authors' `pg_losses * corr`. The statistics are over the micro-batch of each process, as in the authors' code.

    Args:
        model, reward_funcs, **kwargs:
            As for [`~trl.GRPOTrainer`].
        args ([`ClipCovGRPOConfig`], *optional*):
            Configuration. Needs a PPO-clipped `loss_type` (`grpo`, `bnpo`, `dr_grpo`, `dapo`, `luspo`) and token-level
            importance sampling.

    Logs `clip_cov/clip_fraction`: the fraction of completion tokens whose loss was dropped.
    """

    _config_class = ClipCovGRPOConfig
    _name_suffix = "ClipCov"
    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "clip-cov"]

    def __init__(self, model: str | PreTrainedModel, reward_funcs: Any = None, args: Any = None, **kwargs: Any):
        if args is not None and isinstance(args, GRPOConfig):
            if args.loss_type not in _CLIPPED_LOSS_TYPES:
                raise ValueError(
                    f"Clip-Cov is defined on the PPO clipped surrogate; loss_type={args.loss_type!r} has none. Use one "
                    f"of {_CLIPPED_LOSS_TYPES} (the paper: token-mean, i.e. 'dapo')."
                )
            if args.importance_sampling_level != "token":
                raise ValueError(
                    "Clip-Cov selects single tokens; set importance_sampling_level='token' (got "
                    f"{args.importance_sampling_level!r})."
                )
        super().__init__(model, reward_funcs, args=args, **kwargs)

    def _shape_advantages(
        self, inputs: dict[str, Any], logps: torch.Tensor, entropies: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        advantages = inputs["advantages"]
        old = inputs.get("old_per_token_logps")
        selected = clip_cov_selection(
            advantages,
            logps,
            logps if old is None else old,
            mask,
            self.epsilon_low,
            self.epsilon_high,
            self.args.clip_cov_ratio,
            self.args.clip_cov_lb,
            self.args.clip_cov_ub,
        )
        self._log_mean("clip_cov/clip_fraction", selected.sum(), mask.bool().sum())
        token_advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand_as(logps)
        return torch.where(selected, torch.zeros_like(token_advantages), token_advantages)


class EntropyDrivenAdvantageGRPOTrainer(_BaselineGRPOTrainer):
    """
    GRPO with EDGE-GRPO's entropy-driven advantage (Zhang et al. 2025d, arXiv 2507.21848; signal level only, as the
    paper's "w/ Ent Driven Adv" baseline, App. B.3 — no guided error correction): `A^_i = A_i / P^_i` with
    `P^_i = P_i / mean_group(P_j)` and `P_i` the mean token entropy of response `i` under the policy that generated it
    ([`~policy_split_trl.advantages.relative_response_entropy`],
    [`~policy_split_trl.advantages.entropy_driven_advantages`]).

    `P_i` comes from the generation step: from TRL's own old-log-prob pass when it runs (vLLM, `num_iterations > 1`,
    ...), otherwise from one extra no-grad pass. Group means use all processes' rollouts, so a group split across
    processes gets the exact mean. (The authors' code divides by the mean over the whole gathered batch instead of the
    group and averages over padding too; we follow the formula of their paper.)

    Args:
        model, reward_funcs, **kwargs:
            As for [`~trl.GRPOTrainer`].
        args ([`EntropyDrivenAdvantageGRPOConfig`], *optional*):
            Configuration.

    Logs `edge/response_entropy` (mean `P_i`), `edge/scale_min` and `edge/scale_max` (of `1 / P^_i`).
    """

    _config_class = EntropyDrivenAdvantageGRPOConfig
    _name_suffix = "EntropyDrivenAdvantage"
    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "edge-grpo"]
    _captured_entropies: torch.Tensor | None = None
    _capture_next_pass = False

    def _get_per_token_logps_and_entropies(
        self, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        # The first pass of TRL's generation step is the old policy's; it yields the entropies for free.
        capture, self._capture_next_pass = self._capture_next_pass, False
        if capture:
            kwargs["compute_entropy"] = True
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if capture:
            self._captured_entropies = entropies
        return logps, entropies, aux_loss

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        self._capture_next_pass, self._captured_entropies = True, None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._capture_next_pass = False
        entropies, self._captured_entropies = self._captured_entropies, None
        completion_mask = output["completion_mask"]
        mode = train_or_eval(self.model)
        if entropies is None or output.get("old_per_token_logps") is None:
            input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
            attention_mask = torch.cat([output["prompt_mask"], completion_mask], dim=1)
            batch_size = (
                self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
            )
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                _, entropies, _ = super()._get_per_token_logps_and_entropies(
                    self.model,
                    input_ids,
                    attention_mask,
                    completion_mask.size(1),
                    batch_size=batch_size,
                    compute_entropy=True,
                )
        local = response_mean_entropy(entropies.float(), loss_mask(output))
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        gathered = self.accelerator.gather(local)
        relative = relative_response_entropy(gathered, group_size, self.args.edge_epsilon)
        start = self.accelerator.process_index * local.size(0)
        relative = relative[start : start + local.size(0)]
        output["advantages"] = entropy_driven_advantages(output["advantages"], relative, self.args.edge_max_scale)
        # The multiplier 1/P^ as applied (after the optional cap), for the metrics.
        scale = self.accelerator.gather(
            entropy_driven_advantages(torch.ones_like(relative), relative, self.args.edge_max_scale)
        )
        self._metrics[mode]["edge/response_entropy"].append(gathered.mean().item())
        self._metrics[mode]["edge/scale_min"].append(scale.min().item())
        self._metrics[mode]["edge/scale_max"].append(scale.max().item())
        return output
