"""The advantage math of Policy Split (arXiv 2604.11510, Section 3.2), one function per equation.

Shapes: `B` rollouts (rows), `T` completion tokens; `mask` is `1` on real completion tokens and `0` on padding.
Group statistics are accumulated in float64. Every function is pure and differentiable-free (the advantages are
detached quantities), so the trainer only orchestrates.
"""

from __future__ import annotations

import math

import torch

# Below this group std the bonus is treated as constant and normalizes to 0 (no NaN/inf from a zero std).
BONUS_STD_EPS = 1e-8


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """
    Correctness advantage over the joint group of `G` rollouts of a query (Eq. 2, vanilla GRPO).

    `A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)`, with the unbiased std and `eps` exactly as TRL's
    `GRPOTrainer` (`scale_rewards="group"`). The trainer takes `A_i` from TRL itself; this function is the reference
    it is checked against.

    Args:
        rewards (`torch.Tensor`):
            Shape `(N,)`, consecutive groups of `group_size` rollouts (normal and high-entropy rollouts together).
        group_size (`int`):
            `G`.
        eps (`float`, *optional*, defaults to `1e-4`):
            Added to the std, as in TRL.

    Returns:
        `torch.Tensor`: shape `(N,)`, same dtype as `rewards`.
    """
    grouped = rewards.view(-1, group_size).to(torch.float64)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1).to(rewards.dtype)


def dual_mode_bonus(logps_high_entropy: torch.Tensor, logps_normal: torch.Tensor, alpha: float) -> torch.Tensor:
    """
    Per-token exploration signal `b_{i,t}` (Eq. 6, the log-prob estimate of Eq. 5).

    `b = -alpha * log pi_HE(o_t | s, q, o_<t) - (1 - alpha) * log pi(o_t | q, o_<t)`. The first term estimates the
    HE-mode entropy, the pair together the KL between the modes (Appendix A); `alpha = 1 - beta2 / beta1`.

    Args:
        logps_high_entropy (`torch.Tensor`):
            Shape `(B, T)`: log-probs of the rollout tokens in the high-entropy context (with `s`), detached.
        logps_normal (`torch.Tensor`):
            Shape `(B, T)`: log-probs of the same tokens in the normal context (without `s`), detached.
        alpha (`float`):
            Mix in `[0, 1]`.

    Returns:
        `torch.Tensor`: shape `(B, T)`. Values at padding positions are meaningless; mask them downstream.
    """
    return -alpha * logps_high_entropy - (1.0 - alpha) * logps_normal


def row_token_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """
    Per-row sufficient statistics of the masked tokens, for exact group statistics across processes (Eq. 4).

    Each row gives `(count, mean, M2)`: its number of real tokens, their mean and their sum of squared deviations from
    that mean, in float64. Rows of a group can then live on different processes: gather these `(B, 3)` tensors and
    combine them with [`group_mean_std`]; the result equals the statistic over the raw tokens.

    Args:
        values (`torch.Tensor`):
            Shape `(B, T)`.
        mask (`torch.Tensor`):
            Shape `(B, T)`, `1` on real tokens.

    Returns:
        `torch.Tensor`: shape `(B, 3)`, float64, columns `(count, mean, M2)`. Empty rows give `(0, 0, 0)`.
    """
    valid = mask.bool()
    mask = mask.to(torch.float64)
    # torch.where, not a product: a NaN/inf under padding must not leak into the statistics
    values = torch.where(valid, values.to(torch.float64), 0.0)
    count = mask.sum(dim=1)
    mean = values.sum(dim=1) / count.clamp(min=1.0)
    m2 = (((values - mean.unsqueeze(1)) * mask) ** 2).sum(dim=1)
    return torch.stack([count, mean, m2], dim=1)


