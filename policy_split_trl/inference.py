"""Use a trained dual-mode model in either mode: load it with the prompts stored in its `policy_split.json` and generate
(or stream) with transformers, or with vLLM when it is installed and a GPU is present."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from .hub import load_policy_split_config, mode_prompts
from .modes import HIGH_ENTROPY_MODE, MODE_PROMPTS, NORMAL_MODE, apply_mode

logger = logging.getLogger(__name__)

Messages = list[dict[str, Any]]


class DualModeModel:
    """
    A causal LM with its modes: `generate(messages, mode)` puts the mode's stored system prompt exactly where training
    put it ([`apply_mode`]) and samples a reply.

    ```python
    model = DualModeModel.from_pretrained("my-org/qwen3-1.7b-policy-split")
    model.generate([{"role": "user", "content": "Prove there are infinitely many primes."}], mode="high_entropy")
    ```

    Args:
        model (`PreTrainedModel`):
            The model (optionally a `PeftModel`).
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer, with a chat template.
        prompts (`dict[str, str | None]`, *optional*):
            Mode name -> system prompt; defaults to the paper's normal and high-entropy prompts.
        chat_template_kwargs (`dict`, *optional*):
            e.g. `{"enable_thinking": False}` for Qwen3.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompts: dict[str, str | None] | None = None,
        chat_template_kwargs: dict | None = None,
        llm: Any = None,
        lora_request: Any = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = dict(prompts) if prompts else {m: MODE_PROMPTS[m] for m in (NORMAL_MODE, HIGH_ENTROPY_MODE)}
        self.chat_template_kwargs = chat_template_kwargs or {}
        # With vLLM, `model` is None and generation goes through `llm.chat`.
        self.llm = llm
        self.lora_request = lora_request

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        adapter: str | None = None,
        dtype: str = "auto",
        chat_template_kwargs: dict | None = None,
        backend: str = "transformers",
    ) -> DualModeModel:
        """
        Load a model (Hub id, folder or `embedded:<name>`, optionally with a LoRA adapter) and the prompts of its
        `policy_split.json` (from the adapter folder if given, else the model). A model without that file gets the
        paper's prompts, with a warning. `backend="vllm"` (or `"auto"` with vLLM installed and a GPU) generates with
        vLLM's `LLM.chat`, serving the adapter with a `max_lora_rank` that fits its rank.
        """
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .embedded import resolve_model_id
        from .eval.backends import vllm_available, vllm_lora_kwargs

        if backend not in ("auto", "transformers", "vllm"):
            raise ValueError(f"backend must be 'auto', 'transformers' or 'vllm', got {backend!r}.")
        use_vllm = backend == "vllm" or (backend == "auto" and vllm_available())

        path = resolve_model_id(model_id)
        try:
            prompts = mode_prompts(load_policy_split_config(adapter or path))
        except (FileNotFoundError, OSError):
            logger.warning("%s has no policy_split.json: using the paper's prompts.", adapter or model_id)
            prompts = None
        tokenizer = AutoTokenizer.from_pretrained(adapter or path)
        if use_vllm:
            lora_kwargs = vllm_lora_kwargs(adapter)  # before vLLM starts: a bad adapter folder fails in seconds
            from vllm import LLM

            lora = None
            if adapter is not None:
                from vllm.lora.request import LoRARequest

                lora = LoRARequest("adapter", 1, adapter)
            llm = LLM(model=path, **lora_kwargs)
            return cls(None, tokenizer, prompts, chat_template_kwargs, llm=llm, lora_request=lora)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        if torch.cuda.is_available():
            model = model.to("cuda")
        return cls(model.eval(), tokenizer, prompts, chat_template_kwargs)

    @property
    def modes(self) -> list[str]:
        return list(self.prompts)

    def prompt(self, messages: Messages, mode: str = NORMAL_MODE) -> Messages:
        """The messages in `mode`, with its stored system prompt placed as in training."""
        return apply_mode(messages, mode, self.prompts)

    def _inputs(self, messages: Messages, mode: str) -> dict[str, Any]:
        inputs = self.tokenizer.apply_chat_template(
            self.prompt(messages, mode),
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
            **self.chat_template_kwargs,
        )
        return {k: v.to(self.model.device) for k, v in inputs.items()}

    def _generation_kwargs(self, max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> dict:
        sample = temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sample}
        if sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
        if self.tokenizer.pad_token_id is not None:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        return kwargs

    def generate(
        self,
        messages: Messages,
        mode: str = NORMAL_MODE,
        max_new_tokens: int = 1024,
        temperature: float = 0.6,
        top_p: float = 0.95,
        top_k: int = 20,
    ) -> str:
        """
        Reply to `messages` in `mode`.

        Args:
            messages (`list[dict]`):
                The conversation (without the mode's system prompt).
            mode (`str`, *optional*, defaults to `"normal"`):
                One of `modes`.
            max_new_tokens (`int`, *optional*, defaults to `1024`):
                Longest reply.
            temperature (`float`, *optional*, defaults to `0.6`):
                `0` decodes greedily; the other defaults are the paper's inference settings.
            top_p (`float`, *optional*, defaults to `0.95`):
                Nucleus sampling.
            top_k (`int`, *optional*, defaults to `20`):
                Top-k sampling (`0` disables it).

        Returns:
            `str`: the reply text.
        """
        if self.llm is not None:
            from vllm import SamplingParams

            params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k or -1, max_tokens=max_new_tokens)
            outputs = self.llm.chat(
                self.prompt(messages, mode),
                params,
                lora_request=self.lora_request,
                chat_template_kwargs=self.chat_template_kwargs or None,
                use_tqdm=False,
            )
            return outputs[0].outputs[0].text
        inputs = self._inputs(messages, mode)
        out = self.model.generate(**inputs, **self._generation_kwargs(max_new_tokens, temperature, top_p, top_k))
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def stream(
        self,
        messages: Messages,
        mode: str = NORMAL_MODE,
        max_new_tokens: int = 1024,
        temperature: float = 0.6,
        top_p: float = 0.95,
        top_k: int = 20,
    ) -> Iterator[str]:
        """[`generate`], yielding the reply's text piece by piece as it is produced (all at once with vLLM)."""
        if self.llm is not None:
            yield self.generate(messages, mode, max_new_tokens, temperature, top_p, top_k)
            return
        from transformers import TextIteratorStreamer

        inputs = self._inputs(messages, mode)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {**inputs, **self._generation_kwargs(max_new_tokens, temperature, top_p, top_k), "streamer": streamer}
        thread = threading.Thread(target=self.model.generate, kwargs=kwargs, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
