"""A hook into TRL's loss pass, shared by the trainers that set a micro-batch's advantages from that pass itself."""

from __future__ import annotations

from typing import Any

import torch


def loss_mask(batch: dict[str, Any]) -> torch.Tensor:
    """The completion tokens that count in the loss: the completion mask without tool-output tokens (as TRL)."""
    mask = batch["completion_mask"]
    return mask if "tool_mask" not in batch else mask * batch["tool_mask"]


class LossPassAdvantagesMixin:
    """
    Lets a `GRPOTrainer` subclass change a micro-batch's advantages inside TRL's loss pass, from that pass's own
    log-probs and entropies, with no extra forward. TRL's `_compute_loss` reads `inputs["advantages"]` after its
    log-prob/entropy call, so an override of `_get_per_token_logps_and_entropies` that takes the pass's inputs with
    [`_take_loss_inputs`] can replace them there.

    Put it before `GRPOTrainer` in the bases: [`_run_loss_pass`] calls the `_compute_loss` that follows it (TRL's).
    """

    _loss_inputs: dict[str, Any] | None = None

    def _run_loss_pass(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """TRL's `_compute_loss` on `inputs`, which the hook may change: pass a copy of a batch that is reused."""
        self._loss_inputs = inputs
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._loss_inputs = None

    def _take_loss_inputs(self) -> dict[str, Any] | None:
        """The inputs of the loss pass in progress, handed out once: only that pass's own log-prob call gets them."""
        inputs, self._loss_inputs = self._loss_inputs, None
        return inputs
