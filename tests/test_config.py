import pytest
import yaml
from transformers import HfArgumentParser
from trl import TrlParser

from policy_split_trl import HIGH_ENTROPY_SYSTEM_PROMPT, PolicySplitGRPOConfig


def make(**kwargs):
    base = {
        "output_dir": "/tmp/ps-config-test",
        "report_to": "none",
        "use_cpu": True,
        "per_device_train_batch_size": 8,
    }
    base.update(kwargs)
    return PolicySplitGRPOConfig(**base)


def test_defaults_are_the_papers():
    cfg = make()
    assert cfg.eta == 0.03 and cfg.kappa == 2.0 and cfg.alpha == 0.5 and cfg.normal_eta == 0.0
    assert cfg.rollout_sharing is True
    # The authors' released code puts eta inside the clip (SPEC §2.7): their numbers come from that placement.
    assert cfg.eta_placement == "inside_clip"
    assert cfg.high_entropy_system_prompt == HIGH_ENTROPY_SYSTEM_PROMPT
    assert cfg.num_high_entropy_generations == cfg.num_generations // 2
    assert cfg.num_high_entropy_generations_eval == cfg.num_high_entropy_generations


def test_eval_split_defaults():
    cfg = make(num_generations=8, num_high_entropy_generations=3)
    assert cfg.num_high_entropy_generations_eval == 3  # same G in eval: same split
    cfg = make(num_generations=8, num_generations_eval=4)
    assert cfg.num_high_entropy_generations_eval == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kappa": 1.0}, "kappa must be > 1"),
        ({"kappa": 0.5}, "kappa must be > 1"),
        ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"eta": -0.01}, "eta must be >= 0"),
        ({"high_entropy_system_prompt": ""}, "high_entropy_system_prompt must be a non-empty string"),
        ({"high_entropy_system_prompt": "   \n"}, "high_entropy_system_prompt must be a non-empty string"),
        ({"eta_placement": "middle"}, "eta_placement must be one of"),
        ({"num_generations": 4, "num_high_entropy_generations": 0}, "num_high_entropy_generations must be between 1"),
        ({"num_generations": 4, "num_high_entropy_generations": 4}, "num_high_entropy_generations must be between 1"),
        ({"num_generations": 1, "per_device_train_batch_size": 1}, "num_generations must be >= 2"),
        ({"num_generations_eval": 1}, "num_generations_eval must be >= 2"),
        (
            {"num_generations_eval": 4, "num_high_entropy_generations_eval": 4},
            "num_high_entropy_generations_eval must",
        ),
        (
            {"num_generations_eval": 4, "num_high_entropy_generations_eval": 0},
            "num_high_entropy_generations_eval must",
        ),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_negative_normal_eta_is_allowed_for_the_ablation():
    assert make(normal_eta=-0.01).normal_eta == -0.01


def test_every_field_has_help():
    from dataclasses import fields

    from trl import GRPOConfig

    own = {f.name for f in fields(PolicySplitGRPOConfig)} - {f.name for f in fields(GRPOConfig)}
    assert own == {
        "high_entropy_system_prompt",
        "num_high_entropy_generations",
        "num_high_entropy_generations_eval",
        "eta",
        "kappa",
        "alpha",
        "normal_eta",
        "rollout_sharing",
        "eta_placement",
        "loss_aggregation",
        "optimized_step",
        "bonus_from_loss_pass",
        "shared_prefix",
        "eta_schedule",
        "target_kl_high_entropy_normal",
        "eta_target_tolerance",
        "eta_update_factor",
        "eta_min",
        "eta_max",
        "max_entropy_ratio",
        "mode_diagnostics_steps",
        "mode_diagnostics_prompts",
        "base_advantage",
        "asym_beta_pos",
        "asym_beta_neg",
        "asym_correctness_reward",
        "asym_success_threshold",
        "asym_match_grpo_scale",
        "asym_max_abs_advantage",
        "polarity_reweighting",
        "polarity_diagnostics",
        "polarity_chunk_tokens",
        "polarity_lambda_max",
        "polarity_ema",
        "polarity_anchor_ratio",
        "polarity_entropy_target",
        "polarity_gamma",
        "polarity_phase",
        "polarity_slope_window",
        "polarity_epsilon",
    }
    for f in fields(PolicySplitGRPOConfig):
        if f.name in own:
            assert f.metadata.get("help"), f.name


def test_cli_flags_parse():
    parser = HfArgumentParser(PolicySplitGRPOConfig)
    (cfg,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            "/tmp/x",
            "--eta",
            "0.05",
            "--kappa",
            "3",
            "--alpha",
            "0.25",
            "--rollout_sharing",
            "false",
            "--eta_placement",
            "inside_clip",
            "--num_generations",
            "8",
            "--num_high_entropy_generations",
            "2",
            "--per_device_train_batch_size",
            "8",
            "--use_cpu",
            "true",
            "--report_to",
            "none",
        ]
    )
    assert (cfg.eta, cfg.kappa, cfg.alpha, cfg.rollout_sharing) == (0.05, 3.0, 0.25, False)
    assert cfg.eta_placement == "inside_clip" and cfg.num_high_entropy_generations == 2
    with pytest.raises(SystemExit):  # argparse rejects a placement outside the choices
        parser.parse_args_into_dataclasses(["--output_dir", "/tmp/x", "--eta_placement", "middle"])


def test_trl_parser_yaml_recipe_with_cli_override(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "out"),
                "eta": 0.01,
                "kappa": 2.5,
                "num_generations": 4,
                "per_device_train_batch_size": 4,
                "use_cpu": True,
                "report_to": "none",
                "high_entropy_system_prompt": "Think differently.",
            }
        )
    )
    parser = TrlParser(PolicySplitGRPOConfig)
    (cfg,) = parser.parse_args_and_config(["--config", str(recipe), "--eta", "0.02"])
    assert cfg.eta == 0.02  # CLI wins over the recipe
    assert cfg.kappa == 2.5 and cfg.high_entropy_system_prompt == "Think differently."
    assert cfg.num_high_entropy_generations == 2
