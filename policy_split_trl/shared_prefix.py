"""
Shared-prefix log-prob passes (the idea of Prefix Grouper, arXiv 2506.05433, which TRL does not have): the `G`
rollouts of a query share one prompt per context, so each prompt is encoded once per forward pass instead of `G`
times, and its keys/values serve all `G` completions, with gradients flowing back into the prompt.

How: the rows of a pass that have the same prompt are *packed* into one sequence, `[prompt without its last token]`
followed by one slot per rollout, `[last prompt token, completion]`, and run through the model's own attention with a
4D mask (each slot sees the shared part and itself, causally) and explicit position ids (each slot continues the
prompt's positions). The last prompt token is repeated per slot because its output predicts each completion's first
token, and a position has one output; nothing else is repeated. Each token then attends to exactly the keys, at exactly
the positions, it attends to in TRL's padded rows: the log-probs, entropies and gradients are TRL's
(`tests/test_shared_prefix.py` checks them in float64, with LoRA, gradient checkpointing and 2 processes).

It is one `model(...)` call per pass, like TRL's: the same number of forward and backward passes and collectives on
every process whatever the rows hold (the grouping of rows is the only thing that depends on the data), so DDP,
ZeRO-3 and FSDP see TRL's structure; LoRA, gradient checkpointing and TRL's fused LM head (`shift_labels`) work
unchanged. Packing is dense attention over the packed sequence, which pays off while the prompt is long next to the
completions; [`rows_per_pack`] picks how many rollouts share one packed prompt from a cost model, down to 1 (TRL's
padded path) for long completions. Where packing cannot be exact (an attention other than SDPA/eager, sliding-window
or other non-causal layers, multimodal inputs, MoE auxiliary losses) the pass is TRL's, with a one-line log.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class SharedPrefixArguments:
    """
    The setting of [`SharedPrefixMixin`], a dataclass mixin of the configs that offer it
    ([`~policy_split_trl.PolicySplitGRPOConfig`], and every `--method` of `policy-split-train`).

    Args:
        shared_prefix (`bool`, *optional*, defaults to `True`):
            Encode the prompt shared by a query's rollouts once per log-prob pass (training-equivalent; falls back to
            TRL's padded rows, with a one-line log, where it cannot be exact).
    """

    shared_prefix: bool = field(
        default=True,
        metadata={
            "help": "Encode each prompt once per log-prob pass for all the rollouts that share it (Prefix Grouper's "
            "idea; same log-probs and gradients as the padded rows). False: TRL's padded rows."
        },
    )


def shared_left_padding(attention_mask: torch.Tensor, prompt_width: int) -> int:
    """Columns of left padding that every row of a left-padded batch has: what a forward pass can cut off."""
    return int(attention_mask[:, :prompt_width].any(0).float().argmax())


def prompt_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    """
    Which rows share their prompt.

    Args:
        input_ids, attention_mask (`torch.Tensor`):
            Shape `(N, L)`: prompts left-padded, the last `logits_to_keep` columns the completions.
        logits_to_keep (`int`):
            Width of the completion part.

    Returns:
        `torch.Tensor`: shape `(N,)`, a group index per row, numbered `0, 1, ...` in order of first appearance; rows
        with the same prompt tokens and padding have the same index.
    """
    width = input_ids.size(1) - logits_to_keep
    prompts = torch.where(attention_mask[:, :width].bool(), input_ids[:, :width], -1)
    _, inverse = torch.unique(prompts, dim=0, return_inverse=True)
    rows = torch.arange(input_ids.size(0), device=input_ids.device)
    first = torch.full_like(rows, input_ids.size(0)).scatter_reduce(0, inverse, rows, "amin", include_self=True)
    # Unique prompts sorted by first appearance; unused entries (fewer unique prompts than rows) sort last.
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = rows
    return rank[inverse]


def rows_per_pack(
    prompt_width: int, completion_width: int, group_size: int, token_cost: float, min_saving: float = 0.1
) -> int:
    """
    How many rollouts of a group share one packed prompt: the `k <= group_size` that minimizes a pass's cost,
    `ceil(G / k) * (tokens * token_cost + tokens^2)` with `tokens = prompt_width + k * (completion_width + 1)`: linear
    layers cost in proportion to tokens, attention (dense over a packed sequence) to its square. `k = 1` is TRL's
    padded rows (no packing), kept unless packing saves at least `min_saving` of the cost: masked attention runs
    slower per score than the FLOP count says (measured on CPU: 52-token prompts with 256-token completions, a 2% saving
    on paper, ran 5% slower packed).

    Args:
        prompt_width, completion_width (`int`):
            Columns of the prompts (left padding shared by the pass cut off) and of the completions.
        group_size (`int`):
            Rows with the same prompt (`G`).
        token_cost (`float`):
            Cost of a token in the linear layers over that of one attention score: `6 * hidden_size` for a standard
            decoder block (`24 h^2` FLOPs per token per layer against `4 h` per query-key pair).
        min_saving (`float`, *optional*, defaults to `0.1`):
            Smallest fraction of the padded rows' cost that packing must save.

    Returns:
        `int`: rollouts per packed prompt, in `[1, group_size]`.
    """

    def cost(k: int) -> float:
        tokens = (prompt_width + k * (completion_width + 1)) if k > 1 else prompt_width + completion_width
        return math.ceil(group_size / k) * (tokens * token_cost + tokens**2)

    best = min(range(1, max(group_size, 1) + 1), key=lambda k: (cost(k), k))
    return best if cost(best) <= (1.0 - min_saving) * cost(1) else 1


def split_keeping_groups(groups: torch.Tensor, num_chunks: int) -> list[torch.Tensor]:
    """
    `min(num_chunks, N)` contiguous, non-empty, nearly equal slices of rows ordered so that groups are contiguous, each
    cut moved to the nearest group boundary within half a slice, so that a group's rows are encoded together.

    The count is fixed by `num_chunks` and `N` alone (every process makes the same number of passes); only where the
    cuts fall depends on the rows.

    Args:
        groups (`torch.Tensor`):
            Shape `(N,)`: group index of each row, in the order the rows are to be cut (a group's rows contiguous).
        num_chunks (`int`):
            Number of slices, `>= 1`.

    Returns:
        `list[torch.Tensor]`: index tensors into `groups`, in order.
    """
    num_rows = groups.numel()
    count = max(1, min(num_chunks, num_rows))
    boundaries = (torch.nonzero(groups[1:] != groups[:-1]).flatten() + 1).tolist()
    cuts, previous = [], 0
    for k in range(1, count):
        ideal = round(k * num_rows / count)
        low, high = previous + 1, num_rows - (count - k)
        near = [b for b in boundaries if low <= b <= high and abs(b - ideal) <= num_rows / (2 * count)]
        cut = min(near, key=lambda b: (abs(b - ideal), b)) if near else min(max(ideal, low), high)
        cuts.append(cut)
        previous = cut
    edges = [0, *cuts, num_rows]
    return [torch.arange(a, b, device=groups.device) for a, b in itertools.pairwise(edges)]


@dataclass
class PackedRows:
    """
    Rows of one pass packed by shared prompt ([`pack_rows`]).

    Attributes:
        input_ids, position_ids (`torch.Tensor`):
            Shape `(U, S)`: the packed sequences and their positions.
        attention_mask (`torch.Tensor`):
            Shape `(U, 1, S, S)`, bool: which keys each query sees.
        shift_labels (`torch.Tensor`):
            Shape `(U, S)`: the token each position predicts (`-100`: none), for TRL's fused LM head.
        row_pack (`torch.Tensor`):
            Shape `(N,)`: the packed sequence of each original row.
        row_columns (`torch.Tensor`):
            Shape `(N, T)`: the columns of that sequence whose outputs are the row's `T` completion predictions.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    shift_labels: torch.Tensor
    row_pack: torch.Tensor
    row_columns: torch.Tensor

    def unpack(self, per_position: torch.Tensor) -> torch.Tensor:
        """`(U, S)` per-position values (log-probs, entropies) back to the original rows' `(N, T)`."""
        return per_position[self.row_pack.unsqueeze(1), self.row_columns]


def pack_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, groups: torch.Tensor, per_pack: int
) -> PackedRows:
    """
    Pack rows that share their prompt: per packed sequence, the prompt without its last token once, then one slot
    `[last prompt token, completion]` per row (at most `per_pack`). Each slot's tokens see the shared part and their
    own slot, causally, at the positions they have in the padded rows (left padding shared by all rows cut off, as
    [`shared_left_padding`]), so attention is exactly that of the padded rows.

    Args:
        input_ids, attention_mask (`torch.Tensor`):
            Shape `(N, L)`: prompts left-padded, the last `logits_to_keep` columns the completions (right-padded).
        logits_to_keep (`int`):
            `T`, the completion width.
        groups (`torch.Tensor`):
            Shape `(N,)`: [`prompt_groups`] of the rows.
        per_pack (`int`):
            Rows per packed sequence, `>= 1` ([`rows_per_pack`]).

    Returns:
        [`PackedRows`].
    """
    num_rows, width = input_ids.shape
    completions = logits_to_keep
    prompt_width = width - completions
    start = shared_left_padding(attention_mask, prompt_width)
    shared = prompt_width - 1 - start  # columns of the shared part: the prompt but its last token
    slot_width = completions + 1
    device = input_ids.device
    rows = torch.arange(num_rows, device=device)
    # Rows of a group in order, `per_pack` per packed sequence.
    order = torch.argsort(groups, stable=True)
    sorted_groups = groups[order]
    group_first = torch.full_like(rows, num_rows).scatter_reduce(0, sorted_groups, rows, "amin", include_self=True)
    rank = rows - group_first[sorted_groups]
    new_pack = torch.ones_like(rows, dtype=torch.bool)
    new_pack[1:] = (sorted_groups[1:] != sorted_groups[:-1]) | (rank[1:] % per_pack == 0)
    row_pack, row_slot = torch.empty_like(rows), torch.empty_like(rows)
    row_pack[order] = torch.cumsum(new_pack.long(), 0) - 1
    row_slot[order] = rank % per_pack
    num_packs, num_slots = int(row_pack.max()) + 1, int(row_slot.max()) + 1
    length = shared + num_slots * slot_width

    packed_ids = torch.zeros(num_packs, length, dtype=input_ids.dtype, device=device)
    real = torch.zeros(num_packs, length, dtype=torch.bool, device=device)
    first_row = torch.empty(num_packs, dtype=torch.long, device=device)
    first_row[row_pack.flip(0)] = rows.flip(0)  # any row of the pack: all have the same prompt
    packed_ids[:, :shared] = input_ids[first_row, start : prompt_width - 1]
    real[:, :shared] = attention_mask[first_row, start : prompt_width - 1].bool()
    columns = shared + row_slot.unsqueeze(1) * slot_width + torch.arange(slot_width, device=device)
    packed_ids[row_pack.unsqueeze(1), columns] = input_ids[:, prompt_width - 1 :]
    real[row_pack.unsqueeze(1), columns] = attention_mask[:, prompt_width - 1 :].bool()
    labels = torch.full_like(packed_ids, -100)
    targets = input_ids[:, prompt_width:].masked_fill(attention_mask[:, prompt_width:] == 0, -100)
    labels[row_pack.unsqueeze(1), columns[:, :completions]] = targets

    # Positions: the shared part 0..shared-1, each slot shared..shared+T (the padded row's, less the cut padding).
    slot_positions = (shared + torch.arange(slot_width, device=device)).repeat(num_slots)
    positions = torch.cat([torch.arange(shared, device=device), slot_positions]).expand(num_packs, -1)
    segment = torch.cat(
        [
            torch.full((shared,), -1, device=device),
            torch.arange(num_slots, device=device).repeat_interleave(slot_width),
        ]
    )
    index = torch.arange(length, device=device)
    visible = (index.unsqueeze(1) >= index.unsqueeze(0)) & (
        (segment.unsqueeze(0) == -1) | (segment.unsqueeze(1) == segment.unsqueeze(0))
    )
    mask = visible.unsqueeze(0) & real.unsqueeze(1)
    # A query with no visible key (padding) sees itself: its output is never used, and no softmax row is empty.
    mask |= torch.eye(length, dtype=torch.bool, device=device).unsqueeze(0)
    return PackedRows(
        packed_ids, positions.contiguous(), mask.unsqueeze(1), labels, row_pack, columns[:, :completions]
    )


