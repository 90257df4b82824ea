"""Mode diagnostics: how the two modes' objectives and representations relate during training (SPEC §6).

Reviewers of the paper asked for gradient-conflict measurements between the two modes' objectives and for the
similarity of the hidden states across modes. With `mode_diagnostics_steps = N > 0`, [`PolicySplitGRPOTrainer`]
measures, on optimizer steps 1, N + 1, 2N + 1, ... (before their update):

- the gradient of the normal-context loss and of the high-entropy-context loss on the step's first micro-batch (the
  same per-context losses, with the same weights, as the training step), their cosine overall and per parameter group
  ([`parameter_groups`]), and both gradient norms;
- the cosine similarity of the final hidden states of fixed prompts in the normal and in the HE context
  ([`prompt_hidden_cosines`]).

Everything is logged under `policy_split/diagnostics/` with TRL's metrics, and [`plot_mode_diagnostics`] draws it.

- Pure math: [`parameter_groups`], [`gradient_cosines`], [`prompt_hidden_cosines`], [`diagnostics_due`].
- Checks: [`check_mode_diagnostics`] (config) and [`check_mode_diagnostics_setup`] (the trainer's runtime setup).
- Orchestration: [`ModeDiagnosticsMixin`], a base of [`PolicySplitGRPOTrainer`].
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from .contexts import HIGH_ENTROPY_CONTEXT, NORMAL_CONTEXT, has_both_contexts
from .loss_pass import loss_mask
from .modes import apply_system_prompt

DIAGNOSTICS_PREFIX = "policy_split/diagnostics/"
# Transformer blocks are reported in this many contiguous ranges (fewer when the model has fewer blocks): enough to
# see where in depth the modes conflict, few enough to plot.
LAYER_RANGES = 4
# The parameter groups that are not transformer blocks, in the order they are plotted.
OUTSIDE_BLOCK_GROUPS = ("embed", "final_norm", "lm_head", "other")
_TRUE = ("1", "true", "yes")


# ---------------------------------------------------------------------------------------------- configuration checks
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _deepspeed_zero_stage(deepspeed: dict | str | None) -> int | None:
    """ZeRO stage of a `TrainingArguments.deepspeed` value (a dict or a JSON file), else of `accelerate launch`."""
    if isinstance(deepspeed, str) and os.path.isfile(deepspeed):
        try:
            with open(deepspeed) as f:
                deepspeed = json.load(f)
        except (OSError, ValueError):
            return None  # transformers reports an unreadable DeepSpeed config itself
    if isinstance(deepspeed, dict):
        stage = (deepspeed.get("zero_optimization") or {}).get("stage")
        return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
        return int(stage) if stage.isdigit() else None
    return None


def _sharded_reason(fsdp: bool, zero_stage: int | None) -> str | None:
    if fsdp:
        name = "FSDP"
    elif zero_stage == 3:
        name = "DeepSpeed ZeRO-3"
    else:
        return None
    return (
        f"mode_diagnostics_steps > 0 is not supported with {name}: the diagnostics take each context's gradient with "
        "torch.autograd.grad over the unwrapped model's parameters, which under parameter sharding are this process's "
        "shards (or empty placeholders gathered only inside the engine's hooks), so the gradients would be partial. "
        "Run the diagnostics with DDP (e.g. with LoRA, or a smaller model, so that it fits), or set "
        "mode_diagnostics_steps=0."
    )


def check_mode_diagnostics(config: Any) -> None:
    """
    Validate the mode-diagnostics fields of a [`PolicySplitGRPOConfig`] and what they need from the rest of it. Called
    by the config's `__post_init__` and again by the trainer (a config can be changed after it is built).

    The diagnostics split the training loss into its normal-context and high-entropy-context parts, which must add up
    to the loss the step trains; terms taken over the whole micro-batch (TRL's entropy bonus, `top_entropy_quantile`)
    do not split that way.

    Raises:
        `ValueError`: naming the field and the fix.
    """
    for name in ("mode_diagnostics_steps", "mode_diagnostics_prompts"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"{name} must be an integer >= 0 (got {value!r}). mode_diagnostics_steps: 0 turns the diagnostics "
                "off, N measures every N optimizer steps; mode_diagnostics_prompts: how many prompts the hidden-state "
                "similarity uses (0: none)."
            )
    if config.mode_diagnostics_steps == 0:
        return
    fsdp = bool(config.fsdp) or _env_flag("ACCELERATE_USE_FSDP")
    reason = _sharded_reason(fsdp, _deepspeed_zero_stage(config.deepspeed))
    if reason:
        raise ValueError(reason)
    if config.entropy_coef != 0.0 or config.use_adaptive_entropy or config.top_entropy_quantile < 1.0:
        raise ValueError(
            "mode_diagnostics_steps > 0 needs the loss to split into its two contexts' parts, but TRL's entropy bonus "
            "(entropy_coef / use_adaptive_entropy) and top_entropy_quantile < 1 are taken over both contexts' tokens "
            "at once. Set entropy_coef=0, use_adaptive_entropy=False and top_entropy_quantile=1.0 for a diagnostics "
            "run, or mode_diagnostics_steps=0."
        )
    if config.gradient_checkpointing and (config.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
        raise ValueError(
            "mode_diagnostics_steps > 0 takes gradients with torch.autograd.grad, which reentrant gradient "
            "checkpointing does not support. Set gradient_checkpointing_kwargs={'use_reentrant': False} (TRL's "
            "default), or mode_diagnostics_steps=0."
        )
    if config.normal_eta != 0.0 and config.optimized_step and config.bonus_from_loss_pass and config.rollout_sharing:
        raise ValueError(
            f"mode_diagnostics_steps > 0 with normal_eta={config.normal_eta}: when the bonus comes from the loss pass "
            "(bonus_from_loss_pass), the normal-context advantages with eta' are only complete in a pass over both "
            "contexts, so the normal context's loss cannot be taken on its own. Set bonus_from_loss_pass=False for a "
            "diagnostics run with normal_eta != 0."
        )


def check_mode_diagnostics_setup(trainer: Any) -> None:
    """
    What only the built trainer knows: FSDP or ZeRO-3 set up by `accelerate launch` or a plugin, and an MoE
    load-balancing loss (a mean over the whole micro-batch, like the entropy bonus of [`check_mode_diagnostics`]).

    Raises:
        `ValueError`: with the fix.
    """
    check_mode_diagnostics(trainer.args)
    zero_stage = None
    if trainer.is_deepspeed_enabled:
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        zero_stage = getattr(plugin, "zero_stage", None)
    reason = _sharded_reason(trainer.is_fsdp_enabled, zero_stage)
    if reason:
        raise ValueError(reason)
    if trainer.aux_loss_enabled:
        raise ValueError(
            "mode_diagnostics_steps > 0 needs the loss to split into its two contexts' parts, but the MoE "
            "load-balancing loss is taken over both contexts' tokens at once. Set router_aux_loss_coef=0 for a "
            "diagnostics run, or mode_diagnostics_steps=0."
        )


def diagnostics_due(global_step: int, every: int) -> bool:
    """
    Whether the optimizer step that follows `global_step` completed steps is measured: steps 1, N + 1, 2N + 1, ...
    (1-based), so the first measurement is the initial model's. Decided from the global step alone, the same on every
    process, so that every process makes the extra passes and collectives together.

    Args:
        global_step (`int`):
            Optimizer steps completed (`trainer.state.global_step`).
        every (`int`):
            `mode_diagnostics_steps`; `0` never measures.

    Returns:
        `bool`
    """
    return every > 0 and global_step % every == 0


# ---------------------------------------------------------------------------------------------- parameter groups
_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)\.")
_PARAMETER_LEAVES = ("weight", "bias")


def _module_kind(path: str) -> str:
    """
    `"q_proj"` for `"self_attn.q_proj.weight"`, `"q_proj.lora_A"` for `"self_attn.q_proj.lora_A.default.weight"`,
    `"gate_up_proj"` for a fused expert parameter `"mlp.experts.gate_up_proj"`.
    """
    parts = path.split(".")
    lora = next((i for i, part in enumerate(parts) if part.startswith("lora_")), None)
    if lora is not None:  # PEFT: <module>.lora_A.<adapter>.weight
        owner = next((p for p in reversed(parts[:lora]) if not p.isdigit()), "")
        return f"{owner}.{parts[lora]}" if owner else parts[lora]
    if parts[-1] in _PARAMETER_LEAVES:
        parts = parts[:-1]
    return next((p for p in reversed(parts) if not p.isdigit()), path)


def _outside_block_group(name: str) -> str:
    lowered = name.lower()
    # "embed_out" is GPT-NeoX's LM head: tested before the embeddings.
    if "lm_head" in lowered or "embed_out" in lowered:
        return "lm_head"
    if "embed" in lowered or re.search(r"(?:^|\.)(wte|wpe)(?:\.|$)", lowered):
        return "embed"
    if "norm" in lowered or re.search(r"(?:^|\.)ln_f(?:\.|$)", lowered):
        return "final_norm"
    return "other"


def parameter_groups(names: Sequence[str], num_layer_ranges: int = LAYER_RANGES) -> list[tuple[str, ...]]:
    """
    The groups each parameter is reported in, from its name alone (full fine-tuning and PEFT LoRA alike).

    A parameter of a transformer block (a name with a numeric component, `model.layers.<i>.` in Qwen/Llama/Mistral,
    `transformer.h.<i>.` in GPT-2; the first numeric component is the block index) belongs to two groups:

    - its depth: `layers_<a>-<b>`, one of `min(num_layer_ranges, num_blocks)` contiguous ranges of nearly equal size
      (`num_blocks` = the largest index + 1 among `names`), zero-padded so the names sort in depth order;
    - its module kind: `module/<kind>`, the module that owns it (`module/q_proj`, `module/down_proj`,
      `module/input_layernorm`, ...), with LoRA's matrix (`module/q_proj.lora_A`, `module/q_proj.lora_B`), summed over
      all blocks.

    Any other parameter belongs to one group: `lm_head`, `embed` (a LM head tied to the embeddings is the same tensor
    and is reported here), `final_norm`, or `other`.

    Args:
        names (`Sequence[str]`):
            Parameter names, e.g. from `model.named_parameters()` (trainable ones only for the diagnostics).
        num_layer_ranges (`int`, *optional*, defaults to `4`):
            Number of depth ranges the blocks are split into, `>= 1`.

    Returns:
        `list[tuple[str, ...]]`: the groups of each name, in order.

    Example:

    ```python
    >>> parameter_groups(["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
    ...                   "model.layers.1.self_attn.q_proj.lora_B.default.weight", "model.norm.weight"])
    [('embed',), ('layers_0-0', 'module/up_proj'), ('layers_1-1', 'module/q_proj.lora_B'), ('final_norm',)]
    ```
    """
    if num_layer_ranges < 1:
        raise ValueError(f"num_layer_ranges must be >= 1, got {num_layer_ranges}.")
    matches = [_BLOCK_INDEX.search(name) for name in names]
    indices = [int(m.group(1)) for m in matches if m is not None]
    range_of: dict[int, str] = {}
    if indices:
        num_blocks = max(indices) + 1
        width = len(str(num_blocks - 1))
        for block_range in torch.arange(num_blocks).tensor_split(min(num_layer_ranges, num_blocks)):
            first, last = int(block_range[0]), int(block_range[-1])
            label = f"layers_{first:0{width}d}-{last:0{width}d}"
            range_of.update(dict.fromkeys(range(first, last + 1), label))
    groups = []
    for name, match in zip(names, matches, strict=True):
        if match is None:
            groups.append((_outside_block_group(name),))
        else:
            groups.append((range_of[int(match.group(1))], "module/" + _module_kind(name[match.end() :])))
    return groups


# ---------------------------------------------------------------------------------------------- gradient cosines
class GradientComparison(NamedTuple):
    """Cosine between two gradients (NaN when either is zero: the angle is undefined) and their L2 norms."""

    cosine: float
    norm_first: float
    norm_second: float


def _comparison(dot: float, first_sq: float, second_sq: float) -> GradientComparison:
    denominator = math.sqrt(first_sq * second_sq)
    # Clamped: float rounding can put identical directions a few ulps above 1.
    cosine = max(-1.0, min(1.0, dot / denominator)) if denominator > 0 else math.nan
    return GradientComparison(cosine, math.sqrt(first_sq), math.sqrt(second_sq))


def gradient_cosines(
    first: Sequence[torch.Tensor | None],
    second: Sequence[torch.Tensor | None],
    groups: Sequence[Sequence[str]],
) -> tuple[GradientComparison, dict[str, GradientComparison]]:
    r"""
    Cosine similarity of two gradients given parameter by parameter, over all parameters and per group:
    `cos(g, h) = <g, h> / (|g| |h|)` on the concatenation of the group's parameters.

    A group's cosine is not the mean of its parameters' cosines: each parameter weighs by its share of the dot product
    and of the norms, as in the cosine of the whole vector.

    Args:
        first (`Sequence[torch.Tensor | None]`):
            Gradient of each parameter (any shape; `None`: zero, e.g. a parameter the loss does not reach).
        second (`Sequence[torch.Tensor | None]`):
            The other gradient, parameter by parameter (same shapes).
        groups (`Sequence[Sequence[str]]`):
            The groups of each parameter ([`parameter_groups`]); a parameter may belong to several.

    Returns:
        `tuple[GradientComparison, dict[str, GradientComparison]]`: over all parameters, and per group (in the order
        groups first appear). Per-parameter sums are taken in the gradients' precision (float32 in the trainer), groups
        and totals in float64.

    Example:

    ```python
    >>> first = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])]
    >>> second = [torch.tensor([0.0, 1.0]), torch.tensor([2.0])]
    >>> overall, per_group = gradient_cosines(first, second, [("a",), ("b",)])
    >>> round(overall.cosine, 4), per_group["a"].cosine, per_group["b"].cosine
    (0.8, 0.0, 1.0)
    ```
    """
    if not len(first) == len(second) == len(groups):
        raise ValueError(f"got {len(first)} and {len(second)} gradients for {len(groups)} parameters")
    present = [g for g in (*first, *second) if g is not None]
    device = present[0].device if present else torch.device("cpu")
    rows = []
    for a, b in zip(first, second, strict=True):
        reference = a if a is not None else b
        if reference is None:
            rows.append(torch.zeros(3, dtype=torch.float64, device=device))
            continue
        a = torch.zeros_like(reference) if a is None else a
        b = torch.zeros_like(reference) if b is None else b
        a, b = a.reshape(-1), b.reshape(-1).to(a.dtype)
        # One small (3,) tensor per parameter, all brought to the CPU in one transfer below (one device sync).
        rows.append(torch.stack([torch.dot(a, b), torch.dot(a, a), torch.dot(b, b)]).double().to(device))
    sums = torch.stack(rows).cpu().tolist() if rows else []
    totals = [0.0, 0.0, 0.0]
    per_group: dict[str, list[float]] = {}
    for values, member_of in zip(sums, groups, strict=True):
        totals = [t + v for t, v in zip(totals, values, strict=True)]
        for group in member_of:
            acc = per_group.setdefault(group, [0.0, 0.0, 0.0])
            per_group[group] = [t + v for t, v in zip(acc, values, strict=True)]
    return _comparison(*totals), {group: _comparison(*values) for group, values in per_group.items()}


# ---------------------------------------------------------------------------------------------- hidden states
def prompt_hidden_cosines(
    normal_states: torch.Tensor,
    high_entropy_states: torch.Tensor,
    normal_lengths: torch.Tensor,
    high_entropy_lengths: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Cosine similarity of each prompt's final hidden states in the normal context and in the HE context.

    The HE prompt is the normal one after the mode's system prompt (Eq. 1), so the normal prompt's tokens are the HE
    prompt's last ones (exactly so with chat templates that add no default system message, e.g. ChatML/Qwen3 with
    thinking off; plain-text prompts may differ at the joint). Two measures:

    - at the last prompt token (left padding: the last column), the state from which the first completion token is
      sampled;
    - of the mean over the normal prompt's positions, aligned from the end in both contexts (the last
      `min(n_normal, n_HE)` tokens): the same tokens, read with and without the system prompt before them.

    Args:
        normal_states (`torch.Tensor`):
            Shape `(B, L_n, H)`: final hidden states of the left-padded normal-context prompts.
        high_entropy_states (`torch.Tensor`):
            Shape `(B, L_he, H)`: the same prompts in the HE context.
        normal_lengths (`torch.Tensor`):
            Shape `(B,)`: token count of each normal-context prompt (without padding).
        high_entropy_lengths (`torch.Tensor`):
            Shape `(B,)`: the same in the HE context.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: shape `(B,)` each, float32: the last-token cosine and the mean-state
        cosine of each prompt.
    """
    normal_states, high_entropy_states = normal_states.float(), high_entropy_states.float()
    last = F.cosine_similarity(normal_states[:, -1], high_entropy_states[:, -1], dim=-1)
    shared = torch.minimum(normal_lengths, high_entropy_lengths).to(normal_states.device).clamp(min=1)

    def tail_mean(states: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(states.size(1), device=states.device)
        mask = (positions.unsqueeze(0) >= states.size(1) - shared.unsqueeze(1)).to(states.dtype)
        return (states * mask.unsqueeze(2)).sum(1) / shared.unsqueeze(1).to(states.dtype)

    pooled = F.cosine_similarity(tail_mean(normal_states), tail_mean(high_entropy_states), dim=-1)
    return last, pooled


def diagnostics_prompts(train_dataset: Any, eval_dataset: Any, count: int) -> list[Any]:
    """
    The fixed prompts of the hidden-state similarity: the first `count` prompts of the evaluation dataset when there is
    one (the first split of a dict of datasets), else of the training dataset; fewer when the dataset is shorter.

    Args:
        train_dataset, eval_dataset:
            The trainer's datasets (`Dataset`, `IterableDataset`, or a dict of them for evaluation), with a `prompt`
            column.
        count (`int`):
            `mode_diagnostics_prompts`.

    Returns:
        `list`: the prompts as the dataset holds them (text or chat messages).
    """
    dataset = eval_dataset if eval_dataset is not None else train_dataset
    if isinstance(dataset, dict):
        dataset = next(iter(dataset.values()), None)
    if dataset is None or count <= 0:
        return []
    if hasattr(dataset, "select") and hasattr(dataset, "__len__"):  # datasets.Dataset: one column read
        return list(dataset.select(range(min(count, len(dataset))))["prompt"])
    return [row["prompt"] for row in itertools.islice(iter(dataset), count)]


# ---------------------------------------------------------------------------------------------- the plot
def _series(logs: list[dict[str, Any]], key: str) -> list[float]:
    return [math.nan if h.get(key) is None else float(h[key]) for h in logs]


def plot_mode_diagnostics(log_history: list[dict[str, Any]], path: str) -> str | None:
    """
    Plot the mode diagnostics over training steps to a PNG (four panels): the gradient cosine between the two contexts'
    losses overall and per depth range, the same per module kind, both gradient norms, and the hidden-state cosines.

    Args:
        log_history (`list[dict]`):
            `trainer.state.log_history`.
        path (`str`):
            Where to write the PNG (replaced in one step).

    Returns:
        `str | None`: the path, or `None` when no diagnostics were logged or matplotlib is missing.
    """
    from .eval.report import load_pyplot, save_figure

    logs = [
        h
        for h in log_history
        if h.get(DIAGNOSTICS_PREFIX + "grad_cosine", None) is not None
        or h.get(DIAGNOSTICS_PREFIX + "hidden_cosine", None) is not None
    ]
    plt = load_pyplot()
    if not logs or plt is None:
        return None
    steps = [h["step"] for h in logs]
    keys = sorted({k for h in logs for k in h if k.startswith(DIAGNOSTICS_PREFIX + "grad_cosine/")})
    depth = [k for k in keys if "/module/" not in k]
    depth.sort(key=lambda k: (k.rsplit("/", 1)[1] in OUTSIDE_BLOCK_GROUPS[1:], k))  # embed, layers..., the rest
    module = [k for k in keys if "/module/" in k]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    cosine_panels = (
        (axes[0][0], "gradient cosine, normal vs HE context", depth, True),
        (axes[0][1], "gradient cosine per module kind (all blocks)", module, False),
    )
    for ax, title, group_keys, with_overall in cosine_panels:
        if with_overall:
            overall = _series(logs, DIAGNOSTICS_PREFIX + "grad_cosine")
            ax.plot(steps, overall, color="black", linewidth=2.5, marker="o", label="all parameters")
        for key in group_keys:
            ax.plot(steps, _series(logs, key), marker=".", linewidth=1, label=key.split("grad_cosine/", 1)[1])
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("cosine (+1 aligned, 0 orthogonal, <0 conflict)")
        if ax.lines[1:] or with_overall:
            ax.legend(fontsize=7, ncol=2)
    ax = axes[1][0]
    for name, label in (("normal_context", "normal context"), ("high_entropy_context", "high-entropy context")):
        ax.plot(steps, _series(logs, DIAGNOSTICS_PREFIX + f"grad_norm/{name}"), marker=".", label=label)
    ax.set_title("gradient norm of each context's loss (first micro-batch)")
    ax.set_xlabel("step")
    ax.legend()
    ax = axes[1][1]
    for key, label in (("hidden_cosine", "last prompt token"), ("hidden_cosine/prompt_mean", "mean over prompt")):
        ax.plot(steps, _series(logs, DIAGNOSTICS_PREFIX + key), marker=".", label=label)
    ax.set_title("final hidden-state cosine, normal vs HE context (fixed prompts)")
    ax.set_xlabel("step")
    ax.legend()
    return save_figure(fig, plt, path)


# ---------------------------------------------------------------------------------------------- the trainer's part
_MISSING = object()


class ModeDiagnosticsMixin:
    """
    The mode diagnostics of [`PolicySplitGRPOTrainer`] (`mode_diagnostics_steps > 0`); a base placed before the other
    mixins and `GRPOTrainer`. It overrides `compute_loss` (to measure before the step's first micro-batch is trained)
    and `train` (to plot at the end); the rest of training is untouched.

    **Gradients.** On the step's first micro-batch, each context's share of the loss (the same rows, advantages and
    weights as the training step: the normal-context rows of every rollout, then its high-entropy-context rows, in the
    planned chunks; without rollout sharing, the rows trained in each context) is differentiated with
    `torch.autograd.grad` over the trainable parameters of the unwrapped model. That never writes `.grad` and never
    runs DDP's reducer (whose hooks sit on the gradient accumulators, and whose forward is not called), so the update
    is not touched. The two gradients are summed over processes in one all-reduce and divided by the number of
    processes (what DDP does), so they are the global gradients the optimizer would see for this micro-batch (before
    clipping) and every process computes the same cosines.

    **Nothing else changes.** The extra passes run TRL's loss code, which logs metrics, and the Policy Split hooks,
    which keep state for the next pass and feed the adaptive-eta controller: the trainer's and every callback's
    attributes are put back as they were (attributes rebound or added by the passes, and `_metrics` restored from a
    deep copy), the micro-batch is only read (each pass gets its own dict), and the RNG state of the CPU and of the
    current CUDA device is forked (a model with dropout draws its masks as if the passes never ran). Training with
    the diagnostics on therefore gives bitwise the weights and training metrics it gives with them off.

    **Distributed.** Whether a step is measured depends on the global step alone ([`diagnostics_due`]); every process
    then makes the same passes (one loss pass per part, one `autograd.grad` each, `2 * ceil(K / B)` prompt-only
    forwards for the hidden states with `K = mode_diagnostics_prompts`, `B = per_device_train_batch_size`) and the same
    collectives (those of the loss passes, plus one all-reduce of the gradients). Not supported: FSDP and ZeRO-3
    (sharded parameters), see [`check_mode_diagnostics`].

    **Cost**, on each measured step only:

    - memory: two float32 vectors of the trainable parameters' size (8 bytes per trainable parameter: ~0.35 GB for a
      rank-16 LoRA on every linear layer of Qwen3-8B, 43M parameters; ~8 GB per billion parameters in full
      fine-tuning), plus one context's gradient in the parameters' dtype while it is added in, plus the activations
      of one loss pass (as in the training step);
    - compute: one extra forward and backward per context over the first micro-batch (with rollout sharing, about one
      training micro-step; without, two), `2 * ceil(K / B)` no-grad forwards over the prompts, and one all-reduce of
      `8 * P` bytes for `P` trainable parameters.
    """

    # Attributes that the loss passes change in place (not only rebind), restored from a deep copy.
    _mode_diagnostics_deep_state: ClassVar[tuple[str, ...]] = ("_metrics",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._mode_diagnostics_step: int | None = None
        self._mode_diagnostics_prompt_ids: tuple[list[list[int]], list[list[int]]] | None = None
        if self.args.mode_diagnostics_steps:
            check_mode_diagnostics_setup(self)
            prompts = diagnostics_prompts(self.train_dataset, self.eval_dataset, self.args.mode_diagnostics_prompts)
            if prompts:
                he_prompts = [apply_system_prompt(p, self.args.high_entropy_system_prompt) for p in prompts]
                # Tokenized as the trainer tokenizes the prompts it generates from (chat template included).
                self._mode_diagnostics_prompt_ids = (
                    [list(ids) for ids in self._tokenize_prompts(prompts)[0]],
                    [list(ids) for ids in self._tokenize_prompts(he_prompts)[0]],
                )

    # ------------------------------------------------------------------ hooks into the Trainer
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if self._mode_diagnostics_due(model):
            self._run_mode_diagnostics(model, inputs)
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def train(self, *args: Any, **kwargs: Any) -> Any:
        output = super().train(*args, **kwargs)
        if self.args.mode_diagnostics_steps and self.is_world_process_zero():
            plot_mode_diagnostics(self.state.log_history, os.path.join(self.args.output_dir, "mode_diagnostics.png"))
        return output

    def _mode_diagnostics_due(self, model: torch.nn.Module) -> bool:
        """A training micro-step, the first of an optimizer step that [`diagnostics_due`] selects."""
        step = self.state.global_step
        return (
            diagnostics_due(step, self.args.mode_diagnostics_steps)
            and self._mode_diagnostics_step != step
            and model.training
            and torch.is_grad_enabled()
        )

    # ------------------------------------------------------------------ one measurement
    def _run_mode_diagnostics(self, model: torch.nn.Module, inputs: dict[str, Any]) -> None:
        """Measure on this micro-batch and log under `policy_split/diagnostics/`, leaving the trainer as it was."""
        step = self.state.global_step
        unwrapped = self.accelerator.unwrap_model(model)
        saved = self._mode_diagnostics_snapshot()
        try:
            with self._mode_diagnostics_rng():
                overall, per_group = self._mode_gradient_comparison(unwrapped, inputs)
                hidden = self._mode_hidden_similarity(unwrapped)
        finally:
            self._mode_diagnostics_restore(saved)
        self._mode_diagnostics_step = step
        metrics = self._metrics["train"]
        metrics[DIAGNOSTICS_PREFIX + "grad_cosine"].append(overall.cosine)
        metrics[DIAGNOSTICS_PREFIX + "grad_norm/normal_context"].append(overall.norm_first)
        metrics[DIAGNOSTICS_PREFIX + "grad_norm/high_entropy_context"].append(overall.norm_second)
        for group, comparison in per_group.items():
            metrics[DIAGNOSTICS_PREFIX + f"grad_cosine/{group}"].append(comparison.cosine)
        if hidden is not None:
            metrics[DIAGNOSTICS_PREFIX + "hidden_cosine"].append(hidden[0])
            metrics[DIAGNOSTICS_PREFIX + "hidden_cosine/prompt_mean"].append(hidden[1])

    def _mode_diagnostics_snapshot(self) -> tuple[list[tuple[Any, dict[str, Any]]], dict[str, Any]]:
        # The trainer and its callbacks (the adaptive-eta controller is one): attribute bindings, plus deep copies of
        # the containers the loss passes append to.
        objects = [obj for obj in (self, *self.callback_handler.callbacks) if hasattr(obj, "__dict__")]
        shallow = [(obj, dict(vars(obj))) for obj in objects]
        deep = {
            name: copy.deepcopy(getattr(self, name))
            for name in self._mode_diagnostics_deep_state
            if hasattr(self, name)
        }
        return shallow, deep

    def _mode_diagnostics_restore(self, saved: tuple[list[tuple[Any, dict[str, Any]]], dict[str, Any]]) -> None:
        shallow, deep = saved
        for obj, attributes in shallow:
            current = vars(obj)
            for name in [name for name in current if name not in attributes]:
                delattr(obj, name)
            for name, value in attributes.items():
                if current.get(name, _MISSING) is not value:
                    setattr(obj, name, value)
        for name, value in deep.items():
            setattr(self, name, value)

    def _mode_diagnostics_rng(self) -> contextlib.AbstractContextManager:
        device = self.accelerator.device
        devices = (
            [device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else []
        )
        return torch.random.fork_rng(devices=devices)

    def _mode_diagnostics_parts(self, inputs: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any], float]]:
        """
        `(context, rows, weight)` of each loss pass: `weight * loss(rows)` summed over a context's passes is that
        context's share of the micro-batch's loss, the two shares sum to it.
        """
        if has_both_contexts(inputs):  # rollout sharing: the training step's passes, one context at a time
            # The HE rows in the planned chunks (same peak memory as the training step); a deferred bonus needs them
            # in one pass, after the normal context's pass (which keeps its log-probs for it).
            yield from self._context_parts(inputs)
            return
        # Without sharing each row is trained in one context: the other context's rows leave the loss through the
        # tool mask (which TRL multiplies into the loss mask, not the attention mask), the forward passes stay those
        # of the training step, and every loss type but `bnpo` (a mean over the remaining tokens) keeps its scale.
        context = inputs["policy_split_context"]
        base = inputs["tool_mask"] if "tool_mask" in inputs else torch.ones_like(inputs["completion_mask"])
        total_tokens = float(loss_mask(inputs).sum())
        for ctx in (NORMAL_CONTEXT, HIGH_ENTROPY_CONTEXT):
            part = dict(inputs)
            part["tool_mask"] = base * (context == ctx).unsqueeze(1).to(base.dtype)
            weight = float(loss_mask(part).sum()) / max(total_tokens, 1.0) if self.loss_type == "bnpo" else 1.0
            yield ctx, part, weight

    def _mode_gradient_comparison(
        self, unwrapped: torch.nn.Module, inputs: dict[str, Any]
    ) -> tuple[GradientComparison, dict[str, GradientComparison]]:
        """Both contexts' global gradients on `inputs` and their cosines ([`gradient_cosines`])."""
        named = [(name, p) for name, p in unwrapped.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        gradients = self._mode_gradients(unwrapped, inputs, params)
        sizes = [p.numel() for p in params]
        groups = parameter_groups([name for name, _ in named])
        return gradient_cosines(gradients[0].split(sizes), gradients[1].split(sizes), groups)

    def _mode_gradients(
        self, unwrapped: torch.nn.Module, inputs: dict[str, Any], params: list[torch.nn.Parameter]
    ) -> torch.Tensor:
        """
        Shape `(2, P)`, float32: the gradients of the normal-context and high-entropy-context shares of the loss of
        `inputs` with respect to `params` (flattened and concatenated), summed over processes and divided by their
        number, as DDP averages the training gradient.
        """
        sizes = [p.numel() for p in params]
        gradients = torch.zeros(2, sum(sizes), dtype=torch.float32, device=self.accelerator.device)
        with self._open_loss_step():  # the passes of one micro-batch, as in the training step
            for context, part, weight in self._mode_diagnostics_parts(inputs):
                loss = self._run_loss_pass(unwrapped, part) * weight
                # autograd.grad, not backward: `.grad` and DDP's reducer stay untouched.
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for grad, target in zip(grads, gradients[context].split(sizes), strict=True):
                    if grad is not None:
                        target.add_(grad.reshape(-1).to(target.device))
                del grads, loss
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(gradients)  # in place: no third copy
            gradients /= self.accelerator.num_processes
        return gradients

    def _mode_hidden_similarity(self, unwrapped: torch.nn.Module) -> tuple[float, float] | None:
        """Mean over the fixed prompts of [`prompt_hidden_cosines`]; `None` without prompts."""
        if not self._mode_diagnostics_prompt_ids:
            return None
        from .eval.backends import last_hidden_states

        normal_ids, he_ids = self._mode_diagnostics_prompt_ids
        batch_size = self.args.per_device_train_batch_size
        last, pooled = [], []
        was_training = unwrapped.training
        unwrapped.eval()  # no dropout: the similarity of the model, not of a dropout mask
        try:
            with torch.no_grad():
                for start in range(0, len(normal_ids), batch_size):
                    states, lengths = [], []
                    for ids in (normal_ids[start : start + batch_size], he_ids[start : start + batch_size]):
                        tensor, mask = self._left_pad_prompts(ids)
                        states.append(last_hidden_states(unwrapped, tensor, mask))
                        lengths.append(torch.tensor([len(x) for x in ids]))
                    batch_last, batch_pooled = prompt_hidden_cosines(*states, *lengths)
                    last.append(batch_last)
                    pooled.append(batch_pooled)
        finally:
            unwrapped.train(was_training)
        return torch.cat(last).mean().item(), torch.cat(pooled).mean().item()
