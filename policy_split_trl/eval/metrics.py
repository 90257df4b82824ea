"""Metrics of the dual-mode evaluation (the paper's Tables 1, 5, 6): entropy in bits, avg@k / pass@k, unique solves,
and the gaps between two modes. Pure functions; the harness and the training callback share them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

LN2 = math.log(2.0)


def token_entropy_bits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """
    Full-vocabulary Shannon entropy, in bits, of the next-token distribution `softmax(logits / temperature)`.

    With the sampling temperature this is the distribution the tokens were sampled from before top-k/top-p (the
    harness default); with `temperature=1` it is the model's raw distribution.

    Args:
        logits (`torch.Tensor`):
            Shape `(..., V)`.
        temperature (`float`, *optional*, defaults to `1.0`):
            Divides the logits; must be > 0.

    Returns:
        `torch.Tensor`: shape `(...)`, float32, in bits.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for an entropy, got {temperature}.")
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1) / LN2


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """
    Log-probabilities (nats) of `token_ids` under `softmax(logits / temperature)`.

    Args:
        logits (`torch.Tensor`):
            Shape `(..., V)`.
        token_ids (`torch.Tensor`):
            Shape `(...)`.
        temperature (`float`, *optional*, defaults to `1.0`):
            Divides the logits.

    Returns:
        `torch.Tensor`: shape `(...)`, float32.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """
    Accuracy averaged over the `k` samples of each problem, then over problems (the paper's "Acc", mean of 8 runs).

    Args:
        correct (`Sequence[Sequence[bool]]`):
            One row per problem, one entry per sample.

    Returns:
        `float`: in `[0, 1]`; `nan` for no problems.
    """
    rows = [row for row in correct if len(row)]
    if not rows:
        return math.nan
    return sum(sum(map(bool, row)) / len(row) for row in rows) / len(rows)


def pass_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """
    Best-of-k: the fraction of problems with at least one correct sample (Table 6).

    Args:
        correct (`Sequence[Sequence[bool]]`):
            One row per problem, one entry per sample.

    Returns:
        `float`: in `[0, 1]`; `nan` for no problems.
    """
    rows = [row for row in correct if len(row)]
    if not rows:
        return math.nan
    return sum(any(row) for row in rows) / len(rows)


def unique_solved(solved: Mapping[str, Mapping[str, Sequence[bool]]]) -> dict[str, int]:
    """
    Problems that a mode solves (at least one correct sample) and no other mode does.

    Args:
        solved (`Mapping[str, Mapping[str, Sequence[bool]]]`):
            Mode -> problem id -> per-sample correctness.

    Returns:
        `dict[str, int]`: mode -> number of problems only that mode solved.
    """
    solved_sets = {mode: {pid for pid, row in rows.items() if any(row)} for mode, rows in solved.items()}
    return {
        mode: len(problems - set().union(*(s for other, s in solved_sets.items() if other != mode)))
        for mode, problems in solved_sets.items()
    }


def token_weighted_mean(sums: Sequence[float], counts: Sequence[float]) -> float:
    """`sum(sums) / sum(counts)`: a mean over all tokens of all samples (`nan` when there are no tokens)."""
    total = sum(counts)
    return sum(sums) / total if total else math.nan
