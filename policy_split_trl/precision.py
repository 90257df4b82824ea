"""
Whether the optimizer's steps survive the rounding of the weights it updates.

An AdamW step moves a weight by about the learning rate (`|m_hat / sqrt(v_hat)|` is ~1 early on and smaller later). A
weight stored with `m` mantissa bits changes only if the step exceeds half its ulp, which is between
`|w| * 2**-(m + 1)` and `|w| * 2**-m`. In bfloat16 (`m = 7`) a step of 3e-6 (the paper's learning rate) therefore
moves only weights below ~1e-3 in magnitude: ~4% of weights of the usual scale (std 0.02), against all of them in
float32 (`m = 23`). Training must keep float32 *master* weights: load the model in float32 and compute in bf16
through autocast (`dtype: float32` + `bf16: true`), or let DeepSpeed ZeRO keep fp32 master copies of bf16 weights.

This module has the arithmetic ([`update_rounding`]), the measurement on real weights
([`fraction_of_updates_kept`]) and the checks the training script runs: before loading, from the settings
([`precision_warning`], [`precision_warning_for_args`]), and after loading, from the weights
([`trainer_precision_warning`]).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

# Std of freshly initialized Qwen3/Llama-style weights (`initializer_range`): the scale the percentages refer to.
DEFAULT_WEIGHT_SCALE = 0.02
# Below this fraction of weights that an lr-sized step still changes, training is (partly) frozen by rounding.
MIN_FRACTION_CHANGED = 0.9
# Elements sampled per tensor when measuring: the fraction's standard error stays below 0.05%.
MAX_SAMPLED_ELEMENTS = 1 << 20

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
}
FIX = "`dtype: float32` (--dtype float32) with `bf16: true` (bf16 autocast; float16 GPUs: `fp16: true`)"


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """
    A torch floating dtype from a dtype or its name (`"bfloat16"`, `"torch.float32"`, `"bf16"`, ...).

    Returns:
        `torch.dtype` or `None` for `None` and `"auto"` (the checkpoint's own dtype, unknown until it is read).

    Raises:
        `ValueError`: an unknown name or a non-floating dtype.
    """
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return None
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in _DTYPE_NAMES:
            raise ValueError(f"Unknown dtype {dtype!r}; use one of float32, bfloat16, float16 (or auto).")
        return _DTYPE_NAMES[name]
    if not dtype.is_floating_point:
        raise ValueError(f"{dtype} is not a floating-point dtype.")
    return dtype


def mantissa_bits(dtype: torch.dtype | str) -> int:
    """Explicit mantissa bits of a floating dtype: 7 for bfloat16, 10 for float16, 23 for float32."""
    resolved = as_dtype(dtype)
    if resolved is None:
        raise ValueError("mantissa_bits needs a concrete dtype, not 'auto'.")
    return round(-math.log2(torch.finfo(resolved).eps))


def half_ulp(weight: float, dtype: torch.dtype | str) -> float:
    """
    Half the spacing of `dtype` values at `weight`: the smallest update that still changes a weight of that magnitude
    (round-to-nearest; an update of exactly half an ulp may round either way). Normal numbers only.
    """
    if weight == 0:
        return 0.0
    exponent = math.floor(math.log2(abs(weight)))
    return 2.0 ** (exponent - mantissa_bits(dtype) - 1)


@dataclass(frozen=True)
class UpdateRounding:
    """
    What a step of size `learning_rate` does to weights stored in `dtype` ([`update_rounding`]).

    Args:
        dtype (`torch.dtype`):
            The dtype of the updated weights.
        learning_rate (`float`):
            The step size.
        weight_scale (`float`):
            Std of the weights considered typical.
        half_ulp_at_scale (`float`):
            Smallest step that changes a weight of magnitude `weight_scale`.
        largest_weight_changed (`float`):
            Weights of at least this magnitude are not changed by a step of `learning_rate`.
        fraction_changed (`float`):
            Fraction of normally distributed weights (std `weight_scale`) that such a step changes.
    """

    dtype: torch.dtype
    learning_rate: float
    weight_scale: float
    half_ulp_at_scale: float
    largest_weight_changed: float
    fraction_changed: float

    @property
    def rounds_away(self) -> bool:
        """Whether most typical weights would never move: fewer than [`MIN_FRACTION_CHANGED`] change."""
        return self.fraction_changed < MIN_FRACTION_CHANGED


def update_rounding(
    learning_rate: float, dtype: torch.dtype | str, weight_scale: float = DEFAULT_WEIGHT_SCALE
) -> UpdateRounding:
    """
    Which weights a step of size `learning_rate` can still change in `dtype`.

    A weight with binary exponent `k` (`2**k <= |w| < 2**(k+1)`) changes when `lr > 2**(k - m - 1)` (half an ulp), so
    every weight below `2**ceil(log2(lr) + m + 1)` in magnitude changes and none above.

    Args:
        learning_rate (`float`):
            Size of one optimizer step (AdamW's steps are about the learning rate, at most a few times it).
        dtype (`torch.dtype` or `str`):
            dtype of the weights the optimizer updates.
        weight_scale (`float`, *optional*, defaults to `0.02`):
            Std of typical weights (Qwen3's `initializer_range`).

    Returns:
        [`UpdateRounding`].

    Example:
        bfloat16 at 3e-6: weights below 2**-10 (~9.8e-4) change, ~3.9% of N(0, 0.02^2) weights; float32: all.
    """
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
    if weight_scale <= 0:
        raise ValueError(f"weight_scale must be > 0, got {weight_scale}.")
    resolved = as_dtype(dtype)
    if resolved is None:
        raise ValueError("update_rounding needs a concrete dtype, not 'auto'.")
    largest = 2.0 ** math.ceil(math.log2(learning_rate) + mantissa_bits(resolved) + 1)
    return UpdateRounding(
        dtype=resolved,
        learning_rate=learning_rate,
        weight_scale=weight_scale,
        half_ulp_at_scale=half_ulp(weight_scale, resolved),
        largest_weight_changed=largest,
        fraction_changed=math.erf(largest / (weight_scale * math.sqrt(2.0))),
    )


def fraction_of_updates_kept(
    params: Iterable[torch.Tensor], learning_rate: float, max_elements: int | None = MAX_SAMPLED_ELEMENTS
) -> float:
    """
    Measured on real weights: the fraction of trainable elements that a step of `learning_rate` changes in their own
    dtype (`(w + lr) != w`, rounded as an in-place optimizer update is).

    Args:
        params (`Iterable[torch.Tensor]`):
            Parameters, e.g. `model.parameters()`; those with `requires_grad=False` (frozen) and empty ones (a ZeRO-3
            shard placeholder) are skipped.
        learning_rate (`float`):
            The step size.
        max_elements (`int` or `None`, *optional*, defaults to `2**20`):
            Evenly strided sample per tensor (each tensor still weighs by its size); `None` checks every element.

    Returns:
        `float`: the fraction in `[0, 1]`, or `nan` when there is no trainable element.
    """
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
    changed = total = 0.0
    with torch.no_grad():
        for param in params:
            if not param.requires_grad or param.numel() == 0 or not param.is_floating_point():
                continue
            flat = param.detach().reshape(-1)
            if max_elements is not None and flat.numel() > max_elements:
                flat = flat[:: math.ceil(flat.numel() / max_elements)]
            moved = ((flat + learning_rate) != flat).float().mean().item()
            changed += moved * param.numel()
            total += param.numel()
    return changed / total if total else float("nan")


def trained_weight_dtype(
    weight_dtype: torch.dtype | str | None,
    *,
    deepspeed_mixed_precision: bool = False,
    use_peft: bool = False,
    quantized: bool = False,
) -> torch.dtype | None:
    """
    dtype of the weights AdamW actually updates.

    Args:
        weight_dtype (`torch.dtype`, `str` or `None`):
            dtype the model is loaded in (`ModelConfig.dtype`); `None`/`"auto"`: unknown.
        deepspeed_mixed_precision (`bool`, *optional*, defaults to `False`):
            DeepSpeed (any ZeRO stage) with bf16/fp16 on: it keeps fp32 master copies of the weights. FSDP2 does not
            (its sharded parameters stay in the loaded dtype), nor does DDP.
        use_peft (`bool`, *optional*, defaults to `False`):
            LoRA: only the adapters train, and PEFT creates them in float32 (`autocast_adapter_dtype=True`).
        quantized (`bool`, *optional*, defaults to `False`):
            4/8-bit base model (QLoRA): TRL casts the adapters to bfloat16.

    Returns:
        `torch.dtype`, or `None` when it depends on an unknown `weight_dtype`.
    """
    if deepspeed_mixed_precision:
        return torch.float32
    if use_peft:
        return torch.bfloat16 if quantized else torch.float32
    return as_dtype(weight_dtype)


def precision_warning(
    learning_rate: float,
    weight_dtype: torch.dtype | str | None,
    *,
    deepspeed_mixed_precision: bool = False,
    use_peft: bool = False,
    quantized: bool = False,
    weight_scale: float = DEFAULT_WEIGHT_SCALE,
) -> str | None:
    """
    A warning when the settings would train low-precision weights at a learning rate their rounding swallows.

    Args:
        learning_rate (`float`):
            The learning rate.
        weight_dtype, deepspeed_mixed_precision, use_peft, quantized:
            As in [`trained_weight_dtype`].
        weight_scale (`float`, *optional*, defaults to `0.02`):
            As in [`update_rounding`].

    Returns:
        `str` (what happens and which fields to change) or `None` when the steps survive (or the dtype is unknown).
    """
    dtype = trained_weight_dtype(
        weight_dtype, deepspeed_mixed_precision=deepspeed_mixed_precision, use_peft=use_peft, quantized=quantized
    )
    if dtype is None:
        return None
    rounding = update_rounding(learning_rate, dtype, weight_scale)
    if not rounding.rounds_away:
        return None
    name = str(dtype).removeprefix("torch.")
    qlora = use_peft and quantized
    what = "QLoRA adapters (TRL casts them to bfloat16)" if qlora else f"{name} weights"
    fix = (
        "raise learning_rate, or train LoRA without load_in_4bit/load_in_8bit (float32 adapters)"
        if qlora
        else f"keep float32 master weights: {FIX}, or DeepSpeed ZeRO with bf16 (fp32 master copies)"
    )
    return (
        f"AdamW would update {what} at learning_rate {learning_rate:g}: a step that size rounds away on every weight "
        f"above {rounding.largest_weight_changed:.1e} in magnitude, so only ~{rounding.fraction_changed:.0%} of "
        f"typical weights (std {weight_scale:g}) would ever change. To train them, {fix}."
    )


def _deepspeed_mixed_precision(args: Any) -> bool:
    """DeepSpeed on (a `deepspeed` config or an `accelerate launch` DeepSpeed config) with bf16/fp16."""
    deepspeed = getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None
    deepspeed = deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")
    mixed = getattr(args, "bf16", False) or getattr(args, "fp16", False)
    return bool(deepspeed) and (mixed or getattr(args, "mixed_precision", "no") in ("bf16", "fp16"))


def _settings_from_args(
    training_args: Any, model_args: Any, checkpoint_dtype: torch.dtype | str | None
) -> dict[str, Any]:
    """The keywords of [`trained_weight_dtype`] from parsed settings."""
    weight_dtype = model_args.dtype
    if weight_dtype in (None, "auto"):
        weight_dtype = checkpoint_dtype
    return {
        "weight_dtype": weight_dtype,
        "deepspeed_mixed_precision": _deepspeed_mixed_precision(training_args),
        "use_peft": bool(getattr(model_args, "use_peft", False)),
        "quantized": bool(getattr(model_args, "load_in_4bit", False) or getattr(model_args, "load_in_8bit", False)),
    }


def describe_precision(training_args: Any, model_args: Any, checkpoint_dtype: torch.dtype | str | None = None) -> str:
    """
    One line on what a run's optimizer updates and computes in, e.g. `"AdamW updates float32 weights, bf16
    compute"`, from the same settings as [`precision_warning_for_args`].
    """
    settings = _settings_from_args(training_args, model_args, checkpoint_dtype)
    dtype = trained_weight_dtype(**settings)
    what = "LoRA adapters" if settings["use_peft"] else "weights"
    master = " (DeepSpeed fp32 master copies)" if settings["deepspeed_mixed_precision"] else ""
    compute = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
    if dtype is None:
        return (
            f"AdamW updates {what} in the checkpoint's dtype (dtype: auto; checked after loading), {compute} compute"
        )
    return f"AdamW updates {str(dtype).removeprefix('torch.')} {what}{master}, {compute} compute"


def precision_warning_for_args(
    training_args: Any, model_args: Any, checkpoint_dtype: torch.dtype | str | None = None
) -> str | None:
    """
    [`precision_warning`] from parsed settings, before anything is loaded (what `--dry_run` checks).

    Args:
        training_args (`TrainingArguments`):
            Its `learning_rate`, `bf16`/`fp16` and DeepSpeed state (`deepspeed`, or an `accelerate launch`
            DeepSpeed config).
        model_args (`trl.ModelConfig`):
            Its `dtype`, `use_peft`, `load_in_4bit`, `load_in_8bit`.
        checkpoint_dtype (`torch.dtype` or `str`, *optional*):
            The checkpoint's own dtype, used for `dtype: auto`.

    Returns:
        `str` or `None`, as [`precision_warning`].
    """
    return precision_warning(
        training_args.learning_rate, **_settings_from_args(training_args, model_args, checkpoint_dtype)
    )


def measured_precision_warning(
    model: torch.nn.Module, learning_rate: float, fp32_master_weights: bool = False
) -> str | None:
    """
    A warning from the loaded weights: fewer than [`MIN_FRACTION_CHANGED`] of the trainable elements would change under
    a step of `learning_rate` ([`fraction_of_updates_kept`]).

    Args:
        model (`torch.nn.Module`):
            The model as the optimizer will see it (PEFT: the adapters are its trainable parameters).
        learning_rate (`float`):
            The learning rate.
        fp32_master_weights (`bool`, *optional*, defaults to `False`):
            The optimizer updates fp32 copies (DeepSpeed with bf16/fp16), not these tensors: nothing to check.

    Returns:
        `str` or `None`.
    """
    if fp32_master_weights:
        return None
    trainable = [p for p in model.parameters() if p.requires_grad]
    fraction = fraction_of_updates_kept(trainable, learning_rate)
    if math.isnan(fraction) or fraction >= MIN_FRACTION_CHANGED:
        return None
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trainable})
    return (
        f"Only {fraction:.1%} of the trainable weights ({', '.join(dtypes)}) change under one step of learning_rate "
        f"{learning_rate:g}: the rest rounds away and never trains. Keep float32 master weights: {FIX}, or DeepSpeed "
        "ZeRO with bf16 (fp32 master copies)."
    )


def trainer_precision_warning(trainer: Any) -> str | None:
    """[`measured_precision_warning`] for a built `Trainer` (before `train()`: DeepSpeed has not wrapped it yet)."""
    args = trainer.args
    fp32_master = bool(getattr(trainer, "is_deepspeed_enabled", False)) and bool(args.bf16 or args.fp16)
    return measured_precision_warning(trainer.model, args.learning_rate, fp32_master_weights=fp32_master)
