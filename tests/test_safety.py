"""Non-finite hyper-parameters, losses, gradients and rewards, and a failed `push_to_hub`: nothing poisoned, nothing lost."""

import logging
import math
import os

import pytest
import torch
from tiny_model import arithmetic_dataset, build_model, length_reward, training_args
from transformers import TrainerCallback
from trl import GRPOTrainer

from policy_split_trl import (
    ClipCovGRPOConfig,
    EntropyAdvantageGRPOConfig,
    EntropyAdvantageGRPOTrainer,
    EntropyDrivenAdvantageGRPOConfig,
    PolicySplitGRPOConfig,
    PolicySplitGRPOTrainer,
)
from policy_split_trl.hub import POLICY_SPLIT_FILE
from policy_split_trl.safety import infinite_to_missing


def settings(tmp_path, **overrides):
    return training_args(tmp_path / "out", num_generations=4, max_completion_length=8, **overrides)


def make(tmp_path, tokenizer, rewards=None, **overrides):
    return PolicySplitGRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=rewards or [length_reward],
        args=PolicySplitGRPOConfig(**settings(tmp_path, **overrides)),
        train_dataset=arithmetic_dataset(16),
        processing_class=tokenizer,
    )


@pytest.mark.parametrize(
    "config_class, field, value",
    [
        (PolicySplitGRPOConfig, "eta", math.inf),
        (PolicySplitGRPOConfig, "normal_eta", math.nan),
        (PolicySplitGRPOConfig, "kappa", math.inf),
        (PolicySplitGRPOConfig, "alpha", math.nan),
        (PolicySplitGRPOConfig, "learning_rate", math.nan),
        (PolicySplitGRPOConfig, "beta", math.inf),
        (PolicySplitGRPOConfig, "temperature", -math.inf),
        (PolicySplitGRPOConfig, "reward_weights", [1.0, math.inf]),
        (PolicySplitGRPOConfig, "max_grad_norm", math.nan),  # inf is a meaningful bound there, NaN never
        (EntropyAdvantageGRPOConfig, "entropy_advantage_alpha", math.inf),
        (ClipCovGRPOConfig, "clip_cov_ub", math.nan),
        (EntropyDrivenAdvantageGRPOConfig, "edge_epsilon", math.inf),
    ],
)
def test_non_finite_hyper_parameters_fail_at_construction(tmp_path, config_class, field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        config_class(**settings(tmp_path, **{field: value}))


def test_infinite_bounds_and_a_negative_normal_eta_stay_accepted(tmp_path):
    assert PolicySplitGRPOConfig(**settings(tmp_path), max_grad_norm=math.inf).max_grad_norm == math.inf
    # Table 3 ablates eta' = +/-0.01: a negative normal_eta is a setting of the paper, only a non-finite one is not.
    assert PolicySplitGRPOConfig(**settings(tmp_path), normal_eta=-0.01).normal_eta == -0.01


def test_the_dry_run_rejects_a_non_finite_eta():
    from policy_split_trl.scripts import train

    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "quickstart.yaml")
    with pytest.raises(ValueError, match="eta must be a finite number"):
        train.run(["--config", recipe, "--eta", "inf", "--dry_run"])


def poison_loss_at(monkeypatch, step):
    """TRL's loss becomes NaN from the `step`-th loss pass on (what an exploding bonus or reward would do)."""
    calls = {"n": 0}
    original = GRPOTrainer._compute_loss

    def poisoned(self, model, inputs):
        calls["n"] += 1
        loss = original(self, model, inputs)
        return loss * math.nan if calls["n"] >= step else loss

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", poisoned)


def test_a_non_finite_loss_stops_training_before_the_update_and_before_saving(tmp_path, tokenizer, monkeypatch):
    # optimized_step=False: one loss pass per optimizer step, so pass 2 is step 2.
    trainer = make(tmp_path, tokenizer, max_steps=3, optimized_step=False, save_strategy="steps", save_steps=1)
    poison_loss_at(monkeypatch, step=2)
    after_step_1 = {}

    class Remember(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                after_step_1.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()})

    trainer.add_callback(Remember())
    with pytest.raises(FloatingPointError, match="optimizer step 2") as error:
        trainer.train()
    assert "not updated" in str(error.value) and str(tmp_path / "out") in str(error.value)
    # The failed step changed nothing, every weight is finite, and no checkpoint holds the failed step.
    for name, param in trainer.model.named_parameters():
        assert torch.isfinite(param).all() and torch.equal(param, after_step_1[name]), name
    assert (tmp_path / "out" / "checkpoint-1").is_dir()
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_non_finite_gradients_with_a_finite_loss_stop_training(tmp_path, tokenizer):
    trainer = make(tmp_path, tokenizer, max_steps=1)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    # The loss stays finite; only the gradient of one weight is poisoned (what fp16 overflow in backward looks like).
    next(trainer.model.parameters()).register_hook(lambda grad: grad * math.inf)
    with pytest.raises(FloatingPointError, match="optimizer step 1"):
        trainer.train()
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_baselines_have_the_same_guard(tmp_path, tokenizer, monkeypatch):
    trainer = EntropyAdvantageGRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=[length_reward],
        args=EntropyAdvantageGRPOConfig(**settings(tmp_path, max_steps=1)),
        train_dataset=arithmetic_dataset(16),
        processing_class=tokenizer,
    )
    poison_loss_at(monkeypatch, step=1)
    with pytest.raises(FloatingPointError, match="optimizer step 1"):
        trainer.train()