def group_mean_std(row_moments: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Mean and std over all tokens of all rollouts of each group, from per-row moments (Eq. 4 statistics).

    Rows are combined with the parallel-variance formula `M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2`, which is
    exact and stable. The std is unbiased (`M2 / (n - 1)`, as `torch.std`); a group with fewer than 2 tokens has std 0.

    Args:
        row_moments (`torch.Tensor`):
            Shape `(N, 3)` from [`row_token_moments`], consecutive groups of `group_size` rows.
        group_size (`int`):
            `G`.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: group mean and std per row, each shape `(N,)`, float64.
    """
    grouped = row_moments.to(torch.float64).view(-1, group_size, 3)
    count, mean, m2 = grouped.unbind(dim=2)
    group_count = count.sum(dim=1, keepdim=True)
    group_mean = (count * mean).sum(dim=1, keepdim=True) / group_count.clamp(min=1.0)
    group_m2 = m2.sum(dim=1, keepdim=True) + (count * (mean - group_mean) ** 2).sum(dim=1, keepdim=True)
    group_var = torch.where(group_count > 1, group_m2 / (group_count - 1).clamp(min=1.0), torch.zeros_like(group_m2))
    group_std = group_var.clamp(min=0.0).sqrt()
    return (
        group_mean.expand(-1, group_size).reshape(-1),
        group_std.expand(-1, group_size).reshape(-1),
    )


def standardize_bonus(
    bonus: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = BONUS_STD_EPS
) -> torch.Tensor:
    """
    Group-wise normalized bonus `B_{i,t} = (b_{i,t} - mean) / std` (Eq. 4), given each row's group statistics.

    Padding positions are 0. A group whose bonus is constant (std <= `eps`) gets `B = 0` everywhere instead of a
    NaN/inf, so its high-entropy advantage is exactly `A`.

    Args:
        bonus (`torch.Tensor`):
            Shape `(B, T)`, the `b` of Eq. 6.
        mask (`torch.Tensor`):
            Shape `(B, T)`.
        mean (`torch.Tensor`):
            Shape `(B,)`: the mean of the row's group.
        std (`torch.Tensor`):
            Shape `(B,)`: the std of the row's group.
        eps (`float`, *optional*, defaults to `1e-8`):
            Std at or below which the group is treated as constant.

    Returns:
        `torch.Tensor`: shape `(B, T)`, dtype of `bonus`.
    """
    mean = mean.to(torch.float64).unsqueeze(1)
    std = std.to(torch.float64).unsqueeze(1)
    valid = mask.bool() & (std > eps)
    centered = bonus.to(torch.float64) - mean
    normalized = torch.where(valid, centered / torch.where(std > eps, std, torch.ones_like(std)), 0.0)
    return normalized.to(bonus.dtype)


def normalize_bonus(bonus: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """
    Eq. 4 on one process: normalize `b` over all non-padding tokens of all `G` rollouts of each query.

    Composes [`row_token_moments`], [`group_mean_std`] and [`standardize_bonus`]. The trainer does the same with a
    gather of the row moments between the first two steps, so groups split across processes get the exact statistic.

    Args:
        bonus (`torch.Tensor`):
            Shape `(N, T)`, consecutive groups of `group_size` rollouts.
        mask (`torch.Tensor`):
            Shape `(N, T)`.
        group_size (`int`):
            `G`.

    Returns:
        `torch.Tensor`: shape `(N, T)`, dtype of `bonus`.
    """
    mean, std = group_mean_std(row_token_moments(bonus, mask), group_size)
    return standardize_bonus(bonus, mask, mean, std)


def _clip_input(normalized_bonus: torch.Tensor, eta: float, eta_placement: str) -> torch.Tensor:
    """What Eq. 3 clips: `eta * B` (eta inside: the authors' code, Cheng et al. 2025) or `B` (eta outside, as typeset)."""
    if eta_placement == "outside_clip":
        return normalized_bonus
    if eta_placement == "inside_clip":
        return eta * normalized_bonus
    raise ValueError(f"eta_placement must be 'outside_clip' or 'inside_clip', got {eta_placement!r}.")


def clipped_bonus(
    advantages: torch.Tensor,
    normalized_bonus: torch.Tensor,
    eta: float,
    kappa: float,
    eta_placement: str = "inside_clip",
) -> torch.Tensor:
    """
    The bonus term of Eq. 3, clipped so that it never flips the sign of the correctness advantage.

    - `eta_placement="inside_clip"` (default; the authors' released code, Cheng et al. 2025):
      `clip(eta * B, -|A|/kappa, +|A|/kappa)`; at most `|A|/kappa`.
    - `eta_placement="outside_clip"` (Eq. 3 as typeset): `eta * clip(B, -|A|/kappa, +|A|/kappa)`; at most
      `eta|A|/kappa`.

    Where `A = 0` the bound is 0, so the bonus is 0.

    Args:
        advantages (`torch.Tensor`):
            Shape `(B,)`: the correctness advantages `A_i` (Eq. 2).
        normalized_bonus (`torch.Tensor`):
            Shape `(B, T)`: `B_{i,t}` (Eq. 4), detached.
        eta (`float`):
            Coefficient (`eta` for HE-context rows, `eta'` for normal-context rows).
        kappa (`float`):
            Clip ratio, `> 1`.
        eta_placement (`str`, *optional*, defaults to `"inside_clip"`):
            `"inside_clip"` or `"outside_clip"`.

    Returns:
        `torch.Tensor`: shape `(B, T)`.
    """
    bound = (advantages.abs() / kappa).unsqueeze(1).to(normalized_bonus.dtype)
    clipped = torch.clamp(_clip_input(normalized_bonus, eta, eta_placement), -bound, bound)
    return eta * clipped if eta_placement == "outside_clip" else clipped


def entropy_regularized_advantages(
    advantages: torch.Tensor,
    normalized_bonus: torch.Tensor,
    eta: float,
    kappa: float,
    eta_placement: str = "inside_clip",
) -> torch.Tensor:
    """
    Per-token advantage of a row with the bonus (Eq. 3): `A^HE_{i,t} = A_i + bonus_{i,t}`.

    With `eta` it is the high-entropy-context advantage; with `eta'` it is the normal-context advantage of the Table 3
    ablation (`eta' = 0` gives `A_i` on every token, the paper's normal mode).

    Args:
        advantages (`torch.Tensor`):
            Shape `(B,)`: `A_i`.
        normalized_bonus (`torch.Tensor`):
            Shape `(B, T)`: `B_{i,t}`.
        eta (`float`):
            Coefficient.
        kappa (`float`):
            Clip ratio.
        eta_placement (`str`, *optional*, defaults to `"inside_clip"`):
            See [`clipped_bonus`].

    Returns:
        `torch.Tensor`: shape `(B, T)`, dtype of `normalized_bonus`.
    """
    return advantages.unsqueeze(1).to(normalized_bonus.dtype) + clipped_bonus(
        advantages, normalized_bonus, eta, kappa, eta_placement
    )


def bonus_hit_clip(
    advantages: torch.Tensor,
    normalized_bonus: torch.Tensor,
    eta: float,
    kappa: float,
    eta_placement: str = "inside_clip",
) -> torch.Tensor:
    """
    Which tokens' bonus sits at the clip bound of Eq. 3 (for the `clip fraction` metric).

    Only tokens with `A != 0` can be clipped in a meaningful way; tokens with `A = 0` are reported as not clipped.

    Args:
        advantages (`torch.Tensor`):
            Shape `(B,)`.
        normalized_bonus (`torch.Tensor`):
            Shape `(B, T)`.
        eta (`float`):
            Coefficient.
        kappa (`float`):
            Clip ratio.
        eta_placement (`str`, *optional*, defaults to `"inside_clip"`):
            See [`clipped_bonus`].

    Returns:
        `torch.Tensor`: bool, shape `(B, T)`.
    """
    bound = (advantages.abs() / kappa).unsqueeze(1)
    return (_clip_input(normalized_bonus, eta, eta_placement).abs() > bound) & (bound > 0)


def forward_kl_estimate(
    logps_sampled_mode: torch.Tensor, logps_other_mode: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Sums for the Monte-Carlo estimate of `KL(p || q)` from tokens sampled from `p` (Table 5 uses `p = pi_HE`).

    `KL(p || q) ~ mean over sampled tokens of (log p(o_t) - log q(o_t))`. Returned as a (sum, count) pair so the
    caller can reduce across processes before dividing.

    Args:
        logps_sampled_mode (`torch.Tensor`):
            Shape `(B, T)`: log-probs under the mode the tokens were sampled from.
        logps_other_mode (`torch.Tensor`):
            Shape `(B, T)`: log-probs of the same tokens under the other mode.
        mask (`torch.Tensor`):
            Shape `(B, T)`.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: float64 scalars `(sum of log-ratios, number of tokens)`.
    """
    valid = mask.bool()
    diff = logps_sampled_mode.to(torch.float64) - logps_other_mode.to(torch.float64)
    return torch.where(valid, diff, 0.0).sum(), valid.sum().to(torch.float64)


def quarter_loss_weights(
    generated_high_entropy: torch.Tensor, normal_tokens: float, high_entropy_tokens: float
) -> torch.Tensor:
    r"""
    Per-rollout loss weights that turn one token mean over all (row, token) pairs (TRL's `dapo`) into the mean of
    per-"quarter" token means, as the authors' verl loop weighs its micro-batches (SPEC §2.7).

    A quarter is a (training context, generating mode) pair: with rollout sharing there are four, each holding the
    tokens `T_g` of the rollouts generated in mode `g` (both contexts train the same tokens); without sharing two. With
    `N = sum_q N_q` tokens in all and `Q` non-empty quarters, weighting each token of quarter `q` by `N / (Q N_q)`
    gives `sum_q sum_{t in q} w_q l_t / N = (1/Q) sum_q mean_{t in q} l_t`. Since `N_q = T_g` and `N / Q` is the same
    with or without sharing, a rollout generated in mode `g` gets, in both contexts,

    $$w_g = \frac{T_{normal} + T_{HE}}{M \, T_g},$$

    `M` the number of modes with tokens (2, or 1 when a mode produced none). Positive weights scale the clipped
    surrogate exactly (`min(rho wA, clip(rho) wA) = w min(rho A, clip(rho) A)`), so they are applied to the advantages.

    Args:
        generated_high_entropy (`torch.Tensor`):
            Shape `(B,)`, bool: which rollouts were generated in HE mode.
        normal_tokens (`float`):
            `T_normal`: loss tokens of all normal-generated rollouts of the generation batch, over all processes.
        high_entropy_tokens (`float`):
            `T_HE`: the same for HE-generated rollouts.

    Returns:
        `torch.Tensor`: shape `(B,)`, float32, `w_g` of each rollout (1 for a mode with no tokens: its rows add 0).
    """
    total = normal_tokens + high_entropy_tokens
    modes = (normal_tokens > 0) + (high_entropy_tokens > 0)
    weight = {}
    for name, tokens in (("normal", normal_tokens), ("high_entropy", high_entropy_tokens)):
        weight[name] = total / (modes * tokens) if tokens > 0 else 1.0
    return torch.where(
        generated_high_entropy.bool(),
        torch.tensor(weight["high_entropy"], dtype=torch.float32, device=generated_high_entropy.device),
        torch.tensor(weight["normal"], dtype=torch.float32, device=generated_high_entropy.device),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Baselines of the paper's comparison (Table 1, Appendix B.3). Their trainers are in `policy_split_trl.baselines`.
# ---------------------------------------------------------------------------------------------------------------------


def entropy_advantage(
    advantages: torch.Tensor, entropies: torch.Tensor, alpha: float = 0.4, kappa: float = 2.0
) -> torch.Tensor:
    """
    Entropy advantage of Cheng et al. 2025 ("Reasoning with Exploration: An Entropy Perspective", arXiv 2506.14758):
    `A_t + min(alpha * detach(H_t), |A| / kappa)`.

    The entropy term is non-negative and capped at `|A|/kappa` with `kappa > 1`, so it never flips the sign of `A` and
    is 0 where `A = 0`. This is the same clipped term as Policy Split's Eq. 3 in its `inside_clip` reading, with the
    per-token entropy in place of the normalized bonus, so it is computed by [`clipped_bonus`].

    Args:
        advantages (`torch.Tensor`):
            Shape `(B,)`: the GRPO advantages.
        entropies (`torch.Tensor`):
            Shape `(B, T)`: per-token entropies `H_t` of the policy (detached here).
        alpha (`float`, *optional*, defaults to `0.4`):
            Entropy scale (the paper's baseline setting, App. B.3).
        kappa (`float`, *optional*, defaults to `2.0`):
            Cap ratio, `> 1`.

    Returns:
        `torch.Tensor`: shape `(B, T)`.
    """
    if not kappa > 1:
        raise ValueError(f"kappa must be > 1 (got {kappa}) so that the entropy term never flips the advantage's sign.")
    bonus = clipped_bonus(advantages, entropies.detach(), alpha, kappa, eta_placement="inside_clip")
    return advantages.unsqueeze(1).to(bonus.dtype) + bonus


def response_mean_entropy(entropies: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """
    Mean token entropy of each response, `P_i = mean_t H_{i,t}` over its real tokens (EDGE-GRPO's response entropy).

    Args:
        entropies (`torch.Tensor`):
            Shape `(B, T)`.
        mask (`torch.Tensor`):
            Shape `(B, T)`, 1 on completion tokens.

    Returns:
        `torch.Tensor`: shape `(B,)`; 0 for a response without tokens.
    """
    mask = mask.to(entropies.dtype)
    return (entropies * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def relative_response_entropy(response_entropy: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """
    EDGE-GRPO's normalized response entropy `P^_i = P_i / mean_{j in group} P_j` (Zhang et al. 2025d, arXiv
    2507.21848): a ratio to the group mean, not a z-score.

    Both `P_i` and the group mean are floored at `eps`, so a (near-)deterministic response or group never divides by
    zero.

    Args:
        response_entropy (`torch.Tensor`):
            Shape `(N,)`: `P_i` of whole groups, in group order (`N` a multiple of `group_size`).
        group_size (`int`):
            Rollouts per query `G`.
        eps (`float`, *optional*, defaults to `1e-6`):
            Floor of `P_i` and of the group mean.

    Returns:
        `torch.Tensor`: shape `(N,)`; its mean over each group is 1 when no `P_i` is below `eps`.
    """
    if response_entropy.numel() % group_size:
        raise ValueError(f"{response_entropy.numel()} responses do not form whole groups of {group_size}.")
    floored = response_entropy.clamp(min=eps)
    group_mean = floored.view(-1, group_size).mean(1).repeat_interleave(group_size)
    return floored / group_mean


def entropy_driven_advantages(
    advantages: torch.Tensor, relative_entropy: torch.Tensor, max_scale: float | None = None
) -> torch.Tensor:
    """
    EDGE-GRPO's entropy-driven advantage `A^_i = A_i / P^_i`: responses that are more confident than their group (lower
    entropy) get a larger advantage, less confident ones a smaller one; the sign of `A_i` is kept.

    Args:
        advantages (`torch.Tensor`):
            Shape `(B,)`: the GRPO advantages `A_i`.
        relative_entropy (`torch.Tensor`):
            Shape `(B,)`: `P^_i` from [`relative_response_entropy`], detached.
        max_scale (`float`, *optional*):
            Cap on `1 / P^_i`. `None` (default) is the paper's formula.

    Returns:
        `torch.Tensor`: shape `(B,)`.
    """
    scale = 1.0 / relative_entropy.detach()
    if max_scale is not None:
        scale = scale.clamp(max=max_scale)
    return advantages * scale.to(advantages.dtype)


def clip_cov_selection(
    advantages: torch.Tensor,
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    clip_ratio: float = 2e-4,
    cov_lower: float = 1.0,
    cov_upper: float = 5.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """
    Clip-Cov's token selection (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
    Models", arXiv 2505.22617; as in PRIME-RL/Entropy-Mechanism-of-RL's `compute_policy_loss_clip_cov`): the tokens
    whose policy-gradient loss is dropped.

    Per valid token, `cov = (A - mean A) * (log pi - mean log pi)` with both means over the valid tokens of the batch.
    Tokens the PPO clip already cuts off are not candidates; candidates have `cov_lower < cov < cov_upper`. Of them,
    `max(1, int(clip_ratio * #valid tokens))` are picked uniformly at random (a fraction of ALL valid tokens, not of the
    candidates).

    Args:
        advantages (`torch.Tensor`):
            Shape `(B,)` or `(B, T)`.
        logps (`torch.Tensor`):
            Shape `(B, T)`: log-probs of the current policy (detached here).
        old_logps (`torch.Tensor`):
            Shape `(B, T)`: log-probs of the policy that generated the batch.
        mask (`torch.Tensor`):
            Shape `(B, T)`, 1 on tokens that count in the loss.
        epsilon_low, epsilon_high (`float`):
            The PPO clip range `[1 - epsilon_low, 1 + epsilon_high]`.
        clip_ratio (`float`, *optional*, defaults to `2e-4`):
            Fraction of valid tokens to select.
        cov_lower, cov_upper (`float`, *optional*, defaults to `1.0` and `5.0`):
            Open interval of covariances that are candidates.
        generator (`torch.Generator`, *optional*):
            Random source of the pick (default: torch's global one).

    Returns:
        `torch.Tensor`: boolean, shape `(B, T)`, True on the selected tokens.
    """
    logps = logps.detach()
    advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand_as(logps).to(logps.dtype)
    valid = mask.bool()
    selected = torch.zeros_like(valid)
    if not valid.any():
        return selected
    ratio = torch.exp(logps - old_logps)
    # Where the clipped surrogate is the larger loss, PPO has already cut the gradient off.
    clipped_by_ppo = -advantages * torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) > -advantages * ratio
    cov = (advantages - advantages[valid].mean()) * (logps - logps[valid].mean())
    candidates = valid & ~clipped_by_ppo & (cov > cov_lower) & (cov < cov_upper)
    index = candidates.nonzero()
    if len(index) == 0:
        return selected
    num = max(1, int(clip_ratio * valid.sum().item()))
    pick = index[torch.randperm(len(index), generator=generator)[:num].to(index.device)]
    selected[pick[:, 0], pick[:, 1]] = True
    return selected


# ---------------------------------------------------------------------------------------------------------------------
# AsymGRPO (Gu et al. 2026, arXiv 2604.04894; the v1 formula, SEED_METHODS §A.2). Its trainer is in
# `policy_split_trl.asym_grpo`.
# ---------------------------------------------------------------------------------------------------------------------


def rollout_success(
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    threshold: float = 0.5,
    correctness_index: int | None = None,
) -> torch.Tensor:
    """
    Binary correctness of each rollout, AsymGRPO's `r_i` in `{0, 1}`: `1` where the reward is `>= threshold`.

    The reward is the column `correctness_index` of `rewards_per_func` (a 0/1 verifier is unchanged by a threshold in
    `(0, 1]`), or, without it, TRL's combined reward `sum_j w_j r_ij` over the functions that scored the rollout
    (`nansum`). A rollout that no function could score (all NaN; with `correctness_index`, a NaN in that column) is
    unscorable: NaN.

    Args:
        rewards_per_func (`torch.Tensor`):
            Shape `(N, F)`: TRL's rewards, NaN where a function returned `None`.
        reward_weights (`torch.Tensor`):
            Shape `(F,)`: TRL's `reward_weights`.
        threshold (`float`, *optional*, defaults to `0.5`):
            A reward at or above it counts as correct.
        correctness_index (`int`, *optional*):
            The column of the 0/1 verifier. `None`: the weighted combined reward.

    Returns:
        `torch.Tensor`: shape `(N,)`, float32, values `0.`, `1.` or NaN.
    """
    rewards_per_func = rewards_per_func.to(torch.float64)
    if correctness_index is None:
        reward = (rewards_per_func * reward_weights.to(rewards_per_func).unsqueeze(0)).nansum(dim=1)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
    else:
        reward = rewards_per_func[:, correctness_index]
        unscorable = torch.isnan(reward)
    success = (reward >= threshold).to(torch.float32)
    return torch.where(unscorable, torch.full_like(success, float("nan")), success)


def asym_group_advantages(
    success: torch.Tensor,
    group_size: int,
    beta_pos: float,
    beta_neg: float,
    match_grpo_scale: bool = False,
    max_abs: float | None = None,
) -> torch.Tensor:
    r"""
    AsymGRPO's advantage (SEED_METHODS §A.2.4): GRPO's advantage written as a function of the group success rate `p`,
    with a separate exponent for each outcome channel,

    $$A_i = \left(\frac{1-p}{p}\right)^{\beta_{pos}} \text{ if } r_i = 1, \qquad
      A_i = -\left(\frac{p}{1-p}\right)^{\beta_{neg}} \text{ if } r_i = 0,$$

    `p = k / n`, `k` the correct and `n` the scorable rollouts of the group. `beta_pos = beta_neg = 0.5` is GRPO with
    the population std; `match_grpo_scale=True` multiplies by `sqrt((n - 1) / n)`, which makes it TRL's GRPO (Bessel std)
    up to TRL's `+1e-4` in the denominator. All-equal groups (`p` 0 or 1) and groups without a scorable rollout give 0
    everywhere, also at `beta = 0` (±1 only in mixed groups: the paper's "REINFORCE" baseline, SEED_METHODS §A.5.5);
    unscorable rollouts (NaN) are left out of `p` and get 0. The group advantages sum to 0 only at `p = 1/2` or both
    exponents 0.5. No renormalisation (§A.2.6).

    Args:
        success (`torch.Tensor`):
            Shape `(N,)`: `1.` (correct), `0.` (wrong) or NaN (unscorable); consecutive groups of `group_size` (all
            processes' rollouts: never a local slice, where a group may be cut).
        group_size (`int`):
            `G`.
        beta_pos (`float`):
            Exponent `>= 0` of the positive channel (paper: 0.9).
        beta_neg (`float`):
            Exponent `>= 0` of the negative channel (paper: 0.4).
        match_grpo_scale (`bool`, *optional*, defaults to `False`):
            Multiply by `sqrt((n - 1) / n)` (TRL's finite-`G` std factor).
        max_abs (`float`, *optional*):
            Clamp to `[-max_abs, max_abs]`. `None` (default, as the paper): no clamp.

    Returns:
        `torch.Tensor`: shape `(N,)`, float32.
    """
    if success.numel() % group_size:
        raise ValueError(f"{success.numel()} rollouts do not form whole groups of {group_size}.")
    grouped = success.to(torch.float64).view(-1, group_size)
    valid = ~torch.isnan(grouped)
    if not ((grouped[valid] == 0) | (grouped[valid] == 1)).all():
        raise ValueError("success must hold 0., 1. or NaN (unscorable); threshold the rewards first.")
    correct = valid & (grouped == 1)
    n = valid.sum(dim=1, keepdim=True).to(torch.float64)
    p = correct.sum(dim=1, keepdim=True) / n.clamp(min=1.0)
    mixed = (p > 0) & (p < 1)
    q = torch.where(mixed, p, torch.full_like(p, 0.5))  # any value in (0, 1): degenerate groups are zeroed below
    advantages = torch.where(correct, ((1 - q) / q) ** beta_pos, -((q / (1 - q)) ** beta_neg))
    advantages = torch.where(mixed & valid, advantages, torch.zeros_like(advantages))
    if match_grpo_scale:
        advantages = advantages * ((n - 1).clamp(min=0.0) / n.clamp(min=1.0)).sqrt()
    if max_abs is not None:
        advantages = advantages.clamp(-max_abs, max_abs)
    return advantages.view(-1).to(torch.float32)


# ------------------------------------------------------------------------------------------------- entropy polarity
# After the entropy-polarity idea of arXiv 2605.11775 (SEED_METHODS.md Part B). The per-token quantities (§B.2.1-B.2.2)
# are standard first-order softmax math; the reweighting rule and its phase signal (§B.2.4) are OUR rule
# (`polarity_reweighting`), not the paper's PAPO, whose rule is not available.

# Below this |polarity| a token is in neither branch and keeps weight 1 (SEED_METHODS §B.2.4, step 1).
POLARITY_EPS = 1e-8


def sampled_token_contribution(logps: torch.Tensor, entropies: torch.Tensor) -> torch.Tensor:
    """
    Sampled-token contribution `S_t = p_t (log p_t + H_t)` (SEED_METHODS §B.2.1), with `p_t = exp(log p_t)`.

    `S_t < 0` exactly when the sampled token is less likely than "typical" (`p_t < exp(-H_t)`).

    Args:
        logps (`torch.Tensor`):
            Shape `(B, T)` (or any): log-probability `log p_t` of the sampled token.
        entropies (`torch.Tensor`):
            Same shape: entropy `H_t` of the token's distribution.

    Returns:
        `torch.Tensor`: same shape, in the promoted dtype of the inputs.
    """
    return logps.exp() * (logps + entropies)


def full_vocab_token_statistics(
    logits: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """
    From a chunk of full-vocabulary logits (already divided by the temperature), the per-token `log p` of `labels`,
    the entropy `H` and the distributional correction `C = sum_v pi_v^2 (log pi_v + H)` (SEED_METHODS §B.2.1), in one
    `log_softmax` (numerically safe: `pi_v log pi_v` is taken as 0 where `pi_v = 0`, e.g. a `-inf` logit).

    Args:
        logits (`torch.Tensor`):
            Shape `(N, V)`. Computed in float32 (float64 kept as float64).
        labels (`torch.Tensor`, *optional*):
            Shape `(N,)`: the sampled tokens. `None`: no `log p`.

    Returns:
        `tuple`: `(log p or None, H, C)`, each of shape `(N,)`, float32 or float64.
    """
    logits = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    positive = probs > 0
    safe_log = torch.where(positive, log_probs, torch.zeros_like(log_probs))
    entropy = -(probs * safe_log).sum(-1)
    correction = (probs.square() * torch.where(positive, safe_log + entropy.unsqueeze(-1), 0.0)).sum(-1)
    logps = None if labels is None else log_probs.gather(-1, labels.unsqueeze(-1).long()).squeeze(-1)
    return logps, entropy, correction


def distributional_correction(logits: torch.Tensor) -> torch.Tensor:
    """
    State-wise distributional correction `C_t = sum_v pi_t(v)^2 (log pi_t(v) + H_t)` (SEED_METHODS §B.2.1). It equals
    `Cov_{v ~ pi_t}(pi_t(v), log pi_t(v)) >= 0` (both increase with `pi_t(v)`).

    Args:
        logits (`torch.Tensor`):
            Shape `(N, V)`: full-vocabulary logits divided by the temperature.

    Returns:
        `torch.Tensor`: shape `(N,)`, float32 (float64 for float64 logits).
    """
    return full_vocab_token_statistics(logits)[2]


def entropy_polarity(advantages: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """
    Entropy polarity `Pi_t = -A_t D_t` with `D_t = S_t - C_t` (SEED_METHODS §B.2.2): the first-order change of the
    token's entropy per unit policy-gradient step, `Delta H_t ~ -eta A_t D_t` (tabular softmax, `eta > 0`). `Pi > 0`:
    the update on this token expands entropy; `Pi < 0`: it contracts it.

    Args:
        advantages (`torch.Tensor`):
            Shape `(B,)` (a sequence advantage, broadcast over tokens) or `(B, T)`.
        direction (`torch.Tensor`):
            Shape `(B, T)`: `D_t = S_t - C_t`.

    Returns:
        `torch.Tensor`: shape `(B, T)`.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    return -advantages * direction


def polarity_branch_weights(polarity: torch.Tensor, lam: float, eps: float = POLARITY_EPS) -> torch.Tensor:
    """
    Two-branch weights of `polarity_reweighting` (our rule, SEED_METHODS §B.2.4 step 3): `omega = 1 + lam` on the
    expanding branch (`Pi > eps`), `1 - lam` on the contracting branch (`Pi < -eps`), `1` elsewhere (a token with
    `A = 0` has `Pi = 0`). With `|lam| < 1` every weight is positive, so `A * omega` never flips the sign of `A`.

    Args:
        polarity (`torch.Tensor`):
            Shape `(B, T)`: `Pi`.
        lam (`float`):
            Branch shift `lambda_k` in `(-1, 1)` (`lambda_max g_k`).
        eps (`float`, *optional*, defaults to `1e-8`):
            `|Pi| <= eps` is in neither branch.

    Returns:
        `torch.Tensor`: shape `(B, T)`, dtype of `polarity`.
    """
    branch = (polarity > eps).to(polarity.dtype) - (polarity < -eps).to(polarity.dtype)
    return 1.0 + lam * branch


def pressure_scale(abs_adv_weighted_sum: float, abs_adv_sum: float) -> float:
    """
    Global scalar `c` that keeps the total advantage pressure (SEED_METHODS §B.2.4 step 4):
    `sum |A| c omega m = sum |A| m`, i.e. `c = sum |A| m / sum |A| omega m`, both sums over all tokens of all processes.
    `1.0` when there is no pressure to conserve (every `A = 0`, or no token).

    Args:
        abs_adv_weighted_sum (`float`):
            `sum |A_t| omega_t m_t`.
        abs_adv_sum (`float`):
            `sum |A_t| m_t`.

    Returns:
        `float`: `c > 0`.
    """
    if not abs_adv_weighted_sum > 0 or not abs_adv_sum > 0:
        return 1.0
    return abs_adv_sum / abs_adv_weighted_sum


def polarity_ema(previous: float | None, value: float, decay: float) -> float:
    """
    EMA of the batch entropy (SEED_METHODS §B.2.4 step 2): `H~_k = mu H~_{k-1} + (1 - mu) H-_k`, `H~_0 = H-_0`.

    Args:
        previous (`float` or `None`):
            `H~_{k-1}`, `None` at the first batch.
        value (`float`):
            `H-_k`, the batch's token-mean entropy.
        decay (`float`):
            `mu` in `[0, 1)`.

    Returns:
        `float`: `H~_k`.
    """
    return value if previous is None else decay * previous + (1.0 - decay) * value


def polarity_phase_level(smoothed_entropy: float, reference: float, gamma: float) -> float:
    """
    Level phase signal `g_k = tanh(gamma (H_ref - H~_k) / H_ref)` (SEED_METHODS §B.2.4 step 2), in `(-1, 1)`: positive
    when the smoothed entropy is below the reference (collapse: favour expansion), negative above it.

    Args:
        smoothed_entropy (`float`):
            `H~_k`.
        reference (`float`):
            `H_ref > 0` (`rho H-_0`, or an absolute target in nats). `<= 0` gives `0.0` (no signal).
        gamma (`float`):
            Gain `gamma > 0`.

    Returns:
        `float`: `g_k`.
    """
    if not reference > 0:
        return 0.0
    return math.tanh(gamma * (reference - smoothed_entropy) / reference)


def polarity_phase_slope(history: list[float], window: int, reference: float, gamma: float) -> float:
    """
    Slope phase signal `g_k = -tanh(gamma (H~_k - H~_{k-W}) / (W H_ref))` (SEED_METHODS §B.2.4 step 2, option
    "slope"): positive while the smoothed entropy falls. `0.0` until the window is full (`len(history) <= W`).

    Args:
        history (`list[float]`):
            `[..., H~_{k-W}, ..., H~_k]`, the latest last.
        window (`int`):
            `W >= 1`.
        reference (`float`):
            `H_ref > 0`; `<= 0` gives `0.0`.
        gamma (`float`):
            Gain.

    Returns:
        `float`: `g_k`.
    """
    if len(history) <= window or not reference > 0:
        return 0.0
    return -math.tanh(gamma * (history[-1] - history[-1 - window]) / (window * reference))
