"""The paper's baselines: each formula against hand values, each trainer's loss/advantages against a direct computation
on a real generation batch, and every method of the registry training 2 steps through the CLI."""

import math
import os

import pytest
import torch
from tiny_model import arithmetic_dataset, build_model, length_reward, training_args
from trl import GRPOConfig, GRPOTrainer

from policy_split_trl.advantages import (
    clip_cov_selection,
    entropy_advantage,
    entropy_driven_advantages,
    group_advantages,
    relative_response_entropy,
    response_mean_entropy,
)
from policy_split_trl.baselines import (
    ClipCovGRPOConfig,
    ClipCovGRPOTrainer,
    EntropyAdvantageGRPOConfig,
    EntropyAdvantageGRPOTrainer,
    EntropyDrivenAdvantageGRPOConfig,
    EntropyDrivenAdvantageGRPOTrainer,
)
from policy_split_trl.methods import METHODS, MethodConfig, apply_method
from policy_split_trl.scripts.train import run
from policy_split_trl.shared_prefix import SharedPrefixMixin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G = 4


# --------------------------------------------------------------------------------------------------------- formulas
def test_entropy_advantage_hand_values_keep_the_sign():
    advantages = torch.tensor([1.0, -1.0, 0.0, 2.0])
    entropies = torch.tensor([[0.5, 5.0], [0.5, 5.0], [3.0, 3.0], [1.0, 10.0]], requires_grad=True)
    shaped = entropy_advantage(advantages, entropies, alpha=0.4, kappa=2.0)
    # min(0.4 H, |A|/2): row 0 -> 0.2, 0.5 (cap); row 1 the same on A = -1; row 2 A = 0 -> 0; row 3 -> 0.4, 1.0 (cap)
    expected = torch.tensor([[1.2, 1.5], [-0.8, -0.5], [0.0, 0.0], [2.4, 3.0]])
    torch.testing.assert_close(shaped, expected)
    assert (torch.sign(shaped) == torch.sign(advantages).unsqueeze(1)).all()
    assert not shaped.requires_grad  # H is detached: no gradient through the entropy
    with pytest.raises(ValueError, match="kappa"):
        entropy_advantage(advantages, entropies, 0.4, kappa=1.0)


