"""Precision that trains: the rounding arithmetic, the settings check, real tiny trainings, and every recipe."""

import glob
import math
import os
from types import SimpleNamespace

import pytest
import torch
from tiny_model import arithmetic_dataset, build_model, length_reward, training_args

from policy_split_trl import PolicySplitGRPOConfig, PolicySplitGRPOTrainer
from policy_split_trl.comparison.config import load_compare_config
from policy_split_trl.comparison.runner import parse_training
from policy_split_trl.methods import apply_method
from policy_split_trl.precision import (
    MIN_FRACTION_CHANGED,
    fraction_of_updates_kept,
    half_ulp,
    mantissa_bits,
    precision_warning,
    precision_warning_for_args,
    trained_weight_dtype,
    trainer_precision_warning,
    update_rounding,
)
from policy_split_trl.scripts.train import run
from policy_split_trl.training import make_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(
    p for p in glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True) if "/accelerate/" not in p
)
PAPER_LR = 3e-6
FIX_FIELDS = ("`dtype: float32`", "`bf16: true`")


def bf16(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.bfloat16)


# ---------------------------------------------------------------- the arithmetic, on hand values


def test_bf16_rounding_by_hand():
    assert mantissa_bits(torch.bfloat16) == 7 and mantissa_bits("float16") == 10 and mantissa_bits("fp32") == 23
    # The bf16 values next to 1.0 are 1 - 2**-8 and 1 + 2**-7: an update below half that spacing rounds back.
    assert half_ulp(1.0, torch.bfloat16) == 2**-8
    assert bool(bf16(1.0) + 2**-9 == bf16(1.0))
    assert bool(bf16(1.0) + 2**-7 != bf16(1.0))
    assert bool(bf16(1.0) + 1.5 * 2**-8 != bf16(1.0))  # above half an ulp: rounds up to the next value
    # float32 keeps the same updates
    assert bool(torch.tensor(1.0) + 2**-9 != torch.tensor(1.0))
    assert half_ulp(1.0, torch.float32) == 2**-24
    assert half_ulp(0.02, torch.bfloat16) == 2**-14  # 0.02 lies in [2**-6, 2**-5)


def test_update_rounding_at_the_paper_learning_rate():
    rounding = update_rounding(PAPER_LR, torch.bfloat16)
    # 3e-6 exceeds half an ulp, 2**(k - 8), only for exponents k <= -11: weights below 2**-10.
    assert rounding.largest_weight_changed == 2**-10
    just_below, just_above = 0.99 * 2**-10, 2**-10
    assert bool(bf16(just_below) + PAPER_LR != bf16(just_below))
    assert bool(bf16(just_above) + PAPER_LR == bf16(just_above))
    assert rounding.half_ulp_at_scale == 2**-14 > PAPER_LR  # a typical weight (0.02) never moves
    assert rounding.fraction_changed == pytest.approx(math.erf(2**-10 / (0.02 * math.sqrt(2))))
    assert 0.03 < rounding.fraction_changed < 0.05 and rounding.rounds_away
    fp32 = update_rounding(PAPER_LR, torch.float32)
    assert fp32.fraction_changed == 1.0 and not fp32.rounds_away
    assert not update_rounding(1e-3, "bfloat16").rounds_away  # large steps survive bf16
    assert update_rounding(PAPER_LR, "float16").rounds_away  # 10 mantissa bits are not enough either
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        update_rounding(0.0, torch.float32)
    with pytest.raises(ValueError, match="Unknown dtype 'int8'"):
        update_rounding(1e-3, "int8")


