"""
The passes of a [`~policy_split_trl.PolicySplitGRPOTrainer`] step, scoring passes at generation and loss passes, and
how the optimized step (`optimized_step=True`, the default) makes them cheap. The straightforward path scores both
contexts of every rollout at generation (one no-grad pass, or only the twin context when TRL's old log-probs exist),
finishes the advantages there, and trains one loss pass over every rollout in both contexts (`expand_contexts`).
The optimized step computes the same step with less work:

- **widths**: every log-prob pass groups rows of similar prompt width and cuts each forward to its own width
  ([`width_sorted_chunks`], [`shared_left_padding`]), so no row pays for the other context's longer prompt;
- **shared prompts** (`shared_prefix`): the rows of one prompt stay in the same pass, where
  [`~policy_split_trl.shared_prefix.SharedPrefixMixin`] encodes the prompt once for all of them;
- **contexts one after the other**: a micro-batch's normal-context rows are forward/backward-ed, then its
  high-entropy-context rows (in chunks of about the normal rows' size when their advantages are already complete), so
  the peak activation memory is about one context's ([`OptimizedStepMixin._compute_loss_by_context`]);
- **the bonus from the loss pass**: on-policy, the loss pass's own log-probs are the old policy's, so both contexts'
  log-probs for the bonus (Eq. 6) come from it and the generation step makes no scoring pass
  ([`OptimizedStepMixin._bonus_from_loss_pass`]).

Two invariants, which every change here must keep (`tests/test_optimized_step.py`, `tests/test_distributed_matrix.py`):

1. **The same gradient as the straightforward path**: the same rows, advantages and per-token losses; each part's loss
   weighted by its share of the micro-batch's normalizer ([`OptimizedStepMixin._loss_share`]), so the parts sum to
   the whole micro-batch's loss.
2. **Rank-uniform structure**: every process makes the same number of forward passes, backward passes and
   collectives at every micro-step, whatever its rows hold (ZeRO-3 and FSDP hang otherwise, DDP over gloo crashes).
   Whether the contexts are trained one after the other depends on the configuration only; how many forward passes a
   loss pass makes and in how many chunks the high-entropy rows are trained is planned once per generation batch from
   statistics summed over all processes ([`forward_plan`]); scoring passes make TRL's number of forward passes (one per
   `batch_size` rows); only the *grouping* of rows into passes may depend on the data, never the count.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import pad, use_adapter

from .contexts import HIGH_ENTROPY_CONTEXT, NORMAL_CONTEXT, context_rows, has_both_contexts, select_rows
from .loss_pass import LossPassAdvantagesMixin, loss_mask, train_or_eval
from .shared_prefix import prompt_groups, shared_left_padding, split_keeping_groups


def width_sorted_chunks(
    attention_mask: torch.Tensor, logits_to_keep: int, num_chunks: int, groups: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """
    Rows of a left-padded batch in `num_chunks` forward passes, rows with similar prompt widths together, so that each
    pass can be cut to its own width; with `groups`, the rows of a group together as far as the count allows, so that
    a shared-prefix pass encodes their prompt once ([`~policy_split_trl.shared_prefix.split_keeping_groups`]).

    The number of passes is `min(num_chunks, N)` whatever the rows hold: under ZeRO-3 and FSDP every process must call
    forward the same number of times, so only the *grouping* of rows may depend on the data, never the count.

    Args:
        attention_mask (`torch.Tensor`):
            Shape `(N, L)`, prompts left-padded, the last `logits_to_keep` columns the completions.
        logits_to_keep (`int`):
            Width of the completion part (its right padding never moves a row).
        num_chunks (`int`):
            Number of forward passes, `>= 1`.
        groups (`torch.Tensor`, *optional*):
            Shape `(N,)`: [`~policy_split_trl.shared_prefix.prompt_groups`] of the rows.

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
    if groups is None:
        order = torch.argsort(starts, stable=True)
        return [chunk.sort().values for chunk in order.tensor_split(min(num_chunks, num_rows))]
    key = starts * num_rows + groups  # by width, then by group (a group's rows all have the same width)
    order = torch.argsort(key, stable=True)
    return [order[chunk].sort().values for chunk in split_keeping_groups(key[order], num_chunks)]


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


def _prompt_widths(prompt_mask: torch.Tensor) -> tuple[int, int]:
    """`(rows, width of their prompts once the padding they all share is cut)`."""
    if prompt_mask.size(0) == 0:
        return 0, 0
    return prompt_mask.size(0), prompt_mask.size(1) - shared_left_padding(prompt_mask, prompt_mask.size(1))


