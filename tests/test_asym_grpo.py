"""AsymGRPO (arXiv 2604.04894): the formula against the hand-computed table of SEED_METHODS §A.2.4 and TRL's GRPO, the
trainer's advantages against the formula on a real generation batch, Policy Split over AsymGRPO (MRO, the clip of the
HE bonus relative to the asymmetric |A|, deferred bonus), config validation, real short training runs, the recipes,
and 2 processes with a group straddling them."""

import math
import os
import subprocess

import pytest
import torch
import trl.trainer.grpo_trainer as grpo_module
import yaml
from processes import free_port, launcher, requires_launcher
from tiny_model import arithmetic_dataset, build_model, training_args
from trl import GRPOConfig, GRPOTrainer

from policy_split_trl import PolicySplitGRPOConfig, PolicySplitGRPOTrainer
from policy_split_trl.advantages import asym_group_advantages, group_advantages, rollout_success
from policy_split_trl.asym_grpo import AsymGRPOConfig, AsymGRPOMixin, AsymGRPOTrainer
from policy_split_trl.contexts import HIGH_ENTROPY_CONTEXT, NORMAL_CONTEXT
from policy_split_trl.methods import (
    METHODS,
    AsymPolicySplitGRPOTrainer,
    MethodConfig,
    apply_method,
    trainer_class,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
G = 4


def hand(k, n, beta_pos, beta_neg):
    """The closed form of §A.2.4 by hand: (A+, A-) of a group with k correct rollouts out of n."""
    p = k / n
    return ((1 - p) / p) ** beta_pos, -((p / (1 - p)) ** beta_neg)


def group_of(k, n=8):
    return torch.tensor([1.0] * k + [0.0] * (n - k))


# --------------------------------------------------------------------------------------------------------- formula
# SEED_METHODS §A.2.4, G = 8: k, TRL GRPO A+/A-, beta = 0.5 closed form A+/A-, AsymGRPO (0.9, 0.4) A+/A-, sum of A.
TABLE = [
    (1, 2.474, -0.353, 2.646, -0.378, 5.762, -0.459, 2.55),
    (2, 1.620, -0.540, 1.732, -0.577, 2.688, -0.644, 1.51),
    (4, 0.935, -0.935, 1.000, -1.000, 1.000, -1.000, 0.0),
    (6, 0.540, -1.620, 0.577, -1.732, 0.372, -1.552, -0.87),
    (7, 0.353, -2.474, 0.378, -2.646, 0.174, -2.178, -0.96),
]


@pytest.mark.parametrize("row", TABLE, ids=[f"k={row[0]}" for row in TABLE])
def test_the_hand_computed_table_of_seed_methods(row):
    k, trl_pos, trl_neg, half_pos, half_neg, asym_pos, asym_neg, total = row
    success = group_of(k)
    for (beta_pos, beta_neg), (pos, neg) in (((0.5, 0.5), (half_pos, half_neg)), ((0.9, 0.4), (asym_pos, asym_neg))):
        adv = asym_group_advantages(success, 8, beta_pos, beta_neg)
        # As printed (3 decimals) ...
        assert round(adv[0].item(), 3) == pos and round(adv[-1].item(), 3) == neg
        # ... and exactly the hand formula (float32 of the float64 value).
        hand_pos, hand_neg = hand(k, 8, beta_pos, beta_neg)
        expected = torch.tensor([hand_pos] * k + [hand_neg] * (8 - k), dtype=torch.float64).float()
        assert torch.equal(adv, expected)
    asym = asym_group_advantages(success, 8, 0.9, 0.4)
    assert round(asym.sum().item(), 2) == total
    # TRL's GRPO column: the beta = 0.5 closed form times sqrt((G - 1) / G), up to TRL's +1e-4.
    trl = group_advantages(success, 8)
    assert round(trl[0].item(), 3) == trl_pos and round(trl[-1].item(), 3) == trl_neg
    scaled = asym_group_advantages(success, 8, 0.5, 0.5, match_grpo_scale=True)
    torch.testing.assert_close(scaled, trl, rtol=1e-3, atol=1e-3)
    assert torch.equal(scaled, (asym_group_advantages(success, 8, 0.5, 0.5).double() * math.sqrt(7 / 8)).float())


def test_half_exponents_with_the_grpo_scale_are_trls_grpo_on_binary_rewards():
    torch.manual_seed(0)
    for group_size in (2, 4, 8, 16):
        success = (torch.rand(64 * group_size) < torch.rand(64).repeat_interleave(group_size)).float()
        # TRL's formula: (r - mean) / (std + 1e-4), Bessel std, per group
        grouped = success.view(-1, group_size)
        trl = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
        ours = asym_group_advantages(success, group_size, 0.5, 0.5, match_grpo_scale=True)
        torch.testing.assert_close(ours, trl, rtol=1e-3, atol=1e-3)
        assert (ours.abs() >= trl.abs()).all()  # TRL's +1e-4 only shrinks


def test_all_equal_groups_give_zero_and_beta_zero_is_plus_minus_one_in_mixed_groups_only():
    success = torch.cat([group_of(0, 4), group_of(4, 4), group_of(1, 4), group_of(3, 4)])
    for beta_pos, beta_neg in ((0.9, 0.4), (0.0, 0.0), (0.0, 0.5), (2.0, 0.0)):
        adv = asym_group_advantages(success, 4, beta_pos, beta_neg)
        assert torch.equal(adv[:8], torch.zeros(8))  # p = 0 and p = 1, also at beta = 0 (no 0^0 = 1)
    adv = asym_group_advantages(success, 4, 0.0, 0.0)
    assert adv[8:].tolist() == [1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, -1.0]  # REINFORCE: +/-1 in mixed groups


def test_unscorable_rollouts_are_left_out_of_p_and_get_zero():
    nan = float("nan")
    # Group 1: 1 correct of 3 scorable (p = 1/3), one NaN; group 2: only NaN and one correct -> p = 1: zero; group 3:
    # nothing scorable.
    success = torch.tensor([1.0, 0.0, nan, 0.0, nan, 1.0, nan, nan, nan, nan, nan, nan])
    adv = asym_group_advantages(success, 4, 0.9, 0.4)
    pos, neg = hand(1, 3, 0.9, 0.4)
    expected = torch.tensor([pos, neg, 0.0, neg] + [0.0] * 8, dtype=torch.float64).float()
    assert torch.equal(adv, expected) and not torch.isnan(adv).any()
    # The finite-G factor uses the scorable count n = 3: TRL's nan-aware GRPO on the same rewards.
    scaled = asym_group_advantages(success[:4], 4, 0.5, 0.5, match_grpo_scale=True)
    valid = success[:4][~torch.isnan(success[:4])]
    trl = (valid - valid.mean()) / (valid.std() + 1e-4)
    torch.testing.assert_close(scaled[~torch.isnan(success[:4])], trl, rtol=1e-3, atol=1e-3)


def test_a_group_split_across_two_simulated_ranks_gets_the_same_advantages():
    # 3 groups of G = 4 over 2 ranks of 6 rollouts: the middle group has 2 rollouts on each rank.
    success = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    single = asym_group_advantages(success, 4, 0.9, 0.4)
    # What each rank computes: the formula on the gathered rewards, then its slice (as the trainer does).
    ranks = [
        asym_group_advantages(torch.cat([success[:6], success[6:]]), 4, 0.9, 0.4)[r * 6 : (r + 1) * 6] for r in (0, 1)
    ]
    assert torch.equal(torch.cat(ranks), single)
    # The straddling group's p = 2/4 on both ranks; a rank-local p (1 of its 2 rollouts: 2/2 on rank 0) would differ.
    assert ranks[0][4:].tolist() == [1.0, 1.0] and ranks[1][:2].tolist() == [-1.0, -1.0]
    assert asym_group_advantages(success[4:6], 2, 0.9, 0.4).tolist() == [0.0, 0.0]


def test_clamp_and_input_checks():
    adv = asym_group_advantages(group_of(1), 8, 0.9, 0.4, max_abs=5.0)
    assert adv[0].item() == 5.0 and adv[1].item() == pytest.approx(-0.459, abs=1e-3)
    with pytest.raises(ValueError, match="whole groups"):
        asym_group_advantages(torch.ones(6), 4, 0.9, 0.4)
    with pytest.raises(ValueError, match="threshold the rewards"):
        asym_group_advantages(torch.tensor([0.3, 1.0]), 2, 0.9, 0.4)


def test_rollout_success_from_a_named_verifier_or_the_thresholded_combined_reward():
    nan = float("nan")
    rewards = torch.tensor([[1.0, 0.2], [0.0, 0.9], [nan, 0.1], [nan, nan], [1.0, nan]])
    weights = torch.tensor([1.0, 0.5])
    # The verifier column: NaN stays unscorable.
    assert rollout_success(rewards, weights, 0.5, correctness_index=0).tolist()[:2] == [1.0, 0.0]
    assert math.isnan(rollout_success(rewards, weights, 0.5, 0)[2].item())
    # The combined reward sum_j w_j r_j over the functions that scored: 1.1, 0.45, 0.05, NaN (unscorable), 1.0.
    combined = rollout_success(rewards, weights, 0.5)
    assert combined[[0, 1, 2, 4]].tolist() == [1.0, 0.0, 0.0, 1.0] and math.isnan(combined[3].item())
    assert rollout_success(rewards, weights, 0.4)[1].item() == 1.0 and rollout_success(rewards, weights, 1.1)[0] == 1


# ---------------------------------------------------------------------------------------------------------- config
def asym_config(tmp_path, config_class=AsymGRPOConfig, **kwargs):
    return config_class(**{**training_args(tmp_path / "out", num_generations=G), **kwargs})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"asym_beta_pos": -0.1}, "asym_beta_pos must be >= 0"),
        ({"asym_beta_neg": -1.0}, "asym_beta_neg must be >= 0"),
        ({"asym_beta_pos": float("nan")}, "asym_beta_pos must be a finite number"),
        ({"asym_beta_neg": float("inf")}, "asym_beta_neg must be a finite number"),
        ({"asym_success_threshold": float("nan")}, "asym_success_threshold must be a finite number"),
        ({"asym_max_abs_advantage": 0.0}, "asym_max_abs_advantage must be a finite number > 0"),
        ({"asym_max_abs_advantage": float("inf")}, "asym_max_abs_advantage"),
        ({"asym_correctness_reward": " "}, "asym_correctness_reward must be the name"),
    ],
)
@pytest.mark.parametrize("config_class", [AsymGRPOConfig, PolicySplitGRPOConfig, MethodConfig])
def test_config_validation_names_the_field(tmp_path, config_class, kwargs, message):
    with pytest.raises(ValueError, match=message):
        asym_config(tmp_path, config_class, **kwargs)


