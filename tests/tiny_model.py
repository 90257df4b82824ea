"""A tiny Qwen3 and a byte-level BPE tokenizer with a ChatML template, built offline (no Hub)."""

from __future__ import annotations

import os
import random

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from policy_split_trl import (
    HIGH_ENTROPY_SYSTEM_PROMPT,
    LOW_ENTROPY_SYSTEM_PROMPT,
    REWRITTEN_HIGH_ENTROPY_SYSTEM_PROMPT,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MODE_PROMPTS_TEXT = [HIGH_ENTROPY_SYSTEM_PROMPT, REWRITTEN_HIGH_ENTROPY_SYSTEM_PROMPT, LOW_ENTROPY_SYSTEM_PROMPT]


def _corpus() -> list[str]:
    rng = random.Random(0)
    words = [
        "the",
        "a",
        "model",
        "answer",
        "think",
        "step",
        "number",
        "sum",
        "plus",
        "minus",
        "equals",
        "question",
        "mode",
        "high",
        "entropy",
        "normal",
    ]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    lines += [f"{a} + {b} = {a + b}" for a in range(30) for b in range(10)]
    # Real tokenizers have seen English prose: training on the mode prompts keeps the HE prompt near its real-world
    # length (~100 tokens instead of ~350 byte-level pieces), so step-time ratios on the tiny model are realistic.
    lines += ["system user assistant", *MODE_PROMPTS_TEXT] * 5
    return lines


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny_model(path: str) -> str:
    """Write the tiny model + tokenizer as a normal checkpoint folder; returns the path."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def arithmetic_dataset(n: int = 16, conversational: bool = True, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 9)
        question = f"{a} + {b} ="
        prompt = [{"role": "user", "content": question}] if conversational else question
        rows.append({"prompt": prompt, "solution": str(a + b)})
    return Dataset.from_list(rows)


def contains_digit_reward(completions, **kwargs) -> list[float]:
    """A reward a random tiny model gets right sometimes, so groups have reward variance."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(any(ch.isdigit() for ch in t)) for t in texts]


def length_reward(completions, **kwargs) -> list[float]:
    """A dense reward: rarely equal within a group, so `A != 0` and the bonus is exercised."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [len(t) / 100.0 for t in texts]


def training_args(output_dir, **overrides) -> dict:
    """Trainer settings for a quick CPU run on the tiny model: 8 rollouts of 4 per query, 12 tokens, lr 1e-2."""
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 12,
        "max_steps": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "seed": 0,
        "temperature": 1.0,
        **overrides,
    }