def test_measured_fraction_matches_the_arithmetic():
    torch.manual_seed(0)
    weights = torch.randn(1024, 1024) * 0.02
    measured = fraction_of_updates_kept([weights.bfloat16().requires_grad_()], PAPER_LR)
    assert measured == pytest.approx(update_rounding(PAPER_LR, torch.bfloat16).fraction_changed, abs=0.005)
    assert fraction_of_updates_kept([weights.clone().requires_grad_()], PAPER_LR) == 1.0
    # Frozen parameters do not count; a strided sample weighs each tensor by its full size.
    frozen = torch.zeros(4096)
    sampled = fraction_of_updates_kept([weights.bfloat16().requires_grad_(), frozen], PAPER_LR, max_elements=4096)
    assert sampled == pytest.approx(measured, abs=0.01)
    assert math.isnan(fraction_of_updates_kept([frozen], PAPER_LR))


# ---------------------------------------------------------------- which weights AdamW updates, and the warning


@pytest.mark.parametrize(
    "weights, settings, expected",
    [
        ("float32", {}, torch.float32),
        ("bfloat16", {}, torch.bfloat16),  # DDP, single GPU, FSDP2: the loaded dtype
        ("bfloat16", {"deepspeed_mixed_precision": True}, torch.float32),  # ZeRO + bf16: fp32 master copies
        ("bfloat16", {"use_peft": True}, torch.float32),  # PEFT's autocast_adapter_dtype
        ("bfloat16", {"use_peft": True, "quantized": True}, torch.bfloat16),  # TRL casts QLoRA adapters
        ("auto", {}, None),
    ],
)
def test_trained_weight_dtype(weights, settings, expected):
    assert trained_weight_dtype(weights, **settings) == expected


def test_precision_warning_names_the_fix():
    warning = precision_warning(PAPER_LR, "bfloat16")
    assert all(field in warning for field in FIX_FIELDS) and "~4%" in warning
    assert precision_warning(PAPER_LR, torch.float32) is None
    assert precision_warning(PAPER_LR, "bfloat16", deepspeed_mixed_precision=True) is None
    assert precision_warning(1e-5, "bfloat16", use_peft=True) is None
    qlora = precision_warning(1e-5, "bfloat16", use_peft=True, quantized=True)
    assert "QLoRA" in qlora and "load_in_4bit" in qlora
    assert precision_warning(1e-3, "bfloat16") is None
    assert precision_warning(PAPER_LR, "auto") is None  # unknown until loaded: the run checks the weights


def test_precision_warning_reads_the_deepspeed_state(monkeypatch):
    model_args = SimpleNamespace(dtype="bfloat16", use_peft=False, load_in_4bit=False, load_in_8bit=False)
    ddp = SimpleNamespace(learning_rate=PAPER_LR, bf16=True, fp16=False, deepspeed=None, deepspeed_plugin=None)
    assert precision_warning_for_args(ddp, model_args) is not None
    with_config = SimpleNamespace(**{**vars(ddp), "deepspeed": "ds_zero2.json"})
    assert precision_warning_for_args(with_config, model_args) is None
    no_mixed_precision = SimpleNamespace(**{**vars(with_config), "bf16": False})  # DeepSpeed then keeps bf16 weights
    assert precision_warning_for_args(no_mixed_precision, model_args) is not None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # `accelerate launch` with a DeepSpeed config
    assert precision_warning_for_args(ddp, model_args) is None
    # dtype: auto takes the checkpoint's dtype when it is known
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    auto = SimpleNamespace(**{**vars(model_args), "dtype": "auto"})
    assert precision_warning_for_args(ddp, auto) is None
    assert precision_warning_for_args(ddp, auto, checkpoint_dtype=torch.bfloat16) is not None


# ---------------------------------------------------------------- real training on the tiny model


def _train_and_count_changed(model, tokenizer, output_dir):
    args = PolicySplitGRPOConfig(**training_args(output_dir, learning_rate=PAPER_LR, bf16=True, max_steps=3))
    trainer = PolicySplitGRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=args,
        train_dataset=arithmetic_dataset(16),
        processing_class=tokenizer,
    )
    warning = trainer_precision_warning(trainer)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = sum(int((after[name].detach() != value).sum()) for name, value in before.items())
    return changed / sum(value.numel() for value in before.values()), warning, trainer