def test_base_advantage_choices_and_the_configs_fields(tmp_path):
    with pytest.raises(ValueError, match="base_advantage must be one of"):
        asym_config(tmp_path, PolicySplitGRPOConfig, base_advantage="papo")
    args = asym_config(tmp_path, PolicySplitGRPOConfig, base_advantage="asym_grpo")
    assert (args.asym_beta_pos, args.asym_beta_neg, args.asym_match_grpo_scale) == (0.9, 0.4, False)
    defaults = asym_config(tmp_path)
    assert (defaults.asym_correctness_reward, defaults.asym_success_threshold, defaults.asym_max_abs_advantage) == (
        None,
        0.5,
        None,
    )
    assert isinstance(defaults, GRPOConfig) and defaults.num_generations == G  # GRPOConfig's own post-init ran


def test_an_unknown_correctness_reward_fails_at_trainer_init(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="asym_correctness_reward='verifier' is not one of"):
        make(AsymGRPOTrainer, asym_config(tmp_path, asym_correctness_reward="verifier"), tokenizer)


def test_the_trainer_rejects_a_plain_grpo_config(tmp_path, tokenizer):
    with pytest.raises(TypeError, match="AsymGRPOConfig"):
        make(AsymGRPOTrainer, asym_config(tmp_path, GRPOConfig), tokenizer)


