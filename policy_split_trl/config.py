from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from .asym_grpo import AsymGRPOArguments
from .config_checks import check_finite_numbers
from .diagnostics import check_mode_diagnostics
from .eta_control import ETA_SCHEDULES, check_eta_schedule
from .modes import HIGH_ENTROPY_SYSTEM_PROMPT
from .polarity import POLARITY_REWEIGHTING_CONTEXTS, PolarityArguments
from .shared_prefix import SharedPrefixArguments

ETA_PLACEMENTS = ("inside_clip", "outside_clip")
LOSS_AGGREGATIONS = ("token_mean", "quarter_token_mean")
# The correctness advantage A_i that Policy Split builds on: TRL's GRPO (the paper) or AsymGRPO (arXiv 2604.04894).
BASE_ADVANTAGES = ("grpo", "asym_grpo")


@dataclass
class PolicySplitGRPOConfig(AsymGRPOArguments, PolarityArguments, SharedPrefixArguments, GRPOConfig):
    r"""
    Configuration class for the [`PolicySplitGRPOTrainer`].

    [`PolicySplitGRPOConfig`] inherits every parameter of [`~trl.GRPOConfig`] and adds the parameters of Policy Split
    ([arXiv 2604.11510](https://huggingface.co/papers/2604.11510)). Defaults are the paper's (Table 8 / SPEC §3). It
    also has the `asym_*` parameters of [`~policy_split_trl.asym_grpo.AsymGRPOArguments`], read with
    `base_advantage="asym_grpo"`.

    Parameters:
        high_entropy_system_prompt (`str`, *optional*, defaults to the paper's prompt, Appendix C.2):
            System prompt `s` that turns the policy into its high-entropy (HE) mode (Eq. 1).
        num_high_entropy_generations (`int`, *optional*):
            How many of the `num_generations` rollouts of each query are generated in HE mode; the rest are generated
            in normal mode. Defaults to `num_generations // 2`.
        num_high_entropy_generations_eval (`int`, *optional*):
            The same for evaluation. Defaults to `num_high_entropy_generations` when `num_generations_eval` is unset,
            otherwise to `num_generations_eval // 2`.
        eta (`float`, *optional*, defaults to `0.03`):
            Coefficient `eta` of the HE bonus in Eq. 3.
        kappa (`float`, *optional*, defaults to `2.0`):
            Clip ratio `kappa > 1` of Eq. 3: the bonus is clipped to `[-|A|/kappa, |A|/kappa]` so it never flips the
            sign of the correctness advantage `A`.
        alpha (`float`, *optional*, defaults to `0.5`):
            Mix `alpha` in `[0, 1]` of the bonus (Eq. 6): `b = -alpha log pi_HE - (1 - alpha) log pi`. Toward 1 it
            favours high entropy, toward 0 it favours the distance between the modes.
        normal_eta (`float`, *optional*, defaults to `0.0`):
            Coefficient `eta'` of the same clipped bonus on normal-context rows (Table 3 ablation). `0.0` trains
            normal-context rows with the correctness-only advantage, as in the paper.
        rollout_sharing (`bool`, *optional*, defaults to `True`):
            Train every rollout in both contexts (Eq. 10). `False` trains each rollout only in the context that
            generated it (Eq. 9); the bonus still uses the log-probs of both contexts.
        eta_placement (`str`, *optional*, defaults to `"inside_clip"`):
            Where `eta` sits in Eq. 3. `"inside_clip"` is what the authors' released code computes (and Cheng et al.,
            2025): `A + clip(eta * B, -|A|/kappa, |A|/kappa)`, the bonus up to `|A|/kappa`. `"outside_clip"` is the
            typeset form `A + eta * clip(B, -|A|/kappa, |A|/kappa)`, whose bonus is at most `eta |A|/kappa` (0.015|A|
            at the paper's eta and kappa) and mostly saturated: 2.5-10x less entropy-driving signal (SPEC §2.7).
        loss_aggregation (`str`, *optional*, defaults to `"token_mean"`):
            `"token_mean"`: TRL's `dapo` loss, one token mean over every (row, token) pair of both contexts (verl's
            token-mean over the whole batch). `"quarter_token_mean"`: the mean of the token means of the four (training
            context, generating mode) quarters, as the authors' verl loop weighs its micro-batches (each holds one
            quarter, SPEC §2.7); long rollouts of one mode then weigh no more than short ones of the other. Needs
            `loss_type="dapo"`; only the policy-gradient term is re-weighted (a `beta` KL term stays a token mean).
        optimized_step (`bool`, *optional*, defaults to `True`):
            Same math, less work: each context's rows are run at their own width (no padding to the high-entropy
            prompt's), the two contexts are trained in separate forward/backward passes (peak activation memory of
            one context), and on-policy with one micro-batch per generation batch the bonus comes from the loss pass
            itself instead of a separate scoring pass. `False` runs the straightforward path (a scoring pass for both
            contexts, one loss pass over all rows), e.g. to check the optimized one against it.
        bonus_from_loss_pass (`bool`, *optional*, defaults to `True`):
            With `optimized_step`, on-policy and one micro-batch per generation batch: take the bonus from the loss
            pass (no scoring pass, fastest), which then trains the HE context in one piece (its rows are longer by the
            system prompt: more activation memory than GRPO on short rollouts). `False`: a scoring pass gives the
            bonus and the HE context is trained in chunks of the normal context's size (peak memory near GRPO's).
        shared_prefix (`bool`, *optional*, defaults to `True`):
            With `optimized_step`: encode each (query, context) prompt once per log-prob pass for all the rollouts
            that share it, not once per rollout ([`~policy_split_trl.shared_prefix`]; the same log-probs and
            gradients). `False`: TRL's padded rows.
        eta_schedule (`str`, *optional*, defaults to `"constant"`):
            `"constant"`: `eta` as set, the paper's method. `"adaptive"` (beyond the paper): `eta` is the initial value
            of a controller that, once per optimizer step, multiplies `eta` by `eta_update_factor` when the step's
            `policy_split/kl_high_entropy_normal` is below the band `[target / (1 + tol), target * (1 + tol)]`
            (`target = target_kl_high_entropy_normal`, `tol = eta_target_tolerance`), divides it when above, and
            divides it whatever the KL when the HE context's token entropy exceeds `max_entropy_ratio` times the
            normal context's; `eta` stays in `[eta_min, eta_max]`. A statistic the step did not measure moves
            nothing ([`~policy_split_trl.eta_control.adaptive_eta_update`]). Logged as `policy_split/eta`.
        target_kl_high_entropy_normal (`float`, *optional*):
            Target of `policy_split/kl_high_entropy_normal` (`KL(pi_HE || pi)` on HE-generated tokens, nats), `> 0`.
            Required by `eta_schedule="adaptive"`.
        eta_target_tolerance (`float`, *optional*, defaults to `0.2`):
            Relative half-width `tol > 0` of the target band `[target / (1 + tol), target * (1 + tol)]`, inside
            which `eta` does not move. For `eta` to settle, `(1 + tol) ** 2` should exceed `eta_update_factor`.
        eta_update_factor (`float`, *optional*, defaults to `1.1`):
            Multiplicative step `> 1` of the adaptive `eta`.
        eta_min (`float`, *optional*, defaults to `0.001`):
            Lower bound of the adaptive `eta`, `>= 0`.
        eta_max (`float`, *optional*, defaults to `0.1`):
            Upper bound of the adaptive `eta` (the paper's collapse point, Table 3), `>= eta_min`; the initial `eta`
            must lie in `[eta_min, eta_max]`.
        max_entropy_ratio (`float`, *optional*, defaults to `1.5`):
            Entropy ceiling `> 1` of the adaptive `eta`: the step's HE-context token entropy above `max_entropy_ratio`
            x the normal context's (`policy_split/entropy/{high_entropy,normal}_context`) cuts `eta`. `None`: no
            ceiling.
        mode_diagnostics_steps (`int`, *optional*, defaults to `0`):
            `N > 0`: on optimizer steps 1, N + 1, 2N + 1, ... measure the cosine between the gradients of the
            normal-context and the high-entropy-context losses (overall and per parameter group) and the hidden-state
            similarity of the two contexts, logged under `policy_split/diagnostics/` and plotted to
            `mode_diagnostics.png` ([`~policy_split_trl.diagnostics.ModeDiagnosticsMixin`]; the update is unchanged).
            `0`: off. Not with FSDP or ZeRO-3.
        mode_diagnostics_prompts (`int`, *optional*, defaults to `8`):
            Prompts of the hidden-state similarity: the first ones of the evaluation dataset, else of the training
            dataset. `0`: no hidden-state similarity.
        polarity_reweighting (`str`, *optional*, defaults to `"none"`):
            `polarity_reweighting` (our rule, after the entropy-polarity idea of arXiv 2605.11775; SEED_METHODS
            §B.2.4, §B.6) on the base term `A_i` of the `"normal"` context, the `"high_entropy"` context, or `"both"`,
            with one phase controller per context; the bonus's clip stays relative to the unweighted `|A_i|`
            ([`~policy_split_trl.polarity.PolarityPolicySplitMixin`]). Its settings are the `polarity_*` fields of
            [`~policy_split_trl.polarity.PolarityArguments`]. `"none"`: Policy Split as in the paper.
        base_advantage (`str`, *optional*, defaults to `"grpo"`):
            The correctness advantage `A_i` (Eq. 2) both contexts build on. `"grpo"`: TRL's GRPO advantage (the
            paper). `"asym_grpo"`: AsymGRPO's (arXiv 2604.04894, settings `asym_*`), from the pooled success rate of
            both modes' rollouts; the HE bonus is then clipped to `|A_i|/kappa` of the AsymGRPO `A_i`. The trainer
            class is chosen by [`~policy_split_trl.methods.trainer_class`].
    """

    high_entropy_system_prompt: str = field(
        default=HIGH_ENTROPY_SYSTEM_PROMPT,
        metadata={"help": "System prompt s that turns the policy into its high-entropy mode (Eq. 1)."},
    )
    num_high_entropy_generations: int | None = field(
        default=None,
        metadata={
            "help": "How many of the num_generations rollouts of each query are generated in high-entropy mode. "
            "Defaults to num_generations // 2."
        },
    )
    num_high_entropy_generations_eval: int | None = field(
        default=None,
        metadata={
            "help": "How many of the num_generations_eval rollouts of each query use high-entropy mode during "
            "evaluation. Defaults to num_high_entropy_generations when num_generations_eval is unset, else "
            "num_generations_eval // 2."
        },
    )
    eta: float = field(
        default=0.03,
        metadata={"help": "Coefficient eta >= 0 of the high-entropy bonus (Eq. 3). Paper: 0.03."},
    )
    kappa: float = field(
        default=2.0,
        metadata={"help": "Clip ratio kappa > 1 of Eq. 3; the bonus is clipped to +/-|A|/kappa. Paper: 2.0."},
    )
    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Mix alpha in [0, 1] of the bonus b = -alpha log pi_HE - (1 - alpha) log pi (Eq. 6). Paper: 0.5."
        },
    )
    normal_eta: float = field(
        default=0.0,
        metadata={
            "help": "Coefficient eta' of the clipped bonus on normal-context rows (Table 3 ablation). Paper: 0."
        },
    )
    rollout_sharing: bool = field(
        default=True,
        metadata={
            "help": "Train every rollout in both contexts (Eq. 10). False: each rollout only in the context that "
            "generated it (Eq. 9)."
        },
    )
    eta_placement: str = field(
        default="inside_clip",
        metadata={
            "help": "Where eta sits in Eq. 3: 'inside_clip' (A + clip(eta*B, +/-|A|/kappa), the authors' code) or "
            "'outside_clip' (A + eta*clip(B, +/-|A|/kappa), Eq. 3 as typeset).",
            "choices": list(ETA_PLACEMENTS),
        },
    )

    loss_aggregation: str = field(
        default="token_mean",
        metadata={
            "help": "'token_mean': one token mean over both contexts (TRL's dapo). 'quarter_token_mean': the mean of "
            "the token means of the 4 (context, generating mode) quarters, as the authors' verl loop (needs dapo).",
            "choices": list(LOSS_AGGREGATIONS),
        },
    )

    optimized_step: bool = field(
        default=True,
        metadata={
            "help": "Skip the scoring pass when the loss pass can give the bonus, cut each context to its own width, "
            "and train the two contexts in separate forward/backward passes. False: the straightforward path."
        },
    )

    bonus_from_loss_pass: bool = field(
        default=True,
        metadata={
            "help": "On-policy: bonus from the loss pass (fastest). False: a scoring pass, and the high-entropy "
            "context trained in chunks of the normal context's size (peak memory near GRPO's)."
        },
    )

    eta_schedule: str = field(
        default="constant",
        metadata={
            "help": "'constant': eta as set (the paper). 'adaptive': eta steered once per optimizer step toward "
            "target_kl_high_entropy_normal, cut on entropy inflation (max_entropy_ratio), within [eta_min, eta_max].",
            "choices": list(ETA_SCHEDULES),
        },
    )
    target_kl_high_entropy_normal: float | None = field(
        default=None,
        metadata={
            "help": "Target of policy_split/kl_high_entropy_normal (KL(pi_HE || pi) on HE-generated tokens), > 0. "
            "Required by eta_schedule='adaptive'."
        },
    )
    eta_target_tolerance: float = field(
        default=0.2,
        metadata={
            "help": "Relative half-width tol > 0 of the target band [target/(1+tol), target*(1+tol)] of the "
            "adaptive eta."
        },
    )
    eta_update_factor: float = field(
        default=1.1,
        metadata={"help": "Adaptive eta: multiplied (gap below the band) or divided (above) by this factor > 1."},
    )
    eta_min: float = field(default=0.001, metadata={"help": "Lower bound of the adaptive eta, >= 0."})
    eta_max: float = field(default=0.1, metadata={"help": "Upper bound of the adaptive eta, >= eta_min."})
    max_entropy_ratio: float | None = field(
        default=1.5,
        metadata={
            "help": "Adaptive eta: cut eta when the high-entropy context's token entropy exceeds this ratio (> 1) "
            "times the normal context's. None: no ceiling."
        },
    )
    mode_diagnostics_steps: int = field(
        default=0,
        metadata={
            "help": "N > 0: every N optimizer steps (1, N+1, ...), log the cosine between the two contexts' loss "
            "gradients and their hidden-state similarity (policy_split/diagnostics/*). 0: off."
        },
    )
    mode_diagnostics_prompts: int = field(
        default=8,
        metadata={
            "help": "Prompts of the hidden-state similarity (the eval dataset's first ones, else the training "
            "dataset's). 0: none."
        },
    )
    base_advantage: str = field(
        default="grpo",
        metadata={
            "help": "The correctness advantage A_i both contexts build on: 'grpo' (TRL's, the paper) or 'asym_grpo' "
            "(AsymGRPO, arXiv 2604.04894, settings asym_*; the HE bonus clip is then |A_asym|/kappa).",
            "choices": list(BASE_ADVANTAGES),
        },
    )

    polarity_reweighting: str = field(
        default="none",
        metadata={
            "help": "Our polarity reweighting (after arXiv 2605.11775) of the base advantage A in the 'normal' context, "
            "the 'high_entropy' context or 'both' (the bonus clip stays relative to the unweighted |A|). 'none': off.",
            "choices": list(POLARITY_REWEIGHTING_CONTEXTS),
        },
    )

    def __post_init__(self):
        # Our checks run before GRPOConfig's so that a bad mode split gets the Policy Split message.
        check_finite_numbers(self)
        if self.polarity_reweighting not in POLARITY_REWEIGHTING_CONTEXTS:
            raise ValueError(
                f"polarity_reweighting must be one of {POLARITY_REWEIGHTING_CONTEXTS}, got "
                f"{self.polarity_reweighting!r}."
            )
        if not isinstance(self.high_entropy_system_prompt, str) or not self.high_entropy_system_prompt.strip():
            raise ValueError(
                "high_entropy_system_prompt must be a non-empty string: it is what puts the model in high-entropy "
                "mode. Leave it unset to use the paper's prompt."
            )
        if not self.kappa > 1:
            raise ValueError(
                f"kappa must be > 1 (got {self.kappa}): the bonus is clipped to |A|/kappa so that it never flips the "
                "sign of the advantage. Use the paper's kappa=2.0."
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (got {self.alpha}); the paper uses alpha=0.5.")
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0 (got {self.eta}); the paper uses eta=0.03, eta=0 disables the bonus.")
        if self.eta_placement not in ETA_PLACEMENTS:
            raise ValueError(f"eta_placement must be one of {ETA_PLACEMENTS}, got {self.eta_placement!r}.")
        if self.base_advantage not in BASE_ADVANTAGES:
            raise ValueError(
                f"base_advantage must be one of {BASE_ADVANTAGES}, got {self.base_advantage!r}: 'grpo' (the paper) or "
                "'asym_grpo' (AsymGRPO's advantage, settings asym_*)."
            )
        check_eta_schedule(self)
        check_mode_diagnostics(self)
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_aggregation must be one of {LOSS_AGGREGATIONS}, got {self.loss_aggregation!r}.")
        if self.loss_aggregation == "quarter_token_mean" and self.loss_type != "dapo":
            raise ValueError(
                f"loss_aggregation='quarter_token_mean' re-weights the token mean of loss_type='dapo', got "
                f"loss_type={self.loss_type!r}. Set loss_type: dapo (the authors' token-mean), or loss_aggregation: "
                "token_mean."
            )

        if self.num_high_entropy_generations is None:
            self.num_high_entropy_generations = self.num_generations // 2
        self._check_mode_split(
            "num_high_entropy_generations", self.num_high_entropy_generations, "num_generations", self.num_generations
        )
        if self.num_high_entropy_generations_eval is None:
            self.num_high_entropy_generations_eval = (
                self.num_high_entropy_generations
                if self.num_generations_eval is None
                else self.num_generations_eval // 2
            )
        self._check_mode_split(
            "num_high_entropy_generations_eval",
            self.num_high_entropy_generations_eval,
            "num_generations_eval",
            self.num_generations_eval or self.num_generations,
        )
        super().__post_init__()

    @staticmethod
    def _check_mode_split(name: str, num_high_entropy: int, group_name: str, group_size: int) -> None:
        if group_size < 2:
            raise ValueError(
                f"{group_name} must be >= 2 (got {group_size}): Policy Split needs at least one normal-mode and one "
                "high-entropy rollout per query, and two rollouts for a group std."
            )
        if not 1 <= num_high_entropy <= group_size - 1:
            raise ValueError(
                f"{name} must be between 1 and {group_name} - 1 = {group_size - 1} (got {num_high_entropy}): each "
                "mode needs at least one rollout per query."
            )