class OptimizedStepMixin(LossPassAdvantagesMixin):
    """
    The passes of a step and the optimized step (see the module docstring for what it does and the two invariants it
    keeps) for [`~policy_split_trl.PolicySplitGRPOTrainer`], a base placed before `GRPOTrainer`. The trainer calls it
    at generation ([`_defer_bonus_to_loss_pass`], [`_score_contexts`], [`_plan_forward_passes`]), for a micro-batch's
    loss ([`_train_contexts_separately`], [`_compute_loss_by_context`]) and in a loss pass ([`_bonus_from_loss_pass`],
    which uses the trainer's `_dual_mode_advantages`); every log-prob pass goes through its
    `_get_per_token_logps_and_entropies`.
    """

    # ------------------------------------------------------------------ planned at generation
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

    def _plan_forward_passes(
        self, output: dict[str, Any], prompt_masks: tuple[torch.Tensor, torch.Tensor], completion_width: int
    ) -> None:
        """
        Store the generation batch's plan of forward passes ([`forward_plan`]) as scalars that every micro-batch cut
        from it carries: one reduction over all processes, so that every process makes the same passes.

        Args:
            output (`dict[str, Any]`):
                The generation batch, completed in place.
            prompt_masks (`tuple[torch.Tensor, torch.Tensor]`):
                Prompt masks of the rows trained in the normal context and in the high-entropy context.
            completion_width (`int`):
                Width of the completions.
        """
        (normal_rows, normal_width), (he_rows, he_width) = (_prompt_widths(mask) for mask in prompt_masks)
        normal = normal_rows * (normal_width + completion_width)
        high_entropy = he_rows * (he_width + completion_width)
        joint = (normal_rows + he_rows) * (max(normal_width, he_width) + completion_width)
        local = torch.tensor([joint, normal + high_entropy, normal, high_entropy], device=self.accelerator.device)
        forward_chunks, he_chunks = forward_plan(self.accelerator.reduce(local.double(), reduction="sum"))
        device = self.accelerator.device
        output["policy_split_forward_chunks"] = torch.tensor(forward_chunks, device=device)
        output["policy_split_he_chunks"] = torch.tensor(he_chunks, device=device)

    # ------------------------------------------------------------------ scoring passes at generation (SPEC §2.4)
    def _score_contexts(
        self, output: dict[str, Any], gen_prompt_ids: list[list[int]], twin_prompt_ids: list[list[int]], deferred: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """
        `(generating, twin)` contexts' log-probs of the rollouts under the policy that generated them (`None` when
        `deferred` to the loss pass), and the reference model's in the twin context (`None` when `beta == 0`). TRL's
        `old_per_token_logps` already is the generating context's when it exists; otherwise both go through one pass.
        """
        completions = (output["completion_ids"], output["completion_mask"])
        args = self.args
        train = train_or_eval(self.model) == "train"
        batch_size = args.per_device_train_batch_size if train else args.per_device_eval_batch_size
        old_logps = output.get("old_per_token_logps")
        logps_gen = logps_twin = ref_twin = None
        with torch.no_grad(), disable_gradient_checkpointing(self.model, args.gradient_checkpointing_kwargs):
            if not deferred and old_logps is None:
                both = (c.repeat(2, 1) for c in completions)
                logps_gen, logps_twin = self._score(gen_prompt_ids + twin_prompt_ids, *both, batch_size).chunk(2)
            elif not deferred:
                logps_gen, logps_twin = old_logps, self._score(twin_prompt_ids, *completions, batch_size)
            if self.beta != 0.0:
                ref_twin = self._score(twin_prompt_ids, *completions, batch_size, reference=True)
        return logps_gen, logps_twin, ref_twin

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
        model, adapter = self.model, contextlib.nullcontext()
        if reference and self.ref_model is not None:
            model = self.ref_model
        elif reference:  # PEFT: the reference is the adapter-disabled model (or the "ref" adapter), exactly as in TRL
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with adapter:
            logps, _, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_ids.size(1), batch_size=batch_size
            )
        return logps

    def _left_pad_prompts(self, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(prompt_ids, prompt_mask)` of token-id lists, left-padded as TRL pads prompts, on the trainer's device."""
        ids = [torch.tensor(p, dtype=torch.long) for p in prompt_ids]
        padding = {"padding_side": "left", "pad_to_multiple_of": self.pad_to_multiple_of}
        padded = pad(ids, padding_value=self._tokenizer.pad_token_id, **padding)
        mask = pad([torch.ones_like(t) for t in ids], padding_value=0, **padding)
        return padded.to(self.accelerator.device), mask.to(self.accelerator.device)

    # ------------------------------------------------------------------ every log-prob pass: rows cut to their width
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
        """
        TRL's log-probs in TRL's number of forward passes (one per `batch_size` rows; a loss pass: the count planned
        for its generation batch), rows of similar prompt width together, each pass cut to its own width: no pass pays
        for the other context's prompt padding, and every process makes the same number of passes.
        """
        base = super()._get_per_token_logps_and_entropies
        multimodal = any(value is not None for value in kwargs.values())
        if not self.args.optimized_step or multimodal:
            return base(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
                **kwargs,
            )
        num_rows = input_ids.size(0)
        num_chunks = math.ceil(num_rows / batch_size) if batch_size else self._loss_forward_chunks()
        prompt_width = attention_mask.size(1) - logits_to_keep
        shared = getattr(self.args, "shared_prefix", False) and attention_mask.size(1) > logits_to_keep
        prompts = prompt_groups(input_ids, attention_mask, logits_to_keep) if shared else None
        groups = width_sorted_chunks(attention_mask, logits_to_keep, num_chunks, prompts)
        parts = []
        for rows in groups:
            start = shared_left_padding(attention_mask[rows], prompt_width)
            ids, mask = (
                (input_ids, attention_mask) if rows.numel() == num_rows else (input_ids[rows], attention_mask[rows])
            )
            parts.append(
                base(
                    model,
                    ids[:, start:],
                    mask[:, start:],
                    logits_to_keep,
                    batch_size=None,
                    compute_entropy=compute_entropy,
                    compute_aux_loss=compute_aux_loss,
                    **kwargs,
                )
            )
        if len(parts) == 1:
            return parts[0]
        restore = torch.argsort(torch.cat(groups))
        logps = torch.cat([p[0] for p in parts])[restore]
        entropies = torch.cat([p[1] for p in parts])[restore] if compute_entropy else None
        aux_loss = (
            sum(p[2] * len(rows) for p, rows in zip(parts, groups, strict=True)) / num_rows
            if compute_aux_loss
            else None
        )
        return logps, entropies, aux_loss

    def _loss_forward_chunks(self) -> int:
        """Forward passes of the loss pass in progress, as planned for its generation batch ([`forward_plan`])."""
        inputs = None if self._loss_step is None else self._loss_step.pending
        return 1 if inputs is None else int(inputs.get("policy_split_forward_chunks", 1))

    # ------------------------------------------------------------------ a micro-batch's loss, one context at a time
    def _train_contexts_separately(self, model: torch.nn.Module, inputs: dict[str, Any]) -> bool:
        """
        Forward/backward each context's rows on their own (peak activation memory of one context, not both). Decided
        from the configuration alone, never from the rows, so that every process makes the same passes.
        """
        args = self.args
        return (
            args.optimized_step
            and has_both_contexts(inputs)  # rollout sharing: both contexts of every rollout
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

    def _context_parts(self, inputs: dict[str, Any]) -> list[tuple[int, dict[str, Any], float]]:
        """
        `(context, rows, share)` of each loss pass of a micro-batch with rollout sharing trained one context at a time:
        every rollout in the normal context, then in the high-entropy context in the planned number of chunks (one
        when the bonus is deferred to the loss pass, which needs all of them in one pass). `share * loss(rows)` summed
        over the parts is the micro-batch's loss ([`_loss_share`]).
        """
        normal = context_rows(inputs, NORMAL_CONTEXT)
        high_entropy = context_rows(inputs, HIGH_ENTROPY_CONTEXT)
        num_rows = inputs["completion_ids"].size(0)
        he_chunks = 1 if "policy_split_rollout" in inputs else int(inputs.get("policy_split_he_chunks", 1))
        chunks = torch.arange(num_rows, device=normal["completion_ids"].device).tensor_split(min(he_chunks, num_rows))
        parts = [(NORMAL_CONTEXT, normal)] + [(HIGH_ENTROPY_CONTEXT, select_rows(high_entropy, r)) for r in chunks]
        total_tokens = 2.0 * float(loss_mask(normal).sum())
        for _, part in parts:  # one context per part: one forward pass each (the plan's count is for both contexts)
            part["policy_split_forward_chunks"] = 1
        return [(context, part, self._loss_share(part, 2 * num_rows, total_tokens)) for context, part in parts]

    def _loss_share(self, part: dict[str, Any], num_rows: int, num_tokens: float) -> float:
        """Weight of a part's loss in the loss of the whole micro-batch (`num_rows` rows over both contexts, of which
        `num_tokens` count in the loss), by how each `loss_type` normalizes."""
        if self.loss_type in ("dapo", "cispo", "vespo"):  # a sum divided by a batch-independent count
            return 1.0
        if self.loss_type == "bnpo":  # a token mean over the micro-batch (the tokens that count in the loss)
            return float(loss_mask(part).sum()) / max(num_tokens, 1.0)
        return part["completion_ids"].size(0) / num_rows  # a mean over rows

    def _compute_loss_by_context(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """
        The micro-batch's loss as the loss passes of [`_context_parts`]. Every part but the last is forward- and
        backward-ed here under DDP's `no_sync` (DDP prepares its gradient all-reduce at forward time), so the step makes
        one all-reduce, at the last part's backward, which the trainer runs on the returned loss. The weighted parts sum
        to the whole batch's loss; the gradient is the same, the peak activation memory about that of one context.

        Returns:
            `torch.Tensor`: the sum of the parts' weighted losses, of which all but the last are detached.
        """
        parts = self._context_parts(inputs)
        losses = []
        for index, (_, part, share) in enumerate(parts):
            last = index == len(parts) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                loss = self._run_loss_pass(model, part) * share
                if not last:
                    # Nothing later needs this part's graph (normal rows: normal_eta = 0), so its activations go now.
                    self.accelerator.backward(loss)
                    loss = loss.detach()
            losses.append(loss)
        return sum(losses[1:], losses[0])

    # ------------------------------------------------------------------ the bonus from the loss pass
    def _bonus_from_loss_pass(self, inputs: dict[str, Any], logps: torch.Tensor) -> torch.Tensor:
        """
        Advantages of the rows of a loss pass whose bonus was deferred from the generation step: on-policy
        (`num_iterations` 1, one micro-batch per generation batch), this pass's log-probs are the old policy's, so no
        separate scoring pass is needed. Needs both contexts of every rollout: in this pass, or the normal context's
        from the pass just before ([`_context_parts`]), kept in the micro-batch's
        [`~policy_split_trl.loss_pass.LossStep`]. The advantages themselves are the trainer's one pipeline
        (`_dual_mode_advantages`), on the rows put back in generation order.

        Args:
            inputs (`dict[str, Any]`):
                The loss pass's rows, with `policy_split_context`, `policy_split_rollout` (global rollout index) and
                `policy_split_generated_he`; `advantages` of shape `(N, T)`.
            logps (`torch.Tensor`):
                Shape `(N, T)`: this pass's detached log-probs.

        Returns:
            `torch.Tensor`: shape `(N, T)`, the pass's advantages (unchanged for a normal-context-only pass).
        """
        context, rollout = (inputs["policy_split_context"], inputs["policy_split_rollout"])
        advantages = inputs["advantages"]
        is_normal_row = context == NORMAL_CONTEXT
        step = self._loss_step
        if bool(is_normal_row.all()):  # the first of two passes: keep the normal context's log-probs for the second
            step.normal_logps = (rollout, logps)
            return advantages
        he_rows = torch.nonzero(~is_normal_row).squeeze(1)
        he_rows = he_rows[torch.argsort(rollout[he_rows])]
        if bool(is_normal_row.any()):
            normal_rollout, normal_logps = rollout, logps
            normal_rows = torch.nonzero(is_normal_row).squeeze(1)
        elif step.normal_logps is None:
            raise RuntimeError("Policy Split: a high-entropy loss pass ran without its rollouts' normal-context pass.")
        else:
            normal_rollout, normal_logps = step.normal_logps
            normal_rows = torch.arange(normal_rollout.size(0), device=logps.device)
        normal_rows = normal_rows[torch.argsort(normal_rollout[normal_rows])]
        if not torch.equal(normal_rollout[normal_rows], rollout[he_rows]):
            raise RuntimeError("Policy Split: a loss pass does not hold both contexts of its rollouts.")
        # In rollout order (the generation step's): rows of the same rollout, one per context, share their tokens.
        adv_he, adv_normal = self._dual_mode_advantages(
            advantages[he_rows, 0],
            logps[he_rows],
            normal_logps[normal_rows],
            loss_mask(inputs)[he_rows],
            inputs["policy_split_generated_he"][he_rows],
        )
        # In the log-probs' precision, as when the bonus comes from the generation step.
        shaped = advantages.to(torch.promote_types(advantages.dtype, adv_he.dtype), copy=True)
        shaped[he_rows] = adv_he.to(shaped.dtype)
        if bool(is_normal_row.any()) and self.args.normal_eta != 0.0:
            shaped[normal_rows] = adv_normal.to(shaped.dtype)
        return shaped
