"""Precision and generation settings for the hardware a run gets: the rules the Colab notebook and its tests share.

Only the standard library is imported here, on purpose: the notebook's install cell loads this file by its path (the
package's `__init__` imports TRL, hence torch) before torch is imported, because installing vLLM can replace torch.

Sizing colocated vLLM (all in GiB; `GIB = 2**30` bytes):

    vLLM needs  = weights + VLLM_OVERHEAD_GIB + KV cache
    KV cache    = kv_cache_bytes_per_token x vllm_max_model_length x sequences held at once / GIB
    share       = vLLM needs for the whole generation batch (`max_num_seqs` sequences) / GPU memory,
                  rounded up to 5 %, at most MAX_VLLM_SHARE (beyond it vLLM holds fewer sequences at once and queues
                  the rest); vLLM is impossible if even one sequence does not fit in MAX_VLLM_SHARE of the GPU
    training    = GPU memory x (1 - share): vLLM is chosen automatically only where this is >= TRAINING_MEMORY_GIB

Qwen3-0.6B with the notebook's defaults (a 1,024-token context, 32 sequences): 1.11 + 2.0 + 3.5 = 6.6 GiB, i.e. 0.20
of an A100 40 GB and 0.10 of an 80 GB GPU. Qwen3's own 40,960-token context would need 4.4 GiB of KV cache for a single
sequence, more than a T4 (14.7 GiB) leaves vLLM at TRL's default share of 0.3: hence `vllm_max_model_length` is always
the prompt budget plus the completion budget.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

GIB = 2**30
# Qwen3-0.6B, the notebook's default model: 596 M parameters x 2 bytes (vLLM serves it in 16 bits).
QWEN3_0_6B_WEIGHTS_GIB = 1.11
# Qwen3-0.6B and 1.7B: 28 layers x 8 KV heads x 128 dims x 2 (key and value) x 2 bytes.
QWEN3_KV_CACHE_BYTES_PER_TOKEN = 28 * 8 * 128 * 2 * 2
# vLLM memory beyond weights and KV cache: the activation peak of its profiling run (TRL caps a vLLM step at 4,096
# tokens), CUDA graphs, and CUDA/NCCL memory outside PyTorch's allocator. An estimate with a margin.
VLLM_OVERHEAD_GIB = 2.0
# Most of the GPU colocated vLLM may reserve (TRL's default `vllm_gpu_memory_utilization`): training needs the rest.
MAX_VLLM_SHARE = 0.3
# What training needs beside vLLM for vLLM to be chosen automatically: the notebook's defaults are sized for one
# 16 GB GPU (a T4 has 14.7 GiB) training with transformers generation, so vLLM must leave at least that much.
TRAINING_MEMORY_GIB = 14.0
# bf16 runs natively from Ampere (compute capability 8.0) on; below, torch emulates it (slowly), although
# `torch.cuda.is_bf16_supported()` says True. vLLM's fast attention kernels need 8.0 as well.
BF16_MIN_CAPABILITY = (8, 0)
# Where vLLM is off, the reported share is TRL's default (unused).
DEFAULT_VLLM_GPU_MEMORY_UTILIZATION = 0.3
NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"]


@dataclass(frozen=True)
class RuntimeSettings:
    """
    Precision and generation settings for one run, as chosen by [`runtime_settings`].

    Args:
        on_gpu (`bool`):
            Whether training runs on a CUDA GPU.
        bf16 (`bool`):
            bf16 mixed precision (GPUs with compute capability >= 8.0).
        fp16 (`bool`):
            fp16 mixed precision (older GPUs, e.g. the T4).
        use_vllm (`bool`):
            Generate with vLLM colocated on the training GPU instead of transformers' `generate`.
        vllm_gpu_memory_utilization (`float`):
            Share of the GPU vLLM reserves for its weights, activations and KV cache (TRL's
            `vllm_gpu_memory_utilization`).
        vllm_max_model_length (`int`):
            vLLM's context length: the prompt budget plus the completion budget (TRL's `vllm_max_model_length`).
        total_memory_gib (`float` or `None`):
            GPU memory in GiB, `None` on CPU.
        compute_capability (`tuple[int, int]` or `None`):
            The GPU's compute capability, `None` on CPU.
        reason (`str`):
            Why vLLM is (not) used, in a few words.
    """

    on_gpu: bool
    bf16: bool
    fp16: bool
    use_vllm: bool
    vllm_gpu_memory_utilization: float
    vllm_max_model_length: int
    total_memory_gib: float | None = None
    compute_capability: tuple[int, int] | None = None
    reason: str = ""

    @property
    def dtype(self) -> str:
        """The torch dtype name to load the model in: `"bfloat16"`, `"float16"` or `"float32"`."""
        return "bfloat16" if self.bf16 else "float16" if self.fp16 else "float32"

    def describe(self) -> str:
        """One line for a notebook or a log, e.g. `GPU 39.4 GiB, compute capability 8.0: bfloat16, vLLM ...`."""
        if not self.on_gpu:
            device = "CPU"
        else:
            major, minor = self.compute_capability
            device = f"GPU {self.total_memory_gib:.1f} GiB, compute capability {major}.{minor}"
        generation = (
            f"vLLM generation with {self.vllm_gpu_memory_utilization:.0%} of the GPU"
            if self.use_vllm
            else "transformers generation"
        )
        return f"{device}: {self.dtype}, {generation}, max model length {self.vllm_max_model_length} ({self.reason})"


class GpuInfo(NamedTuple):
    """The first GPU as `nvidia-smi` reports it."""

    name: str
    total_memory_gib: float
    compute_capability: tuple[int, int]


def _check_positive(name: str, value: Any, kind: type = int) -> None:
    """Raise a `ValueError` naming `name` unless `value` is a positive `kind` (`int`, or `float` which takes ints)."""
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive {kind.__name__}, got {value!r}.")


def _round_up_to_5_percent(share: float) -> float:
    # The 1e-9 keeps an exact multiple (0.2) from being rounded up to the next step by float noise.
    return round(math.ceil(share * 20 - 1e-9) / 20, 2)


def runtime_settings(
    total_memory_gib: float | None,
    compute_capability: tuple[int, int] | None,
    max_prompt_length: int,
    max_completion_length: int,
    use_vllm: bool | None = None,
    *,
    weights_gib: float = QWEN3_0_6B_WEIGHTS_GIB,
    kv_cache_bytes_per_token: int = QWEN3_KV_CACHE_BYTES_PER_TOKEN,
    max_num_seqs: int = 32,
) -> RuntimeSettings:
    """
    Map the hardware (one GPU, or none) to precision and generation settings.

    Rules: bf16 only on compute capability >= 8.0 (A100, L4, H100); fp16 on older GPUs (T4, V100), whatever
    `torch.cuda.is_bf16_supported()` says (it is True on a T4, where bf16 is emulated); fp32 on CPU. vLLM generation is
    chosen automatically on compute capability >= 8.0 when it leaves training at least `TRAINING_MEMORY_GIB`, and
    transformers generation otherwise (T4 included); `use_vllm=True` forces vLLM on any GPU it fits. vLLM's context is
    always `max_prompt_length + max_completion_length` (never the model's own 40,960 tokens of Qwen3), and its share of
    the GPU is sized as the module docstring shows.

    Args:
        total_memory_gib (`float` or `None`):
            GPU memory in GiB (`torch.cuda.get_device_properties(0).total_memory / 2**30`); `None` means no GPU (CPU).
        compute_capability (`tuple[int, int]` or `None`):
            The GPU's compute capability (`torch.cuda.get_device_capability()`, e.g. `(7, 5)` for a T4); `None` on
            CPU.
        max_prompt_length (`int`):
            Longest prompt in tokens (chat template included).
        max_completion_length (`int`):
            Longest completion in tokens (TRL's `max_completion_length`).
        use_vllm (`bool` or `None`, *optional*):
            `None` chooses automatically; `True` forces vLLM (an error on CPU or where it cannot fit), `False` turns it
            off.
        weights_gib (`float`, *optional*, defaults to Qwen3-0.6B's `1.11`):
            The model's weights in 16 bits, in GiB (see [`model_footprint`]).
        kv_cache_bytes_per_token (`int`, *optional*, defaults to Qwen3-0.6B's `114688`):
            KV-cache bytes per token (see [`model_footprint`]).
        max_num_seqs (`int`, *optional*, defaults to `32`):
            Sequences vLLM generates at once: TRL passes `per_device_train_batch_size x steps_per_generation` (by
            default `x gradient_accumulation_steps`).

    Returns:
        [`RuntimeSettings`]: the settings, with `bf16`, `fp16`, `use_vllm`, `vllm_gpu_memory_utilization` and
        `vllm_max_model_length` ready for `PolicySplitGRPOConfig`.

    Example:

    ```python
    >>> settings = runtime_settings(14.7, (7, 5), 512, 512)  # a Colab T4
    >>> settings.fp16, settings.use_vllm, settings.vllm_max_model_length
    (True, False, 1024)
    >>> runtime_settings(39.4, (8, 0), 512, 512).vllm_gpu_memory_utilization  # an A100 40 GB: vLLM, 20 %
    0.2

    ```
    """
    if (total_memory_gib is None) != (compute_capability is None):
        raise ValueError(
            "`total_memory_gib` and `compute_capability` must both be None (CPU) or both be set (GPU), got "
            f"{total_memory_gib!r} and {compute_capability!r}."
        )
    _check_positive("max_prompt_length", max_prompt_length)
    _check_positive("max_completion_length", max_completion_length)
    _check_positive("max_num_seqs", max_num_seqs)
    _check_positive("kv_cache_bytes_per_token", kv_cache_bytes_per_token)
    _check_positive("weights_gib", weights_gib, float)
    if use_vllm not in (None, True, False):
        raise ValueError(f"`use_vllm` must be None (automatic), True or False, got {use_vllm!r}.")
    max_model_length = max_prompt_length + max_completion_length

    if total_memory_gib is None:
        if use_vllm:
            raise ValueError(
                "`use_vllm=True` needs a CUDA GPU, but none is in use (no GPU, or USE_CPU): set USE_VLLM to None "
                "(automatic) or False."
            )
        return RuntimeSettings(
            False, False, False, False, DEFAULT_VLLM_GPU_MEMORY_UTILIZATION, max_model_length, reason="no GPU"
        )

    _check_positive("total_memory_gib", total_memory_gib, float)
    if (
        not isinstance(compute_capability, tuple)
        or len(compute_capability) != 2
        or not all(isinstance(part, int) for part in compute_capability)
    ):
        raise ValueError(
            f"`compute_capability` must be a (major, minor) tuple of ints such as (8, 0), got {compute_capability!r}: "
            "pass `torch.cuda.get_device_capability()`."
        )
    bf16 = compute_capability >= BF16_MIN_CAPABILITY

    def vllm_gib(sequences: int) -> float:
        return weights_gib + VLLM_OVERHEAD_GIB + kv_cache_bytes_per_token * max_model_length * sequences / GIB

    # Too small a GPU for vLLM if even one sequence does not fit in the most vLLM may take.
    vllm_fits = vllm_gib(1) <= MAX_VLLM_SHARE * total_memory_gib
    share = min(_round_up_to_5_percent(vllm_gib(max_num_seqs) / total_memory_gib), MAX_VLLM_SHARE)
    training_gib = total_memory_gib * (1 - share)
    if use_vllm is None:
        if not bf16:
            use_vllm, reason = False, "auto: vLLM only on compute capability >= 8.0"
        elif not vllm_fits:
            use_vllm, reason = False, f"auto: one {max_model_length}-token sequence does not fit vLLM's share"
        elif training_gib < TRAINING_MEMORY_GIB:
            use_vllm, reason = False, f"auto: vLLM would leave training under {TRAINING_MEMORY_GIB:g} GiB"
        else:
            use_vllm, reason = True, f"auto: vLLM {share * total_memory_gib:.1f} GiB, training {training_gib:.1f} GiB"
    elif use_vllm:
        if not vllm_fits:
            raise ValueError(
                f"`use_vllm=True`: vLLM needs {vllm_gib(1):.1f} GiB for one {max_model_length}-token sequence "
                f"(weights {weights_gib:.1f} + overhead {VLLM_OVERHEAD_GIB:g} + KV cache), more than "
                f"{MAX_VLLM_SHARE:.0%} of this {total_memory_gib:.1f} GiB GPU: set USE_VLLM to None or False, or "
                "lower MAX_PROMPT_LENGTH / MAX_COMPLETION_LENGTH."
            )
        reason = f"asked: vLLM {share * total_memory_gib:.1f} GiB, training {training_gib:.1f} GiB"
    else:
        reason = "asked: no vLLM"
    return RuntimeSettings(
        on_gpu=True,
        bf16=bf16,
        fp16=not bf16,
        use_vllm=use_vllm,
        vllm_gpu_memory_utilization=share if use_vllm else DEFAULT_VLLM_GPU_MEMORY_UTILIZATION,
        vllm_max_model_length=max_model_length,
        total_memory_gib=total_memory_gib,
        compute_capability=compute_capability,
        reason=reason,
    )


def model_footprint(config: Any) -> tuple[float, int]:
    """
    Estimate a dense decoder's 16-bit weights (GiB) and KV-cache bytes per token from its transformers config.

    Counts the embedding (twice if untied), and per layer the attention projections and a gated MLP: exact for
    Qwen3/Llama-style models, an estimate for others (mixture-of-experts models are undercounted).

    Args:
        config (`transformers.PretrainedConfig` or any object with the same attributes):
            `vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`, `num_attention_heads`, and
            optionally `num_key_value_heads`, `head_dim` and `tie_word_embeddings`.

    Returns:
        `tuple[float, int]`: `(weights_gib, kv_cache_bytes_per_token)`, the keywords of [`runtime_settings`].
    """
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [name for name in required if not getattr(config, name, None)]
    if missing:
        raise ValueError(
            f"model_footprint: the config has no {', '.join(missing)}; pass `weights_gib` and "
            "`kv_cache_bytes_per_token` to runtime_settings yourself."
        )
    hidden, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    embeddings = config.vocab_size * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q and o, k and v
    mlp = 3 * hidden * config.intermediate_size  # gate, up, down
    weights_gib = (embeddings + layers * (attention + mlp)) * 2 / GIB
    return weights_gib, layers * kv_heads * head_dim * 2 * 2


def parse_nvidia_smi(output: str) -> GpuInfo | None:
    """
    Read the first GPU from `nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader,nounits`.

    Args:
        output (`str`):
            That command's output, e.g. `"Tesla T4, 7.5, 15360"` (memory in MiB).

    Returns:
        [`GpuInfo`] or `None` when the output lists no GPU or is not in that format (an old driver without
        `compute_cap`, for instance).
    """
    lines = [line for line in output.strip().splitlines() if line.strip()]
    if not lines:
        return None
    fields = [field.strip() for field in lines[0].split(",")]
    try:
        name, capability, memory_mib = fields
        major, minor = (int(part) for part in capability.split("."))
        return GpuInfo(name, float(memory_mib) / 1024, (major, minor))
    except ValueError:
        return None


def detect_gpu(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> GpuInfo | None:
    """
    The first GPU as `nvidia-smi` reports it, without importing torch; `None` without `nvidia-smi` or a working driver.

    Args:
        run (`Callable`, *optional*, defaults to `subprocess.run`):
            Runs the command (a seam for tests).
    """
    try:
        result = run(NVIDIA_SMI_QUERY, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi(result.stdout) if result.returncode == 0 else None


def is_installed(module: str) -> bool:
    """Whether `module` (a top-level name) can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # in `sys.modules` without a spec: it is there
        return True


def install_requirements(
    settings: RuntimeSettings, load_in_4bit: bool, installed: Callable[[str], bool] = is_installed
) -> list[str]:
    """
    The pip requirements a run still lacks: the library, vLLM only when it generates, bitsandbytes only for 4-bit.

    Args:
        settings ([`RuntimeSettings`]):
            The run's settings (`use_vllm`, `on_gpu`).
        load_in_4bit (`bool`):
            Whether the base model is loaded in 4 bits (QLoRA); it only is on a GPU.
        installed (`Callable[[str], bool]`, *optional*, defaults to [`is_installed`]):
            Whether a module can be imported.

    Returns:
        `list[str]`: pip requirements, empty when nothing is missing.
    """
    requirements = []
    if settings.use_vllm and not installed("vllm"):
        requirements.append("policy-split-trl[vllm]")  # the extra pins vLLM to the range TRL supports
    elif not installed("policy_split_trl"):
        requirements.append("policy-split-trl")
    if load_in_4bit and settings.on_gpu and not installed("bitsandbytes"):
        requirements.append("bitsandbytes")
    return requirements
