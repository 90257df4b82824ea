"""The advantage math of Policy Split (arXiv 2604.11510, Section 3.2), one function per equation.

Shapes: `B` rollouts (rows), `T` completion tokens; `mask` is `1` on real completion tokens and `0` on padding.
Group statistics are accumulated in float64. Every function is pure and differentiable-free (the advantages are
detached quantities), so the trainer only orchestrates.
"""

from __future__ import annotations

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
