import math

import pytest
import torch

from policy_split_trl.advantages import (
    bonus_hit_clip,
    clipped_bonus,
    dual_mode_bonus,
    entropy_regularized_advantages,
    forward_kl_estimate,
    group_advantages,
    group_mean_std,
    normalize_bonus,
    quarter_loss_weights,
    row_token_moments,
    standardize_bonus,
)


def test_group_advantages_hand_computed():
    # Group 1: rewards 1,0,0,1 -> mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = sqrt(1/3).
    # Group 2: all equal -> A = 0 exactly.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    a = group_advantages(rewards, group_size=4)
    std = math.sqrt(1 / 3)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / torch.tensor([std + 1e-4] * 4 + [1e-4] * 4)
    torch.testing.assert_close(a, expected)
    assert torch.equal(a[4:], torch.zeros(4))


def test_dual_mode_bonus_hand_computed():
    lp_he = torch.tensor([[-1.0, -2.0]])
    lp_n = torch.tensor([[-3.0, -0.5]])
    # alpha = 0.5: b = 0.5 * 1 + 0.5 * 3 = 2.0; 0.5 * 2 + 0.5 * 0.5 = 1.25
    torch.testing.assert_close(dual_mode_bonus(lp_he, lp_n, 0.5), torch.tensor([[2.0, 1.25]]))
    # alpha = 1: pure HE entropy estimate; alpha = 0: pure normal-mode surprisal
    torch.testing.assert_close(dual_mode_bonus(lp_he, lp_n, 1.0), torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(dual_mode_bonus(lp_he, lp_n, 0.0), torch.tensor([[3.0, 0.5]]))
    # alpha = 0.25: 0.25 * 1 + 0.75 * 3 = 2.5
    assert dual_mode_bonus(lp_he, lp_n, 0.25)[0, 0].item() == pytest.approx(2.5)


def test_normalize_bonus_hand_computed_over_group_tokens():
    # One group of G = 2 rollouts. Valid tokens {1, 2} and {3, 4, 5}: mean 3, unbiased var (4+1+0+1+4)/4 = 2.5.
    bonus = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    s = math.sqrt(2.5)
    expected = torch.tensor([[-2 / s, -1 / s, 0.0], [0.0, 1 / s, 2 / s]])
    torch.testing.assert_close(normalize_bonus(bonus, mask, group_size=2), expected)


def test_normalize_bonus_groups_are_independent():
    bonus = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 30.0], [20.0, 40.0]])
    mask = torch.ones_like(bonus)
    out = normalize_bonus(bonus, mask, group_size=2)
    # group 1 tokens 1..4: mean 2.5, std sqrt(5/3); group 2 tokens 10,20,30,40: mean 25, std sqrt(500/3)
    s1, s2 = math.sqrt(5 / 3), math.sqrt(500 / 3)
    expected = torch.tensor([[-1.5 / s1, -0.5 / s1], [0.5 / s1, 1.5 / s1], [-15 / s2, 5 / s2], [-5 / s2, 15 / s2]])
    torch.testing.assert_close(out, expected)


def test_padding_never_changes_any_statistic():
    torch.manual_seed(0)
    bonus = torch.randn(4, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    ref = normalize_bonus(bonus, mask, group_size=4)
    for garbage in (0.0, 1e9, float("nan"), float("inf")):
        polluted = torch.where(mask.bool(), bonus, torch.full_like(bonus, garbage))
        out = normalize_bonus(polluted, mask, group_size=4)
        torch.testing.assert_close(out, ref)
        assert torch.isfinite(out).all()
    # extra right padding (a wider batch) changes nothing either
    wide = normalize_bonus(torch.cat([bonus, torch.randn(4, 3)], 1), torch.cat([mask, torch.zeros(4, 3)], 1), 4)
    torch.testing.assert_close(wide[:, :6], ref)
    assert torch.equal(wide[:, 6:], torch.zeros(4, 3))
    # equals the plain statistic over the valid tokens
    valid = bonus[mask.bool()].double()
    torch.testing.assert_close(ref[mask.bool()].double(), (valid - valid.mean()) / valid.std(), rtol=1e-5, atol=1e-6)


def test_constant_bonus_gives_zero_not_nan():
    bonus = torch.full((4, 5), 3.7)
    mask = torch.ones(4, 5)
    out = normalize_bonus(bonus, mask, group_size=4)
    assert torch.equal(out, torch.zeros_like(out))
    adv = entropy_regularized_advantages(torch.tensor([1.0, -1.0, 0.5, -0.5]), out, eta=0.03, kappa=2.0)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.5, -0.5]).unsqueeze(1).expand(4, 5))