# -------------------------------------------------------------------------------------------- registry and the MRO
def test_registry_and_trainer_class():
    spec = METHODS["asym_grpo"]
    assert (spec.trainer, spec.config, spec.defaults) == (
        AsymGRPOTrainer,
        AsymGRPOConfig,
        {"asym_beta_pos": 0.9, "asym_beta_neg": 0.4},
    )
    assert "2604.04894" in spec.reference
    # shared_prefix (on by default, every method) adds its own mixin: tested in tests/test_shared_prefix.py.
    args = MethodConfig(output_dir="/tmp/unused", report_to="none", use_cpu=True, shared_prefix=False)
    assert trainer_class("asym_grpo", args) is AsymGRPOTrainer
    assert trainer_class("policy_split", args) is PolicySplitGRPOTrainer
    args.base_advantage = "asym_grpo"
    for method in ("policy_split", "policy_split_no_sharing", "grpo_rollout_sharing"):
        assert trainer_class(method, args) is AsymPolicySplitGRPOTrainer
    assert trainer_class("grpo", args) is GRPOTrainer  # GRPO never reads base_advantage
    assert trainer_class("asym_grpo", args) is AsymGRPOTrainer
    # The method's settings (the user's value wins over the method's defaults)
    args = apply_method("asym_grpo", MethodConfig(output_dir="/tmp/unused", report_to="none", use_cpu=True))
    assert (args.asym_beta_pos, args.asym_beta_neg) == (0.9, 0.4)
    with pytest.warns(UserWarning, match="base_advantage"):
        apply_method("grpo", args, explicit={"base_advantage": "command line"})


