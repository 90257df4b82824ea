"""Adaptive `eta` (beyond the paper): keep the gap between the modes near a target instead of fixing `eta`.

The paper's `eta` is fragile (Table 3: 0.01 gives too little entropy, 0.10 entropy inflation and an accuracy collapse).
With `eta_schedule="adaptive"` the coefficient of the high-entropy (HE) bonus is steered, once per optimizer step, so
that the logged training metric `policy_split/kl_high_entropy_normal` (`KL(pi_HE || pi)` on HE-generated tokens) stays
in a band around `target_kl_high_entropy_normal`, and it is cut whenever the HE context's token entropy exceeds
`max_entropy_ratio` times the normal context's (the paper's failure mode), whatever the KL says.

- [`adaptive_eta_update`] is the rule (pure math, one step).
- [`EtaControllerCallback`] holds the controller's state: the current `eta` and the statistics of the optimizer step in
  progress (sums and counts over all processes, fed by the trainer), applies the rule at `on_step_end` (on every
  process, after the optimizer step, so the next generation step uses the new `eta`) and is saved in and restored from
  every checkpoint's `trainer_state.json` (transformers' `ExportableState`).
- [`check_eta_schedule`] validates the configuration fields.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

ETA_SCHEDULES = ("constant", "adaptive")

# The controller's statistics of one optimizer step: sums and counts over all processes and over its micro-steps.
STATISTICS = ("kl_sum", "kl_count", "entropy_normal_sum", "entropy_normal_count", "entropy_he_sum", "entropy_he_count")


def adaptive_eta_update(
    eta: float,
    kl: float | None,
    entropy_high_entropy: float | None,
    entropy_normal: float | None,
    target: float,
    tolerance: float,
    factor: float,
    eta_min: float,
    eta_max: float,
    max_entropy_ratio: float | None = None,
) -> float:
    r"""
    One step of the adaptive-`eta` controller: a bounded multiplicative update toward a target mode gap, with an
    entropy ceiling.

    In order:

    1. Ceiling: when `max_entropy_ratio` is set and both entropies are known and
       `entropy_high_entropy > max_entropy_ratio * entropy_normal`, `eta` is divided by `factor`, whatever `kl` is
       (even missing): the HE mode is inflating its entropy, the failure of a too-large `eta` (paper, Table 3).
    2. A statistic the rule needs is missing (`None` or not finite): `eta` is left unchanged. The rule needs `kl`, and
       both entropies when `max_entropy_ratio` is set (an increase is never made without the ceiling's check).
    3. Band: with `low = target / (1 + tolerance)` and `high = target * (1 + tolerance)` (symmetric in log space, like
       the multiplicative update), `eta *= factor` when `kl < low`, `eta /= factor` when `kl > high`, and `eta` is
       unchanged when `low <= kl <= high`.

    The result is clamped to `[eta_min, eta_max]`.

    Args:
        eta (`float`):
            Current coefficient of the HE bonus (Eq. 3), `> 0`.
        kl (`float` or `None`):
            The step's `KL(pi_HE || pi)` estimate on HE-generated tokens (the metric
            `policy_split/kl_high_entropy_normal`), or `None` when the step measured none.
        entropy_high_entropy (`float` or `None`):
            The step's mean token entropy of the rows trained in the HE context
            (`policy_split/entropy/high_entropy_context`), or `None`.
        entropy_normal (`float` or `None`):
            The same in the normal context (`policy_split/entropy/normal_context`), or `None`.
        target (`float`):
            Target of `kl`, `> 0`.
        tolerance (`float`):
            Relative half-width of the band around `target`, `> 0`.
        factor (`float`):
            Multiplicative step, `> 1`.
        eta_min (`float`):
            Lower bound of `eta`.
        eta_max (`float`):
            Upper bound of `eta`, `>= eta_min`.
        max_entropy_ratio (`float`, *optional*):
            Ceiling of `entropy_high_entropy / entropy_normal`; `None` disables the ceiling.

    Returns:
        `float`: the `eta` of the next step, in `[eta_min, eta_max]`.

    Example:

    ```python
    >>> adaptive_eta_update(0.03, kl=0.1, entropy_high_entropy=None, entropy_normal=None, target=0.5, tolerance=0.2,
    ...                     factor=1.5, eta_min=0.001, eta_max=0.1)  # below the band [0.4167, 0.6]
    0.045
    ```
    """

    def known(value: float | None) -> bool:
        return value is not None and math.isfinite(value)

    entropies_known = known(entropy_high_entropy) and known(entropy_normal)
    if max_entropy_ratio is not None and entropies_known and entropy_high_entropy > max_entropy_ratio * entropy_normal:
        new_eta = eta / factor
    elif not known(kl) or (max_entropy_ratio is not None and not entropies_known):
        new_eta = eta
    elif kl < target / (1.0 + tolerance):
        new_eta = eta * factor
    elif kl > target * (1.0 + tolerance):
        new_eta = eta / factor
    else:
        new_eta = eta
    return min(max(new_eta, eta_min), eta_max)


def check_eta_schedule(config: Any) -> None:
    """
    Validate the `eta` schedule fields of a [`PolicySplitGRPOConfig`]: each field's own range always (a bad value is
    reported even when the schedule does not read it), and with `eta_schedule="adaptive"` what the controller needs (a
    target, an initial `eta` > 0 inside `[eta_min, eta_max]`). Called by the config's `__post_init__` and again by the
    trainer, since a config can be changed after it is built (e.g. `--method grpo_rollout_sharing` sets `eta=0`).

    Raises:
        `ValueError`: naming the field and the fix.
    """
    schedule = config.eta_schedule
    if schedule not in ETA_SCHEDULES:
        raise ValueError(f"eta_schedule must be one of {ETA_SCHEDULES}, got {schedule!r}.")
    target = config.target_kl_high_entropy_normal
    if target is not None and not target > 0:
        raise ValueError(
            f"target_kl_high_entropy_normal must be > 0 (got {target}): it is the KL(pi_HE || pi) the adaptive eta "
            "steers toward. Set a positive target, e.g. the policy_split/kl_high_entropy_normal of a run you liked."
        )
    if not config.eta_target_tolerance > 0:
        raise ValueError(
            f"eta_target_tolerance must be > 0 (got {config.eta_target_tolerance}): the band "
            "[target / (1 + tol), target * (1 + tol)] must have a width, or eta never settles. Use e.g. 0.2."
        )
    if not config.eta_update_factor > 1:
        raise ValueError(
            f"eta_update_factor must be > 1 (got {config.eta_update_factor}): eta is multiplied or divided by it. "
            "Use e.g. 1.1."
        )
    if not 0 <= config.eta_min <= config.eta_max:
        raise ValueError(
            f"eta_min and eta_max must satisfy 0 <= eta_min <= eta_max (got eta_min={config.eta_min}, "
            f"eta_max={config.eta_max}): they bound the adaptive eta. Swap or fix them."
        )
    ratio = config.max_entropy_ratio
    if ratio is not None and not ratio > 1:
        raise ValueError(
            f"max_entropy_ratio must be > 1 or None (got {ratio}): it caps the high-entropy context's token entropy "
            "at max_entropy_ratio x the normal context's, and the HE mode is meant to be the more entropic one. Use "
            "e.g. 1.5, or None for no ceiling."
        )
    if schedule != "adaptive":
        return
    if target is None:
        raise ValueError(
            "eta_schedule='adaptive' needs target_kl_high_entropy_normal: the KL(pi_HE || pi) (metric "
            "policy_split/kl_high_entropy_normal) that eta is steered toward. Set it, or use eta_schedule='constant'."
        )
    if not config.eta > 0:
        raise ValueError(
            f"eta_schedule='adaptive' needs eta > 0 (got {config.eta}): eta is the initial value of a multiplicative "
            "update, which never leaves 0. Set eta inside [eta_min, eta_max], or use eta_schedule='constant'."
        )
    if not config.eta_min <= config.eta <= config.eta_max:
        raise ValueError(
            f"eta={config.eta} (the initial adaptive eta) must lie in [eta_min, eta_max] = [{config.eta_min}, "
            f"{config.eta_max}]. Move eta inside the bounds or widen them."
        )


class EtaControllerCallback(TrainerCallback, ExportableState):
    """
    The adaptive-`eta` controller of [`PolicySplitGRPOTrainer`]: its state, its update and its checkpointing.

    The trainer feeds [`record_kl`] and [`record_entropies`] with statistics already reduced over all processes (so
    every process holds the same numbers), summed over the micro-steps of the optimizer step. At `on_step_end`, after
    the optimizer step and on every process, the `eta` of the next step is [`adaptive_eta_update`] of the step's means
    (a statistic the step did not measure counts as missing) and the statistics are reset. With
    `eta_schedule="constant"` nothing moves: `eta` stays the configured one.

    The state (`eta` and the step's statistics) goes into every checkpoint's `trainer_state.json` through
    `ExportableState`, and is restored at `on_train_begin` when training resumes from a checkpoint. This is done here
    whatever `restore_callback_states_from_checkpoint` says (it is `False` by default, and meant for user callbacks):
    the controller's state is training state, like the optimizer's, and a resumed run must continue it exactly. When
    transformers does restore callback states it replaces this object by a new one: the trainer looks the controller up
    in its callbacks instead of keeping a reference.

    Args:
        eta (`float`, *optional*):
            Initial `eta` (the config's `eta`).
    """

    def __init__(self, eta: float | None = None):
        self.eta = eta
        self.reset_statistics()

    def reset_statistics(self) -> None:
        for name in STATISTICS:
            setattr(self, name, 0.0)

    def record_kl(self, kl_sum: float, kl_count: float) -> None:
        """Add a micro-step's `KL(pi_HE || pi)` sum and token count (over all processes)."""
        self.kl_sum += kl_sum
        self.kl_count += kl_count

    def record_entropies(self, normal_sum: float, normal_count: float, he_sum: float, he_count: float) -> None:
        """Add a micro-step's token-entropy sums and counts of each context (over all processes)."""
        self.entropy_normal_sum += normal_sum
        self.entropy_normal_count += normal_count
        self.entropy_he_sum += he_sum
        self.entropy_he_count += he_count

    def step_statistics(self) -> tuple[float | None, float | None, float | None]:
        """`(kl, entropy_high_entropy, entropy_normal)` of the step so far, `None` where nothing was measured."""

        def mean(total: float, count: float) -> float | None:
            return total / count if count > 0 else None

        return (
            mean(self.kl_sum, self.kl_count),
            mean(self.entropy_he_sum, self.entropy_he_count),
            mean(self.entropy_normal_sum, self.entropy_normal_count),
        )

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"eta": self.eta, **{name: getattr(self, name) for name in STATISTICS}}}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # `state.stateful_callbacks` holds what the checkpoint saved when resuming, else this object's own state as
        # `train()` began (restoring it then changes nothing).
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        if saved:
            for name, value in saved.get("attributes", {}).items():
                setattr(self, name, value)
        if self.eta is None:
            self.eta = args.eta
        if args.eta_schedule == "adaptive":  # a checkpoint from a run with other bounds
            self.eta = min(max(self.eta, args.eta_min), args.eta_max)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.eta_schedule == "adaptive":
            kl, entropy_high_entropy, entropy_normal = self.step_statistics()
            self.eta = adaptive_eta_update(
                self.eta,
                kl,
                entropy_high_entropy,
                entropy_normal,
                target=args.target_kl_high_entropy_normal,
                tolerance=args.eta_target_tolerance,
                factor=args.eta_update_factor,
                eta_min=args.eta_min,
                eta_max=args.eta_max,
                max_entropy_ratio=args.max_entropy_ratio,
            )
        self.reset_statistics()