def test_response_mean_entropy_ignores_padding():
    entropies = torch.tensor([[1.0, 3.0, 100.0], [2.0, 100.0, 100.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(response_mean_entropy(entropies, mask), torch.tensor([2.0, 2.0, 0.0]))


def test_relative_entropy_is_a_ratio_to_the_group_mean():
    relative = relative_response_entropy(torch.tensor([1.0, 3.0, 2.0, 2.0]), group_size=2)
    torch.testing.assert_close(relative, torch.tensor([0.5, 1.5, 1.0, 1.0]))
    # Zero entropies are floored: an all-deterministic group is neutral, never a division by zero.
    torch.testing.assert_close(relative_response_entropy(torch.zeros(2), 2), torch.ones(2))
    floored = relative_response_entropy(torch.tensor([0.0, 2.0]), 2, eps=1e-6)
    torch.testing.assert_close(floored, torch.tensor([1e-6, 2.0]) / ((1e-6 + 2.0) / 2))
    with pytest.raises(ValueError, match="whole groups"):
        relative_response_entropy(torch.ones(3), 2)


def test_entropy_driven_advantages_hand_values():
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    relative = torch.tensor([0.5, 1.5, 1.0, 1.0])
    torch.testing.assert_close(entropy_driven_advantages(advantages, relative), torch.tensor([2.0, -2 / 3, 0.5, -0.5]))
    capped = entropy_driven_advantages(advantages, relative, max_scale=1.5)
    torch.testing.assert_close(capped, torch.tensor([1.5, -2 / 3, 0.5, -0.5]))


def clip_cov_batch():
    """Constructed so that the covariances are known: mean A = 0 and mean log p = -2 over the 8 valid tokens."""
    advantages = torch.tensor([2.0, -2.0])
    # The 5th column is padding whose covariance would be a candidate (-2 * (-3.5 + 2) = 3) if it counted.
    logps = torch.tensor([[-0.5, -1.5, -4.0, -2.0, -3.5], [-0.5, -3.0, -2.5, -2.0, -3.5]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    # cov = A * (log p + 2): row 0 -> [3, 1, -4, 0], row 1 -> [-3, 2, 1, 0]; candidates 1 < cov < 5 (exclusive):
    # (0, 0) = 3 and (1, 1) = 2; (0, 1) and (1, 2) sit exactly at the lower bound.
    return advantages, logps, mask


def selected_set(selection):
    return {tuple(i) for i in selection.nonzero().tolist()}


def test_clip_cov_selects_only_candidates_and_a_fraction_of_all_valid_tokens():
    advantages, logps, mask = clip_cov_batch()
    picks = set()
    for seed in range(20):
        selection = clip_cov_selection(
            advantages, logps, logps, mask, 0.2, 0.2, generator=torch.Generator().manual_seed(seed)
        )
        assert selection.sum() == 1  # max(1, int(2e-4 * 8 valid tokens)) = 1
        picks |= selected_set(selection)
    assert picks == {(0, 0), (1, 1)}  # random among the candidates, never padding or out-of-range tokens
    # 0.25 of 8 valid tokens = 2: both candidates; a larger ratio cannot select more than the candidates.
    for ratio in (0.25, 1.0):
        assert selected_set(clip_cov_selection(advantages, logps, logps, mask, 0.2, 0.2, clip_ratio=ratio)) == {
            (0, 0),
            (1, 1),
        }


def test_clip_cov_never_selects_tokens_ppo_already_clipped():
    advantages, logps, mask = clip_cov_batch()
    old = logps.clone()
    old[0, 0] -= 0.5  # ratio e^0.5 = 1.65 > 1.2 with A > 0: PPO's clip is active there
    old[1, 1] += 0.1  # ratio e^-0.1 = 0.90, inside [0.8, 1.2]: still a candidate
    assert selected_set(clip_cov_selection(advantages, logps, old, mask, 0.2, 0.2, clip_ratio=1.0)) == {(1, 1)}
    old[1, 1] += 0.3  # ratio e^-0.4 = 0.67 < 0.8 with A < 0: clipped too
    assert not clip_cov_selection(advantages, logps, old, mask, 0.2, 0.2, clip_ratio=1.0).any()
    assert not clip_cov_selection(advantages, logps, logps, torch.zeros_like(mask), 0.2, 0.2).any()


# ---------------------------------------------------------------------------------------------------------- trainers
def base_config(tmp_path, config_class, **kwargs):
    base = training_args(tmp_path / "out", num_generations=G)
    return config_class(**{**base, **kwargs})


def make(trainer_class, config_class, tmp_path, tokenizer, rewards=None, **kwargs):
    return trainer_class(
        model=build_model(tokenizer),
        reward_funcs=rewards or [length_reward],
        args=base_config(tmp_path, config_class, **kwargs),
        train_dataset=arithmetic_dataset(16),
        processing_class=tokenizer,
    )


def generation_batch(trainer):
    trainer.model.train()
    out = trainer._generate_and_score_completions([row for row in arithmetic_dataset(2) for _ in range(G)])
    trainer.current_gradient_accumulation_steps = 1
    return out


def logps_and_entropies(trainer, out):
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        logps, entropies, _ = super(type(trainer), trainer)._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, out["completion_ids"].size(1), compute_entropy=True
        )
    return logps, entropies


def loss_and_grad(trainer, out):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, out)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]).clone()
    trainer.model.zero_grad()
    return loss.detach(), grad


def reference_loss_and_grad(trainer, out, token_advantages):
    """The on-policy dapo loss with fixed per-token advantages, computed directly: -sum(A_t log p_t) / #tokens."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    trainer.model.zero_grad()
    logps = super(type(trainer), trainer)._get_per_token_logps_and_entropies(
        trainer.model, ids, mask, out["completion_ids"].size(1)
    )[0]
    m = out["completion_mask"].float()
    ratio = torch.exp(logps - logps.detach())  # 1 on-policy, with the policy-gradient as its gradient
    loss = -(token_advantages * ratio * m).sum() / m.sum()
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]).clone()
    trainer.model.zero_grad()
    return loss.detach(), grad


def test_entropy_advantage_trainer_loss_and_gradient(tmp_path, tokenizer):
    trainer = make(EntropyAdvantageGRPOTrainer, EntropyAdvantageGRPOConfig, tmp_path, tokenizer)
    out = generation_batch(trainer)
    original = out["advantages"].clone()
    assert (original != 0).any()
    _, entropies = logps_and_entropies(trainer, out)
    shaped = entropy_advantage(original, entropies, 0.4, 2.0)
    assert not torch.allclose(shaped, original.unsqueeze(1).expand_as(shaped))  # the shaping does something
    loss, grad = loss_and_grad(trainer, out)
    ref_loss, ref_grad = reference_loss_and_grad(trainer, out, shaped)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)  # detached H: no entropy gradient
    torch.testing.assert_close(out["advantages"], original)  # the batch keeps A (num_iterations > 1 reuses it)
    loss_again, _ = loss_and_grad(trainer, out)
    torch.testing.assert_close(loss_again, loss)  # shaping is not compounded


def test_clip_cov_trainer_drops_exactly_the_selected_tokens(tmp_path, tokenizer):
    # ratio 1 and the widest bounds: every valid token is selected on-policy, so the policy loss is exactly 0.
    trainer = make(
        ClipCovGRPOTrainer,
        ClipCovGRPOConfig,
        tmp_path,
        tokenizer,
        clip_cov_ratio=1.0,
        clip_cov_lb=-1e9,
        clip_cov_ub=1e9,
    )
    out = generation_batch(trainer)
    loss, grad = loss_and_grad(trainer, out)
    assert loss == 0 and grad.abs().max() == 0
    assert trainer._metrics["train"]["clip_cov/clip_fraction"][-1] == 1.0

    # The paper's bounds: the loss equals the direct loss with A zeroed on clip_cov_selection's tokens.
    trainer.args.clip_cov_lb, trainer.args.clip_cov_ub = 1.0, 5.0
    logps, _ = logps_and_entropies(trainer, out)
    token_advantages = out["advantages"].unsqueeze(1).expand_as(logps)
    # The covariance scale of a tiny model is small: widen the bounds around its values so that some tokens qualify.
    mask = out["completion_mask"].bool()
    cov = (token_advantages - token_advantages[mask].mean()) * (logps - logps[mask].mean())
    trainer.args.clip_cov_lb, trainer.args.clip_cov_ub = 0.0, float(cov[mask].max()) + 1.0
    selection = clip_cov_selection(
        out["advantages"], logps, logps, out["completion_mask"], 0.2, 0.2, 1.0, 0.0, trainer.args.clip_cov_ub
    )
    assert 0 < selection.sum() < mask.sum()
    expected = torch.where(selection, 0.0, token_advantages)
    loss, grad = loss_and_grad(trainer, out)
    ref_loss, ref_grad = reference_loss_and_grad(trainer, out, expected)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_clip_cov_needs_a_clipped_token_level_loss(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="loss_type"):
        make(ClipCovGRPOTrainer, ClipCovGRPOConfig, tmp_path, tokenizer, loss_type="cispo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        make(ClipCovGRPOTrainer, ClipCovGRPOConfig, tmp_path, tokenizer, importance_sampling_level="sequence")


class RewardRecorder:
    def __init__(self):
        self.rewards = []

        def recorded_length_reward(completions, **kwargs):
            rewards = length_reward(completions)
            self.rewards.extend(rewards)
            return rewards

        self.func = recorded_length_reward


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_entropy_driven_advantage_divides_a_by_the_relative_entropy(tmp_path, tokenizer, num_iterations, monkeypatch):
    recorder = RewardRecorder()
    trainer = make(
        EntropyDrivenAdvantageGRPOTrainer,
        EntropyDrivenAdvantageGRPOConfig,
        tmp_path,
        tokenizer,
        rewards=[recorder.func],
        num_iterations=num_iterations,
    )
    calls = []
    original = GRPOTrainer._get_per_token_logps_and_entropies

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("compute_entropy", False))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", counting)
    out = generation_batch(trainer)
    monkeypatch.undo()
    # One forward pass in the generation step either way: TRL's own old-log-prob pass when it runs, else ours.
    assert len(calls) == 1
    if num_iterations == 2:
        assert out["old_per_token_logps"] is not None
    assert calls == [True]
    _, entropies = logps_and_entropies(trainer, out)
    response = response_mean_entropy(entropies, out["completion_mask"])
    grpo = group_advantages(torch.tensor(recorder.rewards), G)
    expected = grpo * response.view(-1, G).mean(1).repeat_interleave(G) / response
    torch.testing.assert_close(out["advantages"], expected, rtol=1e-4, atol=1e-5)
    assert (torch.sign(out["advantages"]) == torch.sign(grpo)).all()


def test_baseline_trainers_reject_a_plain_grpo_config(tmp_path, tokenizer):
    with pytest.raises(TypeError, match="EntropyAdvantageGRPOConfig"):
        EntropyAdvantageGRPOTrainer(
            model=build_model(tokenizer),
            reward_funcs=[length_reward],
            args=base_config(tmp_path, GRPOConfig),
            processing_class=tokenizer,
            train_dataset=arithmetic_dataset(4),
        )


def test_config_validation_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="entropy_advantage_kappa"):
        base_config(tmp_path, EntropyAdvantageGRPOConfig, entropy_advantage_kappa=1.0)
    with pytest.raises(ValueError, match="clip_cov_lb"):
        base_config(tmp_path, ClipCovGRPOConfig, clip_cov_lb=5.0, clip_cov_ub=1.0)
    with pytest.raises(ValueError, match="edge_epsilon"):
        base_config(tmp_path, EntropyDrivenAdvantageGRPOConfig, edge_epsilon=0.0)


# ---------------------------------------------------------------------------------------------------------- registry
def test_apply_method_fixed_and_default_settings(tmp_path):
    args = base_config(tmp_path, MethodConfig)
    apply_method("entropy_regularization", args)
    assert args.entropy_coef == 0.003
    args = base_config(tmp_path, MethodConfig, entropy_coef=0.01)
    assert apply_method("entropy_regularization", args).entropy_coef == 0.01  # the user's value wins
    args = apply_method("grpo_rollout_sharing", base_config(tmp_path, MethodConfig))
    assert (args.eta, args.normal_eta, args.rollout_sharing) == (0.0, 0.0, True)
    with pytest.raises(ValueError, match="grpo_rollout_sharing means eta=0.0"):
        apply_method("grpo_rollout_sharing", base_config(tmp_path, MethodConfig, eta=0.05))
    with pytest.raises(ValueError, match="Unknown method"):
        apply_method("ppo", base_config(tmp_path, MethodConfig))


def test_the_registry_holds_each_methods_classes_and_method_config_is_their_union():
    import dataclasses

    for spec in METHODS.values():
        assert issubclass(spec.trainer, GRPOTrainer) and issubclass(spec.config, GRPOConfig)
        # A baseline trainer resolves its args to its own config class: the registry names the same one.
        assert getattr(spec.trainer, "_config_class", spec.config) is spec.config
    method_fields = {f.name for f in dataclasses.fields(MethodConfig)}
    every_config = {f.name for spec in METHODS.values() for f in dataclasses.fields(spec.config)}
    assert method_fields == every_config


OWN_METRIC = {
    "grpo": "reward",
    "forking_tokens": "reward",
    "clip_cov": "clip_cov/clip_fraction",
    "entropy_driven_advantage": "edge/response_entropy",
    "entropy_regularization": "entropy_coef",
    "entropy_advantage": "entropy_advantage/term_mean",
    "policy_split": "policy_split/bonus/abs_mean",
    "policy_split_no_sharing": "policy_split/bonus/abs_mean",
    "grpo_rollout_sharing": "policy_split/bonus/abs_mean",
    "asym_grpo": "asym/max_abs_adv",
    "policy_split_asym_grpo": "asym/max_abs_adv",
    "polarity_reweighting": "polarity_reweighting/lambda",
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_two_steps_from_the_cli(method, tiny_model_path, tmp_path):
    # A random tiny model's covariances are far below Clip-Cov's paper bounds (1, 5): widen them to see it select.
    extra = ["--clip_cov_lb=-1e9", "--clip_cov_ub=1e9", "--clip_cov_ratio=0.1"] if method == "clip_cov" else []
    trainer = run(
        [
            "--config",
            os.path.join(ROOT, "recipes", "quickstart.yaml"),
            "--method",
            method,
            "--model_name_or_path",
            tiny_model_path,
            "--output_dir",
            str(tmp_path / method),
            "--max_steps",
            "2",
            "--max_completion_length",
            "8",
            "--num_generations",
            "4",
            "--per_device_train_batch_size",
            "8",
            "--mode_report",
            "false",
            "--use_cpu",
            "true",
            "--report_to",
            "none",
            "--learning_rate",
            "1e-2",
            *extra,
        ]
    )
    # The registry's trainer with the shared-prefix passes right before GRPOTrainer (on by default, every method).
    assert isinstance(trainer, METHODS[method].trainer) and isinstance(trainer, SharedPrefixMixin)
    logs = [h for h in trainer.state.log_history if OWN_METRIC[method] in h]
    assert [h["step"] for h in logs] == [1, 2]
    values = [h[OWN_METRIC[method]] for h in logs]
    assert all(math.isfinite(v) for v in values)
    if method == "entropy_regularization":
        assert values == [0.003, 0.003]
    if method == "forking_tokens":
        assert trainer.top_entropy_quantile == 0.2
    if method == "grpo_rollout_sharing":
        assert values == [0.0, 0.0]  # eta = 0: no bonus, both contexts still trained
    if method in ("policy_split", "policy_split_no_sharing"):
        assert trainer.args.rollout_sharing is (method == "policy_split") and max(values) > 0
    if method == "clip_cov":
        assert all(0.08 < v <= 0.1 for v in values)  # int(0.1 * #tokens) of the tokens, every one a candidate
    if method == "entropy_advantage":  # 0 only where every A is 0 (a group with equal rewards)
        assert all(v >= 0 for v in values) and max(values) > 0