def test_one_token_and_empty_completions():
    # A group whose only real token is one token: std undefined -> B = 0, no NaN.
    bonus = torch.tensor([[5.0, 1.0], [2.0, 2.0]])
    mask = torch.tensor([[1, 0], [0, 0]])
    out = normalize_bonus(bonus, mask, group_size=2)
    assert torch.equal(out, torch.zeros(2, 2))
    # An empty completion inside a normal group contributes nothing to the statistics.
    bonus = torch.tensor([[1.0, 3.0], [7.0, 7.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    out = normalize_bonus(bonus, mask, group_size=2)
    s = math.sqrt(2.0)  # tokens {1, 3}: mean 2, unbiased var 2
    torch.testing.assert_close(out, torch.tensor([[-1 / s, 1 / s], [0.0, 0.0]]))
    moments = row_token_moments(bonus, mask)
    assert moments[1].tolist() == [0.0, 0.0, 0.0]


def test_group_split_across_ranks_equals_single_process():
    torch.manual_seed(1)
    bonus = torch.randn(8, 7) * 3 + 5
    mask = (torch.rand(8, 7) > 0.3).long()
    single = normalize_bonus(bonus, mask, group_size=4)
    # "rank 0" holds rows 0..2, "rank 1" rows 3..7: the first group is split across ranks.
    gathered = torch.cat([row_token_moments(bonus[:3], mask[:3]), row_token_moments(bonus[3:], mask[3:])])
    mean, std = group_mean_std(gathered, group_size=4)
    rank0 = standardize_bonus(bonus[:3], mask[:3], mean[:3], std[:3])
    rank1 = standardize_bonus(bonus[3:], mask[3:], mean[3:], std[3:])
    torch.testing.assert_close(torch.cat([rank0, rank1]), single)
    # and the statistics equal the raw-token statistics of each group
    for g in range(2):
        rows = slice(4 * g, 4 * g + 4)
        tokens = bonus[rows][mask[rows].bool()].double()
        assert mean[4 * g].item() == pytest.approx(tokens.mean().item(), rel=1e-12)
        assert std[4 * g].item() == pytest.approx(tokens.std().item(), rel=1e-12)


def test_statistics_are_float64():
    moments = row_token_moments(torch.ones(2, 2, dtype=torch.bfloat16), torch.ones(2, 2))
    assert moments.dtype == torch.float64
    mean, std = group_mean_std(moments, 2)
    assert mean.dtype == std.dtype == torch.float64


def test_clipped_bonus_outside_clip_hand_computed():
    adv = torch.tensor([1.0, -0.5, 0.0])
    b = torch.tensor([[3.0, -0.1, 0.3], [3.0, -0.1, -1.0], [3.0, -0.1, 0.3]])
    # bounds |A|/kappa = 0.5, 0.25, 0 ; eta = 0.03 outside the clip
    expected = 0.03 * torch.tensor([[0.5, -0.1, 0.3], [0.25, -0.1, -0.25], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(clipped_bonus(adv, b, 0.03, 2.0, "outside_clip"), expected)
    he = entropy_regularized_advantages(adv, b, 0.03, 2.0, "outside_clip")
    torch.testing.assert_close(he, adv.unsqueeze(1) + expected)
    assert torch.equal(he[2], torch.zeros(3))  # A = 0 -> HE advantage exactly 0


def test_clipped_bonus_inside_clip_hand_computed():
    adv = torch.tensor([1.0, -0.5])
    b = torch.tensor([[3.0, -0.1, 0.3], [3.0, -0.1, -1.0]])
    # eta * B = 0.5 * B = [1.5, -0.05, 0.15] clipped to +/-0.5 ; [1.5, -0.05, -0.5] clipped to +/-0.25
    expected = torch.tensor([[0.5, -0.05, 0.15], [0.25, -0.05, -0.25]])
    torch.testing.assert_close(clipped_bonus(adv, b, 0.5, 2.0, "inside_clip"), expected)
    with pytest.raises(ValueError, match="eta_placement"):
        clipped_bonus(adv, b, 0.5, 2.0, "middle")


@pytest.mark.parametrize("placement", ["outside_clip", "inside_clip"])
def test_bonus_bound_and_sign_preservation(placement):
    torch.manual_seed(2)
    adv = torch.randn(64)
    b = torch.randn(64, 32) * 4
    eta, kappa = 0.3, 2.0
    he = entropy_regularized_advantages(adv, b, eta, kappa, placement)
    limit = (eta if placement == "outside_clip" else 1.0) * adv.abs() / kappa
    assert ((he - adv.unsqueeze(1)).abs() <= limit.unsqueeze(1) + 1e-7).all()
    assert (torch.sign(he) == torch.sign(adv).unsqueeze(1)).all()


def test_normal_rows_with_zero_eta_prime_are_exactly_a():
    adv = torch.tensor([0.7, -1.3, 0.0])
    b = torch.randn(3, 4)
    out = entropy_regularized_advantages(adv, b, 0.0, 2.0)
    assert torch.equal(out, adv.unsqueeze(1).expand(3, 4))
    # eta' != 0 (Table 3 ablation) uses the same clipped form
    out = entropy_regularized_advantages(adv, b, -0.01, 2.0)
    torch.testing.assert_close(out, adv.unsqueeze(1) + clipped_bonus(adv, b, -0.01, 2.0))


def test_all_rewards_equal_give_zero_high_entropy_advantage():
    rewards = torch.ones(4)
    adv = group_advantages(rewards, 4)
    b = normalize_bonus(torch.randn(4, 5), torch.ones(4, 5), 4)
    assert torch.equal(entropy_regularized_advantages(adv, b, 0.03, 2.0), torch.zeros(4, 5))
    assert torch.equal(entropy_regularized_advantages(adv, b, 0.5, 2.0, "inside_clip"), torch.zeros(4, 5))


def test_bonus_hit_clip_hand_computed():
    adv = torch.tensor([1.0, 0.0])
    b = torch.tensor([[0.6, -0.4, -0.7], [5.0, 0.1, 0.0]])
    # outside: |B| > 0.5 -> [T, F, T]; A = 0 row never counts as clipped
    assert bonus_hit_clip(adv, b, 0.03, 2.0, "outside_clip").tolist() == [[True, False, True], [False] * 3]
    # inside with eta = 1: same; with eta = 0.1: |0.1 B| <= 0.07 < 0.5 -> nothing clipped
    assert bonus_hit_clip(adv, b, 0.1, 2.0, "inside_clip").tolist() == [[False] * 3, [False] * 3]


def test_forward_kl_estimate_sums():
    lp_p = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    lp_q = torch.tensor([[-1.5, -1.0, -9.0], [-1.0, -0.5, float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    total, count = forward_kl_estimate(lp_p, lp_q, mask)
    # (0.5) + (-1.0) + (0.5) + (0.0) over 4 tokens; masked NaN ignored
    assert total.item() == pytest.approx(0.0)
    assert count.item() == 4
    total, _ = forward_kl_estimate(lp_p, lp_q, torch.tensor([[1, 0, 0], [1, 0, 0]]))
    assert total.item() == pytest.approx(1.0)


def test_quarter_loss_weights_hand_computed():
    # T_normal = 30, T_HE = 10 tokens: w_normal = 40 / (2 * 30) = 2/3, w_HE = 40 / (2 * 10) = 2.
    weights = quarter_loss_weights(torch.tensor([False, True, True]), 30.0, 10.0)
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 2.0, 2.0]))
    # Each quarter then weighs the same: sum of w * tokens per generating mode = (T_normal + T_HE) / 2 each.
    assert 30.0 * weights[0].item() == pytest.approx(10.0 * weights[1].item())
    # A mode without tokens: only the other mode's quarters count, at weight 1 (the plain token mean).
    assert quarter_loss_weights(torch.tensor([False, True]), 30.0, 0.0).tolist() == [1.0, 1.0]
    assert quarter_loss_weights(torch.tensor([False, True]), 0.0, 12.0).tolist() == [1.0, 1.0]
