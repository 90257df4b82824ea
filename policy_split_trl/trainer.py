"""
Policy Split (arXiv 2604.11510) on TRL's `GRPOTrainer`, in the order of `SPEC.md` §2: 1. the modes at generation,
2. the two contexts of every rollout, 3. the advantages (one pipeline: `_dual_mode_advantages`), 4. the loss, 5. the
metrics. [`~policy_split_trl.optimized_step`] makes the passes cheap; [`~policy_split_trl.contexts`] holds a rollout's
two contexts as rows of a batch; [`~policy_split_trl.advantages`], the equations.

A step through TRL's hooks: `_generate_and_score_completions` (modes, then TRL's generation and rewards, during which
`_calculate_rewards` logs the per-mode metrics, then `_add_contexts`: both contexts' log-probs, advantages, rows); then
per micro-batch `_compute_loss`, one loss pass over both contexts or one per context, in each of which
`_get_per_token_logps_and_entropies` completes the advantages from the pass's own log-probs. Data flows between hooks
only in the generation batch's keys and in the micro-batch's [`~policy_split_trl.loss_pass.LossStep`].
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel
from trl import GRPOTrainer
from trl.trainer.grpo_trainer import RewardFunc

from .advantages import (
    bonus_hit_clip,
    dual_mode_bonus,
    entropy_regularized_advantages,
    forward_kl_estimate,
    group_mean_std,
    quarter_loss_weights,
    row_token_moments,
    standardize_bonus,
)
from .asym_grpo import AsymGRPOMixin
from .config import PolicySplitGRPOConfig
from .config_checks import resolve_config
from .contexts import (
    HE_KEY_PREFIX,
    HIGH_ENTROPY_CONTEXT,
    NORMAL_CONTEXT,
    by_context,
    context_sampling_logps,
    expand_contexts,
)
from .diagnostics import ModeDiagnosticsMixin
from .eta_control import EtaControllerCallback, check_eta_schedule
from .hub import DualModeHubMixin
from .loss_pass import LossStep, loss_mask, train_or_eval
from .modes import HIGH_ENTROPY_MODE, NORMAL_MODE, apply_system_prompt, high_entropy_rows
from .optimized_step import OptimizedStepMixin
from .safety import SafeTrainingMixin
from .shared_prefix import SharedPrefixMixin

# Keys TRL adds for multimodal models; their rows cannot simply be duplicated into a second context.
_MULTIMODAL_KEYS = ("pixel_values", "num_images", "image_grid_thw", "token_type_ids", "mm_token_type_ids")


class PolicySplitGRPOTrainer(
    ModeDiagnosticsMixin, OptimizedStepMixin, SafeTrainingMixin, DualModeHubMixin, SharedPrefixMixin, GRPOTrainer
):
    """
    Trainer for Policy Split: dual-mode, entropy-regularized GRPO (arXiv 2604.11510).

    One model, two modes: normal, and high-entropy (HE) = the same weights with a system prompt (Eq. 1). For every
    query, [`PolicySplitGRPOConfig.num_high_entropy_generations`] of the `G` rollouts are generated with the HE prompt
    and the rest without; rewards and the correctness advantage `A_i` (Eq. 2) come from [`~trl.GRPOTrainer`] over the
    joint group. Every rollout is then scored in both contexts and, with rollout sharing (Eq. 10), trained twice:

    - normal context (no system prompt): advantage `A_i` on every token (plus the optional `eta'` bonus);
    - HE context (with the system prompt): `A^HE_{i,t} = A_i + clip(eta * B_{i,t}, -|A_i|/kappa, |A_i|/kappa)`
      (Eq. 3 as the authors' code computes it; `eta_placement="outside_clip"`: `A_i + eta * clip(B_{i,t}, ...)`, as
      typeset), where `B` is the group-normalized (Eq. 4) bonus `b = -alpha log pi_HE - (1 - alpha) log pi` (Eq. 6).

    Without sharing (Eq. 9) each rollout is trained only in the context that generated it. Everything else —
    generation (transformers or vLLM), rewards, the clipped surrogate of every `loss_type`, KL to a reference, PEFT,
    distributed training — is TRL's own. With `optimized_step` (default) the same step costs less
    ([`~policy_split_trl.optimized_step`], which also states how every process makes the same passes and
    collectives). Group statistics (Eq. 2, Eq. 4) are taken over all processes, never over a local slice.

    Args:
        model, reward_funcs, **kwargs:
            As for [`~trl.GRPOTrainer`].
        args ([`PolicySplitGRPOConfig`], *optional*):
            Configuration. Defaults to `PolicySplitGRPOConfig("<model>-PolicySplit")`.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "policy-split"]
    _name = "Policy Split"
    _paper: ClassVar[dict[str, str]] = {
        "title": "Policy Split: Incentivizing Dual-Mode Exploration in LLM Reinforcement with Dual-Mode Entropy "
        "Regularization",
        "id": "2604.11510",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @misc{policysplit2026,
                title        = {{Policy Split: Incentivizing Dual-Mode Exploration in LLM Reinforcement with Dual-Mode Entropy Regularization}},
                year         = 2026,
                eprint       = {arXiv:2604.11510},
            }"""),
    }

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: RewardFunc | list[RewardFunc] | None = None,
        args: PolicySplitGRPOConfig | None = None,
        **kwargs: Any,
    ):
        args = resolve_config(model, args, PolicySplitGRPOConfig, "PolicySplit")
        for unsupported in ("rollout_func", "environment_factory"):
            if kwargs.get(unsupported) is not None:
                raise NotImplementedError(
                    f"PolicySplitGRPOTrainer does not support `{unsupported}` yet: it must re-score each rollout under "
                    "the other mode's prompt, which a custom rollout or environment may have rewritten."
                )
        check_eta_schedule(args)  # again: a config may be changed after it is built (e.g. by `apply_method`)
        if args.polarity_reweighting != "none" and not getattr(self, "_applies_polarity_reweighting", False):
            raise ValueError(
                f"polarity_reweighting={args.polarity_reweighting!r} needs the trainer composed with it "
                "(policy_split_trl.methods.trainer_class, or PolarityPolicySplitMixin); PolicySplitGRPOTrainer alone "
                "would ignore it. Set polarity_reweighting: none, or train through policy-split-train."
            )
        if args.base_advantage != "grpo" and not isinstance(self, AsymGRPOMixin):
            raise ValueError(
                f"base_advantage={args.base_advantage!r} needs the trainer composed with it "
                "(policy_split_trl.methods.trainer_class, e.g. AsymPolicySplitGRPOTrainer); PolicySplitGRPOTrainer "
                "alone would train on GRPO's A_i. Set base_advantage: grpo, or train through policy-split-train."
            )
        super().__init__(model, reward_funcs, args=args, **kwargs)
        # The `eta` in force and the adaptive controller's state, saved in and restored from checkpoints.
        self.add_callback(EtaControllerCallback(args.eta))

    @property
    def _eta_controller(self) -> EtaControllerCallback | None:
        # Looked up, not kept: transformers replaces the callback object when it restores callback states on resume.
        return next((c for c in self.callback_handler.callbacks if isinstance(c, EtaControllerCallback)), None)

    @property
    def _eta(self) -> float:
        """The `eta` of Eq. 3 in force: `args.eta` (`eta_schedule="constant"`), or the adaptive controller's."""
        if self.args.eta_schedule == "constant":
            return self.args.eta
        if (controller := self._eta_controller) is None:
            raise RuntimeError(
                "eta_schedule='adaptive' needs the trainer's EtaControllerCallback, which was removed from its "
                "callbacks. Keep it (it holds the current eta), or use eta_schedule='constant'."
            )
        return controller.eta

    def _mode_split(self, mode: str) -> tuple[int, int]:
        """`(G, number of HE rollouts per group)` for `"train"` or `"eval"`."""
        if mode == "train":
            return self.num_generations, self.args.num_high_entropy_generations
        return self.num_generations_eval, self.args.num_high_entropy_generations_eval

    # ------------------------------------------------------------------ 1. the modes at generation (SPEC §2.1-2.3)
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        """TRL's generation step on rollouts of both modes, then both contexts of every rollout ([`_add_contexts`])."""
        group_size, num_he = self._mode_split(train_or_eval(self.model))
        # Mode of each rollout, from its global index so a group split across processes is split exactly.
        device = self.accelerator.device
        rollout = self.accelerator.process_index * len(inputs) + torch.arange(len(inputs), device=device)
        is_he = high_entropy_rows(rollout, group_size, num_he)
        flags = is_he.tolist()
        # Each rollout's prompt in the mode that generates it (Eq. 1) and in the other mode (its twin context).
        he_prompts = [apply_system_prompt(x["prompt"], self.args.high_entropy_system_prompt) for x in inputs]
        gen_prompts = [he if flag else x["prompt"] for x, he, flag in zip(inputs, he_prompts, flags, strict=True)]
        twin_prompts = [x["prompt"] if flag else he for x, he, flag in zip(inputs, he_prompts, flags, strict=True)]
        # `policy_split_mode` reaches the reward functions as a keyword, like any dataset column.
        modes = [HIGH_ENTROPY_MODE if flag else NORMAL_MODE for flag in flags]
        output = super()._generate_and_score_completions(
            [{**x, "prompt": p, "policy_split_mode": m} for x, p, m in zip(inputs, gen_prompts, modes, strict=True)]
        )
        if any(key in output for key in _MULTIMODAL_KEYS):
            raise NotImplementedError("PolicySplitGRPOTrainer supports text-only models for now.")
        return self._add_contexts(output, twin_prompts, is_he, rollout)

    def _generate_single_turn(
        self,
        prompt_ids: list[list[int]],
        images: list | None,
        multimodal_fields: dict[str, Any],
        num_generations: int,
        has_tool_images: bool = False,
    ) -> tuple[list[list[int]], list[list[float | None]] | None]:
        # vLLM server mode generates `n` samples from every `n`-th prompt, assuming a group shares one prompt. Ours
        # holds two runs of identical prompts (normal, then HE); a gcd-sized `n` keeps each run's own prompt.
        if self.use_vllm and self.vllm_mode == "server":
            group_size, num_he = self._mode_split(train_or_eval(self.model))
            if num_generations == group_size:
                num_generations = math.gcd(group_size - num_he, num_he)
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)

    # ------------------------------------------------------------------ 2. the two contexts (SPEC §2.4, Eq. 9-10)
    def _add_contexts(
        self, output: dict[str, Any], twin_prompts: list, is_he: torch.Tensor, rollout: torch.Tensor
    ) -> dict[str, Any]:
        """
        Complete TRL's generation batch `output` (rollouts of both modes; `is_he` `(B,)` bool, `rollout` `(B,)` global
        indices) with each rollout's twin context, after the other mode's prompt (`twin_prompts`): both contexts'
        log-probs under the policy that generated it, unless the loss pass supplies them (optimized step), the
        advantages of each context ([`_dual_mode_advantages`]) and the rows each context trains. Returns `output`.
        """
        mode = train_or_eval(self.model)
        gen_prompt_ids = [
            ids[m.bool()].tolist() for ids, m in zip(output["prompt_ids"], output["prompt_mask"], strict=True)
        ]
        twin_prompt_ids = self._tokenize_prompts(twin_prompts)[0]
        old_logps = output.get("old_per_token_logps")
        deferred = self._defer_bonus_to_loss_pass(mode, old_logps)
        logps_gen, logps_twin, ref_twin = self._score_contexts(output, gen_prompt_ids, twin_prompt_ids, deferred)

        # The advantages (§2.5-2.7): A_i in the normal context, A^HE in the HE context.
        mask = loss_mask(output)
        if deferred:  # completed in the loss pass ([`_bonus_from_loss_pass`])
            logps_normal = logps_he = None
            adv_normal = adv_he = output["advantages"].unsqueeze(1).expand_as(mask).to(torch.float32)
        else:
            logps_normal, logps_he = by_context(is_he, logps_gen, logps_twin)
            adv_he, adv_normal = self._dual_mode_advantages(output["advantages"], logps_he, logps_normal, mask, is_he)

        # The rows each context trains. Eq. 10 (sharing): one row per rollout, as TRL has it, the normal context under
        # TRL's keys and the HE context's copy under `HE_KEY_PREFIX + key` ([`expand_contexts`] gives the 2B rows).
        sampling = output.get("sampling_per_token_logps")
        if self.args.rollout_sharing:
            normal_prompt_ids, he_prompt_ids = by_context(is_he, gen_prompt_ids, twin_prompt_ids)
            prompt_ids, prompt_mask = self._left_pad_prompts(normal_prompt_ids + he_prompt_ids)
            contexts = {"prompt_ids": prompt_ids.chunk(2), "prompt_mask": prompt_mask.chunk(2)}
            contexts["advantages"] = (adv_normal, adv_he)
            if old_logps is not None:
                contexts["old_per_token_logps"] = (logps_normal, logps_he)
            if ref_twin is not None:
                contexts["ref_per_token_logps"] = by_context(is_he, output["ref_per_token_logps"], ref_twin)
            if sampling is not None:  # the generating context's sampler gap, reused by the twin row (SPEC §2.11)
                contexts["sampling_per_token_logps"] = tuple(
                    context_sampling_logps(sampling, logps_gen, logps, mask) for logps in (logps_normal, logps_he)
                )
            for key, (normal_value, he_value) in contexts.items():
                output[key], output[HE_KEY_PREFIX + key] = normal_value, he_value
            # Both contexts' tokens count, so `dapo`/`cispo` stay a token mean over every (row, token) pair.
            output["num_items_in_batch"] = output["num_items_in_batch"] * 2
            if deferred:  # the loss pass puts its rows back in rollout order for the group statistics of Eq. 4
                output["policy_split_rollout"], output["policy_split_generated_he"] = rollout, is_he
            context_prompt_masks = contexts["prompt_mask"]
        else:  # Eq. 9: each rollout in the context that generated it
            output["advantages"] = torch.where(is_he.unsqueeze(1), adv_he, adv_normal)
            if sampling is not None:
                output["sampling_per_token_logps"] = context_sampling_logps(sampling, logps_gen, logps_gen, mask)
            output["policy_split_context"] = is_he.long()
            context_prompt_masks = (output["prompt_mask"][~is_he], output["prompt_mask"][is_he])
        if self.args.loss_aggregation == "quarter_token_mean":
            # Tokens of each generating mode over the whole generation batch (all processes): one reduction, always.
            local = torch.stack([(mask * (~is_he).unsqueeze(1)).sum(), (mask * is_he.unsqueeze(1)).sum()]).double()
            normal_tokens, he_tokens = self.accelerator.reduce(local, reduction="sum").tolist()
            output["policy_split_loss_weight"] = quarter_loss_weights(is_he, normal_tokens, he_tokens)
        self._plan_forward_passes(output, context_prompt_masks, output["completion_ids"].size(1))
        return output

    # ------------------------------------------------------------------ 3. the advantages (SPEC §2.5-2.7)
    def _dual_mode_advantages(
        self,
        advantages: torch.Tensor,
        logps_he: torch.Tensor,
        logps_normal: torch.Tensor,
        mask: torch.Tensor,
        is_he: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Both contexts' advantages from both contexts' log-probs of the same rollouts: the bonus (Eq. 6), normalized
        over all tokens of each group on all processes (Eq. 4), clipped into `A_i` (Eq. 3). The one pipeline, at
        generation and in the loss pass ([`_bonus_from_loss_pass`]); it logs the KL between the modes and the bonus.

        Args:
            advantages (`torch.Tensor`):
                Shape `(B,)`: `A_i` (Eq. 2) of the local rollouts, in generation order (whole groups across processes).
            logps_he, logps_normal (`torch.Tensor`):
                Shape `(B, T)`: detached log-probs of the rollouts' tokens in the HE and in the normal context.
            mask (`torch.Tensor`):
                Shape `(B, T)`: the tokens that count in the loss.
            is_he (`torch.Tensor`):
                Shape `(B,)`, bool: the rollouts generated in HE mode.

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: HE-context (`eta`) and normal-context (`eta'`) advantages, `(B, T)`.
        """
        args = self.args
        bonus = dual_mode_bonus(logps_he, logps_normal, args.alpha)
        normalized = self._normalize_bonus(bonus, mask, self._mode_split(train_or_eval(self.model))[0])
        adv_he = entropy_regularized_advantages(advantages, normalized, self._eta, args.kappa, args.eta_placement)
        adv_normal = entropy_regularized_advantages(
            advantages, normalized, args.normal_eta, args.kappa, args.eta_placement
        )
        self._log_bonus_metrics(is_he, logps_he, logps_normal, mask, advantages, normalized, adv_he)
        return adv_he, adv_normal

    def _normalize_bonus(self, bonus: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
        """Eq. 4 with the exact group statistic when a group's rollouts are spread over several processes."""
        # Gathering (count, mean, M2) per row instead of raw (B, T) tensors: exact, and independent of padding width.
        mean, std = group_mean_std(self.accelerator.gather(row_token_moments(bonus, mask)), group_size)
        start = self.accelerator.process_index * bonus.size(0)
        local = slice(start, start + bonus.size(0))
        return standardize_bonus(bonus, mask, mean[local], std[local])

    # ------------------------------------------------------------------ 4. the loss (SPEC §2.8-2.10)
    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """TRL's loss of one micro-batch, every rollout in both contexts (Eq. 10): one loss pass, or one per context."""
        with self._open_loss_step() as step:
            if self._train_contexts_separately(model, inputs):
                loss = self._compute_loss_by_context(model, inputs)
            else:  # a copy: the loss pass may complete the advantages, and the same micro-batch can be trained again
                loss = self._run_loss_pass(model, dict(expand_contexts(inputs)))
            self._log_context_entropies(step)
        return loss

    def _get_per_token_logps_and_entropies(
        self, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        inputs = self._take_loss_inputs()
        if inputs is not None:  # a loss pass's own call: keep its entropies, complete its advantages
            self._loss_step.entropies.append((inputs, None if entropies is None else entropies.detach()))
            advantages = inputs["advantages"]
            if "policy_split_rollout" in inputs:  # the bonus was deferred to this pass
                advantages = self._bonus_from_loss_pass(inputs, logps.detach())
            # A weight on the base term (polarity reweighting): after the bonus, whose clip uses the unweighted |A|.
            advantages = self._weight_base_term(inputs, advantages)
            if "policy_split_loss_weight" in inputs:  # `quarter_token_mean`: after the bonus, whose clip uses |A|
                weight = inputs["policy_split_loss_weight"]
                advantages = advantages * (weight.unsqueeze(1) if advantages.dim() == 2 else weight)
            inputs["advantages"] = advantages
        return logps, entropies, aux_loss

    def _weight_base_term(self, inputs: dict[str, Any], advantages: torch.Tensor) -> torch.Tensor:
        """
        Hook for a weight on the base term `A_i` of a loss pass's rows, applied after the bonus (SEED_METHODS §B.6):
        `polarity_reweighting` ([`~policy_split_trl.polarity.PolarityPolicySplitMixin`]) adds `(c omega - 1) A_i`
        here. Policy Split itself leaves the advantages unchanged.
        """
        return advantages

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # once per optimizer step: the eta in force during the step
            self._metrics["train"]["policy_split/eta"].append(self._eta)
        return loss

    # ------------------------------------------------------------------ 5. the metrics (per mode, Table 5)
    def _calculate_rewards(
        self, inputs: list[dict[str, Any]], prompts: list, completions: list, completion_ids_list: list[list[int]]
    ) -> torch.Tensor:
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # Reward and completion length per generating mode, logged here, where TRL hands over the gathered rewards.
        is_he = torch.tensor(
            [x["policy_split_mode"] == HIGH_ENTROPY_MODE for x in inputs], device=self.accelerator.device
        )
        self._log_mode_metrics(is_he, rewards_per_func, [len(ids) for ids in completion_ids_list])
        return rewards_per_func

    def _log_mode_metrics(self, is_he: torch.Tensor, rewards_per_func: torch.Tensor, lengths: list[int]) -> None:
        """Reward (total and per function) and completion length per generating mode, over all processes."""
        metrics = self._metrics[train_or_eval(self.model)]
        all_is_he = self.accelerator.gather(is_he.long()).bool()
        weights = self.reward_weights.to(rewards_per_func.device).unsqueeze(0)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        all_lengths = self.accelerator.gather(torch.tensor(lengths, device=self.accelerator.device, dtype=torch.float))
        for name, rows in ((NORMAL_MODE, ~all_is_he), (HIGH_ENTROPY_MODE, all_is_he)):
            metrics[f"policy_split/{name}/reward"].append(torch.nanmean(rewards[rows]).item())
            for i, func_name in enumerate(self.reward_func_names):
                mean = torch.nanmean(rewards_per_func[rows, i]).item()
                metrics[f"policy_split/{name}/rewards/{func_name}/mean"].append(mean)
            metrics[f"policy_split/{name}/completion_length"].append(all_lengths[rows].mean().item())

    def _log_bonus_metrics(
        self,
        is_he: torch.Tensor,
        logps_he: torch.Tensor,
        logps_normal: torch.Tensor,
        mask: torch.Tensor,
        advantages: torch.Tensor,
        normalized: torch.Tensor,
        adv_he: torch.Tensor,
    ) -> None:
        """KL between the modes and the bonus statistics, from both contexts' log-probs of the local rollouts."""
        args, mode = self.args, train_or_eval(self.model)
        # KL(pi_HE || pi) on HE-generated tokens (Table 5) and KL(pi || pi_HE) on normal-generated tokens.
        kl_he = forward_kl_estimate(logps_he, logps_normal, mask * is_he.unsqueeze(1))
        kl_normal = forward_kl_estimate(logps_normal, logps_he, mask * (~is_he).unsqueeze(1))
        # Bonus statistics over the tokens trained in the HE context.
        he_context_rows = torch.ones_like(is_he) if args.rollout_sharing else is_he
        bonus_mask = (mask * he_context_rows.unsqueeze(1)).bool()
        bonus_abs = torch.where(bonus_mask, (adv_he - advantages.unsqueeze(1)).abs(), 0.0).sum()
        clipped = bonus_hit_clip(advantages, normalized, self._eta, args.kappa, args.eta_placement) & bonus_mask
        local = torch.stack(
            [*kl_he, *kl_normal, bonus_abs.double(), bonus_mask.sum().double(), clipped.sum().double()]
        )
        kl_he_sum, kl_he_n, kl_n_sum, kl_n_n, abs_sum, bonus_n, clipped_n = self.accelerator.reduce(
            local, reduction="sum"
        ).tolist()
        if mode == "train" and args.eta_schedule == "adaptive":  # reduced over all processes: the same on each
            self._eta_controller.record_kl(kl_he_sum, kl_he_n)
        metrics = self._metrics[mode]
        for name, total, count in (
            ("kl_high_entropy_normal", kl_he_sum, kl_he_n),
            ("kl_normal_high_entropy", kl_n_sum, kl_n_n),
            ("bonus/abs_mean", abs_sum, bonus_n),
            ("bonus/clip_fraction", clipped_n, bonus_n),
        ):
            if count > 0:
                metrics[f"policy_split/{name}"].append(total / count)

    def _log_context_entropies(self, step: LossStep) -> None:
        """Mean token entropy of each context over the micro-batch's loss passes, in one reduction."""
        passes = step.entropies
        if not passes or "policy_split_context" not in passes[0][0] or any(e is None for _, e in passes):
            return
        sums = torch.zeros(4, device=self.accelerator.device)
        for rows, entropies in passes:
            mask = loss_mask(rows)
            for ctx in (NORMAL_CONTEXT, HIGH_ENTROPY_CONTEXT):
                ctx_mask = mask * (rows["policy_split_context"] == ctx).unsqueeze(1)
                sums[2 * ctx] += (entropies * ctx_mask).sum()
                sums[2 * ctx + 1] += ctx_mask.sum()
        totals = self.accelerator.reduce(sums, reduction="sum").tolist()
        mode = train_or_eval(self.model)
        if mode == "train" and self.args.eta_schedule == "adaptive":  # reduced over all processes: the same on each
            self._eta_controller.record_entropies(*totals)
        for name, (total, count) in zip(("normal_context", "high_entropy_context"), (totals[:2], totals[2:])):
            if count > 0:
                self._metrics[mode][f"policy_split/entropy/{name}"].append(total / count)
