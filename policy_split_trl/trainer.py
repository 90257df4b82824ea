from __future__ import annotations

import contextlib
import json
import math
import os
import textwrap
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.grpo_trainer import RewardFunc
from trl.trainer.utils import pad, use_adapter

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
from .config import PolicySplitGRPOConfig, resolve_config
from .diagnostics import ModeDiagnosticsMixin
from .eta_control import EtaControllerCallback, check_eta_schedule
from .hub import modes_card_section, policy_split_metadata, write_policy_split_json
from .loss_pass import LossPassAdvantagesMixin, loss_mask
from .modes import HIGH_ENTROPY_MODE, NORMAL_MODE, apply_system_prompt, high_entropy_rows
from .safety import SafeTrainingMixin

# Keys TRL adds for multimodal models; their rows cannot simply be duplicated into a second context.
_MULTIMODAL_KEYS = ("pixel_values", "num_images", "image_grid_thw", "token_type_ids", "mm_token_type_ids")

NORMAL_CONTEXT, HIGH_ENTROPY_CONTEXT = 0, 1


def context_sampling_logps(
    sampling_logps: torch.Tensor, logps_generating: torch.Tensor, logps_context: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """
    Sampler log-probs for a row trained in any context, carrying the generating context's sampler/trainer gap.

    vLLM reports `log pi_vllm(o_t | generating context)`. A twin row trained in the other context must get the *same*
    correction (SPEC §2.11), never a ratio between the two contexts, which would mask almost every shared row. So the
    gap `log pi_vllm - log pi_old` measured in the generating context is added to the row's own `log pi_old`. Tokens
    that vLLM could not score (NaN) and padding get a gap of 0, i.e. no correction and never a NaN in the loss.

    Args:
        sampling_logps (`torch.Tensor`):
            Shape `(B, T)`: the sampler's log-probs in the generating context (may contain NaN).
        logps_generating (`torch.Tensor`):
            Shape `(B, T)`: trainer (old-policy) log-probs in the generating context.
        logps_context (`torch.Tensor`):
            Shape `(B, T)`: trainer (old-policy) log-probs in the context the row is trained in.
        mask (`torch.Tensor`):
            Shape `(B, T)`.

    Returns:
        `torch.Tensor`: shape `(B, T)`, finite wherever the inputs `logps_*` are.
    """
    gap = sampling_logps - logps_generating
    gap = torch.where(mask.bool() & ~torch.isnan(gap), gap, torch.zeros_like(gap))
    return logps_context + gap


def shared_left_padding(attention_mask: torch.Tensor, prompt_width: int) -> int:
    """Columns of left padding that every row of a left-padded batch has: what a forward pass can cut off."""
    return int(attention_mask[:, :prompt_width].any(0).float().argmax())


def width_sorted_chunks(attention_mask: torch.Tensor, logits_to_keep: int, num_chunks: int) -> list[torch.Tensor]:
    """
    Rows of a left-padded batch in `num_chunks` forward passes, rows with similar prompt widths together, so that each
    pass can be cut to its own width.

    The number of passes is `min(num_chunks, N)` whatever the rows hold: under ZeRO-3 and FSDP every process must call
    forward the same number of times, so only the *grouping* of rows may depend on the data, never the count.

    Args:
        attention_mask (`torch.Tensor`):
            Shape `(N, L)`, prompts left-padded, the last `logits_to_keep` columns the completions.
        logits_to_keep (`int`):
            Width of the completion part (its right padding never moves a row).
        num_chunks (`int`):
            Number of forward passes, `>= 1`.

    Returns:
        `list[torch.Tensor]`: `min(num_chunks, N)` sorted index tensors (nearly equal sizes) that partition `range(N)`.
    """
    num_rows = attention_mask.size(0)
    everything = torch.arange(num_rows, device=attention_mask.device)
    if num_chunks <= 1 or num_rows < 2:
        return [everything]
    prompt_width = attention_mask.size(1) - logits_to_keep
    prompt = attention_mask[:, : max(prompt_width, 0)].bool()
    # Columns of left padding before each row's prompt (a row without prompt tokens: all of them).
    starts = torch.where(prompt.any(1), prompt.float().argmax(1), torch.full_like(everything, prompt_width))
    order = torch.argsort(starts, stable=True)
    return [chunk.sort().values for chunk in order.tensor_split(min(num_chunks, num_rows))]


def forward_plan(positions: torch.Tensor, min_saving: float = 0.1) -> tuple[int, int]:
    """
    How the loss passes of a generation batch are cut, decided once from statistics summed over every process so that
    all processes make the same number of forward/backward passes (ZeRO-3/FSDP hang and DDP/gloo crash otherwise).

    Args:
        positions (`torch.Tensor`):
            Shape `(4,)`, summed over processes: token positions of one pass over all rows padded together, of the rows
            run at their own context's width, of the normal-context rows and of the high-entropy-context rows.
        min_saving (`float`, *optional*, defaults to `0.1`):
            Smallest fraction of positions a second forward pass must save.

    Returns:
        `tuple[int, int]`: forward passes of a loss pass over both contexts (2 when the contexts' own widths save at
        least `min_saving`, else 1), and how many chunks the high-entropy rows are trained in when the contexts are
        trained one after the other (about the normal rows' positions per chunk, for the same peak memory).
    """
    joint, split, normal, high_entropy = positions.tolist()
    forward_chunks = 2 if split <= (1.0 - min_saving) * joint else 1
    he_chunks = max(1, math.ceil(high_entropy / max(normal, 1.0)))
    return forward_chunks, he_chunks


# Per-rollout tensors that differ between the two contexts. With rollout sharing, a generation batch keeps TRL's one row
# per rollout and carries the high-entropy context's copy of each under `HE_KEY_PREFIX + key`: TRL shuffles and splits
# rows, so a rollout's two contexts stay in the same micro-batch on every process.
CONTEXT_KEYS = (
    "prompt_ids",
    "prompt_mask",
    "advantages",
    "old_per_token_logps",
    "ref_per_token_logps",
    "sampling_per_token_logps",
)
HE_KEY_PREFIX = "policy_split_he_"


def _is_row_tensor(value: Any, num_rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == num_rows


def _loss_tokens(batch: dict[str, Any]) -> float:
    return float(loss_mask(batch).sum())


def select_rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The rows `rows` of every per-row tensor of `batch` (scalars such as `num_items_in_batch` kept as they are)."""
    num_rows = batch["completion_ids"].size(0)
    return {key: value[rows] if _is_row_tensor(value, num_rows) else value for key, value in batch.items()}


def context_rows(batch: dict[str, Any], context: int) -> dict[str, Any]:
    """
    One context's rows of a generation batch with rollout sharing: every rollout once, with that context's prompt,
    advantages and log-probs, and `policy_split_context` set to `context`.
    """
    num_rows = batch["completion_ids"].size(0)
    out = {key: value for key, value in batch.items() if not key.startswith(HE_KEY_PREFIX)}
    if context == HIGH_ENTROPY_CONTEXT:
        for key in CONTEXT_KEYS:
            if HE_KEY_PREFIX + key in batch:
                out[key] = batch[HE_KEY_PREFIX + key]
    out["policy_split_context"] = torch.full((num_rows,), context, device=batch["completion_ids"].device)
    return out


def expand_contexts(batch: dict[str, Any]) -> dict[str, Any]:
    """
    The rows a loss pass trains, from a generation batch: with rollout sharing, rows `[0, B)` are every rollout in the
    normal context and rows `[B, 2B)` every rollout in the high-entropy context (Eq. 10), with `policy_split_context`
    0/1; without sharing the batch already is one row per rollout in its generating context (Eq. 9).
    """
    if HE_KEY_PREFIX + "prompt_ids" not in batch:
        return batch
    normal, high_entropy = context_rows(batch, NORMAL_CONTEXT), context_rows(batch, HIGH_ENTROPY_CONTEXT)
    num_rows = batch["completion_ids"].size(0)
    return {
        key: torch.cat([value, high_entropy[key]]) if _is_row_tensor(value, num_rows) else value
        for key, value in normal.items()
    }


class PolicySplitGRPOTrainer(ModeDiagnosticsMixin, LossPassAdvantagesMixin, SafeTrainingMixin, GRPOTrainer):
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
    generation (transformers or vLLM), rewards, the clipped surrogate of every `loss_type`, KL to a reference,
    PEFT, distributed training — is TRL's own. Only three things are added to TRL's generation step: the HE prompt
    on the HE rollouts, the other context's log-probs, and the rows/advantages built from them. With
    `optimized_step` (default) the other context's log-probs come from the loss pass itself when training is
    on-policy (no scoring pass), each context runs at its own width, and the contexts are backpropagated one after
    the other ([`PolicySplitGRPOConfig.optimized_step`]).

    Distributed by construction: at every micro-step, every process makes the same number of forward passes, backward
    passes and collectives, whatever its rows hold (ZeRO-3 and FSDP hang otherwise, DDP over gloo crashes). A row of
    the generation batch is a rollout carrying both of its contexts, so TRL's shuffle and split keep the two together
    and every micro-batch holds the same structure on every process; whether the contexts are trained one after the
    other depends on the configuration only; how many forward passes a loss pass makes and in how many chunks the
    high-entropy rows are trained is planned once per generation batch from statistics summed over all processes
    ([`forward_plan`]); scoring passes make TRL's number of forward passes (one per `batch_size` rows). Group
    statistics (Eq. 2, Eq. 4) are taken over all processes, never over a local slice.

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
        super().__init__(model, reward_funcs, args=args, **kwargs)
        # The `eta` in force and the adaptive controller's state, saved in and restored from checkpoints.
        self.add_callback(EtaControllerCallback(args.eta))
        self._policy_split_rewards: torch.Tensor | None = None
        self._policy_split_lengths: list[int] | None = None
        self._policy_split_entropies: torch.Tensor | None = None
        self._deferred_normal: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ what a saved model carries
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        # Next to the weights of every checkpoint and of the final model (full or adapter): the modes and their exact
        # prompts, so that inference uses what training used.
        write_policy_split_json(output_dir or self.args.output_dir, self.args)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        eval_results: str | dict | None = None,
    ) -> None:
        """
        TRL's model card plus a "Modes" section (how to call each mode, the recipe, and the latest per-mode metrics).

        Args:
            model_name, dataset_name, tags:
                As in TRL.
            eval_results (`str` or `dict`, *optional*):
                A `policy-split-eval` `results.json` (path or content) whose per-mode metrics go into the card.
        """
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        if isinstance(eval_results, str):
            with open(eval_results) as f:
                eval_results = json.load(f)
        model_id = self.hub_model_id or model_name or os.path.basename(os.path.normpath(self.args.output_dir))
        path = os.path.join(self.args.output_dir, "README.md")
        with open(path, "a") as f:
            f.write("\n" + modes_card_section(policy_split_metadata(self.args), model_id, eval_results))

    # ------------------------------------------------------------------ small hooks into TRL
    @property
    def _eta_controller(self) -> EtaControllerCallback | None:
        # Looked up, not kept: transformers replaces the callback object when it restores callback states on resume.
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, EtaControllerCallback):
                return callback
        return None

    @property
    def _eta(self) -> float:
        """The `eta` of Eq. 3 in force: `args.eta` (`eta_schedule="constant"`), or the adaptive controller's."""
        if self.args.eta_schedule == "constant":
            return self.args.eta
        controller = self._eta_controller
        if controller is None:
            raise RuntimeError(
                "eta_schedule='adaptive' needs the trainer's EtaControllerCallback, which was removed from its "
                "callbacks. Keep it (it holds the current eta), or use eta_schedule='constant'."
            )
        return controller.eta

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # once per optimizer step: the eta in force during the step
            self._metrics["train"]["policy_split/eta"].append(self._eta)
        return loss

    def _mode_split(self, mode: str) -> tuple[int, int]:
        """`(G, number of HE rollouts per group)` for `"train"` or `"eval"`."""
        if mode == "train":
            return self.num_generations, self.args.num_high_entropy_generations
        return self.num_generations_eval, self.args.num_high_entropy_generations_eval

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
            group_size, num_he = self._mode_split("train" if self.model.training else "eval")
            if num_generations == group_size:
                num_generations = math.gcd(group_size - num_he, num_he)
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)

    def _calculate_rewards(
        self, inputs: list[dict[str, Any]], prompts: list, completions: list, completion_ids_list: list[list[int]]
    ) -> torch.Tensor:
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # Kept for the per-mode metrics; TRL does not return them from `_generate_and_score_completions`.
        self._policy_split_rewards = rewards_per_func
        self._policy_split_lengths = [len(ids) for ids in completion_ids_list]
        return rewards_per_func

    def _get_per_token_logps_and_entropies(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        def forward(rows: torch.Tensor | None, start: int = 0) -> tuple:
            all_rows = rows is None or rows.numel() == input_ids.size(0)
            ids, mask = (input_ids, attention_mask) if all_rows else (input_ids[rows], attention_mask[rows])
            return super(PolicySplitGRPOTrainer, self)._get_per_token_logps_and_entropies(
                model, ids[:, start:], mask[:, start:], logits_to_keep, batch_size=None if rows is not None else
                batch_size, compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **kwargs,
            )  # fmt: skip

        multimodal = any(value is not None for value in kwargs.values())
        if not self.args.optimized_step or multimodal:
            logps, entropies, aux_loss = forward(None)
        else:
            # TRL's number of forward passes (one per `batch_size` rows; a loss pass: the count planned for the whole
            # generation batch), rows of similar prompt width together, each pass cut to its own width: no pass pays
            # for the other context's prompt padding, and every process makes the same number of passes.
            num_rows = input_ids.size(0)
            num_chunks = math.ceil(num_rows / batch_size) if batch_size else self._loss_forward_chunks()
            prompt_width = attention_mask.size(1) - logits_to_keep
            groups = width_sorted_chunks(attention_mask, logits_to_keep, num_chunks)
            parts = [forward(rows, shared_left_padding(attention_mask[rows], prompt_width)) for rows in groups]
            if len(parts) == 1:
                logps, entropies, aux_loss = parts[0]
            else:
                restore = torch.argsort(torch.cat(groups))
                logps = torch.cat([p[0] for p in parts])[restore]
                entropies = torch.cat([p[1] for p in parts])[restore] if compute_entropy else None
                aux_loss = (
                    sum(p[2] * len(rows) for p, rows in zip(parts, groups, strict=True)) / num_rows
                    if compute_aux_loss
                    else None
                )
        # The loss pass computes per-token entropies; kept so `_compute_loss` can log them per context.
        self._policy_split_entropies = None if entropies is None else entropies.detach()
        inputs = self._take_loss_inputs()
        if inputs is not None:
            advantages = inputs["advantages"]
            if "policy_split_rollout" in inputs:
                advantages = self._bonus_from_loss_pass(inputs, logps.detach())
            if "policy_split_loss_weight" in inputs:  # `quarter_token_mean`: after the bonus, whose clip uses |A|
                weight = inputs["policy_split_loss_weight"]
                advantages = advantages * (weight.unsqueeze(1) if advantages.dim() == 2 else weight)
            inputs["advantages"] = advantages
        return logps, entropies, aux_loss

    def _loss_forward_chunks(self) -> int:
        """Forward passes of the loss pass in progress, as planned for its generation batch ([`forward_plan`])."""
        inputs = self._loss_inputs
        return 1 if inputs is None else int(inputs.get("policy_split_forward_chunks", 1))

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """
        The loss of one micro-batch (one row per rollout, both contexts of each with rollout sharing).

        Rank-uniform by construction: every process runs the same number of loss passes, forward and backward passes
        and collectives for every micro-batch, whatever its rows hold. A micro-batch always holds both contexts of its
        rollouts (TRL shuffles and splits rollouts, never a rollout's two contexts), whether the contexts are trained
        one after the other depends on the configuration only, and the numbers of forward passes and high-entropy
        chunks come from the generation batch's plan, which is taken over all processes ([`forward_plan`]).
        """
        if self._train_contexts_separately(model, inputs):
            parts = self._compute_loss_by_context(model, inputs)
        else:
            # A copy: the loss pass may complete the advantages, and the same micro-batch can be trained again.
            rows = dict(expand_contexts(inputs))
            parts = [(self._run_loss_pass(model, rows), rows, self._policy_split_entropies)]
        self._policy_split_entropies = None
        self._log_context_entropies([(part, entropies) for _, part, entropies in parts])
        return sum((loss for loss, _, _ in parts[1:]), parts[0][0])

    def _log_context_entropies(self, parts: list[tuple[dict[str, Any], torch.Tensor | None]]) -> None:
        """Mean token entropy of each context over the micro-batch's loss passes, in one reduction."""
        if "policy_split_context" not in parts[0][0] or any(entropies is None for _, entropies in parts):
            return
        sums = torch.zeros(4, device=self.accelerator.device)
        for part, entropies in parts:
            mask = loss_mask(part)
            for ctx in (NORMAL_CONTEXT, HIGH_ENTROPY_CONTEXT):
                ctx_mask = mask * (part["policy_split_context"] == ctx).unsqueeze(1)
                sums[2 * ctx] += (entropies * ctx_mask).sum()
                sums[2 * ctx + 1] += ctx_mask.sum()
        totals = self.accelerator.reduce(sums, reduction="sum").tolist()
        mode = "train" if self.model.training else "eval"
        if mode == "train" and self.args.eta_schedule == "adaptive":  # reduced over all processes: the same on each
            self._eta_controller.record_entropies(*totals)
        for name, (total, count) in zip(("normal_context", "high_entropy_context"), (totals[:2], totals[2:])):
            if count > 0:
                self._metrics[mode][f"policy_split/entropy/{name}"].append(total / count)

    # ------------------------------------------------------------------ the optimized step (`optimized_step`)
    def _train_contexts_separately(self, model: torch.nn.Module, inputs: dict[str, Any]) -> bool:
        """
        Forward/backward each context's rows on their own (peak activation memory of one context, not both). Decided
        from the configuration alone, never from the rows, so that every process makes the same passes.
        """
        args = self.args
        return (
            args.optimized_step
            and HE_KEY_PREFIX + "prompt_ids" in inputs  # rollout sharing: both contexts of every rollout
            and model.training
            and torch.is_grad_enabled()
            # A second backward inside one micro-step is plain gradient accumulation for DDP (under no_sync); ZeRO and
            # FSDP reduce gradients in their own hooks, and the entropy terms below are means over the whole batch.
            and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
            and not self._entropy_bonus_enabled
            and self.top_entropy_quantile >= 1.0
            and not self.aux_loss_enabled
            and args.normal_eta == 0.0
        )

    def _loss_share(self, part: dict[str, Any], num_rows: int, num_tokens: float) -> float:
        """Weight of a part's loss in the loss of the whole micro-batch (`num_rows` rows over both contexts, of which
        `num_tokens` count in the loss), by how each `loss_type` normalizes."""
        if self.loss_type in ("dapo", "cispo", "vespo"):  # a sum divided by a batch-independent count
            return 1.0
        if self.loss_type == "bnpo":  # a token mean over the micro-batch (the tokens that count in the loss)
            return _loss_tokens(part) / max(num_tokens, 1.0)
        return part["completion_ids"].size(0) / num_rows  # a mean over rows

    def _compute_loss_by_context(
        self, model: torch.nn.Module, inputs: dict[str, Any]
    ) -> list[tuple[torch.Tensor, dict[str, Any], torch.Tensor | None]]:
        """
        The micro-batch's loss as several forward/backward passes: every rollout in the normal context, then in the HE
        context, in the planned number of chunks (about the normal rows' positions each) when their advantages are
        already complete (a deferred bonus needs all HE rows in one pass). Every part but the last is forward- and
        backward-ed here under DDP's `no_sync` (DDP prepares its gradient all-reduce at forward time), so the step makes
        one all-reduce, at the last part's backward, which the trainer runs on the returned loss. The weighted parts sum
        to the whole batch's loss; the gradient is the same, the peak activation memory about that of one context.

        Returns:
            `list[tuple]`: `(loss, rows, entropies)` of each part; the losses of all parts but the last are detached.
        """
        normal = context_rows(inputs, NORMAL_CONTEXT)
        high_entropy = context_rows(inputs, HIGH_ENTROPY_CONTEXT)
        num_rows = inputs["completion_ids"].size(0)
        he_chunks = 1 if "policy_split_rollout" in inputs else int(inputs.get("policy_split_he_chunks", 1))
        chunks = torch.arange(num_rows, device=normal["completion_ids"].device).tensor_split(min(he_chunks, num_rows))
        parts = [normal] + [select_rows(high_entropy, rows) for rows in chunks]
        for part in parts:  # one context per part: one forward pass each (the plan's count is for both contexts)
            part["policy_split_forward_chunks"] = 1
        total_tokens = 2.0 * _loss_tokens(normal)
        results = []
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                loss = self._run_loss_pass(model, part) * self._loss_share(part, 2 * num_rows, total_tokens)
                if not last:
                    # Nothing later needs this part's graph (normal rows: normal_eta = 0), so its activations go now.
                    self.accelerator.backward(loss)
                    loss = loss.detach()
            results.append((loss, part, self._policy_split_entropies))
        self._deferred_normal = None
        return results

    def _bonus_from_loss_pass(self, inputs: dict[str, Any], logps: torch.Tensor) -> torch.Tensor:
        """
        Advantages of the rows of a loss pass whose bonus was deferred from the generation step: on-policy
        (`num_iterations` 1, one micro-batch per generation batch), this pass's log-probs are the old policy's, so no
        separate scoring pass is needed. Needs both contexts of every rollout: in this pass, or the normal context's
        from the pass just before (`_compute_loss_by_context`).
        """
        context, rollout = inputs["policy_split_context"], inputs["policy_split_rollout"]
        advantages = inputs["advantages"]
        is_normal_row = context == NORMAL_CONTEXT
        if bool(is_normal_row.all()):  # the first of two passes: keep the normal context's log-probs for the second
            self._deferred_normal = (rollout, logps)
            return advantages
        he_rows = torch.nonzero(~is_normal_row).squeeze(1)
        he_rows = he_rows[torch.argsort(rollout[he_rows])]
        if bool(is_normal_row.any()):
            normal_rollout, normal_logps = rollout, logps
            normal_rows = torch.nonzero(is_normal_row).squeeze(1)
        else:
            normal_rollout, normal_logps = self._deferred_normal
            normal_rows = torch.arange(normal_rollout.size(0), device=logps.device)
        normal_rows = normal_rows[torch.argsort(normal_rollout[normal_rows])]
        if not torch.equal(normal_rollout[normal_rows], rollout[he_rows]):
            raise RuntimeError("Policy Split: a loss pass does not hold both contexts of its rollouts.")
        # In rollout order (the generation step's): rows of the same rollout, one per context, share their tokens.
        logps_he, logps_normal = logps[he_rows], normal_logps[normal_rows]
        is_he = inputs["policy_split_generated_he"][he_rows]
        mask = loss_mask(inputs)[he_rows]
        base = advantages[he_rows, 0]
        mode = "train" if self.model.training else "eval"
        group_size = self._mode_split(mode)[0]
        normalized = self._normalize_bonus(dual_mode_bonus(logps_he, logps_normal, self.args.alpha), mask, group_size)
        args = self.args
        adv_he = entropy_regularized_advantages(base, normalized, self._eta, args.kappa, args.eta_placement)
        # In the log-probs' precision, as when the bonus comes from the generation step.
        shaped = advantages.to(torch.promote_types(advantages.dtype, adv_he.dtype), copy=True)
        shaped[he_rows] = adv_he.to(shaped.dtype)
        if bool(is_normal_row.any()) and args.normal_eta != 0.0:
            adv_normal = entropy_regularized_advantages(
                base, normalized, args.normal_eta, args.kappa, args.eta_placement
            )
            shaped[normal_rows] = adv_normal.to(shaped.dtype)
        self._log_bonus_metrics(
            mode, is_he, logps_he, logps_normal, mask, base, normalized, adv_he, torch.ones_like(is_he)
        )
        return shaped

    # ------------------------------------------------------------------ scoring helpers
    def _left_pad_prompts(self, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        ids = [torch.tensor(p, dtype=torch.long) for p in prompt_ids]
        padded = pad(
            ids,
            padding_value=self._tokenizer.pad_token_id,
            padding_side="left",
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        mask = pad(
            [torch.ones_like(t) for t in ids],
            padding_value=0,
            padding_side="left",
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        return padded.to(device), mask.to(device)

    def _score(
        self,
        prompt_ids: list[list[int]],
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        batch_size: int,
        reference: bool = False,
    ) -> torch.Tensor:
        """Per-token log-probs of `completion_ids` after `prompt_ids`, by the policy or the reference model."""
        prompt_tensor, prompt_mask = self._left_pad_prompts(prompt_ids)
        input_ids = torch.cat([prompt_tensor, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        if not reference:
            return self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size
            )[0]
        if self.ref_model is not None:
            return self._get_per_token_logps_and_entropies(
                self.ref_model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size
            )[0]
        # PEFT: the reference is the adapter-disabled model (or the "ref" adapter), exactly as in TRL.
        unwrapped = self.accelerator.unwrap_model(self.model)
        with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
            return self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size
            )[0]

    def _normalize_bonus(self, bonus: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
        """Eq. 4 with the exact group statistic when a group's rollouts are spread over several processes."""
        # Gathering (count, mean, M2) per row instead of raw (B, T) tensors: exact, and independent of padding width.
        mean, std = group_mean_std(self.accelerator.gather(row_token_moments(bonus, mask)), group_size)
        start = self.accelerator.process_index * bonus.size(0)
        local = slice(start, start + bonus.size(0))
        return standardize_bonus(bonus, mask, mean[local], std[local])

    # ------------------------------------------------------------------ the Policy Split generation step
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        group_size, num_he = self._mode_split(mode)
        num_rows = len(inputs)
        process_index = self.accelerator.process_index

        # Mode of each rollout, from its global index so a group split across processes is split exactly.
        global_index = process_index * num_rows + torch.arange(num_rows, device=device)
        is_he = high_entropy_rows(global_index, group_size, num_he)
        he_flags = is_he.tolist()
        normal_prompts = [x["prompt"] for x in inputs]
        he_prompts = [apply_system_prompt(p, self.args.high_entropy_system_prompt) for p in normal_prompts]
        # `policy_split_mode` reaches the reward functions as a keyword, like any dataset column.
        mode_inputs = [
            {
                **x,
                "prompt": he if flag else x["prompt"],
                "policy_split_mode": HIGH_ENTROPY_MODE if flag else NORMAL_MODE,
            }
            for x, he, flag in zip(inputs, he_prompts, he_flags, strict=True)
        ]
        output = super()._generate_and_score_completions(mode_inputs)
        if any(key in output for key in _MULTIMODAL_KEYS):
            raise NotImplementedError("PolicySplitGRPOTrainer supports text-only models for now.")

        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        mask = loss_mask(output)
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        gen_prompt_ids = [
            ids[m.bool()].tolist() for ids, m in zip(output["prompt_ids"], output["prompt_mask"], strict=True)
        ]
        twin_prompts = [p if flag else he for p, he, flag in zip(normal_prompts, he_prompts, he_flags, strict=True)]
        twin_prompt_ids = self._tokenize_prompts(twin_prompts)[0]

        # Log-probs of both contexts under the policy that generated the rollouts. TRL's `old_per_token_logps`
        # already covers the generating context when it exists; otherwise both contexts go through one pass.
        old_gen = output.get("old_per_token_logps")
        deferred = self._defer_bonus_to_loss_pass(mode, old_gen)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if deferred:
                logps_gen = logps_twin = None  # the loss pass has both contexts' log-probs: no scoring pass
            elif old_gen is None:
                logps = self._score(
                    gen_prompt_ids + twin_prompt_ids,
                    completion_ids.repeat(2, 1),
                    completion_mask.repeat(2, 1),
                    batch_size,
                )
                logps_gen, logps_twin = logps.chunk(2)
            else:
                logps_gen = old_gen
                logps_twin = self._score(twin_prompt_ids, completion_ids, completion_mask, batch_size)
            ref_twin = (
                self._score(twin_prompt_ids, completion_ids, completion_mask, batch_size, reference=True)
                if self.beta != 0.0
                else None
            )

        he_col = is_he.unsqueeze(1)
        advantages = output["advantages"]
        args = self.args
        self._log_mode_metrics(mode, is_he)
        if deferred:
            # The HE context's advantages are completed by the loss pass, which puts its rows back in generation
            # order (TRL shuffles them) through `policy_split_rollout` for the group statistics of Eq. 4.
            logps_normal = logps_he = None
            adv_normal = adv_he = advantages.unsqueeze(1).expand_as(completion_mask).to(torch.float32)
        else:
            logps_he = torch.where(he_col, logps_gen, logps_twin)
            logps_normal = torch.where(he_col, logps_twin, logps_gen)
            # Eq. 6 -> Eq. 4 (exact group statistics from gathered per-row moments) -> Eq. 3.
            bonus = dual_mode_bonus(logps_he, logps_normal, args.alpha)
            normalized = self._normalize_bonus(bonus, mask, group_size)
            adv_he = entropy_regularized_advantages(advantages, normalized, self._eta, args.kappa, args.eta_placement)
            adv_normal = entropy_regularized_advantages(
                advantages, normalized, args.normal_eta, args.kappa, args.eta_placement
            )

        sampling = output.get("sampling_per_token_logps")
        if args.rollout_sharing:
            # One row per rollout, as TRL has it: the normal context under TRL's keys, the HE context's copy of the
            # prompt, advantages and log-probs under `HE_KEY_PREFIX + key` (`expand_contexts` gives the 2B rows).
            normal_ctx_prompts = [
                t if f else g for g, t, f in zip(gen_prompt_ids, twin_prompt_ids, he_flags, strict=True)
            ]
            he_ctx_prompts = [g if f else t for g, t, f in zip(gen_prompt_ids, twin_prompt_ids, he_flags, strict=True)]
            prompt_ids, prompt_mask = self._left_pad_prompts(normal_ctx_prompts + he_ctx_prompts)
            contexts = {"prompt_ids": prompt_ids.chunk(2), "prompt_mask": prompt_mask.chunk(2)}
            contexts["advantages"] = (adv_normal, adv_he)
            if old_gen is not None:
                contexts["old_per_token_logps"] = (logps_normal, logps_he)
            if ref_twin is not None:
                ref_gen = output["ref_per_token_logps"]
                contexts["ref_per_token_logps"] = (
                    torch.where(he_col, ref_twin, ref_gen),
                    torch.where(he_col, ref_gen, ref_twin),
                )
            if sampling is not None:  # the generating context's sampler gap, reused by the twin row (SPEC §2.11)
                contexts["sampling_per_token_logps"] = (
                    context_sampling_logps(sampling, logps_gen, logps_normal, mask),
                    context_sampling_logps(sampling, logps_gen, logps_he, mask),
                )
            for key, (normal_value, he_value) in contexts.items():
                output[key], output[HE_KEY_PREFIX + key] = normal_value, he_value
            # Both contexts' tokens count, so `dapo`/`cispo` stay a token mean over every (row, token) pair.
            output["num_items_in_batch"] = output["num_items_in_batch"] * 2
            if deferred:
                output["policy_split_rollout"] = global_index
                output["policy_split_generated_he"] = is_he
            he_context_rows = torch.ones_like(is_he)
            context_widths = [self._prompt_widths(p) for p in contexts["prompt_mask"]]
        else:
            output["advantages"] = torch.where(he_col, adv_he, adv_normal)
            if sampling is not None:
                output["sampling_per_token_logps"] = context_sampling_logps(sampling, logps_gen, logps_gen, mask)
            output["policy_split_context"] = is_he.long()
            he_context_rows = is_he
            context_widths = [self._prompt_widths(output["prompt_mask"][rows]) for rows in (~is_he, is_he)]
        if args.loss_aggregation == "quarter_token_mean":
            # Tokens of each generating mode over the whole generation batch (all processes): one reduction, always.
            local = torch.stack([(mask * (~is_he).unsqueeze(1)).sum(), (mask * he_col).sum()]).double()
            normal_tokens, he_tokens = self.accelerator.reduce(local, reduction="sum").tolist()
            output["policy_split_loss_weight"] = quarter_loss_weights(is_he, normal_tokens, he_tokens)
        self._plan_forward_passes(output, context_widths, completion_ids.size(1))

        if not deferred:
            self._log_bonus_metrics(
                mode, is_he, logps_he, logps_normal, mask, advantages, normalized, adv_he, he_context_rows
            )
        return output

    @staticmethod
    def _prompt_widths(prompt_mask: torch.Tensor) -> tuple[int, int]:
        """`(rows, width of their prompts once the padding they all share is cut)`."""
        if prompt_mask.size(0) == 0:
            return 0, 0
        return prompt_mask.size(0), prompt_mask.size(1) - shared_left_padding(prompt_mask, prompt_mask.size(1))

    def _plan_forward_passes(
        self, output: dict[str, Any], context_widths: list[tuple[int, int]], completion_width: int
    ) -> None:
        """
        Store the generation batch's plan of forward passes ([`forward_plan`]) as scalars that every micro-batch cut
        from it carries: one reduction over all processes, so that every process makes the same passes.
        """
        (normal_rows, normal_width), (he_rows, he_width) = context_widths
        normal = normal_rows * (normal_width + completion_width)
        high_entropy = he_rows * (he_width + completion_width)
        joint = (normal_rows + he_rows) * (max(normal_width, he_width) + completion_width)
        local = torch.tensor([joint, normal + high_entropy, normal, high_entropy], device=self.accelerator.device)
        forward_chunks, he_chunks = forward_plan(self.accelerator.reduce(local.double(), reduction="sum"))
        device = self.accelerator.device
        output["policy_split_forward_chunks"] = torch.tensor(forward_chunks, device=device)
        output["policy_split_he_chunks"] = torch.tensor(he_chunks, device=device)

    def _defer_bonus_to_loss_pass(self, mode: str, old_logps: torch.Tensor | None) -> bool:
        """
        Whether the loss pass can supply the bonus instead of a scoring pass: on-policy (TRL computed no old log-probs,
        no vLLM sampler to correct), with sharing (the loss pass sees both contexts of every rollout), and one
        micro-batch per generation batch (whole groups, every rollout).
        """
        args = self.args
        return (
            args.optimized_step
            and args.bonus_from_loss_pass
            and args.rollout_sharing
            and old_logps is None
            and not self.use_vllm
            and not args.use_liger_kernel
            and (mode == "eval" or args.steps_per_generation == 1)
        )

    # ------------------------------------------------------------------ metrics
    def _log_mode_metrics(self, mode: str, is_he: torch.Tensor) -> None:
        """Reward and completion length per generating mode."""
        metrics = self._metrics[mode]
        device = self.accelerator.device
        all_is_he = self.accelerator.gather(is_he.long()).bool()

        rewards_per_func = self._policy_split_rewards
        weights = self.reward_weights.to(rewards_per_func.device).unsqueeze(0)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        lengths = self.accelerator.gather(torch.tensor(self._policy_split_lengths, device=device, dtype=torch.float))
        for name, rows in ((NORMAL_MODE, ~all_is_he), (HIGH_ENTROPY_MODE, all_is_he)):
            metrics[f"policy_split/{name}/reward"].append(torch.nanmean(rewards[rows]).item())
            for i, func_name in enumerate(self.reward_func_names):
                metrics[f"policy_split/{name}/rewards/{func_name}/mean"].append(
                    torch.nanmean(rewards_per_func[rows, i]).item()
                )
            metrics[f"policy_split/{name}/completion_length"].append(lengths[rows].mean().item())

    def _log_bonus_metrics(
        self,
        mode: str,
        is_he: torch.Tensor,
        logps_he: torch.Tensor,
        logps_normal: torch.Tensor,
        mask: torch.Tensor,
        advantages: torch.Tensor,
        normalized: torch.Tensor,
        adv_he: torch.Tensor,
        he_context_rows: torch.Tensor,
    ) -> None:
        """KL between the modes and the bonus statistics, from both contexts' log-probs of the local rollouts."""
        metrics = self._metrics[mode]
        args = self.args
        # KL(pi_HE || pi) on HE-generated tokens (Table 5) and KL(pi || pi_HE) on normal-generated tokens.
        he_mask = mask * is_he.unsqueeze(1)
        normal_mask = mask * (~is_he).unsqueeze(1)
        kl_he = forward_kl_estimate(logps_he, logps_normal, he_mask)
        kl_normal = forward_kl_estimate(logps_normal, logps_he, normal_mask)
        # Bonus statistics over the tokens trained in the HE context.
        bonus_mask = (mask * he_context_rows.unsqueeze(1)).bool()
        bonus_abs = torch.where(bonus_mask, (adv_he - advantages.unsqueeze(1)).abs(), 0.0).sum()
        clipped = bonus_hit_clip(advantages, normalized, self._eta, args.kappa, args.eta_placement) & bonus_mask
        local = torch.stack(
            [
                *kl_he,
                *kl_normal,
                bonus_abs.double(),
                bonus_mask.sum().double(),
                clipped.sum().double(),
            ]
        )
        totals = self.accelerator.reduce(local, reduction="sum").tolist()
        (kl_he_sum, kl_he_n, kl_n_sum, kl_n_n, abs_sum, bonus_n, clipped_n) = totals
        if mode == "train" and args.eta_schedule == "adaptive":  # reduced over all processes: the same on each
            self._eta_controller.record_kl(kl_he_sum, kl_he_n)
        if kl_he_n > 0:
            metrics["policy_split/kl_high_entropy_normal"].append(kl_he_sum / kl_he_n)
        if kl_n_n > 0:
            metrics["policy_split/kl_normal_high_entropy"].append(kl_n_sum / kl_n_n)
        if bonus_n > 0:
            metrics["policy_split/bonus/abs_mean"].append(abs_sum / bonus_n)
            metrics["policy_split/bonus/clip_fraction"].append(clipped_n / bonus_n)