def test_fp32_master_weights_with_bf16_autocast_train_every_parameter(tokenizer, tmp_path):
    # The recipes' setting: float32 weights, bf16 compute (autocast), the paper's learning rate.
    fraction, warning, trainer = _train_and_count_changed(build_model(tokenizer), tokenizer, tmp_path)
    assert trainer.state.global_step == 3
    assert trainer.accelerator.mixed_precision == "bf16"
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert fraction > 0.99
    assert warning is None


def test_bf16_weights_barely_train_and_the_warning_fires(tokenizer, tmp_path):
    model = build_model(tokenizer).to(torch.bfloat16)
    fraction, warning, trainer = _train_and_count_changed(model, tokenizer, tmp_path)
    assert trainer.state.global_step == 3
    assert fraction < 0.2  # ~4% of N(0, 0.02) weights; the norm weights (1.0) never move
    assert warning is not None and all(field in warning for field in FIX_FIELDS)
    assert "Only" in warning and float(warning.split("Only ")[1].split("%")[0]) / 100 < MIN_FRACTION_CHANGED


# ---------------------------------------------------------------- every recipe, and the CLI


def _parsed_trainings(recipe):
    """(label, training_args, model_args) of every training a recipe runs (a comparison: one per method)."""
    if "/compare/" in recipe:
        config = load_compare_config(recipe)
        for method in config.methods:
            if method != "original":  # evaluated, never trained
                _, training, model = parse_training(config, method)
                yield method, training, model
        return
    script, training, model = make_parser().parse_args_and_config(args=["--config", recipe, "--use_cpu", "true"])
    apply_method(script.method, training)
    yield script.method, training, model


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_recipe_keeps_its_updates(recipe):
    trainings = list(_parsed_trainings(recipe))
    assert trainings
    for label, training, model in trainings:
        assert precision_warning_for_args(training, model) is None, (label, model.dtype, training.learning_rate)
        # The check is not vacuous: the same recipe with pure low-precision trained weights is caught.
        variant = SimpleNamespace(**{**vars(model), "dtype": "bfloat16"})
        if model.use_peft:
            variant.load_in_4bit = True  # QLoRA: TRL casts the adapters to bf16
        assert precision_warning_for_args(training, variant) is not None, label


def test_dry_run_of_a_bf16_recipe_variant_warns(capsys):
    recipe = os.path.join(ROOT, "recipes", "paper", "qwen3_1.7b_policy_split.yaml")
    summary = run(["--config", recipe, "--dry_run"])
    assert summary["precision"] == "AdamW updates float32 weights, bf16 compute"
    assert "precision_warning" not in summary
    capsys.readouterr()
    summary = run(["--config", recipe, "--dry_run", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert summary["precision"] == "AdamW updates bfloat16 weights, bf16 compute"
    assert "precision_warning" in out and "learning_rate 3e-06" in out
    assert all(field in summary["precision_warning"] for field in FIX_FIELDS)


def test_a_real_run_warns_from_the_loaded_weights(tiny_model_path, tmp_path, capsys):
    trainer = run(
        [
            "--config",
            os.path.join(ROOT, "recipes", "quickstart.yaml"),
            "--model_name_or_path",
            tiny_model_path,
            "--output_dir",
            str(tmp_path),
            "--dtype",
            "bfloat16",
            "--learning_rate",
            "3e-6",
            "--max_steps",
            "1",
            "--max_completion_length",
            "8",
            "--num_generations",
            "4",
            "--per_device_train_batch_size",
            "4",
            "--mode_report",
            "false",
            "--use_cpu",
            "true",
            "--report_to",
            "none",
        ]
    )
    assert trainer.state.global_step == 1
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    out = capsys.readouterr().out
    assert "WARNING: Only" in out and "of the trainable weights (bfloat16)" in out
    assert all(field in out for field in FIX_FIELDS)
