"""
The methods of the paper's comparison (Table 1, Table 4, Appendix B.3) by name, so that a baseline is one flag away:
`policy-split-train --config <recipe> --method clip_cov`.

A method is a trainer class, the config class that trainer reads, and the settings that make it that method. Where
TRL already implements a baseline (entropy regularization: `entropy_coef`; forking tokens only:
`top_entropy_quantile`) the method is only settings on TRL's `GRPOTrainer`; the others are the small trainers of
[`policy_split_trl.baselines`] and Policy Split's own [`~policy_split_trl.trainer.PolicySplitGRPOTrainer`].
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from trl import GRPOConfig, GRPOTrainer

from .asym_grpo import AsymGRPOConfig, AsymGRPOMixin, AsymGRPOTrainer
from .baselines import (
    ClipCovGRPOConfig,
    ClipCovGRPOTrainer,
    EntropyAdvantageGRPOConfig,
    EntropyAdvantageGRPOTrainer,
    EntropyDrivenAdvantageGRPOConfig,
    EntropyDrivenAdvantageGRPOTrainer,
)
from .config import PolicySplitGRPOConfig
from .polarity import (
    PolarityDiagnosticsMixin,
    PolarityPolicySplitMixin,
    PolarityReweightingGRPOConfig,
    PolarityReweightingGRPOTrainer,
)
from .shared_prefix import SharedPrefixMixin
from .trainer import PolicySplitGRPOTrainer


@dataclass(frozen=True)
class MethodSpec:
    """
    One method of the comparison.

    Args:
        name (`str`):
            Registry name (`--method`).
        label (`str`):
            Its row name in the paper's Table 1 / Table 4.
        trainer (`type`):
            The trainer class (a `GRPOTrainer`).
        config (`type`):
            The config class whose fields `trainer` reads (a `GRPOConfig`); [`MethodConfig`] is built from these.
        fixed (`dict[str, Any]`):
            Settings that define the method (e.g. `eta=0` for "GRPO w/ sharing"). A conflicting value set by the user
            is an error, not silently replaced (see [`apply_method`]).
        defaults (`dict[str, Any]`):
            The method's paper hyper-parameters, applied where the user did not set the field.
        dual_mode (`bool`):
            Trained with the high-entropy prompt, so both modes are worth evaluating.
        reference (`str`):
            Where the method comes from.
    """

    name: str
    label: str
    trainer: type
    config: type
    fixed: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    dual_mode: bool = False
    reference: str = ""


class AsymPolicySplitGRPOTrainer(PolicySplitGRPOTrainer, AsymGRPOMixin):
    """
    Policy Split over AsymGRPO (`base_advantage: asym_grpo`): [`PolicySplitGRPOTrainer`] with the correctness
    advantage `A_i` of [`~policy_split_trl.asym_grpo.AsymGRPOMixin`], from the pooled success rate of both modes'
    rollouts of a query (SEED_METHODS §A.6).

    The MRO puts the AsymGRPO mixin right before `GRPOTrainer`, so Policy Split's `_generate_and_score_completions`
    gets the AsymGRPO advantages from `super()` and builds both contexts' advantages on them: normal context `A_i`,
    HE context `A_i + clip(eta B, -|A_i|/kappa, |A_i|/kappa)` (or the typeset placement). The clip window is relative to
    the base advantage in use, here the asymmetric `|A_i|` (SEED_METHODS §A.6, watch-out 1: it widens on rare
    successes of hard prompts, which is the point of both methods), at generation and in the deferred bonus of the
    loss pass alike.
    """

    _tag_names: ClassVar[list[str]] = [*PolicySplitGRPOTrainer._tag_names, "asym-grpo"]


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("grpo", "GRPO", GRPOTrainer, GRPOConfig, reference="Shao et al. 2024 (TRL's GRPOTrainer)"),
        MethodSpec(
            "forking_tokens",
            "w/ Forking Token Only",
            GRPOTrainer,
            GRPOConfig,
            defaults={"top_entropy_quantile": 0.2},
            reference="Wang et al. 2025b: gradients only through the top-20% entropy tokens (TRL's top_entropy_quantile)",
        ),
        MethodSpec(
            "clip_cov",
            "w/ Clip-Cov",
            ClipCovGRPOTrainer,
            ClipCovGRPOConfig,
            reference="Cui et al. 2025, 'The Entropy Mechanism of RL for Reasoning LMs' (PRIME-RL/Entropy-Mechanism-of-RL)",
        ),
        MethodSpec(
            "entropy_driven_advantage",
            "w/ Ent Driven Adv",
            EntropyDrivenAdvantageGRPOTrainer,
            EntropyDrivenAdvantageGRPOConfig,
            reference="Zhang et al. 2025d, EDGE-GRPO (signal level: entropy-driven advantage only)",
        ),
        MethodSpec(
            "entropy_regularization",
            "w/ Ent Regularization",
            GRPOTrainer,
            GRPOConfig,
            defaults={"entropy_coef": 0.003},
            reference="Schulman et al. 2017; loss coefficient 0.003 as in App. B.3 (TRL's entropy_coef)",
        ),
        MethodSpec(
            "entropy_advantage",
            "w/ Ent Advantage",
            EntropyAdvantageGRPOTrainer,
            EntropyAdvantageGRPOConfig,
            reference="Cheng et al. 2025, 'Reasoning with Exploration: An Entropy Perspective' (alpha 0.4, kappa 2)",
        ),
        MethodSpec(
            "policy_split",
            "Policy Split",
            PolicySplitGRPOTrainer,
            PolicySplitGRPOConfig,
            dual_mode=True,
            reference="arXiv 2604.11510 (Eq. 10, rollout sharing)",
        ),
        MethodSpec(
            "policy_split_no_sharing",
            "Policy Split w/o sharing",
            PolicySplitGRPOTrainer,
            PolicySplitGRPOConfig,
            fixed={"rollout_sharing": False},
            dual_mode=True,
            reference="arXiv 2604.11510, Eq. 9 (Table 4 ablation)",
        ),
        MethodSpec(
            "grpo_rollout_sharing",
            "GRPO w/ sharing",
            PolicySplitGRPOTrainer,
            PolicySplitGRPOConfig,
            fixed={"eta": 0.0, "normal_eta": 0.0, "rollout_sharing": True, "eta_schedule": "constant"},
            dual_mode=True,
            reference="arXiv 2604.11510, Table 4: both modes and rollout sharing, no entropy bonus",
        ),
        # Beyond the paper's comparison: the entropy-guided methods its users compare it with (issue 15).
        MethodSpec(
            "asym_grpo",
            "AsymGRPO",
            AsymGRPOTrainer,
            AsymGRPOConfig,
            defaults={"asym_beta_pos": 0.9, "asym_beta_neg": 0.4},
            reference="Gu et al. 2026, arXiv 2604.04894 (v1 formula; beta from a secondary reading)",
        ),
        MethodSpec(
            "policy_split_asym_grpo",
            "Policy Split over AsymGRPO",
            AsymPolicySplitGRPOTrainer,
            PolicySplitGRPOConfig,
            fixed={"base_advantage": "asym_grpo"},
            defaults={"asym_beta_pos": 0.9, "asym_beta_neg": 0.4},
            dual_mode=True,
            reference="Policy Split (arXiv 2604.11510) with AsymGRPO's A_i (arXiv 2604.04894); SEED_METHODS §A.6",
        ),
        MethodSpec(
            "polarity_reweighting",
            "Polarity reweighting (ours)",
            PolarityReweightingGRPOTrainer,
            PolarityReweightingGRPOConfig,
            reference="Our rule (SEED_METHODS §B.2.4), after the entropy-polarity idea of arXiv 2605.11775; not PAPO",
        ),
    )
}


def _most_derived_configs(specs: Iterable[MethodSpec]) -> tuple[type, ...]:
    """
    The distinct config classes of `specs` in registry order, less any that another one already inherits
    (`GRPOConfig`): the bases of [`MethodConfig`] (listing a base next to its subclass would break the MRO).
    """
    configs = list(dict.fromkeys(spec.config for spec in specs))
    return tuple(c for c in configs if not any(other is not c and issubclass(other, c) for other in configs))


@dataclass
class MethodConfig(*_most_derived_configs(METHODS.values())):
    """
    Every method's settings in one dataclass: all of [`~trl.GRPOConfig`] plus the fields each method's config class
    adds ([`PolicySplitGRPOConfig`], [`~policy_split_trl.baselines.ClipCovGRPOConfig`],
    [`~policy_split_trl.baselines.EntropyDrivenAdvantageGRPOConfig`],
    [`~policy_split_trl.baselines.EntropyAdvantageGRPOConfig`]). Its bases are derived from [`METHODS`], so a method
    registered with a new config class is parsed without touching this class. Each config's `__post_init__` checks its
    own fields and calls `super()`, so every method's checks run.

    Why one class for all methods rather than parsing the chosen method's config: it is what `policy-split-train`
    parses, so one recipe runs any method (`--config policy_split.yaml --method grpo` must accept the recipe's `eta`
    and warn that `grpo` does not read it, see [`apply_method`], rather than reject an unknown flag), the comparison
    driver trains every method from one recipe, and `--help` lists every method's flags. Each trainer reads only its
    own config's fields ([`method_config_class`]).
    """


# Where a setting was written, for [`apply_method`]'s `explicit`: the command line wins over a recipe, as in TrlParser.
COMMAND_LINE = "command line"


def _precedence(source: str | None) -> int:
    """Rank of a setting's source: not set (0) < a YAML recipe (1) < the command line (2)."""
    if source is None:
        return 0
    return 2 if source == COMMAND_LINE else 1