def test_policy_split_over_asym_as_a_method_of_the_comparison(tmp_path):
    spec = METHODS["policy_split_asym_grpo"]
    assert spec.trainer is AsymPolicySplitGRPOTrainer and spec.dual_mode
    args = apply_method(
        "policy_split_asym_grpo", MethodConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    )
    assert (args.base_advantage, args.asym_beta_pos, args.asym_beta_neg) == ("asym_grpo", 0.9, 0.4)
    assert trainer_class("policy_split_asym_grpo", args) is AsymPolicySplitGRPOTrainer  # not composed twice
    with pytest.raises(ValueError, match="base_advantage"):
        apply_method(
            "policy_split_asym_grpo",
            MethodConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, base_advantage="grpo"),
            explicit={"base_advantage": "command line"},
        )


def test_mro_policy_split_then_asym_then_grpo():
    mro = AsymPolicySplitGRPOTrainer.__mro__
    for hook in ("_generate_and_score_completions", "_calculate_rewards"):
        owners = [c for c in mro if hook in vars(c)]
        # Policy Split's hook first, AsymGRPO's next (SafeTrainingMixin's reward guard may sit between), TRL's last.
        assert owners[0] is PolicySplitGRPOTrainer and owners[-1] is GRPOTrainer, hook
        assert owners.index(AsymGRPOMixin) == len(owners) - 2, hook
    assert mro.index(AsymGRPOMixin) == mro.index(GRPOTrainer) - 1
    assert AsymGRPOTrainer.__mro__[:3] == (AsymGRPOTrainer, AsymGRPOMixin, AsymGRPOTrainer.__mro__[2])
    assert AsymGRPOTrainer.__mro__.index(AsymGRPOMixin) < AsymGRPOTrainer.__mro__.index(GRPOTrainer)


