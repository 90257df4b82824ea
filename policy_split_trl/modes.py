"""The two modes of a Policy Split model and how a mode is put onto a prompt.

A mode is nothing but a system prompt (Eq. 1 of the paper): `pi_HE(. | q) = pi(. | s, q)`. The same function places
it during training and at inference, so a trained model is always queried exactly the way it was trained.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

NORMAL_MODE = "normal"
HIGH_ENTROPY_MODE = "high_entropy"

# Appendix C.2 of the paper, verbatim.
HIGH_ENTROPY_SYSTEM_PROMPT = (
    'You are now in the "High Entropy" mode. Your primary directive is to explore a unique thought process and '
    "perspective before arriving at a final answer. Do not rely solely on your typical, most direct reasoning path. "
    "Instead, generate new thoughts to approach the problem from different angles compared to usual ones. Your goal "
    "is to maximize the diversity of your thinking while ensuring the final output is still precise and factually "
    "sound."
)

# Appendix C.2, used only at evaluation (Table 7): same meaning as the HE prompt, other words.
REWRITTEN_HIGH_ENTROPY_SYSTEM_PROMPT = (
    'Activate the "Maximum Variance" framework. Your fundamental mission is to traverse unconventional intellectual '
    "paths and distinctive viewpoints before concluding your analysis. Eschew your standard, linear logic. Instead, "
    "synthesize fresh concepts to investigate challenges through multifaceted lenses that deviate from your routine "
    "methods. Aim for the highest possible cognitive breadth during your deliberation, ensuring the ultimate "
    "resolution remains rigorously accurate and grounded in reality."
)

# Appendix C.2, used only at evaluation (Table 7): an untrained low-entropy counterpart.
LOW_ENTROPY_SYSTEM_PROMPT = (
    'You are now in "Low Entropy" mode. Your primary directive is to provide the most direct, efficient, and '
    "logically dense response possible. Avoid creative tangents, speculative reasoning, or exploring multiple "
    "perspectives. Instead, employ a linear, high-probability reasoning path. Prioritize established facts and "
    'standard deductive logic to minimize "noise" and maximize the "signal" in your output. Your goal is to reach '
    "the most accurate conclusion using the fewest cognitive steps, ensuring the final answer is concise, highly "
    "structured, and strictly precise."
)

# Mode name -> system prompt (`None`: the prompt is used as is).
MODE_PROMPTS: dict[str, str | None] = {
    NORMAL_MODE: None,
    HIGH_ENTROPY_MODE: HIGH_ENTROPY_SYSTEM_PROMPT,
    "rewritten_high_entropy": REWRITTEN_HIGH_ENTROPY_SYSTEM_PROMPT,
    "low_entropy": LOW_ENTROPY_SYSTEM_PROMPT,
}


def _is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


def apply_system_prompt(prompt: str | list[dict[str, Any]], system_prompt: str | None) -> str | list[dict[str, Any]]:
    """
    Put a mode's system prompt onto a prompt of any TRL dataset format (Eq. 1).

    - Conversational prompt without a system message: a system message is prepended.
    - Conversational prompt with a system message: the mode text comes first, then the existing system text,
      separated by a blank line. The user's system message is never dropped.
    - Plain-text (standard) prompt: the mode text is prefixed, followed by a blank line.

    The input is never modified; a new prompt is returned.

    Args:
        prompt (`str` or `list[dict]`):
            A TRL prompt: a string, or a list of `{"role": ..., "content": ...}` messages.
        system_prompt (`str` or `None`):
            The mode's system prompt. `None` returns a copy of the prompt unchanged (normal mode).

    Returns:
        The prompt in the requested mode, in the same format as the input.

    Example:
    ```python
    >>> apply_system_prompt([{"role": "user", "content": "2+2?"}], "Be brief.")
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '2+2?'}]
    ```
    """
    if system_prompt is None:
        return copy.deepcopy(prompt)
    if isinstance(prompt, str):
        return f"{system_prompt}\n\n{prompt}"
    if not _is_conversational(prompt) or len(prompt) == 0:
        raise ValueError(
            "A prompt must be a string or a non-empty list of chat messages with a 'role' key, got "
            f"{type(prompt).__name__}: {prompt!r:.200}"
        )
    messages = copy.deepcopy(prompt)
    first = messages[0]
    if first["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    content = first.get("content")
    if isinstance(content, list):  # content blocks (multimodal message format)
        first["content"] = [{"type": "text", "text": f"{system_prompt}\n\n"}, *content]
    elif content is None or not str(content).strip():
        first["content"] = system_prompt
    else:
        first["content"] = f"{system_prompt}\n\n{content}"
    return messages


def apply_mode(
    prompt: str | list[dict[str, Any]], mode: str, mode_prompts: dict[str, str | None] | None = None
) -> str | list[dict[str, Any]]:
    """
    Put a named mode onto a prompt; the inference-time counterpart of what the trainer does.

    Args:
        prompt (`str` or `list[dict]`):
            A TRL prompt (string or chat messages).
        mode (`str`):
            A mode name: `"normal"`, `"high_entropy"`, `"rewritten_high_entropy"`, `"low_entropy"`, or a key of
            `mode_prompts`.
        mode_prompts (`dict[str, str | None]`, *optional*):
            Mode name -> system prompt. Defaults to [`MODE_PROMPTS`]; pass the prompts a model was trained with when
            they differ from the paper's.

    Returns:
        The prompt in that mode.
    """
    mode_prompts = MODE_PROMPTS if mode_prompts is None else mode_prompts
    if mode not in mode_prompts:
        raise ValueError(f"Unknown mode {mode!r}. Known modes: {sorted(mode_prompts)}.")
    return apply_system_prompt(prompt, mode_prompts[mode])


def high_entropy_rows(global_indices: torch.Tensor, group_size: int, num_high_entropy: int) -> torch.Tensor:
    """
    Which rollouts of a generation batch are generated in high-entropy mode.

    Rollouts of one query are consecutive in TRL's generation batch (its `RepeatSampler`), so the position of a
    rollout inside its group is `global_index % group_size`. The first `group_size - num_high_entropy` positions are
    normal, the last `num_high_entropy` are high-entropy. Using the *global* index keeps the split exact when a
    group spans several processes.

    Args:
        global_indices (`torch.Tensor`):
            Integer tensor of shape `(B,)`: the rows' indices in the global (all-process) generation batch.
        group_size (`int`):
            `G`, the number of rollouts per query.
        num_high_entropy (`int`):
            How many of the `G` rollouts use the high-entropy mode.

    Returns:
        `torch.Tensor`: bool tensor of shape `(B,)`, `True` for high-entropy rollouts.
    """
    return (global_indices % group_size) >= group_size - num_high_entropy
