"""A hook into TRL's loss pass, shared by the trainers that set a micro-batch's advantages from that pass itself."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch


def train_or_eval(model: torch.nn.Module) -> Literal["train", "eval"]:
    """The key of `GRPOTrainer._metrics` (and of TRL's per-split settings) that a step of `model` logs under."""
    return "train" if model.training else "eval"


def loss_mask(batch: dict[str, Any]) -> torch.Tensor:
    """The completion tokens that count in the loss: the completion mask without tool-output tokens (as TRL)."""
    mask = batch["completion_mask"]
    return mask if "tool_mask" not in batch else mask * batch["tool_mask"]


@dataclass
class LossStep:
    """
    What the hooks of one micro-batch's loss hand each other. TRL's `_compute_loss` calls
    `_get_per_token_logps_and_entropies` with tensors only, so the rows of a loss pass, and what the pass finds that a
    later pass or the metrics need, travel here rather than as arguments.

    Lifetime: opened by [`LossPassAdvantagesMixin._open_loss_step`] around the loss passes of one micro-batch (a pass
    run outside one opens its own) and bound to `trainer._loss_step` until they end; it never outlives them.

    Attributes:
        pending (`dict[str, Any]` or `None`):
            The rows of the loss pass in progress, until that pass's own log-prob call takes them
            ([`LossPassAdvantagesMixin._take_loss_inputs`]); `None` between passes.
        entropies (`list[tuple[dict[str, Any], torch.Tensor | None]]`):
            `(rows, detached per-token entropies of shape (N, T))` of each loss pass so far, for the metrics.
        normal_logps (`tuple[torch.Tensor, torch.Tensor]` or `None`):
            Policy Split's bonus from the loss pass: `(rollout index, detached log-probs)`, shapes `(B,)` and
            `(B, T)`, of the pass that held only normal-context rows, for the pass over the same rollouts in the
            high-entropy context.
    """

    pending: dict[str, Any] | None = None
    entropies: list[tuple[dict[str, Any], torch.Tensor | None]] = field(default_factory=list)
    normal_logps: tuple[torch.Tensor, torch.Tensor] | None = None


class LossPassAdvantagesMixin:
    """
    Lets a `GRPOTrainer` subclass change a micro-batch's advantages inside TRL's loss pass, from that pass's own
    log-probs and entropies, with no extra forward. TRL's `_compute_loss` reads `inputs["advantages"]` after its
    log-prob/entropy call, so an override of `_get_per_token_logps_and_entropies` that takes the pass's inputs with
    [`_take_loss_inputs`] can replace them there.

    Put it before `GRPOTrainer` in the bases: [`_run_loss_pass`] calls the `_compute_loss` that follows it (TRL's).
    """

    _loss_step: LossStep | None = None

    @contextlib.contextmanager
    def _open_loss_step(self) -> Iterator[LossStep]:
        """A fresh [`LossStep`] bound to `self._loss_step` for the loss passes run inside; the previous one after."""
        outer, self._loss_step = self._loss_step, LossStep()
        try:
            yield self._loss_step
        finally:
            self._loss_step = outer

    def _run_loss_pass(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """TRL's `_compute_loss` on `inputs`, which the hook may change: pass a copy of a batch that is reused."""
        # Inside a micro-batch's step (opened by the trainer's `_compute_loss`) or, run on its own, in a step of its own.
        opened = self._open_loss_step() if self._loss_step is None else contextlib.nullcontext(self._loss_step)
        with opened as step:
            step.pending = inputs
            try:
                return super()._compute_loss(model, inputs)
            finally:
                step.pending = None

    def _take_loss_inputs(self) -> dict[str, Any] | None:
        """The inputs of the loss pass in progress, handed out once: only that pass's own log-prob call gets them."""
        step = self._loss_step
        if step is None:
            return None
        inputs, step.pending = step.pending, None
        return inputs