def method_config_class(method: str) -> type:
    """The config class whose fields `method`'s trainer reads (`GRPOConfig` for TRL's `GRPOTrainer`)."""
    return METHODS[method].config


# Settings of our own that every method reads: [`trainer_class`] composes the polarity diagnostics onto any trainer.
EVERY_METHOD_SETTINGS = frozenset({"polarity_diagnostics", "polarity_chunk_tokens", "shared_prefix"})


def inapplicable_settings(method: str, names: Iterable[str]) -> list[str]:
    """
    The settings among `names` that `method`'s trainer never reads: fields [`MethodConfig`] adds for other methods
    (e.g. `eta` for `grpo`, `clip_cov_ratio` for `policy_split`). Other names (GRPO/TrainingArguments fields, script
    arguments) are left out.

    Args:
        method (`str`):
            A key of `METHODS`.
        names (`Iterable[str]`):
            Field names, e.g. those the user set.

    Returns:
        `list[str]`: the inapplicable ones, in the order given.
    """
    grpo_fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    method_fields = {f.name for f in dataclasses.fields(method_config_class(method))}
    extra_fields = {f.name for f in dataclasses.fields(MethodConfig)} - grpo_fields - EVERY_METHOD_SETTINGS
    return [name for name in names if name in extra_fields and name not in method_fields]