def attention_mask_for(mask: torch.Tensor, attn_implementation: str) -> torch.Tensor:
    """The packed bool mask as the attention takes it: bool for SDPA, additive (0 or the float32 minimum) for eager."""
    if attn_implementation == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
        ~mask, torch.finfo(torch.float32).min
    )


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why packing would not be exact for `model` (`None`: it is): its attention and its layers' masks."""
    config = getattr(model, "config", None)
    if config is None:
        return "the model has no config"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    attention = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)
    if attention not in SUPPORTED_ATTENTION:
        return f"attn_implementation={attention!r} is not one of {SUPPORTED_ATTENTION}"
    layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        return f"layer types {sorted(layer_types)} are not all full causal attention"
    if getattr(text, "use_sliding_window", False) and getattr(text, "sliding_window", None):
        return "sliding-window attention"
    if getattr(text, "hidden_size", None) is None:
        return "the config has no hidden_size"
    return None


class SharedPrefixMixin:
    """
    Shared-prefix log-prob passes (module docstring) for a `GRPOTrainer` subclass: put it right before `GRPOTrainer`
    in the bases (`policy_split_trl.methods.trainer_class` does this for every method when `shared_prefix` is set).
    It overrides only `_get_per_token_logps_and_entropies`, making TRL's number of forward passes (one per
    `batch_size` rows), a group's rows in the same pass where the count allows.
    """

    def _get_per_token_logps_and_entropies(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """TRL's log-probs and entropies, each pass's rows packed by shared prompt ([`pack_rows`])."""
        padded = super()._get_per_token_logps_and_entropies
        reason = self._shared_prefix_off(model, input_ids, logits_to_keep, compute_aux_loss, kwargs)
        if reason is not None:
            return padded(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
                **kwargs,
            )
        num_rows = input_ids.size(0)
        groups = prompt_groups(input_ids, attention_mask, logits_to_keep)
        order = torch.argsort(groups, stable=True)
        chunks = [
            order[c] for c in split_keeping_groups(groups[order], math.ceil(num_rows / (batch_size or num_rows)))
        ]
        text_config = self.accelerator.unwrap_model(model).config.get_text_config()
        token_cost = 6.0 * text_config.hidden_size
        prompt_width = input_ids.size(1) - logits_to_keep
        logps, entropies = [], []
        for rows in chunks:
            ids, mask = input_ids[rows], attention_mask[rows]
            # The chunk's groups numbered 0, 1, ... (what `pack_rows` indexes with), from the groups found above.
            chunk_groups = torch.unique(groups[rows], return_inverse=True)[1]
            cut = prompt_width - shared_left_padding(mask, prompt_width)
            largest = int(torch.bincount(chunk_groups).max())
            per_pack = rows_per_pack(cut, logits_to_keep, largest, token_cost)
            if per_pack > 1:
                chunk_logps, chunk_entropies = self._packed_pass(
                    model, ids, mask, logits_to_keep, chunk_groups, per_pack, compute_entropy, text_config
                )
            else:  # packing would cost more than it saves (long completions): TRL's pass over these rows
                chunk_logps, chunk_entropies, _ = padded(
                    model, ids, mask, logits_to_keep, batch_size=None, compute_entropy=compute_entropy
                )
            logps.append(chunk_logps)
            entropies.append(chunk_entropies)
        restore = torch.argsort(torch.cat(chunks))
        return (
            torch.cat(logps)[restore],
            torch.cat(entropies)[restore] if compute_entropy else None,
            None,
        )

    def _packed_pass(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        groups: torch.Tensor,
        per_pack: int,
        compute_entropy: bool,
        text_config: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward pass over packed rows, through TRL's fused LM head (`shift_labels`: no shift)."""
        packed = pack_rows(input_ids, attention_mask, logits_to_keep, groups, per_pack)
        with self.accelerator.autocast():
            outputs = model(
                input_ids=packed.input_ids,
                attention_mask=attention_mask_for(packed.attention_mask, text_config._attn_implementation),
                position_ids=packed.position_ids,
                shift_labels=packed.shift_labels,
                fused_lm_head=True,
            )
        logps = packed.unpack(outputs.log_probs)
        return logps, packed.unpack(outputs.entropy) if compute_entropy else None

    def _shared_prefix_off(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        logits_to_keep: int,
        compute_aux_loss: bool,
        kwargs: dict[str, Any],
    ) -> str | None:
        """Why this pass takes TRL's padded rows (`None`: it is packed); a reason other than the setting is logged once."""
        # `optimized_step=False` is Policy Split's straightforward path: TRL's rows exactly, the reference of the tests.
        if not getattr(self.args, "shared_prefix", True) or not getattr(self.args, "optimized_step", True):
            return "off"
        if input_ids.size(1) <= logits_to_keep:
            return "no prompt"  # nothing to share
        reason = None
        if any(value is not None for value in kwargs.values()):
            reason = "multimodal inputs"
        elif compute_aux_loss:
            reason = "the MoE auxiliary loss is computed"
        else:
            reason = unsupported_reason(self.accelerator.unwrap_model(model))
        if reason is not None:
            logged = self.__dict__.setdefault("_shared_prefix_logged", set())
            if reason not in logged:
                logged.add(reason)
                logger.warning("shared_prefix: padded rows instead (%s).", reason)
        return reason
