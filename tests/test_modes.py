import copy

import pytest
import torch

from policy_split_trl import (
    HIGH_ENTROPY_SYSTEM_PROMPT,
    LOW_ENTROPY_SYSTEM_PROMPT,
    REWRITTEN_HIGH_ENTROPY_SYSTEM_PROMPT,
    apply_mode,
    apply_system_prompt,
)
from policy_split_trl.modes import high_entropy_rows

S = "Be creative."


def test_conversational_without_system_message_gets_one_prepended():
    prompt = [{"role": "user", "content": "2+2?"}]
    original = copy.deepcopy(prompt)
    out = apply_system_prompt(prompt, S)
    assert out == [{"role": "system", "content": S}, {"role": "user", "content": "2+2?"}]
    assert prompt == original  # input untouched


def test_conversational_with_system_message_keeps_it_after_a_blank_line():
    prompt = [{"role": "system", "content": "You are a math tutor."}, {"role": "user", "content": "2+2?"}]
    out = apply_system_prompt(prompt, S)
    assert out[0] == {"role": "system", "content": "Be creative.\n\nYou are a math tutor."}
    assert out[1:] == prompt[1:]
    assert prompt[0]["content"] == "You are a math tutor."


def test_empty_system_message_and_content_blocks():
    assert apply_system_prompt([{"role": "system", "content": ""}, {"role": "user", "content": "q"}], S)[0] == {
        "role": "system",
        "content": S,
    }
    blocks = [{"role": "system", "content": [{"type": "text", "text": "Tutor."}]}, {"role": "user", "content": "q"}]
    out = apply_system_prompt(blocks, S)
    assert out[0]["content"] == [{"type": "text", "text": "Be creative.\n\n"}, {"type": "text", "text": "Tutor."}]


def test_plain_text_prompt_is_prefixed():
    assert apply_system_prompt("What is 2+2?", S) == "Be creative.\n\nWhat is 2+2?"


def test_none_means_normal_mode_and_bad_prompts_fail_clearly():
    prompt = [{"role": "user", "content": "q"}]
    assert apply_system_prompt(prompt, None) == prompt
    with pytest.raises(ValueError, match="non-empty list of chat messages"):
        apply_system_prompt([], S)
    with pytest.raises(ValueError, match="non-empty list of chat messages"):
        apply_system_prompt([{"content": "no role"}], S)


def test_apply_mode_by_name():
    prompt = [{"role": "user", "content": "q"}]
    assert apply_mode(prompt, "normal") == prompt
    assert apply_mode(prompt, "high_entropy")[0]["content"] == HIGH_ENTROPY_SYSTEM_PROMPT
    assert apply_mode(prompt, "rewritten_high_entropy")[0]["content"] == REWRITTEN_HIGH_ENTROPY_SYSTEM_PROMPT
    assert apply_mode(prompt, "low_entropy")[0]["content"] == LOW_ENTROPY_SYSTEM_PROMPT
    assert apply_mode(prompt, "mine", {"mine": "X"})[0]["content"] == "X"
    with pytest.raises(ValueError, match="Unknown mode 'bogus'"):
        apply_mode(prompt, "bogus")


def test_paper_prompts_verbatim_fragments():
    assert HIGH_ENTROPY_SYSTEM_PROMPT.startswith('You are now in the "High Entropy" mode. Your primary directive')
    assert HIGH_ENTROPY_SYSTEM_PROMPT.endswith("the final output is still precise and factually sound.")
    assert "traverse unconventional intellectual paths" in REWRITTEN_HIGH_ENTROPY_SYSTEM_PROMPT
    assert LOW_ENTROPY_SYSTEM_PROMPT.endswith("concise, highly structured, and strictly precise.")
    assert "  " not in HIGH_ENTROPY_SYSTEM_PROMPT + REWRITTEN_HIGH_ENTROPY_SYSTEM_PROMPT + LOW_ENTROPY_SYSTEM_PROMPT


def test_high_entropy_rows_follow_the_global_index():
    # G = 4, 2 HE per group: positions 2, 3 of every group.
    assert high_entropy_rows(torch.arange(8), 4, 2).tolist() == [False, False, True, True] * 2
    # G = 8, 3 HE: positions 5, 6, 7
    assert high_entropy_rows(torch.arange(8), 8, 3).sum().item() == 3
    # A group split across two processes (rank 1 holds global rows 2, 3): still the global positions.
    assert high_entropy_rows(torch.arange(2) + 2, 4, 2).tolist() == [True, True]