def apply_method(method: str, args: Any, explicit: Mapping[str, str] | None = None) -> Any:
    """
    Make `args` the settings of `method`: its defining settings (`fixed`) and, where the user did not set a field, its
    paper hyper-parameters (`defaults`).

    What the user set is decided by `explicit` (field name -> where it was written: `"command line"` or a recipe,
    e.g. from [`~policy_split_trl.training.explicit_arguments`]), never by the value, so `--eta 0.03` (the
    default value) still counts. A set value that contradicts a fixed setting is an error, except when the method was
    chosen on the command line and the value comes from the recipe: the command line wins over a recipe, as for any
    flag, and a warning names what is replaced (`--config recipe.yaml --method grpo_rollout_sharing` on a recipe that
    sets `eta: 0.03` trains with `eta=0`). Set values that the method's trainer never reads (`--method grpo --eta 0.5`)
    are warned about, unless they come from a recipe whose method the command line replaced (a recipe's knobs for its
    own method are expected there). Without `explicit` (a config built in Python), a value differing from the field's default
    counts as set.

    Args:
        method (`str`):
            A key of `METHODS`.
        args (`MethodConfig` or any config with the method's fields):
            Parsed settings; changed in place and returned.
        explicit (`Mapping[str, str]`, *optional*):
            The fields the user set and where; may include `"method"` itself.

    Returns:
        The same `args`.

    Raises:
        `ValueError`: unknown method, or a setting that contradicts the method (e.g. `eta: 0.05` with
        `grpo_rollout_sharing`).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {sorted(METHODS)}.")
    spec = METHODS[method]
    if explicit is None:
        field_defaults = {
            f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            for f in dataclasses.fields(type(args))
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        }
        explicit = {
            name: "config"
            for name in {**spec.fixed, **spec.defaults}
            if getattr(args, name) != field_defaults.get(name)
        }
    method_source = explicit.get("method")
    for name, value in spec.fixed.items():
        current, source = getattr(args, name), explicit.get(name)
        if source is not None and current != value:
            if _precedence(method_source) <= _precedence(source):
                raise ValueError(
                    f"--method {method} means {name}={value!r}, but {name}={current!r} is set ({source}); remove "
                    f"{name} from the recipe/flags, or pick another method (e.g. policy_split)."
                )
            warnings.warn(
                f"{name}={current!r} ({source}) is replaced by {name}={value!r}: --method {method} ({method_source}) "
                f"means {name}={value!r} and the command line wins over the recipe. Remove {name} from the recipe to "
                "silence this.",
                UserWarning,
                stacklevel=2,
            )
        setattr(args, name, value)
    for name, value in spec.defaults.items():
        if name not in explicit:
            setattr(args, name, value)
    # A recipe's knobs for its own method are expected when the command line picks another method for it ("one
    # --method away on any recipe"): only knobs written where the method was chosen, or later, are warned about.
    ignored = [
        name
        for name in inapplicable_settings(method, explicit)
        if _precedence(explicit[name]) >= _precedence(method_source)
    ]
    if ignored:
        by_source: dict[str, list[str]] = {}
        for name in ignored:
            by_source.setdefault(explicit[name], []).append(name)
        where = "; ".join(f"{', '.join(names)} ({source})" for source, names in by_source.items())
        warnings.warn(
            f"--method {method} does not use {where}: its trainer ({spec.trainer.__name__}) never reads "
            "these settings, so they have no effect. Remove them, or pick a method that uses them (see "
            "policy_split_trl.methods.METHODS).",
            UserWarning,
            stacklevel=2,
        )
    return args


def method_settings(method: str, args: Any) -> dict[str, Any]:
    """
    The settings that make `method` differ from GRPO, as they stand in `args` (for summaries and the comparison table).

    Args:
        method (`str`):
            A key of `METHODS`.
        args:
            The run's config.

    Returns:
        `dict[str, Any]`: the method's fixed and default settings plus the fields its trainer's config adds to
        `GRPOConfig`.
    """
    spec = METHODS[method]
    names = list(spec.fixed) + list(spec.defaults)
    grpo_fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    names += [f.name for f in dataclasses.fields(method_config_class(method)) if f.name not in grpo_fields]
    return {name: getattr(args, name) for name in dict.fromkeys(names)}


# ------------------------------------------------------------------------------------------------------ compositions
@dataclass(frozen=True)
class Composition:
    """
    A method stacked on Policy Split by cooperative inheritance, chosen by a setting of the parsed config (e.g.
    `base_advantage: asym_grpo`). To add one: write its trainer as a mixin whose overrides call `super()`, and append a
    `Composition` to [`COMPOSITIONS`]; [`trainer_class`] then builds the trainer for any config that asks for it.

    Args:
        name (`str`):
            The setting that asks for it, as written in a recipe (for messages and class names).
        mixin (`type`):
            Its trainer mixin. By default [`trainer_class`] places it between the Policy Split trainer and
            `GRPOTrainer`, so Policy Split's hooks see what the mixin made of TRL's (`output["advantages"]` above all).
        applies (`Callable[[Any], bool]`):
            Whether a parsed config asks for it.
        stage (`int`):
            Where it sits in the pipeline of advantages (SEED_METHODS §B.6): `0` replaces the base advantage `A_i`
            (computed first, next to `GRPOTrainer`), `1` reweights a base advantage, ... Higher stages wrap lower ones;
            Policy Split's bonus, clipped relative to `|A_i|` as it reaches Policy Split, comes last.
        prefix (`str`):
            Prefix of the composed trainer's class name (`"Asym"` -> `AsymPolicySplitGRPOTrainer`).
        outside (`bool`, *optional*, defaults to `False`):
            `True`: placed before the Policy Split trainer instead, so its overrides run around Policy Split's (to
            read or reweight what Policy Split built). Among themselves such mixins are also ordered by decreasing
            `stage`.
        every_method (`bool`, *optional*, defaults to `False`):
            `True`: offered to every method, not only those trained with Policy Split (the comparison stays fair).
    """

    name: str
    mixin: type
    applies: Callable[[Any], bool]
    stage: int
    prefix: str
    outside: bool = False
    every_method: bool = False


COMPOSITIONS: list[Composition] = [
    Composition(
        "base_advantage: asym_grpo",
        AsymGRPOMixin,
        lambda args: getattr(args, "base_advantage", "grpo") == "asym_grpo",
        stage=0,
        prefix="Asym",
    ),
    # Around Policy Split: it reweights the base term of the contexts Policy Split built (SEED_METHODS §B.6).
    Composition(
        "polarity_reweighting",
        PolarityPolicySplitMixin,
        lambda args: getattr(args, "polarity_reweighting", "none") != "none",
        stage=1,
        prefix="Polarity",
        outside=True,
    ),
    # Outermost: it reads the advantages every other stage made.
    Composition(
        "polarity_diagnostics",
        PolarityDiagnosticsMixin,
        lambda args: bool(getattr(args, "polarity_diagnostics", False)),
        stage=2,
        prefix="PolarityDiagnostics",
        outside=True,
        every_method=True,
    ),
    # Innermost, right before GRPOTrainer: every other override of the log-prob pass sees TRL's outputs.
    Composition(
        "shared_prefix",
        SharedPrefixMixin,
        lambda args: bool(getattr(args, "shared_prefix", False)),
        stage=-1,
        prefix="SharedPrefix",
        every_method=True,
    ),
]


# Composed trainers by (base trainer, their bases but GRPOTrainer): one class per combination, so `type(trainer)` is
# stable.
_COMPOSED: dict[tuple[type, tuple[type, ...]], type] = {
    (PolicySplitGRPOTrainer, (PolicySplitGRPOTrainer, AsymGRPOMixin, GRPOTrainer)): AsymPolicySplitGRPOTrainer,
}


def compose_trainer(base: type, compositions: Iterable[Composition]) -> type:
    """
    The trainer class `base` with the mixins of `compositions` stacked on it: bases
    `(*outside mixins, base, *inside mixins, GRPOTrainer)`, each side ordered by decreasing `stage`, so the base
    advantage is computed first (next to `GRPOTrainer`) and each later stage, then `base`, builds on the one before.
    Mixins `base` already inherits are left out; `base` itself when none is left.
    """
    ordered = sorted((c for c in compositions if not issubclass(base, c.mixin)), key=lambda c: -c.stage)
    if not ordered:  # nothing asked for, or `base` has it already (a registry method that is a composition)
        return base
    outside = tuple(c.mixin for c in ordered if c.outside)
    inside = tuple(c.mixin for c in ordered if not c.outside)
    # TRL's own trainer as `base` is the last base, after the inside mixins.
    bases = (*outside, *inside, base) if base is GRPOTrainer else (*outside, base, *inside, GRPOTrainer)
    key = (base, bases)
    if key not in _COMPOSED:
        name = "".join(c.prefix for c in ordered) + base.__name__
        doc = f"{base.__name__} with {', '.join(c.name for c in ordered)} (see policy_split_trl.methods.COMPOSITIONS)."
        _COMPOSED[key] = type(name, bases, {"__module__": __name__, "__doc__": doc})
    return _COMPOSED[key]


def trainer_class(method: str, args: Any) -> type:
    """
    The trainer class to build for `method` with the parsed config `args`: the registry's, with the compositions the
    config asks for (e.g. `base_advantage: asym_grpo` gives [`AsymPolicySplitGRPOTrainer`]) when the method trains
    with Policy Split. Other methods do not read Policy Split's settings ([`apply_method`] warns about them).

    Args:
        method (`str`):
            A key of `METHODS`.
        args:
            The run's config (after [`apply_method`]).

    Returns:
        `type`: a `GRPOTrainer` subclass.
    """
    spec = METHODS[method]
    compositions = [c for c in COMPOSITIONS if c.applies(args)]
    if not issubclass(spec.trainer, PolicySplitGRPOTrainer):
        # The others build on Policy Split's contexts; `polarity_diagnostics` and `shared_prefix` work on every method.
        compositions = [c for c in compositions if c.every_method]
    return compose_trainer(spec.trainer, compositions)
