"""
The two contexts of a rollout (SPEC §2.4, Eq. 10) as rows of a batch.

A *mode* is how a rollout was generated (normal, or high-entropy with the system prompt `s`); a *context* is the prompt
a row is trained under (without `s`: normal context; with `s`: high-entropy context). With rollout sharing every
rollout is trained in both contexts, whichever mode generated it.

A generation batch keeps TRL's one row per rollout: the normal context under TRL's keys, and the high-entropy
context's copy of every per-rollout tensor that differs ([`CONTEXT_KEYS`]) under `HE_KEY_PREFIX + key`. TRL shuffles
and splits rows, so a rollout's two contexts stay in the same micro-batch on every process. [`expand_contexts`] turns
such a batch into the rows a loss pass trains; [`context_rows`] gives one context's rows.
"""

from __future__ import annotations

from typing import Any

import torch

NORMAL_CONTEXT, HIGH_ENTROPY_CONTEXT = 0, 1

# Per-rollout tensors that differ between the two contexts.
CONTEXT_KEYS = (
    "prompt_ids",
    "prompt_mask",
    "advantages",
    "old_per_token_logps",
    "ref_per_token_logps",
    "sampling_per_token_logps",
)
HE_KEY_PREFIX = "policy_split_he_"


def has_both_contexts(batch: dict[str, Any]) -> bool:
    """Whether `batch` carries both contexts of every rollout (rollout sharing) rather than one row per context."""
    return HE_KEY_PREFIX + "prompt_ids" in batch


def by_context(is_he: torch.Tensor, generating: Any, twin: Any) -> tuple[Any, Any]:
    """
    `(normal-context, high-entropy-context)` values of rollouts, from their values in the context that generated them
    and in the other ("twin") context.

    Args:
        is_he (`torch.Tensor`):
            Shape `(B,)`, bool: the rollouts generated in high-entropy mode.
        generating, twin (`torch.Tensor` of shape `(B, ...)`, or `list` of length `B`):
            Values in the generating context and in the twin context.

    Returns:
        `tuple`: two values of the inputs' type and shape.
    """
    if isinstance(generating, torch.Tensor):
        he_col = is_he.view(-1, *([1] * (generating.dim() - 1)))
        return torch.where(he_col, twin, generating), torch.where(he_col, generating, twin)
    flags = is_he.tolist()
    normal = [t if f else g for g, t, f in zip(generating, twin, flags, strict=True)]
    high_entropy = [g if f else t for g, t, f in zip(generating, twin, flags, strict=True)]
    return normal, high_entropy


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


def _is_row_tensor(value: Any, num_rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == num_rows


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
    if not has_both_contexts(batch):
        return batch
    normal, high_entropy = (context_rows(batch, NORMAL_CONTEXT), context_rows(batch, HIGH_ENTROPY_CONTEXT))
    num_rows = batch["completion_ids"].size(0)
    return {
        key: torch.cat([value, high_entropy[key]]) if _is_row_tensor(value, num_rows) else value
        for key, value in normal.items()
    }
