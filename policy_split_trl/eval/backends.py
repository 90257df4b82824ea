"""Generation and scoring backends of the evaluation harness.

Both backends generate token ids; the per-token metrics (entropy of the full next-token distribution, log-probs
under any mode's context) always come from one teacher-forced scoring pass of the transformers model, so the two
backends share the metric code and the numbers mean the same thing. vLLM is used for generation when it is installed
and a GPU is present (or when asked for), transformers `generate` otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .checks import check_int, check_number
from .metrics import token_entropy_bits, token_logprobs

Messages = list[dict[str, Any]]


@dataclass
class SamplingConfig:
    """
    Sampling parameters; the defaults are the paper's inference settings (Table 9, Qwen3 thinking mode).

    `policy-split-eval` takes them as flat flags (`--temperature 0.6`), and an evaluation YAML as a `sampling:` mapping
    or flat keys (see [`~policy_split_trl.eval.parser.EvalParser`]).

    Args:
        temperature (`float`, *optional*, defaults to `0.6`):
            Sampling temperature, finite and > 0.
        top_p (`float`, *optional*, defaults to `0.95`):
            Nucleus sampling, in (0, 1].
        top_k (`int`, *optional*, defaults to `20`):
            Top-k sampling, an integer >= 0; `0` disables it.
        max_new_tokens (`int`, *optional*, defaults to `32768`):
            Longest completion, an integer >= 1.

    Raises:
        [`~policy_split_trl.eval.checks.EvalConfigError`] (a `ValueError`): a field of the wrong type (a bool, a string,
        a float where an integer is needed), NaN or infinite, or out of range; the message names it.
    """

    temperature: float = field(default=0.6, metadata={"help": "Sampling temperature, finite and > 0."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling, in (0, 1]."})
    top_k: int = field(default=20, metadata={"help": "Top-k sampling, an integer >= 0; 0 disables it."})
    max_new_tokens: int = field(default=32768, metadata={"help": "Longest completion, an integer >= 1."})

    def __post_init__(self):
        # Finite and typed: a NaN temperature passes `<= 0` and `inf` new tokens passes `< 1`, and a YAML string
        # ("6e-1") would only fail at the first comparison, without saying which field.
        check_number("sampling.temperature", self.temperature, 0.0, low_open=True)  # > 0: the harness samples
        check_number("sampling.top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_int("sampling.top_k", self.top_k, minimum=0)
        check_int("sampling.max_new_tokens", self.max_new_tokens, minimum=1)


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


def last_hidden_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """
    Final hidden states of a causal LM (after its last norm: what the LM head reads), computed by its decoder alone.

    `model(..., output_hidden_states=True)` would keep every layer's states (tens of GB at 32K tokens) to use only the
    last, and the causal LM's own forward builds a KV cache nobody reads; the decoder with `use_cache=False` keeps
    neither.

    Args:
        model (`PreTrainedModel`):
            A transformers causal LM (Qwen3, Llama, ...), optionally a `PeftModel` with a LoRA adapter.
        input_ids (`torch.Tensor`):
            Token ids, shape `(batch, length)`.
        attention_mask (`torch.Tensor`):
            Its attention mask.

    Returns:
        `torch.Tensor`: shape `(batch, length, hidden_size)`.
    """
    # `get_decoder()` is the inner decoder (`model.model` for Qwen3 and Llama). A `PeftModel` forwards the call to the
    # model it wraps, whose linear layers carry the LoRA weights in place, so the adapter still applies.
    decoder = model.get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if getattr(out, "last_hidden_state", None) is None:
        raise TypeError(
            f"{type(model).__name__}.get_decoder() returned a {type(decoder).__name__}, whose output has no "
            "`last_hidden_state`: scoring needs a transformers causal LM (or a PEFT LoRA model wrapping one)."
        )
    return out.last_hidden_state


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
            hidden = last_hidden_states(self.model, ids, mask)
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


ADAPTER_CONFIG_FILE = "adapter_config.json"

# The only `max_lora_rank` values vLLM accepts: `MaxLoRARanks` in vllm/config/lora.py, the same in vLLM 0.22.0 and
# 0.31.0 (the range TRL 1.16 supports). vLLM sizes its LoRA buffers by it and rejects any other value when it builds
# the engine. TRL keeps the same tuple as `VLLM_LORA_RANKS` in `trl.experimental.async_grpo`, which we do not import:
# importing `trl.experimental` warns, and its API may change without notice.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank(adapter: str) -> int:
    """
    Rank of a PEFT LoRA adapter, read from its `adapter_config.json`: `r`, or the largest `rank_pattern` value when a
    module was given a higher rank.

    Args:
        adapter (`str`):
            The adapter folder (what `save_pretrained` wrote), or its Hub id.

    Returns:
        `int`: the largest rank of the adapter's modules.
    """
    if os.path.isdir(adapter):
        path = os.path.join(adapter, ADAPTER_CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{adapter} has no {ADAPTER_CONFIG_FILE}, so it is not a PEFT LoRA adapter folder: pass the folder "
                "`save_pretrained` (or `trainer.save_model()` of a LoRA run) wrote, or pass a full model as the model "
                "without an adapter."
            )
    else:
        # Not a local folder: a Hub id, as `PeftModel.from_pretrained` and vLLM's `LoRARequest` accept.
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(adapter, ADAPTER_CONFIG_FILE)
        except Exception as error:  # offline, no such repository or no such file: the same fix for all
            raise FileNotFoundError(
                f"Could not read {ADAPTER_CONFIG_FILE} of the adapter {adapter!r} (neither a local folder nor a "
                f"reachable Hub repository with that file): pass a PEFT LoRA adapter folder."
            ) from error
    with open(path) as f:
        config = json.load(f)
    pattern = config.get("rank_pattern") or {}
    ranks = [config.get("r"), *pattern.values()]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        raise ValueError(
            f"{path}: `r` and every `rank_pattern` value must be positive integers (got r={config.get('r')!r}, "
            f"rank_pattern={pattern!r}); is this a LoRA adapter (peft_type={config.get('peft_type')!r})?"
        )
    return max(ranks)


def vllm_lora_kwargs(adapter: str | None) -> dict[str, Any]:
    """
    `vllm.LLM(...)` keyword arguments that serve `adapter` (or no adapter): `enable_lora`, and a `max_lora_rank` the
    adapter fits in, since vLLM's default (16) is below the rank of our LoRA recipes (32) and vLLM refuses a request
    whose adapter rank exceeds it.

    Args:
        adapter (`str`, *optional*):
            A PEFT LoRA adapter folder (or Hub id); `None` serves the bare model.

    Returns:
        `dict[str, Any]`: `{"enable_lora": False}`, or `{"enable_lora": True, "max_lora_rank": rank}`.
    """
    if adapter is None:
        return {"enable_lora": False}
    rank = lora_rank(adapter)
    # vLLM takes only the values of VLLM_LORA_RANKS, so round up to the next one: `max_lora_rank` is a capacity, an
    # r=24 adapter is served exactly under 32.
    allowed = [value for value in VLLM_LORA_RANKS if value >= rank]
    if not allowed:
        raise ValueError(
            f"The adapter {adapter} has LoRA rank {rank}, above the largest `max_lora_rank` vLLM accepts "
            f"({VLLM_LORA_RANKS[-1]}): merge it into the model (`merge_and_unload()`, then pass the merged folder as "
            "the model without an adapter) or use the transformers backend."
        )
    return {"enable_lora": True, "max_lora_rank": allowed[0]}


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
            A LoRA adapter folder, served through vLLM's LoRA support with a `max_lora_rank` that fits its rank
            ([`vllm_lora_kwargs`]).
        max_model_len (`int`, *optional*):
            vLLM context length; defaults to the model's.
    """

    name = "vllm"

    def __init__(
        self,
        scorer: TransformersBackend,
        model_path: str,
        gpu_memory_utilization: float = 0.5,
        adapter: str | None = None,
        max_model_len: int | None = None,
    ):
        from vllm import LLM

        self.scorer = scorer
        self.adapter = adapter
        self.llm = LLM(
            model=model_path,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            **vllm_lora_kwargs(adapter),
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
