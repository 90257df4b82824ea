"""Generation and scoring backends of the evaluation harness.

Both backends generate token ids; the per-token metrics (entropy of the full next-token distribution, log-probs
under any mode's context) always come from one teacher-forced scoring pass of the transformers model, so the two
backends share the metric code and the numbers mean the same thing. vLLM is used for generation when it is installed
and a GPU is present (or when asked for), transformers `generate` otherwise.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from .metrics import token_entropy_bits, token_logprobs

Messages = list[dict[str, Any]]


@dataclass
class SamplingConfig:
    """
    Sampling parameters; the defaults are the paper's inference settings (Table 9, Qwen3 thinking mode).

    Args:
        temperature (`float`, *optional*, defaults to `0.6`):
            Sampling temperature (> 0).
        top_p (`float`, *optional*, defaults to `0.95`):
            Nucleus sampling.
        top_k (`int`, *optional*, defaults to `20`):
            Top-k sampling; `0` disables it.
        max_new_tokens (`int`, *optional*, defaults to `32768`):
            Longest completion.
    """

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    max_new_tokens: int = 32768

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (the harness samples), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError("top_k must be >= 0 and max_new_tokens >= 1.")


@dataclass
class Scored:
    """Per-token results of scoring one completion in one context."""

    logprobs: list[float]
    entropy_bits: list[float]


def chat_prompt_ids(tokenizer: Any, messages: Messages, chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a chat prompt with the generation prompt, as TRL and vLLM's `LLM.chat` render it."""
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, **(chat_template_kwargs or {})
    )
    return list(out["input_ids"])