def test_infinite_to_missing():
    rewards = torch.tensor([[1.0, math.inf], [-math.inf, 2.0], [math.nan, 0.5]])
    out = infinite_to_missing(rewards)
    assert torch.isnan(out[0, 1]) and torch.isnan(out[1, 0]) and torch.isnan(out[2, 0])
    assert out[0, 0] == 1.0 and out[1, 1] == 2.0 and out[2, 1] == 0.5


def test_infinite_rewards_are_missing_with_one_warning_per_function(tmp_path, tokenizer, caplog):
    def sometimes_infinite(completions, **kwargs):
        return [math.inf if i == 0 else float(len(c[0]["content"]) % 3) for i, c in enumerate(completions)]

    trainer = make(tmp_path, tokenizer, rewards=[sometimes_infinite, length_reward], max_steps=2)
    with caplog.at_level(logging.WARNING, logger="policy_split_trl.safety"):
        trainer.train()
    warnings = [r for r in caplog.records if "sometimes_infinite" in r.getMessage()]
    assert len(warnings) == 1 and "treated as missing" in warnings[0].getMessage()
    assert not any("length_reward" in r.getMessage() for r in caplog.records)
    for log in trainer.state.log_history:
        if "loss" in log:
            assert math.isfinite(log["rewards/sometimes_infinite/mean"]) and math.isfinite(log["reward"])
            assert math.isfinite(log["policy_split/normal/reward"]) and math.isfinite(log["grad_norm"])


def test_push_to_hub_saves_locally_before_the_hub_fails(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the real Hub client refuses every call, as an unreachable Hub does
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    trainer = make(tmp_path, tokenizer, max_steps=1)
    trainer.train()
    out = tmp_path / "out"
    assert not (out / "model.safetensors").exists()  # nothing saved by training itself (save_strategy "no")
    with pytest.raises(RuntimeError, match="push_to_hub failed") as error:
        trainer.push_to_hub()
    assert os.path.abspath(out) in str(error.value)
    assert (out / "model.safetensors").is_file() and (out / POLICY_SPLIT_FILE).is_file()
    reloaded = type(trainer.model).from_pretrained(out)
    for (name, a), b in zip(trainer.model.named_parameters(), reloaded.parameters(), strict=True):
        assert torch.equal(a.detach().cpu(), b), name


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"question": "1 + 1 ="}], "has no 'prompt' column"),
        ([{"prompt": ""}], "row 0 of column 'prompt'"),
        ([{"prompt": [{"role": "user", "content": "hi"}]}, {"prompt": [{"role": "user", "content": ""}]}], "row 1"),
    ],
    ids=["missing_column", "empty_string", "empty_message"],
)
@pytest.mark.parametrize("trainer_class", [PolicySplitGRPOTrainer, EntropyAdvantageGRPOTrainer])
def test_datasets_are_checked_before_the_model_loads(tmp_path, trainer_class, rows, message):
    from datasets import Dataset

    config_class = PolicySplitGRPOConfig if trainer_class is PolicySplitGRPOTrainer else EntropyAdvantageGRPOConfig
    # The model id does not exist: had it been loaded first, the error would be about the model.
    with pytest.raises(ValueError, match=message):
        trainer_class(
            model="no-such-org/no-such-model",
            reward_funcs=[length_reward],
            args=config_class(**settings(tmp_path)),
            train_dataset=Dataset.from_list(rows),
        )


def test_each_eval_split_is_checked(tmp_path, tokenizer):
    from datasets import Dataset

    good = arithmetic_dataset(4)
    with pytest.raises(ValueError, match=r"eval_dataset\['held_out'\]: row 0"):
        PolicySplitGRPOTrainer(
            model=build_model(tokenizer),
            reward_funcs=[length_reward],
            args=PolicySplitGRPOConfig(**settings(tmp_path)),
            train_dataset=good,
            eval_dataset={"ok": good, "held_out": Dataset.from_list([{"prompt": " "}])},
            processing_class=tokenizer,
        )
