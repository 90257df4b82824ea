"""Checks every config class of this package shares: no non-finite hyper-parameter, and a trainer's `args` resolved
from `None` or checked to be its own config class. Imported by `config.py` and by the method modules whose argument
mixins `config.py` builds on (so it imports none of them)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from transformers import PreTrainedModel
from trl import GRPOConfig
from trl.trainer.utils import get_config_model_id

# Numeric fields of TRL's and transformers' configs whose value may be +/-inf: bounds where "no bound" is meaningful.
# Every other number must be finite, and NaN is never accepted.
INFINITE_OK_FIELDS = frozenset(
    {
        "max_grad_norm",
        "delta",
        "epsilon_high",
        "vllm_importance_sampling_clip_max",
        "vllm_importance_sampling_clip_min",
        "vllm_importance_sampling_cap",
        "off_policy_mask_threshold",
        "edge_max_scale",
    }
)


def check_finite_numbers(config: Any) -> None:
    """
    Reject non-finite numbers in every numeric field of a dataclass config (ours and the TRL/transformers fields it
    inherits): NaN anywhere, +/-inf outside [`INFINITE_OK_FIELDS`]. A NaN or infinite hyper-parameter (`eta=inf`, a
    NaN learning rate, an infinite reward weight) would make the first update NaN and poison the weights.

    Raises:
        `ValueError`: naming the field and its value.
    """
    for field_ in dataclasses.fields(config):
        value = getattr(config, field_.name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if not isinstance(item, float) or math.isfinite(item):
                continue
            if math.isinf(item) and field_.name in INFINITE_OK_FIELDS:
                continue
            raise ValueError(
                f"{field_.name} must be a finite number (got {value!r}): a NaN or infinite hyper-parameter makes the "
                f"first update non-finite. Set {field_.name} to a finite value or leave it at its default."
            )


def resolve_config(model: str | PreTrainedModel, args: GRPOConfig | None, config_class: type, suffix: str) -> Any:
    """
    A trainer's `args`: the default config named after the model when `None`, else `args` if it is a `config_class`.

    Raises:
        `TypeError`: for a config of another class (e.g. a plain `GRPOConfig`), with how to convert it.
    """
    if args is None:
        model_name = model if isinstance(model, str) else get_config_model_id(model.config)
        return config_class(f"{model_name.split('/')[-1]}-{suffix}")
    if not isinstance(args, config_class):
        raise TypeError(
            f"args must be a {config_class.__name__}, got {type(args).__name__}. Build it with the same arguments: "
            f"{config_class.__name__}(**grpo_config.to_dict()) keeps every GRPO setting."
        )
    return args