# ------------------------------------------------------------------------------------------------ real batches
class ParityReward:
    """A 0/1 reward the random tiny model gets right about half the time (mixed groups), recorded in call order."""

    def __init__(self):
        self.rewards = []

        def parity(completions, **kwargs):
            texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
            rewards = [float(len(t) % 2 == 0) for t in texts]
            self.rewards.extend(rewards)
            return rewards

        self.func = parity


def make(trainer_class_, args, tokenizer, reward=None, model=None):
    return trainer_class_(
        model=model if model is not None else build_model(tokenizer),
        reward_funcs=[(reward or ParityReward()).func],
        args=args,
        train_dataset=arithmetic_dataset(16),
        eval_dataset=arithmetic_dataset(4),
        processing_class=tokenizer,
    )


def generate(trainer, train=True, queries=4):
    trainer.model.train(train)
    torch.manual_seed(0)
    group = G if train else trainer.num_generations_eval
    out = trainer._generate_and_score_completions([row for row in arithmetic_dataset(queries) for _ in range(group)])
    trainer.current_gradient_accumulation_steps = 1
    return out


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_trainer_advantages_are_the_formula_on_the_batchs_rewards(tmp_path, tokenizer, train):
    reward = ParityReward()
    trainer = make(AsymGRPOTrainer, asym_config(tmp_path, num_generations_eval=8), tokenizer, reward)
    out = generate(trainer, train)
    group = G if train else 8
    success = torch.tensor(reward.rewards)
    assert 0 < success.sum() < len(success)
    expected = asym_group_advantages(success, group, 0.9, 0.4)
    assert torch.equal(out["advantages"], expected)
    metrics = trainer._metrics["train" if train else "eval"]
    grouped = success.view(-1, group).sum(1)
    mixed = (grouped > 0) & (grouped < group)
    assert metrics["asym/frac_mixed_groups"][-1] == mixed.float().mean().item()
    assert metrics["asym/max_abs_adv"][-1] == expected.abs().max().item()
    in_mixed = mixed.repeat_interleave(group)
    assert metrics["asym/mean_adv_pos"][-1] == pytest.approx(expected[in_mixed & (success == 1)].mean().item())
    assert metrics["asym/mean_adv_neg"][-1] == pytest.approx(expected[in_mixed & (success == 0)].mean().item())


def test_settings_reach_the_advantages(tmp_path, tokenizer):
    reward = ParityReward()
    args = asym_config(tmp_path, asym_beta_pos=0.5, asym_beta_neg=0.5, asym_match_grpo_scale=True)
    trainer = make(AsymGRPOTrainer, args, tokenizer, reward)
    out = generate(trainer)
    # TRL's GRPO on the same rewards, as TRL would have computed it
    torch.testing.assert_close(
        out["advantages"], group_advantages(torch.tensor(reward.rewards), G), rtol=1e-3, atol=1e-3
    )
    # A combined reward of two functions, thresholded, vs the named verifier
    reward, verifier = ParityReward(), ParityReward()
    args = asym_config(tmp_path, asym_correctness_reward="parity", asym_max_abs_advantage=1.5)
    trainer = AsymGRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=[verifier.func],
        args=args,
        train_dataset=arithmetic_dataset(16),
        processing_class=tokenizer,
    )
    out = generate(trainer)
    expected = asym_group_advantages(torch.tensor(verifier.rewards), G, 0.9, 0.4, max_abs=1.5)
    assert torch.equal(out["advantages"], expected) and out["advantages"].abs().max() <= 1.5


