"""
A fixed, held-out probe of the gap between the two modes: the same token sequences scored in both contexts.

Training metrics (`policy_split/kl_high_entropy_normal`, the context entropies) are taken on each step's own rollouts,
so they move with the rollouts as much as with the model. The probe holds the sequences fixed: completions sampled once
(from a fixed model, in both modes) after held-out prompts, then scored by any later model state in the normal context
(no system prompt) and in the high-entropy (HE) context (with it). Its numbers change only when the model does, which
is what a paired comparison of two updates, or a curve over training steps, needs.

All values are in nats, over the full vocabulary at every completion position (exact, not a sampled estimate):

- `entropy_normal_context` = `H(pi(.|q, o_<t))`, `entropy_high_entropy_context` = `H(pi(.|s, q, o_<t))`;
- `kl_high_entropy_normal` = `KL(pi(.|s, q, o_<t) || pi(.|q, o_<t))` (Table 5's direction).

Token means over all completion tokens of the probe (both generating modes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .modes import apply_system_prompt

PROBE_METRICS = ("entropy_normal_context", "entropy_high_entropy_context", "kl_high_entropy_normal")


def full_vocab_entropy(logits: torch.Tensor) -> torch.Tensor:
    """
    Shannon entropy `H(p) = -sum_v p_v log p_v` (nats) of `p = softmax(logits)`, per position.

    Args:
        logits (`torch.Tensor`):
            Shape `(..., V)`.

    Returns:
        `torch.Tensor`: shape `(...)`, float32.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def full_vocab_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """
    `KL(p || q) = sum_v p_v (log p_v - log q_v)` (nats) of `p = softmax(logits_p)`, `q = softmax(logits_q)`.

    Args:
        logits_p, logits_q (`torch.Tensor`):
            Shape `(..., V)` each.

    Returns:
        `torch.Tensor`: shape `(...)`, float32, >= 0.
    """
    logp = torch.log_softmax(logits_p.float(), dim=-1)
    logq = torch.log_softmax(logits_q.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def prompt_token_ids(
    tokenizer: Any, prompt: str | list[dict[str, Any]], chat_template_kwargs: dict | None = None
) -> list[int]:
    """Token ids of a prompt as TRL renders it: the chat template with the generation prompt, or the plain text."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    out = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True, **(chat_template_kwargs or {})
    )
    return list(out["input_ids"])


@dataclass
class ModeGapProbe:
    """
    Held-out sequences scored in both contexts ([`measure`]); build it with [`sample`] or from known completions.

    Args:
        prompts (`Sequence`):
            Prompts (strings or chat messages), one per completion, without any system prompt.
        completions (`Sequence[Sequence[int]]`):
            The completion token ids to score after each prompt.
        high_entropy_system_prompt (`str`):
            The HE mode's system prompt.
        tokenizer:
            The model's tokenizer (for the chat template and the padding id).
        chat_template_kwargs (`dict`, *optional*):
            Passed to `apply_chat_template`.
    """

    prompts: Sequence[Any]
    completions: Sequence[Sequence[int]]
    high_entropy_system_prompt: str
    tokenizer: Any
    chat_template_kwargs: dict | None = None

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.completions) or not self.completions:
            raise ValueError(
                f"A probe needs one completion per prompt and at least one (got {len(self.prompts)} prompts, "
                f"{len(self.completions)} completions)."
            )
        if any(len(c) == 0 for c in self.completions):
            raise ValueError("Every probe completion needs at least one token: drop empty completions first.")
        self._batches = {
            context: self._build(system_prompt)
            for context, system_prompt in (("normal", None), ("high_entropy", self.high_entropy_system_prompt))
        }

    def _build(self, system_prompt: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded prompt + right-padded completion ids, attention mask, and the mask of completion positions."""
        prompt_ids = [
            prompt_token_ids(self.tokenizer, apply_system_prompt(p, system_prompt), self.chat_template_kwargs)
            for p in self.prompts
        ]
        prompt_width = max(len(p) for p in prompt_ids)
        completion_width = max(len(c) for c in self.completions)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        rows = len(prompt_ids)
        ids = torch.full((rows, prompt_width + completion_width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        completion_mask = torch.zeros(rows, completion_width, dtype=torch.bool)
        for i, (p, c) in enumerate(zip(prompt_ids, self.completions, strict=True)):
            ids[i, prompt_width - len(p) : prompt_width] = torch.tensor(p)
            ids[i, prompt_width : prompt_width + len(c)] = torch.tensor(list(c))
            attention[i, prompt_width - len(p) : prompt_width + len(c)] = 1
            completion_mask[i, : len(c)] = True
        return ids, attention, completion_mask

    @classmethod
    def sample(
        cls,
        model: Any,
        tokenizer: Any,
        prompts: Sequence[Any],
        high_entropy_system_prompt: str,
        num_per_mode: int = 2,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        seed: int = 0,
        chat_template_kwargs: dict | None = None,
    ) -> ModeGapProbe:
        """
        Sample `num_per_mode` completions per prompt in each mode (normal, then HE) from `model`, at `temperature`
        (no top-k/top-p), with a fixed seed, and build the probe from them.
        """
        probe_prompts, completions = [], []
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            for system_prompt in (None, high_entropy_system_prompt):
                for prompt in prompts:
                    ids = prompt_token_ids(tokenizer, apply_system_prompt(prompt, system_prompt), chat_template_kwargs)
                    inputs = torch.tensor([ids], device=model.device).repeat(num_per_mode, 1)
                    with torch.no_grad():
                        out = model.generate(
                            input_ids=inputs,
                            attention_mask=torch.ones_like(inputs),
                            do_sample=True,
                            temperature=temperature,
                            top_k=0,
                            top_p=1.0,
                            max_new_tokens=max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id,
                        )
                    for row in out[:, inputs.size(1) :].tolist():
                        if tokenizer.eos_token_id in row:  # keep the EOS token, as a rollout does
                            row = row[: row.index(tokenizer.eos_token_id) + 1]
                        if row:
                            probe_prompts.append(prompt)
                            completions.append(row)
        finally:
            torch.random.set_rng_state(generator_state)
        return cls(probe_prompts, completions, high_entropy_system_prompt, tokenizer, chat_template_kwargs)

    @torch.no_grad()
    def measure(self, model: Any, batch_size: int = 16) -> dict[str, float]:
        """
        The probe's metrics ([`PROBE_METRICS`], nats, token means) under `model`, in eval mode (no dropout).

        Returns:
            `dict[str, float]`.
        """
        was_training = model.training
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        count = 0
        try:
            rows = self._batches["normal"][0].size(0)
            for start in range(0, rows, batch_size):
                logits = {}
                for context, (ids, attention, completion_mask) in self._batches.items():
                    chunk = slice(start, start + batch_size)
                    width = completion_mask.size(1)
                    mask_chunk = attention[chunk]
                    # Positions counted from each row's first real token, so left padding changes nothing.
                    positions = (mask_chunk.cumsum(dim=1) - 1).clamp(min=0)
                    out = model(
                        input_ids=ids[chunk].to(model.device),
                        attention_mask=mask_chunk.to(model.device),
                        position_ids=positions.to(model.device),
                    )
                    # Position t's logits predict token t + 1: the completion's tokens come from the positions
                    # one to the left of them.
                    logits[context] = out.logits[:, -width - 1 : -1].float().cpu()
                mask = self._batches["normal"][2][start : start + batch_size]
                per_token = (
                    full_vocab_entropy(logits["normal"]),
                    full_vocab_entropy(logits["high_entropy"]),
                    full_vocab_kl(logits["high_entropy"], logits["normal"]),
                )
                for i, values in enumerate(per_token):
                    totals[i] += values[mask].double().sum()
                count += int(mask.sum())
        finally:
            model.train(was_training)
        return {name: (totals[i] / count).item() for i, name in enumerate(PROBE_METRICS)}
