"""
Entropy polarity (after arXiv 2605.11775) for every trainer: a diagnostic, and `polarity_reweighting`, OUR rule.

Per completion token, under the policy that generated the batch (SEED_METHODS.md Part B), with `pi` the full-vocabulary
softmax of the logits divided by the training temperature:

- `S_t = p_t (log p_t + H_t)` (sampled-token contribution), `C_t = sum_v pi_v^2 (log pi_v + H_t)` (distributional
  correction, `>= 0`), `D_t = S_t - C_t`;
- polarity `Pi_t = -A_t D_t`: a policy-gradient step of size `eta` on the token changes its entropy by about
  `eta Pi_t` (tabular softmax): `Pi > 0` expands entropy, `Pi < 0` contracts it.

`C_t` needs the whole vocabulary, which TRL's fused LM head never materializes: [`full_vocab_polarity_pass`] runs the
decoder once, no-grad, and applies the LM head in chunks of `polarity_chunk_tokens` tokens.

- [`PolarityDiagnosticsMixin`] (`polarity_diagnostics`, off by default: it costs one extra forward per generation
  batch and context) logs the fraction of expanding/contracting tokens by sign of `A`, the mean `Pi`, and the predicted
  vs realized change of the batch's entropy, per context for Policy Split.
- [`PolarityReweightingMixin`] (`--method polarity_reweighting`) and [`PolarityPolicySplitMixin`]
  (`polarity_reweighting: normal | high_entropy | both` on Policy Split): the sign-preserving, pressure-conserving
  two-branch reweighting of SEED_METHODS §B.2.4. This is our rule, after the entropy-polarity idea of arXiv
  2605.11775: the paper's own rule (PAPO) and its phase signal are not available, and nothing here reproduces or claims
  its results or defaults.
- [`PolarityController`] holds the phase signal's state (EMA entropy, anchor, window), identical on every process,
  saved in and restored from checkpoints.

This module never imports the Policy Split trainer (which may compose it): it reads Policy Split batches through
[`~policy_split_trl.contexts`].
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, TrainerCallback
from transformers.trainer_callback import ExportableState
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.grpo_trainer import RewardFunc

from .advantages import (
    entropy_polarity,
    full_vocab_token_statistics,
    polarity_branch_weights,
    polarity_ema,
    polarity_phase_level,
    polarity_phase_slope,
    pressure_scale,
    sampled_token_contribution,
)
from .config_checks import resolve_config
from .contexts import HE_KEY_PREFIX, HIGH_ENTROPY_CONTEXT, NORMAL_CONTEXT, has_both_contexts
from .loss_pass import loss_mask, train_or_eval
from .safety import SafeTrainingMixin

POLARITY_PHASES = ("level", "slope")
POLARITY_REWEIGHTING_CONTEXTS = ("none", "normal", "high_entropy", "both")
NORMAL_CONTEXT_NAME, HIGH_ENTROPY_CONTEXT_NAME = "normal_context", "high_entropy_context"
# The controller track of a trainer with one context (GRPO, or `polarity_reweighting` standalone).
POLICY_TRACK = "policy"
# Row tensors carrying `(c omega - 1) A` of each context from generation to the loss pass (Policy Split composition).
POLARITY_SHIFT_KEYS = {
    NORMAL_CONTEXT: "polarity_shift_normal_context",
    HIGH_ENTROPY_CONTEXT: "polarity_shift_he_context",
}


# ------------------------------------------------------------------------------------ 1. the full-vocabulary pass
def lm_head_logit_transform(model: Any) -> tuple[float, float | None]:
    """
    `(logit_scale, final_logit_softcapping)` of a causal LM, read as TRL's fused LM head reads them (a missing scale is
    1.0; `logits_scaling` divides, except for HyperCLOVA X), so that the pass sees the logits TRL's loss sees.
    """
    config = model.config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        scale = getattr(config, name, None) if scale is None else scale
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(config, "final_logit_softcapping", None)


@torch.no_grad()
def full_vocab_polarity_pass(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 512,
    batch_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """
    Exact per-token `log p_t`, `H_t`, `C_t` (and so `S_t`, `D_t`) of the completion tokens, over the full vocabulary,
    without ever holding `(tokens x vocab)` logits: one no-grad decoder pass over prompt + completion (as TRL's loss
    pass: `input_ids` and `attention_mask` only), then the LM head on `chunk_tokens` completion positions at a time,
    with TRL's fused-head transforms (`logit_scale`, softcapping, then `/ temperature`). Works with a PEFT LoRA model
    (the decoder and the LM head carry the adapter). Not under FSDP or ZeRO-3 (sharded LM head).

    Args:
        model (`PreTrainedModel`):
            The (unwrapped) causal LM, optionally a `PeftModel`.
        prompt_ids, prompt_mask (`torch.Tensor`):
            Shape `(B, P)`, prompts left-padded.
        completion_ids, completion_mask (`torch.Tensor`):
            Shape `(B, T)`, completions right-padded. Only positions with `completion_mask` are scored.
        temperature (`float`, *optional*, defaults to `1.0`):
            The training temperature (TRL's `temperature`).
        chunk_tokens (`int`, *optional*, defaults to `512`):
            Completion positions per LM-head chunk: peak extra memory about `chunk_tokens x V x 4 bytes x 3`.
        batch_size (`int`, *optional*):
            Rows per decoder forward (as TRL's scoring passes: `per_device_train_batch_size`); `None`: all at once.

    Returns:
        `dict[str, torch.Tensor]`: `logps`, `entropies`, `correction`, `contribution` (`S`), `direction` (`D = S - C`),
        each `(B, T)` (float32, float64 for a float64 model), 0 at unscored positions.
    """
    num_rows = completion_ids.size(0)
    if batch_size is not None and num_rows > batch_size:
        parts = [
            full_vocab_polarity_pass(
                model,
                prompt_ids[start : start + batch_size],
                prompt_mask[start : start + batch_size],
                completion_ids[start : start + batch_size],
                completion_mask[start : start + batch_size],
                temperature,
                chunk_tokens,
            )
            for start in range(0, num_rows, batch_size)
        ]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    from .eval.backends import last_hidden_states  # not at import: eval pulls in the harness

    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    hidden = last_hidden_states(model, input_ids, attention_mask)
    width = completion_ids.size(1)
    # The state at position j predicts token j + 1: the last T states before the final one predict the completion.
    hidden = hidden[:, -width - 1 : -1]
    valid = completion_mask.bool()
    lm_head = model.get_output_embeddings()
    states, labels = hidden[valid], completion_ids[valid]
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    stats = [torch.empty(states.size(0), dtype=out_dtype, device=hidden.device) for _ in range(3)]
    scale, softcap = lm_head_logit_transform(model)
    for start in range(0, states.size(0), chunk_tokens):
        end = min(start + chunk_tokens, states.size(0))
        logits = lm_head(states[start:end].to(lm_head.weight.dtype)).to(out_dtype) * scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        for target, value in zip(stats, full_vocab_token_statistics(logits / temperature, labels[start:end])):
            target[start:end] = value
    result = {}
    for name, values in zip(("logps", "entropies", "correction"), stats):
        full = torch.zeros(completion_ids.shape, dtype=out_dtype, device=hidden.device)
        full[valid] = values
        result[name] = full
    result["contribution"] = sampled_token_contribution(result["logps"], result["entropies"]) * valid
    result["direction"] = result["contribution"] - result["correction"]
    return result


# ------------------------------------------------------------------------------------------------- 2. the settings
@dataclass
class PolarityArguments:
    r"""
    Settings of entropy polarity (after arXiv 2605.11775): the diagnostic and `polarity_reweighting` (our rule, SEED_METHODS
    §B.2.4; the defaults are our assumptions, not the paper's, which are not available). A mixin of config fields:
    combine it with a `GRPOConfig` (`class C(PolarityArguments, GRPOConfig)`).

    Parameters:
        polarity_diagnostics (`bool`, *optional*, defaults to `False`):
            Log entropy polarity per generation batch (`polarity/...`): one extra no-grad forward per batch and context.
        polarity_chunk_tokens (`int`, *optional*, defaults to `512`):
            Tokens per LM-head chunk of the full-vocabulary pass.
        polarity_lambda_max (`float`, *optional*, defaults to `0.5`):
            `lambda_max` in `[0, 1)`: branch weights `1 +/- lambda_max g_k`.
        polarity_ema (`float`, *optional*, defaults to `0.9`):
            EMA decay `mu` in `[0, 1)` of the batch entropy.
        polarity_anchor_ratio (`float`, *optional*, defaults to `0.8`):
            `rho > 0`: reference entropy `H_ref = rho * H-_0` (the first batch's entropy), unless
            `polarity_entropy_target` is set.
        polarity_entropy_target (`float`, *optional*):
            Absolute reference entropy in nats (`> 0`), instead of `rho * H-_0`.
        polarity_gamma (`float`, *optional*, defaults to `5.0`):
            Gain `gamma > 0` of the phase signal.
        polarity_phase (`str`, *optional*, defaults to `"level"`):
            `"level"`: `g = tanh(gamma (H_ref - H~) / H_ref)`. `"slope"`: `g = -tanh(gamma (H~_k - H~_{k-W}) / (W H_ref))`.
        polarity_slope_window (`int`, *optional*, defaults to `5`):
            `W >= 1` of the slope phase signal.
        polarity_epsilon (`float`, *optional*, defaults to `1e-8`):
            `|Pi| <= epsilon` is in neither branch (weight 1).
    """

    polarity_diagnostics: bool = field(
        default=False,
        metadata={
            "help": "Log entropy polarity per generation batch (polarity/*): fraction of expanding/contracting tokens "
            "by sign of A, mean polarity, predicted vs realized entropy change. One extra no-grad forward per batch."
        },
    )
    polarity_chunk_tokens: int = field(
        default=512, metadata={"help": "Tokens per LM-head chunk of the full-vocabulary polarity pass (>= 1)."}
    )
    polarity_lambda_max: float = field(
        default=0.5,
        metadata={
            "help": "polarity_reweighting (our rule): branch weights 1 +/- lambda_max * g, lambda_max in [0, 1)."
        },
    )
    polarity_ema: float = field(
        default=0.9, metadata={"help": "polarity_reweighting: EMA decay in [0, 1) of the batch token-mean entropy."}
    )
    polarity_anchor_ratio: float = field(
        default=0.8,
        metadata={"help": "polarity_reweighting: reference entropy = ratio (> 0) x the first batch's entropy."},
    )
    polarity_entropy_target: float | None = field(
        default=None,
        metadata={
            "help": "polarity_reweighting: absolute reference entropy in nats (> 0) instead of the anchor ratio."
        },
    )
    polarity_gamma: float = field(
        default=5.0, metadata={"help": "polarity_reweighting: gain (> 0) of the phase signal."}
    )
    polarity_phase: str = field(
        default="level",
        metadata={
            "help": "polarity_reweighting phase signal: 'level' (EMA entropy vs the reference) or 'slope' (its change "
            "over polarity_slope_window batches).",
            "choices": list(POLARITY_PHASES),
        },
    )
    polarity_slope_window: int = field(
        default=5, metadata={"help": "polarity_reweighting: window W >= 1 (batches) of the slope phase signal."}
    )
    polarity_epsilon: float = field(
        default=1e-8, metadata={"help": "polarity_reweighting: tokens with |polarity| <= epsilon keep weight 1."}
    )

    def __post_init__(self):
        check_polarity_arguments(self)
        parent = super()
        if hasattr(parent, "__post_init__"):
            parent.__post_init__()


def check_polarity_arguments(config: Any) -> None:
    """
    Validate the [`PolarityArguments`] fields of `config` (each field's range, whether or not it is used).

    Raises:
        `ValueError`: naming the field and the fix.
    """
    for name in ("polarity_lambda_max", "polarity_ema", "polarity_anchor_ratio", "polarity_gamma", "polarity_epsilon"):
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number (got {value!r}); leave it at its default if unsure.")
    if not 0 <= config.polarity_lambda_max < 1:
        raise ValueError(
            f"polarity_lambda_max must be in [0, 1) (got {config.polarity_lambda_max}): the branch weights "
            "1 +/- lambda must stay positive so that no advantage flips sign. Use e.g. 0.5; 0 disables the reweighting."
        )
    if not 0 <= config.polarity_ema < 1:
        raise ValueError(f"polarity_ema must be in [0, 1) (got {config.polarity_ema}); e.g. 0.9.")
    if not config.polarity_anchor_ratio > 0:
        raise ValueError(
            f"polarity_anchor_ratio must be > 0 (got {config.polarity_anchor_ratio}): the reference entropy is this "
            "ratio x the first batch's entropy. Use e.g. 0.8."
        )
    target = config.polarity_entropy_target
    if target is not None and not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
        raise ValueError(
            f"polarity_entropy_target must be a finite entropy > 0 in nats, or None (got {target!r}); None uses "
            "polarity_anchor_ratio x the first batch's entropy."
        )
    if not config.polarity_gamma > 0:
        raise ValueError(f"polarity_gamma must be > 0 (got {config.polarity_gamma}); e.g. 5.0.")
    if config.polarity_phase not in POLARITY_PHASES:
        raise ValueError(f"polarity_phase must be one of {POLARITY_PHASES}, got {config.polarity_phase!r}.")
    if not isinstance(config.polarity_slope_window, int) or config.polarity_slope_window < 1:
        raise ValueError(f"polarity_slope_window must be an integer >= 1 (got {config.polarity_slope_window!r}).")
    if not isinstance(config.polarity_chunk_tokens, int) or config.polarity_chunk_tokens < 1:
        raise ValueError(f"polarity_chunk_tokens must be an integer >= 1 (got {config.polarity_chunk_tokens!r}).")
    if not config.polarity_epsilon >= 0:
        raise ValueError(f"polarity_epsilon must be >= 0 (got {config.polarity_epsilon}); e.g. 1e-8.")


# ------------------------------------------------------------------------------------------------ 3. the controller
class PolarityController(TrainerCallback, ExportableState):
    """
    State of the phase signal of `polarity_reweighting` (our rule, SEED_METHODS §B.2.4 step 2), one track per
    controlled context (`"policy"`; or `"normal_context"` / `"high_entropy_context"` for Policy Split).

    Per track: the number of batches seen, the anchor `H-_0` (first batch's token-mean entropy), the EMA `H~`, the last
    `W + 1` EMA values (slope signal), and the last `g` and `lambda`. [`update`] is called once per training generation
    batch with sums already reduced over all processes, so the state is the same on every process. The state goes into
    every checkpoint's `trainer_state.json` (`ExportableState`) and is restored at `on_train_begin` when resuming,
    whatever `restore_callback_states_from_checkpoint` says (as [`~policy_split_trl.eta_control.EtaControllerCallback`]):
    a resumed run continues the controller exactly.

    Args:
        tracks (`tuple[str, ...]`, *optional*, defaults to `("policy",)`):
            Names of the controlled contexts.
    """

    def __init__(self, tracks: tuple[str, ...] = (POLICY_TRACK,)):
        self.tracks = {name: self.empty_track() for name in tracks}

    @staticmethod
    def empty_track() -> dict[str, Any]:
        return {"batches": 0, "anchor": None, "smoothed": None, "history": [], "phase": 0.0, "lam": 0.0}

    def update(self, name: str, entropy_sum: float, token_count: float, args: Any) -> dict[str, Any]:
        """
        One generation batch of track `name`: its token-mean entropy `H-_k = entropy_sum / token_count` (over all
        processes) moves the EMA, the anchor (first batch) and the window, then `g_k` and `lambda_k = lambda_max g_k`
        are recomputed. A batch without tokens moves nothing. Returns the track.
        """
        track = self.tracks[name]
        if token_count > 0:
            mean = entropy_sum / token_count
            track["batch_entropy"] = mean
            if track["anchor"] is None:
                track["anchor"] = mean
            track["smoothed"] = polarity_ema(track["smoothed"], mean, args.polarity_ema)
            track["history"] = [*track["history"], track["smoothed"]][-(args.polarity_slope_window + 1) :]
            track["batches"] += 1
        if track["smoothed"] is None:
            return track
        reference = args.polarity_entropy_target
        if reference is None:
            reference = args.polarity_anchor_ratio * track["anchor"]
        if args.polarity_phase == "level":
            phase = polarity_phase_level(track["smoothed"], reference, args.polarity_gamma)
        else:
            phase = polarity_phase_slope(track["history"], args.polarity_slope_window, reference, args.polarity_gamma)
        track["reference"], track["phase"], track["lam"] = reference, phase, args.polarity_lambda_max * phase
        return track

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"tracks": copy.deepcopy(self.tracks)}}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        if saved:
            for name, track in saved.get("attributes", {}).get("tracks", {}).items():
                self.tracks[name] = copy.deepcopy(track)


# ---------------------------------------------------------------------------------------------- 4. the trainer part
@dataclass(frozen=True)
class PolarityContext:
    """
    One context of a generation batch's rows: its metric name, the key prefix of its prompt and advantages (`""`:
    TRL's keys; Policy Split's high-entropy copies: `policy_split_he_`), the rows trained in it (`(B,)` bool), and its
    index (`NORMAL_CONTEXT` / `HIGH_ENTROPY_CONTEXT`; `None` outside Policy Split).
    """

    name: str
    prefix: str
    rows: torch.Tensor
    index: int | None = None


class _PolarityBase:
    """The full-vocabulary pass over a generation batch's contexts, shared by the diagnostics and the reweighting."""

    # The last batch's pass: `(output, {prefix: statistics})`, so a diagnostics mixin stacked on a reweighting one
    # reuses it instead of a second pass.
    _polarity_last: tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]] | None = None

    def _polarity_contexts(self, output: dict[str, Any]) -> list[PolarityContext]:
        """
        The contexts of a generation batch. Hook: a Policy Split batch (recognized from its keys,
        [`~policy_split_trl.contexts`]) gives its normal and high-entropy contexts (with sharing, every row in both;
        without, each row in the context that generated it); any other batch, one context of every row.
        """
        num_rows = output["completion_ids"].size(0)
        every = torch.ones(num_rows, dtype=torch.bool, device=output["completion_ids"].device)
        if has_both_contexts(output):
            return [
                PolarityContext(NORMAL_CONTEXT_NAME, "", every, NORMAL_CONTEXT),
                PolarityContext(HIGH_ENTROPY_CONTEXT_NAME, HE_KEY_PREFIX, every, HIGH_ENTROPY_CONTEXT),
            ]
        if "policy_split_context" in output:
            context = output["policy_split_context"]
            return [
                PolarityContext(NORMAL_CONTEXT_NAME, "", context == NORMAL_CONTEXT, NORMAL_CONTEXT),
                PolarityContext(HIGH_ENTROPY_CONTEXT_NAME, "", context == HIGH_ENTROPY_CONTEXT, HIGH_ENTROPY_CONTEXT),
            ]
        return [PolarityContext(POLICY_TRACK, "", every)]

    def _polarity_statistics(self, output: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
        """[`full_vocab_polarity_pass`] of every row of `output` under the prompts at `prefix`, once per batch."""
        if self._polarity_last is None or self._polarity_last[0] is not output:
            self._polarity_last = (output, {})
        cache = self._polarity_last[1]
        if prefix not in cache:
            model = self.accelerator.unwrap_model(self.model)
            cache[prefix] = full_vocab_polarity_pass(
                model,
                output[prefix + "prompt_ids"],
                output[prefix + "prompt_mask"],
                output["completion_ids"],
                output["completion_mask"],
                temperature=self.temperature,
                chunk_tokens=self.args.polarity_chunk_tokens,
                batch_size=self.args.per_device_train_batch_size,
            )
        return cache[prefix]

    def _check_polarity_support(self) -> None:
        if self.is_fsdp_enabled or (
            self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        ):
            raise NotImplementedError(
                "Entropy polarity's full-vocabulary pass needs the whole LM head on each process: not with FSDP or "
                "ZeRO-3 yet. Use DDP or ZeRO-1/2, or turn polarity_diagnostics and polarity reweighting off."
            )


class PolarityDiagnosticsMixin(_PolarityBase):
    """
    Entropy-polarity diagnostics for any `GRPOTrainer` subclass (cooperative: put it first in the bases). With
    `polarity_diagnostics=True`, after each training generation batch (`super()._generate_and_score_completions`) it
    computes `D_t` under the behaviour policy ([`full_vocab_polarity_pass`]) and, with the advantages the batch trains
    with (after any reweighting; for Policy Split with the bonus deferred to the loss pass, the base `A`), logs in ONE
    all-reduce per batch, per context (`polarity/normal_context/...`, `polarity/high_entropy_context/...` for Policy
    Split, `polarity/...` otherwise):

    - `expanding_fraction_positive` / `contracting_fraction_positive`: the fraction of `A > 0` tokens with `Pi > eps`
      (expanding) / `Pi < -eps` (contracting); the same `..._negative` for `A < 0`;
    - `mean_polarity`: the token mean of `Pi = -A D`;
    - `entropy`: the batch's token-mean entropy `H-_k` (full vocabulary, at the training temperature);
    - `predicted_entropy_change`: the token mean of `Pi` of this batch, the first-order change of `H-` per unit
      logit-space step; `realized_entropy_change`: `H-_k - H-_{k-1}`, logged next to `previous_predicted_entropy_change`
      (the prediction made at batch `k - 1`) so the two can be compared on one row.

    What the comparison can show: whether the *sign* of the predicted change tracks the realized one over a run
    (the paper's validation of polarity). What it cannot: the prediction is in units of an unknown step size (the
    optimizer is Adam, with clipping, on shared parameters, while the derivation is a tabular softmax step), the
    realized change is measured on the next batch's rollouts (other prompts, other tokens), and several optimizer steps
    may lie between two generation batches; so magnitudes are not comparable and single steps are noisy. Training only
    (no evaluation batches); the previous-batch values are not checkpointed (the first batch after a resume logs no
    realized change).
    """

    _polarity_previous: dict[str, tuple[float, float]] | None = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.args.polarity_diagnostics:
            self._check_polarity_support()

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        output = super()._generate_and_score_completions(inputs)
        if self.args.polarity_diagnostics and train_or_eval(self.model) == "train":
            self._log_polarity_diagnostics(output)
        self._polarity_last = None
        return output

    def _log_polarity_diagnostics(self, output: dict[str, Any]) -> None:
        contexts = self._polarity_contexts(output)
        eps = self.args.polarity_epsilon
        mask = loss_mask(output).bool()
        rows = []
        for context in contexts:
            stats = self._polarity_statistics(output, context.prefix)
            advantages = polarity_training_advantages(output, context)
            polarity = entropy_polarity(advantages, stats["direction"])
            token = mask & context.rows.unsqueeze(1)
            positive, negative = token & (advantages > 0), token & (advantages < 0)
            counts = [
                positive.sum(),
                (positive & (polarity > eps)).sum(),
                (positive & (polarity < -eps)).sum(),
                negative.sum(),
                (negative & (polarity > eps)).sum(),
                (negative & (polarity < -eps)).sum(),
            ]
            sums = [polarity[token].sum(), stats["entropies"][token].sum(), token.sum()]
            rows.append(torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in counts + sums]))
        totals = self.accelerator.reduce(torch.stack(rows).to(self.accelerator.device), reduction="sum").tolist()
        metrics = self._metrics["train"]
        previous = self._polarity_previous or {}
        self._polarity_previous = {}
        for context, values in zip(contexts, totals, strict=True):
            n_pos, pos_exp, pos_con, n_neg, neg_exp, neg_con, polarity_sum, entropy_sum, tokens = values
            prefix = "polarity/" if context.index is None else f"polarity/{context.name}/"
            for name, count, total in (
                ("expanding_fraction_positive", pos_exp, n_pos),
                ("contracting_fraction_positive", pos_con, n_pos),
                ("expanding_fraction_negative", neg_exp, n_neg),
                ("contracting_fraction_negative", neg_con, n_neg),
            ):
                if total > 0:
                    metrics[prefix + name].append(count / total)
            if tokens > 0:
                entropy, predicted = entropy_sum / tokens, polarity_sum / tokens
                metrics[prefix + "mean_polarity"].append(predicted)
                metrics[prefix + "entropy"].append(entropy)
                metrics[prefix + "predicted_entropy_change"].append(predicted)
                if context.name in previous:
                    last_entropy, last_predicted = previous[context.name]
                    metrics[prefix + "realized_entropy_change"].append(entropy - last_entropy)
                    metrics[prefix + "previous_predicted_entropy_change"].append(last_predicted)
                self._polarity_previous[context.name] = (entropy, predicted)


def polarity_training_advantages(output: dict[str, Any], context: PolarityContext) -> torch.Tensor:
    """
    The `(B, T)` advantages a context's rows train with, as known at generation: the context's `advantages` (Policy
    Split's HE copy for the high-entropy context) plus its polarity shift `(c omega - 1) A` when the reweighting is
    composed with Policy Split (added in the loss pass).
    """
    advantages = output[context.prefix + "advantages"]
    mask = output["completion_mask"]
    advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand(mask.shape).float()
    if context.index is not None and POLARITY_SHIFT_KEYS[context.index] in output:
        advantages = advantages + output[POLARITY_SHIFT_KEYS[context.index]]
    return advantages


class _PolarityReweightingBase(_PolarityBase):
    """The reweighting of SEED_METHODS §B.2.4 (our rule) on a set of contexts, with its controller and metrics."""

    _polarity_tracks: ClassVar[tuple[str, ...]] = (POLICY_TRACK,)

    def _install_polarity_controller(self, tracks: tuple[str, ...]) -> None:
        self._check_polarity_support()
        self.add_callback(PolarityController(tracks))

    @property
    def _polarity_controller(self) -> PolarityController:
        # Looked up, not kept: transformers replaces the callback object when it restores callback states on resume.
        controller = next((c for c in self.callback_handler.callbacks if isinstance(c, PolarityController)), None)
        if controller is None:
            raise RuntimeError(
                "polarity reweighting needs the trainer's PolarityController callback, which was removed. Keep it."
            )
        return controller

    def _polarity_weights(
        self, output: dict[str, Any], contexts: list[PolarityContext], base: torch.Tensor
    ) -> list[torch.Tensor]:
        """
        Reweighted-advantage factors `c omega` `(B, T)` of each context (0 outside its rows and on padding): Pi from
        the base advantages `base` `(B,)`, the phase of each context's controller track, the pressure scale `c` of
        each context. Exactly 2 all-reduces, whatever the data: `(sum H m, sum m)` of every context, then
        `(sum |A| omega m, sum |A| m)` of every context.
        """
        args, device = self.args, self.accelerator.device
        mask = loss_mask(output).bool()
        tokens = [mask & c.rows.unsqueeze(1) for c in contexts]
        stats = [self._polarity_statistics(output, c.prefix) for c in contexts]
        local = torch.tensor(
            [[float(s["entropies"][t].double().sum()), float(t.sum())] for s, t in zip(stats, tokens)],
            dtype=torch.float64,
            device=device,
        )
        entropy_totals = self.accelerator.reduce(local, reduction="sum").tolist()
        controller = self._polarity_controller
        tracks = [controller.update(c.name, *totals, args) for c, totals in zip(contexts, entropy_totals)]
        weights, pressure = [], []
        for context, s, token, track in zip(contexts, stats, tokens, tracks):
            polarity = entropy_polarity(base.float(), s["direction"].float())
            omega = polarity_branch_weights(polarity, track["lam"], args.polarity_epsilon) * token
            magnitude = base.abs().float().unsqueeze(1) * token
            pressure.append(torch.stack([(magnitude * omega).double().sum(), magnitude.double().sum()]))
            weights.append((omega, polarity, token))
        pressure_totals = self.accelerator.reduce(torch.stack(pressure).to(device), reduction="sum").tolist()
        factors = []
        metrics = self._metrics["train"]
        eps = args.polarity_epsilon
        for context, (omega, polarity, token), track, totals, (entropy_sum, count) in zip(
            contexts, weights, tracks, pressure_totals, entropy_totals
        ):
            scale = pressure_scale(*totals)
            factors.append((scale * omega).detach())
            prefix = "polarity_reweighting/" if context.index is None else f"polarity_reweighting/{context.name}/"
            metrics[prefix + "lambda"].append(track["lam"])
            metrics[prefix + "phase"].append(track["phase"])
            metrics[prefix + "pressure_scale"].append(scale)
            if track["smoothed"] is not None:
                metrics[prefix + "smoothed_entropy"].append(track["smoothed"])
            if count > 0:
                metrics[prefix + "batch_entropy"].append(entropy_sum / count)
            # Local fractions (no collective: the metric is averaged over processes by TRL's logging).
            n = token.sum()
            if n > 0:
                metrics[prefix + "expanding_fraction"].append(float((token & (polarity > eps)).sum() / n))
                metrics[prefix + "contracting_fraction"].append(float((token & (polarity < -eps)).sum() / n))
        return factors


class PolarityReweightingMixin(_PolarityReweightingBase):
    """
    `polarity_reweighting` (our rule, after the entropy-polarity idea of arXiv 2605.11775; SEED_METHODS §B.2.4) for a
    one-context `GRPOTrainer` (cooperative: put it before the trainer in the bases). After
    `super()._generate_and_score_completions`, on training batches: `Pi_t = -A_i D_t` under the behaviour policy,
    `omega_t = 1 + lambda_k` (expanding, `Pi > eps`), `1 - lambda_k` (contracting, `Pi < -eps`), 1 otherwise, with
    `lambda_k = lambda_max g_k` from the [`PolarityController`]; `c` conserves `sum |A| m`; the advantages become the
    detached `(B, T)` `A_i c omega_t`, which TRL's loss takes as they are (same clipped surrogate). `|lambda| < 1`, so no
    sign ever flips. Two all-reduces per training generation batch, always; evaluation batches are left as TRL's.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._install_polarity_controller((POLICY_TRACK,))

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        output = super()._generate_and_score_completions(inputs)
        if train_or_eval(self.model) == "train":
            base = output["advantages"]
            if base.dim() != 1:
                raise RuntimeError("polarity_reweighting expects TRL's (B,) sequence advantages before it.")
            (factor,) = self._polarity_weights(output, self._polarity_contexts(output)[:1], base)
            output["advantages"] = (base.float().unsqueeze(1) * factor).detach()
        return output


class PolarityPolicySplitMixin(_PolarityReweightingBase):
    """
    `polarity_reweighting: normal | high_entropy | both` on Policy Split (cooperative: stack it on
    `PolicySplitGRPOTrainer`, `class T(PolarityPolicySplitMixin, PolicySplitGRPOTrainer)`), in the composition order
    of SEED_METHODS §B.6: base `A_i` -> `omega A_i` -> Policy Split's bonus, whose clip stays relative to the
    UNWEIGHTED `|A_i|` (Policy Split's semantics):

        A^HE_{i,t}     = c_HE omega^HE_{i,t} A_i + clip(eta B_{i,t}, -|A_i|/kappa, |A_i|/kappa)   (inside_clip)
        A^normal_{i,t} = c_N omega^N_{i,t} A_i (+ its own eta' term)

    with one controller track per reweighted context (its own entropy, anchor and phase), `D` of each context under
    that context's prompt, and `c` per context. `omega` depends only on `A` and `D`, so it is computed at generation
    and carried to the loss pass as row tensors `(c omega - 1) A` of each context ([`POLARITY_SHIFT_KEYS`]), which
    TRL's shuffle and split keep with their rows; the trainer's hook `_weight_base_term` adds the row's own context's
    shift after the bonus (whether the bonus came from the generation step or is deferred to the loss pass) and before
    `quarter_token_mean`'s weight. A context not reweighted gets no shift (weight 1).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        choice = self.args.polarity_reweighting
        if choice not in POLARITY_REWEIGHTING_CONTEXTS or choice == "none":
            raise ValueError(
                f"{type(self).__name__} needs polarity_reweighting in ('normal', 'high_entropy', 'both'), got "
                f"{choice!r}. Use PolicySplitGRPOTrainer for 'none'."
            )
        self._install_polarity_controller(self._reweighted_context_names())

    _applies_polarity_reweighting = True

    def _reweighted_context_names(self) -> tuple[str, ...]:
        choice = self.args.polarity_reweighting
        return tuple(
            name
            for name, key in ((NORMAL_CONTEXT_NAME, "normal"), (HIGH_ENTROPY_CONTEXT_NAME, "high_entropy"))
            if choice in (key, "both")
        )

    def _add_contexts(
        self, output: dict[str, Any], twin_prompts: list, is_he: torch.Tensor, rollout: torch.Tensor
    ) -> dict[str, Any]:
        base = output["advantages"].detach().clone()  # A_i (B,), before the contexts' advantages replace it
        output = super()._add_contexts(output, twin_prompts, is_he, rollout)
        if train_or_eval(self.model) != "train":
            return output
        names = self._reweighted_context_names()
        contexts = [c for c in self._polarity_contexts(output) if c.name in names]
        for context, factor in zip(contexts, self._polarity_weights(output, contexts, base), strict=True):
            shift = (factor - 1.0) * base.float().unsqueeze(1) * (factor != 0)
            key = POLARITY_SHIFT_KEYS[context.index]
            output[key] = output[key] + shift if key in output else shift
        return output

    def _weight_base_term(self, inputs: dict[str, Any], advantages: torch.Tensor) -> torch.Tensor:
        advantages = super()._weight_base_term(inputs, advantages)
        context = inputs.get("policy_split_context")
        if context is None or not any(key in inputs for key in POLARITY_SHIFT_KEYS.values()):
            return advantages
        zeros = torch.zeros_like(inputs["completion_mask"], dtype=torch.float32)
        shift = torch.where(
            (context == HIGH_ENTROPY_CONTEXT).unsqueeze(1),
            inputs.get(POLARITY_SHIFT_KEYS[HIGH_ENTROPY_CONTEXT], zeros),
            inputs.get(POLARITY_SHIFT_KEYS[NORMAL_CONTEXT], zeros),
        )
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1).expand_as(shift)
        return (advantages + shift.to(advantages.dtype)).detach()


# ------------------------------------------------------------------------------------- 5. the standalone method
@dataclass
class PolarityReweightingGRPOConfig(PolarityArguments, GRPOConfig):
    """
    Configuration of [`PolarityReweightingGRPOTrainer`]: every [`~trl.GRPOConfig`] parameter plus
    [`PolarityArguments`] (our rule's settings; the defaults are our assumptions, see SEED_METHODS §B.3).
    """


class PolarityReweightingGRPOTrainer(
    PolarityDiagnosticsMixin, PolarityReweightingMixin, SafeTrainingMixin, GRPOTrainer
):
    """
    GRPO with `polarity_reweighting`: our sign-preserving, pressure-conserving two-branch reweighting of the advantages
    by entropy polarity (SEED_METHODS §B.2.4), after the entropy-polarity idea of arXiv 2605.11775 — not the paper's
    PAPO rule, which is not available, and none of its results. See [`PolarityReweightingMixin`].

    Args:
        model, reward_funcs, **kwargs:
            As for [`~trl.GRPOTrainer`].
        args ([`PolarityReweightingGRPOConfig`], *optional*):
            Configuration.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "polarity-reweighting"]

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: RewardFunc | list[RewardFunc] | None = None,
        args: PolarityReweightingGRPOConfig | None = None,
        **kwargs: Any,
    ):

        args = resolve_config(model, args, PolarityReweightingGRPOConfig, "PolarityReweighting")
        if args.use_liger_kernel:
            raise NotImplementedError(
                "polarity_reweighting writes (B, T) advantages for TRL's loss; the Liger fused loss bypasses it. Set "
                "use_liger_kernel=False."
            )
        super().__init__(model, reward_funcs, args=args, **kwargs)


class PolarityDiagnosticsGRPOTrainer(PolarityDiagnosticsMixin, GRPOTrainer):
    """TRL's `GRPOTrainer` with [`PolarityDiagnosticsMixin`] (for methods that are settings on TRL's trainer)."""


POLARITY_PLOT_METRICS = (
    ("expanding_fraction_positive", "A > 0 tokens whose update expands entropy"),
    ("expanding_fraction_negative", "A < 0 tokens whose update expands entropy"),
)


def polarity_series(log_history: list[dict[str, Any]]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """
    The polarity diagnostics of a run's `trainer.state.log_history`, per context: `{context: {metric: (steps,
    values)}}`, with context `""` for a single-mode method and `normal_context` / `high_entropy_context` for Policy
    Split. Empty when the run did not log them (`polarity_diagnostics` off).
    """
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for entry in log_history:
        for key, value in entry.items():
            if not key.startswith("polarity/") or "step" not in entry:
                continue
            context, _, metric = key[len("polarity/") :].rpartition("/")
            steps, values = series.setdefault(context, {}).setdefault(metric, ([], []))
            steps.append(entry["step"])
            values.append(value)
    return series


def plot_polarity(histories: dict[str, list[dict[str, Any]]], path: str) -> str | None:
    """
    Fraction of expanding tokens over training steps, one line per method (and context: solid normal, dashed
    high-entropy), for the runs of `histories` (`{label: log_history}`) that logged the polarity diagnostics: the
    fraction of `A > 0` tokens and of `A < 0` tokens whose update expands entropy (`Pi > eps`). Returns the PNG's path,
    or `None` without matplotlib or without any run with diagnostics.
    """
    from .eval.report import load_pyplot, save_figure

    runs = {label: polarity_series(history) for label, history in histories.items()}
    runs = {label: series for label, series in runs.items() if series}
    plt = load_pyplot()
    if plt is None or not runs:
        return None
    fig, axes = plt.subplots(1, len(POLARITY_PLOT_METRICS), figsize=(12, 4.2), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metric, title) in zip(axes, POLARITY_PLOT_METRICS, strict=True):
        for i, (label, series) in enumerate(runs.items()):
            for context, curves in sorted(series.items()):
                if metric not in curves:
                    continue
                steps, values = curves[metric]
                name = label if not context else f"{label} ({context.replace('_context', '')} context)"
                style = "--" if context == "high_entropy_context" else "-"
                ax.plot(steps, values, style, color=colors[i % len(colors)], marker=".", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of tokens")
    axes[0].legend(fontsize=7)
    fig.suptitle("Entropy polarity over training (Pi = -A (S - C) > 0: the update expands entropy)")
    return save_figure(fig, plt, path)