class LossRecorder:
    """The advantages and context of every `GRPOTrainer._compute_loss` call, as the loss used them."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = GRPOTrainer._compute_loss

        def recorded(trainer, model, inputs):
            loss = original(trainer, model, inputs)
            self.calls.append({k: v.detach().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
            return loss

        monkeypatch.setattr(GRPOTrainer, "_compute_loss", recorded)

    def by_context(self, context):
        rows = []
        for call in self.calls:
            selected = call["policy_split_context"] == context
            rows.append(call["advantages"][selected])
        return torch.cat(rows)


def ps_config(tmp_path, **kwargs):
    settings = {
        "base_advantage": "asym_grpo",
        "max_completion_length": 10,
        "per_device_train_batch_size": 16,
        **kwargs,
    }
    return asym_config(tmp_path, PolicySplitGRPOConfig, **settings)


@pytest.mark.parametrize(
    "settings",
    [{}, {"optimized_step": False}, {"bonus_from_loss_pass": False}, {"eta_placement": "outside_clip"}],
    ids=["deferred_bonus", "reference_path", "scoring_pass", "outside_clip"],
)
def test_policy_split_over_asym_clips_the_bonus_relative_to_the_asymmetric_advantage(
    tmp_path, tokenizer, monkeypatch, settings
):
    # eta large: the bonus sits at its clip bound on most tokens, so the bound itself is measured.
    reward = ParityReward()
    eta = 50.0
    args = ps_config(tmp_path, eta=eta, **settings)
    trainer = make(trainer_class("policy_split", args), args, tokenizer, reward)
    assert type(trainer) is AsymPolicySplitGRPOTrainer
    out = generate(trainer)
    asym = asym_group_advantages(torch.tensor(reward.rewards), G, 0.9, 0.4)
    grpo = group_advantages(torch.tensor(reward.rewards), G)
    assert torch.equal(out["advantages"][:, 0], asym)  # the normal context's A_i (TRL's key), from Asym's override
    recorder = LossRecorder(monkeypatch)
    trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, out).backward()
    normal, he = recorder.by_context(NORMAL_CONTEXT), recorder.by_context(HIGH_ENTROPY_CONTEXT)
    mask = out["completion_mask"].bool()
    assert torch.equal(normal[mask], asym.unsqueeze(1).expand_as(mask)[mask])  # eta' = 0: A_i on every token
    bonus = he - asym.unsqueeze(1).float()
    bound = (asym.abs() / 2.0).unsqueeze(1).expand_as(mask)  # kappa = 2
    if settings.get("eta_placement") == "outside_clip":
        bound = eta * bound
    assert (bonus[mask].abs() <= bound[mask] * (1 + 1e-5) + 1e-6).all()
    # The bound is reached, and on the rare successes of hard groups it is the asymmetric |A| / kappa: wider than
    # the GRPO |A| / kappa that Policy Split over GRPO would use.
    per_row_max = torch.where(mask, bonus.abs(), 0.0).amax(1)
    reached = torch.isclose(per_row_max, bound[:, 0], rtol=1e-5, atol=1e-6)
    assert reached.all() if "eta_placement" not in settings else reached.float().mean() > 0.8  # eta B saturates
    wider = asym.abs() > grpo.abs() * (1 + 1e-3)
    scale = eta if "eta_placement" in settings else 1.0
    assert wider.any() and (per_row_max[wider] > scale * grpo.abs()[wider] / 2.0).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in trainer.model.parameters())


# ---------------------------------------------------------------------------------------------- real training runs
@pytest.mark.parametrize("method", ["asym_grpo", "policy_split"])
def test_real_training_run_trains_on_the_formulas_advantages(tmp_path, tokenizer, monkeypatch, method):
    monkeypatch.setattr(grpo_module, "shuffle_sequence_dict", lambda batch: batch)  # loss rows in generation order
    reward = ParityReward()
    if method == "asym_grpo":
        args = apply_method(method, asym_config(tmp_path, MethodConfig, max_steps=2))
    else:
        args = ps_config(tmp_path, max_steps=2, per_device_train_batch_size=8)
    trainer = make(trainer_class(method, args), args, tokenizer, reward)
    recorder = LossRecorder(monkeypatch)
    trainer.train()
    assert trainer.state.global_step == 2
    expected = asym_group_advantages(torch.tensor(reward.rewards), G, 0.9, 0.4)
    if method == "asym_grpo":
        used = torch.cat([call["advantages"] for call in recorder.calls])
    else:  # the normal context's rows train A_i on every token (eta' = 0)
        used = recorder.by_context(NORMAL_CONTEXT)[:, 0]
    assert torch.equal(used, expected)
    logs = [h for h in trainer.state.log_history if "asym/max_abs_adv" in h]
    assert [h["step"] for h in logs] == [1, 2]
    assert all(math.isfinite(h["asym/max_abs_adv"]) and 0 <= h["asym/frac_mixed_groups"] <= 1 for h in logs)


# ---------------------------------------------------------------------------------------------------------- recipes
def load_recipe(*path):
    with open(os.path.join(ROOT, "recipes", *path)) as f:
        return yaml.safe_load(f)


def test_recipes_name_the_method_and_its_settings():
    baseline = load_recipe("baselines", "qwen3_1.7b_asym_grpo.yaml")
    assert baseline["method"] == "asym_grpo"
    assert (baseline["asym_beta_pos"], baseline["asym_beta_neg"], baseline["num_generations"]) == (0.9, 0.4, 8)
    composed = load_recipe("paper", "qwen3_1.7b_policy_split_asym_grpo.yaml")
    paper = load_recipe("paper", "qwen3_1.7b_policy_split.yaml")
    assert composed["method"] == "policy_split" and composed["base_advantage"] == "asym_grpo"
    different = {k for k in {*composed, *paper} if composed.get(k) != paper.get(k)}
    assert different <= {"base_advantage", "asym_beta_pos", "asym_beta_neg", "output_dir"}, different


# ------------------------------------------------------------------------------------------------------ 2 processes


@requires_launcher("torchrun")
def test_two_processes_with_a_group_straddling_them(tmp_path):
    import json

    result = tmp_path / "result.json"
    cmd = [
        launcher("torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        os.path.join(HERE, "asym_run.py"),
        str(result),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if "Warning" not in line and "warnings.warn" not in line]
        raise AssertionError("\n".join(lines[-60:]))
    results = json.loads(result.read_text())
    for name in ("asym_grpo", "policy_split_asym"):
        rank0, rank1 = results[name]
        assert len(rank0["steps"]) == 2, name
        for step0, step1 in zip(rank0["steps"], rank1["steps"], strict=True):
            # Both processes hold the same gathered rewards and compute bit-identical advantages for the whole batch...
            assert step0["rewards"] == step1["rewards"] and step0["all_advantages"] == step1["all_advantages"], name
            # ... which are the formula on the gathered rewards, as 1 process computes it ...
            expected = asym_group_advantages(torch.tensor(step0["rewards"]), G, 0.9, 0.4).tolist()
            assert step0["all_advantages"] == expected, name
            # ... of which each process trains its own 6 rollouts (the middle group straddles the two).
            assert step0["local"] + step1["local"] == expected, name
        # The straddling group [4, 8) is mixed on some step (with these seeds its halves are all-wrong on one process
        # and all-right on the other: a process-local p would have given it 0).
        assert any(any(a != 0 for a in step["all_advantages"][4:8]) for step in rank0["steps"]), name
        # The same collectives on both processes, and none added to the method without AsymGRPO.
        assert rank0["collectives"] == rank1["collectives"], name
        baseline = results[{"asym_grpo": "grpo", "policy_split_asym": "policy_split"}[name]][0]["collectives"]
        assert rank0["collectives"] == baseline, name


def test_policy_split_alone_refuses_an_asym_base_advantage(tmp_path, tokenizer):
    # Built directly (not through `trainer_class`), Policy Split would silently train on GRPO's A_i.
    with pytest.raises(ValueError, match="base_advantage='asym_grpo' needs the trainer composed"):
        make(PolicySplitGRPOTrainer, ps_config(tmp_path), tokenizer)
    assert isinstance(make(AsymPolicySplitGRPOTrainer, ps_config(tmp_path), tokenizer), PolicySplitGRPOTrainer)
