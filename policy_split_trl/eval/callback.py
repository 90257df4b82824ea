"""A Trainer callback that runs a small dual-mode evaluation every N steps, so users watch the modes split live."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from ..modes import HIGH_ENTROPY_MODE, NORMAL_MODE
from .backends import SamplingConfig, TransformersBackend
from .benchmarks import Problem
from .harness import EvalConfig, compute_results, iter_records

PREFIX = "dual_mode_eval"


def problems_from_dataset(dataset: Any, kind: str = "math", benchmark: str = "heldout") -> list[Problem]:
    """
    Turn a training-format dataset (`prompt` + `solution` columns, as `policy_split_trl.data` builds) into problems.

    Args:
        dataset (`Dataset` or `list[dict]`):
            Rows with a conversational `prompt` and a gold `solution`.
        kind (`str`, *optional*, defaults to `"math"`):
            How answers are graded: `"math"`, `"multiple_choice"` or `"arithmetic"`.
        benchmark (`str`, *optional*, defaults to `"heldout"`):
            Name shown in the logged metrics.

    Returns:
        `list[Problem]`.
    """
    return [
        Problem(
            benchmark=benchmark, id=str(i), prompt=row["prompt"], answer=str(row["solution"]), kind=kind, metadata={}
        )
        for i, row in enumerate(dataset)
    ]


class DualModeEvalCallback(TrainerCallback):
    """
    Every `every_n_steps` optimizer steps, sample `k` completions per held-out problem in each mode with the model
    being trained, and log per mode: `dual_mode_eval/<mode>/accuracy` (avg@k), `pass_at_k`, `entropy_bits`,
    `length`, and `dual_mode_eval/kl_<mode>_normal` (KL(pi_mode || pi) on that mode's samples).

    Attach it with [`attach`] so the metrics go through the trainer's own logging (TensorBoard, W&B, trackio):

    ```python
    callback = DualModeEvalCallback(problems_from_dataset(eval_dataset, kind="arithmetic"), every_n_steps=10)
    callback.attach(trainer)
    ```

    Args:
        problems (`Sequence[Problem]`):
            Held-out problems (a small slice: this runs inside training).
        every_n_steps (`int`, *optional*, defaults to `50`):
            Evaluation period, in optimizer steps.
        k (`int`, *optional*, defaults to `2`):
            Samples per problem and mode.
        sampling (`SamplingConfig`, *optional*):
            Sampling parameters; defaults to the paper's inference settings with 512 new tokens.
        mode_prompts (`dict[str, str | None]`, *optional*):
            Mode name -> system prompt; defaults to normal and the trainer's `high_entropy_system_prompt`.
        batch_size (`int`, *optional*, defaults to `8`):
            Sequences per generate/score call.
        chat_template_kwargs (`dict`, *optional*):
            Passed to the chat template, as in training (e.g. `{"enable_thinking": False}` for Qwen3).
    """

    def __init__(
        self,
        problems: Sequence[Problem],
        every_n_steps: int = 50,
        k: int = 2,
        sampling: SamplingConfig | None = None,
        mode_prompts: dict[str, str | None] | None = None,
        batch_size: int = 8,
        chat_template_kwargs: dict | None = None,
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        if not problems:
            raise ValueError("DualModeEvalCallback needs at least one held-out problem.")
        self.problems = list(problems)
        self.every_n_steps = every_n_steps
        self.k = k
        self.sampling = sampling or SamplingConfig(max_new_tokens=512)
        self.mode_prompts = mode_prompts
        self.batch_size = batch_size
        self.chat_template_kwargs = chat_template_kwargs or {}
        self.trainer: Any = None
        self.history: list[dict[str, float]] = []

    def attach(self, trainer: Any) -> DualModeEvalCallback:
        """Register on `trainer` and log through its metrics."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def _modes(self, args: Any) -> dict[str, str | None]:
        if self.mode_prompts is not None:
            return self.mode_prompts
        prompt = getattr(args, "high_entropy_system_prompt", None)
        if prompt is None:
            from ..modes import HIGH_ENTROPY_SYSTEM_PROMPT

            prompt = HIGH_ENTROPY_SYSTEM_PROMPT
        return {NORMAL_MODE: None, HIGH_ENTROPY_MODE: prompt}

    def evaluate(self, model: Any, tokenizer: Any, args: Any = None) -> dict[str, float]:
        """Run the evaluation now and return the flat metrics (also what gets logged)."""
        modes = self._modes(args)
        config = EvalConfig(
            model="<in-training>",
            output_dir="",
            modes=list(modes),
            mode_prompts={m: p for m, p in modes.items() if p},
            k=self.k,
            sampling=self.sampling,
            batch_size=self.batch_size,
            progress=False,
        )
        problems = {self.problems[0].benchmark: self.problems}
        was_training = model.training
        model.eval()
        try:
            backend = TransformersBackend(
                model, tokenizer, batch_size=self.batch_size, chat_template_kwargs=self.chat_template_kwargs
            )
            records = [r for batch in iter_records(config, backend, problems) for r in batch]
        finally:
            model.train(was_training)
        results = compute_results(config, records, problems)
        flat: dict[str, float] = {}
        for mode, m in next(iter(results["per_benchmark"].values())).items():
            for key, name in (
                ("avg_at_k", "accuracy"),
                ("pass_at_k", "pass_at_k"),
                ("entropy_bits", "entropy_bits"),
                ("mean_length", "length"),
            ):
                if not (isinstance(m[key], float) and math.isnan(m[key])):
                    flat[f"{PREFIX}/{mode}/{name}"] = float(m[key])
            if "kl_mode_normal" in m:
                flat[f"{PREFIX}/kl_{mode}_normal"] = float(m["kl_mode_normal"])
        return flat

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 0 or state.global_step % self.every_n_steps:
            return
        model = kwargs["model"]
        tokenizer = kwargs.get("processing_class")
        if self.trainer is not None:
            model = self.trainer.accelerator.unwrap_model(self.trainer.model)
            tokenizer = tokenizer or self.trainer.processing_class
        metrics = self.evaluate(model, tokenizer, args)
        self.history.append({"step": state.global_step, **metrics})
        if self.trainer is not None and hasattr(self.trainer, "_metrics"):
            # GRPO-family trainers average `_metrics` into their next log line.
            for key, value in metrics.items():
                self.trainer._metrics["train"][key].append(value)
            control.should_log = True