class TransformersBackend:
    """
    Batched `generate` with left padding, and the teacher-forced scoring pass (used by every backend).

    Args:
        model (`PreTrainedModel`):
            A causal LM (optionally a `PeftModel`).
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer, with a chat template.
        batch_size (`int`, *optional*, defaults to `8`):
            Sequences per forward/generate call.
        chat_template_kwargs (`dict`, *optional*):
            Passed to the chat template (e.g. `{"enable_thinking": True}` for Qwen3).
        score_chunk (`int`, *optional*, defaults to `1024`):
            Completion positions per LM-head chunk in scoring: full-vocabulary logits of a 32K-token completion would
            not fit in memory at once.
    """

    name = "transformers"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int = 8,
        chat_template_kwargs: dict | None = None,
        score_chunk: int = 1024,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.chat_template_kwargs = chat_template_kwargs or {}
        self.score_chunk = score_chunk
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(
        cls, model_name_or_path: str, adapter: str | None = None, dtype: str = "auto", **kwargs: Any
    ) -> TransformersBackend:
        """Load a model (Hub id, local folder or `embedded:<name>`) and optionally a PEFT adapter on top."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..embedded import resolve_model_id

        path = resolve_model_id(model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(adapter or path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        if torch.cuda.is_available():
            model = model.to("cuda")
        model.eval()
        return cls(model, tokenizer, **kwargs)

    def prompt_ids(self, messages: Messages) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages, self.chat_template_kwargs)

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        pad_id = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=self.device)
        return ids, mask

    def _trim(self, ids: list[int]) -> list[int]:
        # Keep the first EOS (it is part of the response, as in TRL's lengths) and drop what follows it.
        for i, token in enumerate(ids):
            if token in self.eos_token_ids:
                return ids[: i + 1]
        return ids

    @torch.no_grad()
    def generate(
        self, prompts: list[Messages], n: int, sampling: SamplingConfig, seed: int = 0
    ) -> list[list[list[int]]]:
        """
        Sample `n` completions for every prompt.

        Args:
            prompts (`list[list[dict]]`):
                Chat prompts.
            n (`int`):
                Samples per prompt.
            sampling (`SamplingConfig`):
                Sampling parameters.
            seed (`int`, *optional*, defaults to `0`):
                Seed of this call, so that a resumed run samples what an uninterrupted one would have.

        Returns:
            `list[list[list[int]]]`: for each prompt, `n` completions as token ids (up to and including EOS).
        """
        torch.manual_seed(seed)
        per_call = max(1, self.batch_size // n)
        results: list[list[list[int]]] = []
        for start in range(0, len(prompts), per_call):
            chunk = [self.prompt_ids(p) for p in prompts[start : start + per_call]]
            ids, mask = self._left_pad(chunk)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k or None,
                max_new_tokens=sampling.max_new_tokens,
                num_return_sequences=n,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            completions = [self._trim(row[ids.size(1) :].tolist()) for row in out]
            results += [completions[i * n : (i + 1) * n] for i in range(len(chunk))]
        return results

    @torch.no_grad()
    def score(self, prompts: list[Messages], completions: list[list[int]], temperature: float = 1.0) -> list[Scored]:
        """
        Teacher-forced pass: per-token log-probs and full-vocabulary entropies (bits) of each completion after its
        prompt, under `softmax(logits / temperature)`.

        Args:
            prompts (`list[list[dict]]`):
                The context to score in (any mode's prompt), one per completion.
            completions (`list[list[int]]`):
                Completion token ids.
            temperature (`float`, *optional*, defaults to `1.0`):
                Temperature of the scored distribution.

        Returns:
            `list[Scored]`: one per completion.
        """
        results: list[Scored] = []
        head = self.model.get_output_embeddings()
        for start in range(0, len(prompts), self.batch_size):
            batch_prompts = [self.prompt_ids(p) for p in prompts[start : start + self.batch_size]]
            batch_completions = completions[start : start + self.batch_size]
            ids, mask = self._left_pad([p + c for p, c in zip(batch_prompts, batch_completions, strict=True)])
            width = max((len(c) for c in batch_completions), default=0)
            if width == 0:
                results += [Scored([], []) for _ in batch_completions]
                continue
            # Position t predicts token t + 1: the states that predict the completion end one before the sequence.
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
            hidden = out.hidden_states[-1]
            for row, completion in enumerate(batch_completions):
                length = len(completion)
                if length == 0:
                    results.append(Scored([], []))
                    continue
                # Left padding: every row ends at the last position.
                states = hidden[row, -length - 1 : -1]
                targets = ids[row, -length:]
                logps, ents = [], []
                for c in range(0, length, self.score_chunk):
                    logits = head(states[c : c + self.score_chunk])
                    logps += token_logprobs(logits, targets[c : c + self.score_chunk], temperature).tolist()
                    ents += token_entropy_bits(logits, temperature).tolist()
                results.append(Scored(logps, ents))
        return results


class VLLMBackend:
    """
    Generation with vLLM (batched, `n` samples per prompt from the same chat-template token ids as `LLM.chat`);
    scoring with the transformers backend it wraps, so metrics are computed exactly as without vLLM.

    Args:
        scorer (`TransformersBackend`):
            The transformers backend used for tokenization and scoring.
        model_path (`str`):
            Local path or Hub id of the model for vLLM.
        gpu_memory_utilization (`float`, *optional*, defaults to `0.5`):
            vLLM's share of GPU memory (the scorer needs the rest).
        adapter (`str`, *optional*):
            A LoRA adapter folder, served through vLLM's LoRA support.
    """

    name = "vllm"

    def __init__(self, scorer: TransformersBackend, model_path: str, gpu_memory_utilization: float = 0.5,
                 adapter: str | None = None, max_model_len: int | None = None):  # fmt: skip
        from vllm import LLM

        self.scorer = scorer
        self.adapter = adapter
        self.llm = LLM(
            model=model_path,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_lora=adapter is not None,
            max_model_len=max_model_len,
        )

    def prompt_ids(self, messages: Messages) -> list[int]:
        return self.scorer.prompt_ids(messages)

    def generate(
        self, prompts: list[Messages], n: int, sampling: SamplingConfig, seed: int = 0
    ) -> list[list[list[int]]]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or -1,
            max_tokens=sampling.max_new_tokens,
            seed=seed,
        )
        lora = None
        if self.adapter is not None:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest("adapter", 1, self.adapter)
        inputs = [{"prompt_token_ids": self.prompt_ids(p)} for p in prompts]
        outputs = self.llm.generate(inputs, params, lora_request=lora, use_tqdm=False)
        return [[list(o.token_ids) for o in out.outputs] for out in outputs]

    def score(self, prompts: list[Messages], completions: list[list[int]], temperature: float = 1.0) -> list[Scored]:
        return self.scorer.score(prompts, completions, temperature)


def vllm_available() -> bool:
    """vLLM is installed and a CUDA GPU is present."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def make_backend(
    model: str,
    adapter: str | None = None,
    backend: str = "auto",
    batch_size: int = 8,
    chat_template_kwargs: dict | None = None,
    gpu_memory_utilization: float = 0.5,
    max_model_len: int | None = None,
) -> TransformersBackend | VLLMBackend:
    """
    Build the backend: `"auto"` picks vLLM when it is installed and a GPU is present, transformers otherwise.

    Args:
        model (`str`):
            Hub id, local folder or `embedded:<name>`.
        adapter (`str`, *optional*):
            PEFT/LoRA adapter folder.
        backend (`str`, *optional*, defaults to `"auto"`):
            `"auto"`, `"transformers"` or `"vllm"`.
        batch_size (`int`, *optional*, defaults to `8`):
            Sequences per call of the transformers backend.
        chat_template_kwargs (`dict`, *optional*):
            Chat-template arguments.
        gpu_memory_utilization (`float`, *optional*, defaults to `0.5`):
            vLLM's share of GPU memory.
        max_model_len (`int`, *optional*):
            vLLM context length.

    Returns:
        The backend.
    """
    if backend not in ("auto", "transformers", "vllm"):
        raise ValueError(f"backend must be 'auto', 'transformers' or 'vllm', got {backend!r}.")
    use_vllm = backend == "vllm" or (backend == "auto" and vllm_available())
    if backend == "vllm" and not vllm_available():
        raise RuntimeError("backend='vllm' needs `pip install vllm` and a CUDA GPU; use backend='transformers'.")
    scorer = TransformersBackend.from_pretrained(
        model, adapter=adapter, batch_size=batch_size, chat_template_kwargs=chat_template_kwargs
    )
    if not use_vllm:
        return scorer
    from ..embedded import resolve_model_id

    return VLLMBackend(scorer, resolve_model_id(model), gpu_memory_utilization, adapter, max_model_len)
