"""Mode diagnostics (policy_split_trl/diagnostics.py): the math, the gradients against independent computations,
training left bitwise unchanged, and the same measurements on 2 processes as on 1."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset
from distributed_matrix import fake_generate_single_turn
from processes import free_port
from tiny_model import arithmetic_dataset, build_model, length_reward, training_args
from trl import GRPOTrainer

import policy_split_trl.trainer as trainer_module
from policy_split_trl import PolicySplitGRPOConfig, PolicySplitGRPOTrainer, diagnostics
from policy_split_trl.contexts import HE_KEY_PREFIX, expand_contexts
from policy_split_trl.diagnostics import (
    DIAGNOSTICS_PREFIX,
    check_mode_diagnostics,
    diagnostics_due,
    diagnostics_prompts,
    gradient_cosines,
    parameter_groups,
    plot_mode_diagnostics,
    prompt_hidden_cosines,
)

HERE = os.path.dirname(__file__)
G = 4
# Keys of a log entry that measure time, never equal between two runs.
TIMING_KEYS = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


# ---------------------------------------------------------------------------------------------- pure math
def test_gradient_cosines_against_hand_values():
    first = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]]), None]
    second = [torch.tensor([2.0, -1.0]), torch.tensor([[1.0]]), torch.tensor([5.0])]
    overall, groups = gradient_cosines(first, second, [("a",), ("a", "b"), ("c",)])
    # <g, h> = 2 - 2 + 3 + 0 = 3; |g|^2 = 1 + 4 + 9 = 14; |h|^2 = 4 + 1 + 1 + 25 = 31.
    assert overall.cosine == pytest.approx(3 / math.sqrt(14 * 31))
    assert (overall.norm_first, overall.norm_second) == pytest.approx((math.sqrt(14), math.sqrt(31)))
    # Group a = both first parameters: the cosine of the concatenation (3 / sqrt(14 * 6)), not the mean of the
    # parameters' cosines ((0 + 1) / 2).
    assert groups["a"].cosine == pytest.approx(3 / math.sqrt(14 * 6))
    assert groups["b"].cosine == pytest.approx(1.0)
    assert math.isnan(groups["c"].cosine)  # a zero gradient: no angle
    assert (groups["c"].norm_first, groups["c"].norm_second) == (0.0, 5.0)
    assert list(groups) == ["a", "b", "c"]
    # Signs: the opposite gradient gives the opposite cosines.
    negated, negated_groups = gradient_cosines(first, [-g for g in second], [("a",), ("a", "b"), ("c",)])
    assert negated.cosine == pytest.approx(-overall.cosine)
    assert negated_groups["b"].cosine == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        gradient_cosines(first, second[:2], [("a",), ("a",), ("c",)])


def test_parameter_groups_on_the_tiny_model_full_and_lora(tokenizer):
    model = build_model(tokenizer)
    names = [name for name, _ in model.named_parameters()]
    groups = dict(zip(names, parameter_groups(names), strict=True))
    assert groups["model.embed_tokens.weight"] == ("embed",)  # the tied LM head is this tensor
    assert groups["model.layers.0.self_attn.q_proj.weight"] == ("layers_0-0", "module/q_proj")
    assert groups["model.layers.1.mlp.down_proj.weight"] == ("layers_1-1", "module/down_proj")
    assert groups["model.layers.1.input_layernorm.weight"] == ("layers_1-1", "module/input_layernorm")
    assert groups["model.norm.weight"] == ("final_norm",)
    assert {g for member in groups.values() for g in member} == {
        "embed",
        "final_norm",
        "layers_0-0",
        "layers_1-1",
        "module/q_proj",
        "module/k_proj",
        "module/v_proj",
        "module/o_proj",
        "module/q_norm",
        "module/k_norm",
        "module/gate_proj",
        "module/up_proj",
        "module/down_proj",
        "module/input_layernorm",
        "module/post_attention_layernorm",
    }

    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    lora_model = peft.get_peft_model(build_model(tokenizer), lora)
    trainable = [name for name, p in lora_model.named_parameters() if p.requires_grad]
    lora_groups = dict(zip(trainable, parameter_groups(trainable), strict=True))
    assert lora_groups["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] == (
        "layers_0-0",
        "module/q_proj.lora_A",
    )
    assert lora_groups["base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"] == (
        "layers_1-1",
        "module/v_proj.lora_B",
    )
    assert len(lora_groups) == 8


def test_parameter_groups_depth_ranges_and_other_architectures():
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(28)]
    ranges = [g[0] for g in parameter_groups(names)]
    assert sorted(set(ranges)) == ["layers_00-06", "layers_07-13", "layers_14-20", "layers_21-27"]
    assert ranges[6] == "layers_00-06" and ranges[7] == "layers_07-13" and ranges[27] == "layers_21-27"
    assert sorted({g[0] for g in parameter_groups(names, num_layer_ranges=1)}) == ["layers_00-27"]
    assert parameter_groups(
        [
            "transformer.wte.weight",
            "transformer.h.3.attn.c_attn.bias",
            "transformer.ln_f.weight",
            "lm_head.weight",
            "gpt_neox.embed_out.weight",
            "model.layers.0.mlp.experts.gate_up_proj",
            "model.layers.0.mlp.experts.5.down_proj.weight",
            "score.weight",
        ]
    ) == [
        ("embed",),
        ("layers_3-3", "module/c_attn"),  # blocks 0-3 here: 4 ranges of one
        ("final_norm",),
        ("lm_head",),
        ("lm_head",),
        ("layers_0-0", "module/gate_up_proj"),
        ("layers_0-0", "module/down_proj"),
        ("other",),
    ]


def test_prompt_hidden_cosines_against_hand_values():
    # Row 0: normal prompt of 2 tokens, HE prompt of 3; row 1: normal prompt of 1 token (one column of left padding).
    normal = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[9.0, 9.0], [3.0, 4.0]]])
    high_entropy = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [1.0, 0.0]], [[7.0, 7.0], [1.0, 1.0], [4.0, 3.0]]])
    last, pooled = prompt_hidden_cosines(normal, high_entropy, torch.tensor([2, 1]), torch.tensor([3, 3]))
    # Last token: cos([0, 1], [1, 0]) = 0; cos([3, 4], [4, 3]) = 24 / 25.
    torch.testing.assert_close(last, torch.tensor([0.0, 24 / 25]))
    # Means over the normal prompt's positions, aligned from the end: row 0 [0.5, 0.5] vs [1, 0] -> 1/sqrt(2);
    # row 1 one position: the same as the last token (the padding and the system prompt's tokens are left out).
    torch.testing.assert_close(pooled, torch.tensor([1 / math.sqrt(2), 24 / 25]))


def test_diagnostics_due_from_the_global_step_alone():
    assert [step for step in range(8) if diagnostics_due(step, 3)] == [0, 3, 6]  # optimizer steps 1, 4, 7
    assert not any(diagnostics_due(step, 0) for step in range(8))


def test_diagnostics_prompts_eval_first_then_train():
    train = Dataset.from_list([{"prompt": f"train {i}"} for i in range(5)])
    evaluation = Dataset.from_list([{"prompt": f"eval {i}"} for i in range(2)])
    assert diagnostics_prompts(train, None, 3) == ["train 0", "train 1", "train 2"]
    assert diagnostics_prompts(train, evaluation, 3) == ["eval 0", "eval 1"]  # fewer when the dataset is shorter
    assert diagnostics_prompts(train, {"math": evaluation, "other": train}, 1) == ["eval 0"]
    assert diagnostics_prompts(train, None, 0) == []
    iterable = IterableDataset.from_generator(lambda: ({"prompt": f"stream {i}"} for i in range(10)))
    assert diagnostics_prompts(iterable, None, 2) == ["stream 0", "stream 1"]


# ---------------------------------------------------------------------------------------------- configuration
def base_settings(tmp_path, **overrides):
    settings = training_args(tmp_path / "out", num_generations=G, max_completion_length=8, max_steps=2)
    settings.update(overrides)
    return settings


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode_diagnostics_steps": -1}, "mode_diagnostics_steps must be an integer >= 0"),
        ({"mode_diagnostics_steps": 1, "mode_diagnostics_prompts": -2}, "mode_diagnostics_prompts must be"),
        ({"mode_diagnostics_steps": True}, "mode_diagnostics_steps must be an integer"),
        ({"mode_diagnostics_steps": 1, "fsdp": "full_shard"}, "not supported with FSDP"),
        ({"mode_diagnostics_steps": 1, "deepspeed": {"zero_optimization": {"stage": 3}}}, "DeepSpeed ZeRO-3"),
        ({"mode_diagnostics_steps": 1, "entropy_coef": 0.01}, "entropy_coef=0"),
        ({"mode_diagnostics_steps": 1, "top_entropy_quantile": 0.2}, "top_entropy_quantile=1.0"),
        (
            {
                "mode_diagnostics_steps": 1,
                "gradient_checkpointing": True,
                "gradient_checkpointing_kwargs": {"use_reentrant": True},
            },
            "use_reentrant",
        ),
        ({"mode_diagnostics_steps": 1, "normal_eta": 0.01}, "bonus_from_loss_pass=False"),
    ],
)
def test_config_rejects_what_the_diagnostics_cannot_measure(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        PolicySplitGRPOConfig(**base_settings(tmp_path, **overrides))


def test_config_accepts_and_reads_the_launcher(tmp_path, monkeypatch):
    # Off: nothing else is checked; on: the ablation works with the scoring pass.
    PolicySplitGRPOConfig(**base_settings(tmp_path, mode_diagnostics_steps=0, top_entropy_quantile=0.2))
    PolicySplitGRPOConfig(
        **base_settings(tmp_path, mode_diagnostics_steps=2, normal_eta=0.01, bonus_from_loss_pass=False)
    )
    config = PolicySplitGRPOConfig(**base_settings(tmp_path, mode_diagnostics_steps=5))
    assert (config.mode_diagnostics_steps, config.mode_diagnostics_prompts) == (5, 8)
    # `accelerate launch` with an FSDP or ZeRO-3 config file says so through the environment.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ValueError, match="ZeRO-3"):
        check_mode_diagnostics(config)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    check_mode_diagnostics(config)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "1")
    with pytest.raises(ValueError, match="FSDP"):
        check_mode_diagnostics(config)


# ---------------------------------------------------------------------------------------------- the trainer
def make_trainer(tmp_path, tokenizer, name="out", peft_config=None, **overrides):
    settings = base_settings(tmp_path, **overrides)
    settings["output_dir"] = str(tmp_path / name)
    return PolicySplitGRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=[length_reward],
        args=PolicySplitGRPOConfig(**settings),
        train_dataset=arithmetic_dataset(16),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


@pytest.fixture
def fast_rollouts(monkeypatch):
    """Rollouts from a deterministic function of the prompt (lengths 3-8, some ending in EOS) instead of sampling."""
    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", fake_generate_single_turn)


def flat_grads(params):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


class Capture:
    """
    Records each measurement's micro-batch and its two gradients (`(2, P)`), the gradient the training step leaves in
    `.grad` after each micro-step, and the advantages each loss pass ends with (the deferred bonus completes them).
    """

    def __init__(self, trainer):
        self.measurements, self.training_grads, self.advantages = [], [], []
        gradients, training_step = trainer._mode_gradients, trainer.training_step
        bonus = trainer._bonus_from_loss_pass

        def spy_gradients(unwrapped, inputs, params):
            result = gradients(unwrapped, inputs, params)
            self.measurements.append((dict(inputs), result.clone()))
            return result

        def spy_step(model, inputs, num_items_in_batch=None):
            loss = training_step(model, inputs, num_items_in_batch)
            self.training_grads.append(flat_grads([p for p in trainer.model.parameters() if p.requires_grad]).clone())
            return loss

        def spy_bonus(inputs, logps):
            result = bonus(inputs, logps)
            self.advantages.append(result.detach().clone())
            return result

        trainer._mode_gradients, trainer.training_step = spy_gradients, spy_step
        trainer._bonus_from_loss_pass = spy_bonus


def reference_gradient(model, rows, advantages, loss_type, normalizer):
    """
    The gradient of TRL's clipped surrogate of `rows` on-policy, written out: the ratio `exp(logp - sg(logp))` is 1, so
    `-min(ratio A, clip(ratio) A) = -ratio A`; `dapo` and `bnpo` sum it over the loss tokens and divide by
    `normalizer` (the generation batch's token count, the micro-batch's), `grpo` takes each row's token mean and
    divides their sum by `normalizer` (the micro-batch's row count). Log-probs from the plain causal LM (no fused head,
    no width cutting).
    """
    ids = torch.cat([rows["prompt_ids"], rows["completion_ids"]], 1)
    mask = torch.cat([rows["prompt_mask"], rows["completion_mask"]], 1)
    width = rows["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -width - 1 : -1].float()
    logps = logits.log_softmax(-1).gather(-1, rows["completion_ids"].unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logps - logps.detach())
    advantages = advantages if advantages.dim() == 2 else advantages.unsqueeze(1)
    per_token = -ratio * advantages * rows["completion_mask"]
    if loss_type == "grpo":
        per_token = per_token / rows["completion_mask"].sum(-1, keepdim=True).clamp(min=1)
    loss = per_token.sum() / normalizer
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def assert_close_vectors(actual, expected, rtol=1e-4):
    scale = expected.abs().max().item()
    assert scale > 0
    assert (actual - expected).abs().max().item() <= rtol * scale, (actual - expected).abs().max().item() / scale


@pytest.mark.parametrize(
    "settings",
    [
        {},  # the default optimized step: contexts in separate passes, the HE bonus from the loss pass (deferred)
        {"optimized_step": False},  # the straightforward path: finished advantages, one pass over both contexts
        {"rollout_sharing": False},  # Eq. 9: each rollout in its own context (the tool-mask split)
        {"loss_type": "grpo"},  # a mean over rows: each context's loss weighs by its share of the rows
        {"loss_type": "bnpo", "rollout_sharing": False},  # a mean over the micro-batch's tokens, split by the mask
    ],
    ids=["optimized", "straightforward", "no_sharing", "grpo", "bnpo_no_sharing"],
)
def test_gradients_equal_independent_computations(tmp_path, tokenizer, fast_rollouts, settings):
    # float32 throughout (TRL turns bf16 autocast on by default), so that the reference below can be exact to rounding.
    trainer = make_trainer(
        tmp_path, tokenizer, max_steps=1, bf16=False, mode_diagnostics_steps=1, mode_diagnostics_prompts=4, **settings
    )
    capture = Capture(trainer)
    trainer.train()
    assert len(capture.measurements) == 1 and len(capture.training_grads) == 1
    inputs, gradients = capture.measurements[0]
    normal_grad, he_grad = gradients
    # 1. The two contexts' gradients add up to the gradient the training step computed on the same micro-batch (one
    #    micro-batch per step here): the split is exact and weighted as in training.
    assert_close_vectors(normal_grad + he_grad, capture.training_grads[0])
    # 2. Each context's gradient equals the surrogate's gradient computed from scratch on that context's rows, at the
    #    initial weights (the measurement comes before step 1's update).
    model = build_model(tokenizer)
    if HE_KEY_PREFIX + "prompt_ids" in inputs:
        rows = expand_contexts(inputs)
        num = inputs["completion_ids"].size(0)
        normal_rows = {k: v[:num] for k, v in rows.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
        he_rows = {k: v[num:] for k, v in rows.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
        normal_adv, he_adv = normal_rows["advantages"], he_rows["advantages"]
        if "policy_split_rollout" in inputs:  # the deferred bonus: the HE advantages the training step's HE pass made
            he_adv = capture.advantages[-1]
            assert not torch.equal(he_adv, he_rows["advantages"].expand_as(he_adv))  # the bonus did something
    else:
        context = inputs["policy_split_context"].bool()
        num = context.size(0)
        rows = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.size(0) == num}
        normal_rows = {k: v[~context] for k, v in rows.items()}
        he_rows = {k: v[context] for k, v in rows.items()}
        normal_adv, he_adv = normal_rows["advantages"], he_rows["advantages"]
        assert context.any() and (~context).any()
    loss_type = trainer.loss_type
    if loss_type == "dapo":
        normalizer = inputs["num_items_in_batch"].float()
    elif loss_type == "bnpo":
        normalizer = float(normal_rows["completion_mask"].sum() + he_rows["completion_mask"].sum())
    else:  # grpo: rows of both contexts
        normalizer = float(normal_rows["completion_mask"].size(0) + he_rows["completion_mask"].size(0))
    assert_close_vectors(normal_grad, reference_gradient(model, normal_rows, normal_adv, loss_type, normalizer))
    assert_close_vectors(he_grad, reference_gradient(model, he_rows, he_adv, loss_type, normalizer))
    # Not vacuous: two different, non-zero gradients.
    cosine = F.cosine_similarity(normal_grad, he_grad, dim=0).item()
    assert abs(cosine) < 0.999 and normal_grad.norm() > 0 and he_grad.norm() > 0
    # 3. The logged values are the cosine and norms of these gradients.
    log = trainer.state.log_history[0]
    assert log[DIAGNOSTICS_PREFIX + "grad_cosine"] == pytest.approx(cosine, abs=1e-5)
    assert log[DIAGNOSTICS_PREFIX + "grad_norm/normal_context"] == pytest.approx(normal_grad.norm().item(), rel=1e-5)
    assert log[DIAGNOSTICS_PREFIX + "grad_norm/high_entropy_context"] == pytest.approx(he_grad.norm().item(), rel=1e-5)
    # 4. The hidden-state cosine of the first 4 training prompts, each run alone (no padding), at the initial weights.
    prompts = list(arithmetic_dataset(16)[:4]["prompt"])
    cosines = []
    with torch.no_grad():
        for prompt in prompts:
            states = []
            for messages in (
                prompt,
                [{"role": "system", "content": trainer.args.high_entropy_system_prompt}, *prompt],
            ):
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
                ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
                states.append(model.model(input_ids=ids).last_hidden_state[0, -1])
            cosines.append(F.cosine_similarity(*states, dim=0).item())
    assert log[DIAGNOSTICS_PREFIX + "hidden_cosine"] == pytest.approx(sum(cosines) / 4, abs=1e-5)
    assert 0 < log[DIAGNOSTICS_PREFIX + "hidden_cosine"] < 0.9999


def test_identical_contexts_give_cosine_one_and_negated_advantages_minus_one(
    tmp_path, tokenizer, fast_rollouts, monkeypatch
):
    # Sanity case: the HE "system prompt" patched away and eta = 0, so both contexts train the same rows with the same
    # advantages: the same gradient (cosine +1, equal norms) and the same hidden states.
    def no_system_prompt(prompt, system_prompt):
        return copy.deepcopy(prompt)

    monkeypatch.setattr(trainer_module, "apply_system_prompt", no_system_prompt)
    monkeypatch.setattr(diagnostics, "apply_system_prompt", no_system_prompt)
    trainer = make_trainer(
        tmp_path, tokenizer, max_steps=1, eta=0.0, mode_diagnostics_steps=1, mode_diagnostics_prompts=2
    )
    capture = Capture(trainer)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log[DIAGNOSTICS_PREFIX + "grad_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert log[DIAGNOSTICS_PREFIX + "grad_norm/normal_context"] == pytest.approx(
        log[DIAGNOSTICS_PREFIX + "grad_norm/high_entropy_context"], rel=1e-6
    )
    assert log[DIAGNOSTICS_PREFIX + "grad_norm/normal_context"] > 0
    assert log[DIAGNOSTICS_PREFIX + "hidden_cosine"] == pytest.approx(1.0, abs=1e-6)
    # The same micro-batch with the HE context's advantages negated: opposite gradients, cosine -1 overall and in
    # every group that has a gradient.
    inputs, _ = capture.measurements[0]
    negated = {**inputs, HE_KEY_PREFIX + "advantages": -inputs[HE_KEY_PREFIX + "advantages"]}
    trainer.model.train()
    overall, groups = trainer._mode_gradient_comparison(trainer.model, negated)
    assert overall.cosine == pytest.approx(-1.0, abs=1e-6)
    assert all(g.cosine == pytest.approx(-1.0, abs=1e-5) for g in groups.values() if not math.isnan(g.cosine))
    assert overall.norm_first == pytest.approx(overall.norm_second, rel=1e-6)


def diagnostics_free(log):
    return {k: v for k, v in log.items() if not k.startswith(DIAGNOSTICS_PREFIX) and k not in TIMING_KEYS}


def lora_config():
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


# Per variant: settings, and the logged steps (1-based) that are measured.
BITWISE_VARIANTS = {
    "full": ({}, [1, 2]),
    "lora": ({"gradient_checkpointing": True}, [1, 2]),  # autograd.grad through (non-reentrant) checkpointing
    # Two micro-batches per step, measured on the first one only, every 2 steps (step 2 is not), no hidden-state
    # prompts. The extra passes see the first micro-batch again, so anything they left behind (a metric, a bonus
    # statistic) would weigh it twice in the logs.
    "accumulation": (
        {"gradient_accumulation_steps": 2, "mode_diagnostics_steps": 2, "mode_diagnostics_prompts": 0},
        [1],
    ),
}


@pytest.mark.parametrize("variant", list(BITWISE_VARIANTS))
def test_training_is_bitwise_unchanged(tmp_path, tokenizer, monkeypatch, variant):
    settings, measured = BITWISE_VARIANTS[variant]
    if variant != "full":  # "full" samples its rollouts: the RNG the generation draws from must not move either
        monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", fake_generate_single_turn)
    peft_config = lora_config() if variant == "lora" else None
    runs = {}
    for name, on in (("off", False), ("on", True)):
        overrides = {"mode_diagnostics_steps": 1, **settings} if on else {**settings, "mode_diagnostics_steps": 0}
        trainer = make_trainer(tmp_path, tokenizer, name=name, peft_config=peft_config, **overrides)
        if variant == "full":
            # Dropout draws from the RNG in the extra passes; the training step's masks and the next step's rollouts
            # must not see it.
            for layer in trainer.model.model.layers:
                layer.self_attn.attention_dropout = 0.1
        capture = Capture(trainer)
        trainer.train()
        runs[name] = (trainer, capture)
    (off, _), (on, capture) = runs["off"], runs["on"]
    for (name, p_off), (_, p_on) in zip(off.model.named_parameters(), on.model.named_parameters(), strict=True):
        assert torch.equal(p_off, p_on), name
    logs_off, logs_on = off.state.log_history, on.state.log_history
    assert [diagnostics_free(h) for h in logs_off] == [diagnostics_free(h) for h in logs_on]
    assert not any(k.startswith(DIAGNOSTICS_PREFIX) for h in logs_off for k in h)
    step_logs = [h for h in logs_on if "loss" in h]
    assert [h["step"] for h in step_logs if DIAGNOSTICS_PREFIX + "grad_cosine" in h] == measured
    # The two contexts' gradients add up to what the training step's first micro-batch left in `.grad`.
    accumulation = settings.get("gradient_accumulation_steps", 1)
    assert len(capture.measurements) == len(measured)
    for (_, gradients), step in zip(capture.measurements, measured, strict=True):
        assert_close_vectors(gradients.sum(0), capture.training_grads[(step - 1) * accumulation])
    groups = {k.split("grad_cosine/", 1)[1] for h in logs_on for k in h if "grad_cosine/" in k}
    if variant == "lora":
        assert groups == {
            "layers_0-0",
            "layers_1-1",
            "module/q_proj.lora_A",
            "module/q_proj.lora_B",
            "module/v_proj.lora_A",
            "module/v_proj.lora_B",
        }
        # lora_B starts at 0, so lora_A gets no gradient at step 1 (no angle: None in the logs), and does at step 2.
        assert step_logs[0][DIAGNOSTICS_PREFIX + "grad_cosine/module/q_proj.lora_A"] is None
        assert -1 <= step_logs[1][DIAGNOSTICS_PREFIX + "grad_cosine/module/q_proj.lora_A"] <= 1
    else:
        assert {"embed", "final_norm", "layers_0-0", "layers_1-1", "module/q_proj"} <= groups
    hidden = variant != "accumulation"
    keys = ["grad_cosine"] + (["hidden_cosine", "hidden_cosine/prompt_mean"] if hidden else [])
    for h in step_logs:
        if h["step"] in measured:
            assert all(-1 <= h[DIAGNOSTICS_PREFIX + key] <= 1 for key in keys)
        assert (DIAGNOSTICS_PREFIX + "hidden_cosine" in h) == (hidden and h["step"] in measured)
    assert os.path.getsize(tmp_path / "on" / "mode_diagnostics.png") > 1000
    assert not (tmp_path / "off" / "mode_diagnostics.png").exists()


def test_extra_passes_leave_the_trainer_and_its_callbacks_as_they_were(tmp_path, tokenizer, fast_rollouts):
    overrides = {}
    if "eta_schedule" in PolicySplitGRPOConfig.__dataclass_fields__:
        # The adaptive-eta controller (a callback) sums the KL that the loss pass of a deferred bonus measures.
        overrides = {"eta_schedule": "adaptive", "target_kl_high_entropy_normal": 1.0}
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1, mode_diagnostics_steps=1, **overrides)
    objects = [trainer, *trainer.callback_handler.callbacks]
    seen = {}
    compare, run = trainer._mode_gradient_comparison, trainer._run_mode_diagnostics

    def state():
        return [dict(vars(obj)) for obj in objects], copy.deepcopy(trainer._metrics)

    def spy_compare(unwrapped, inputs):
        result = compare(unwrapped, inputs)
        seen["inside"] = state()
        return result

    def spy_run(model, inputs):
        seen["before"] = state()
        run(model, inputs)
        seen["after"] = state()

    trainer._mode_gradient_comparison, trainer._run_mode_diagnostics = spy_compare, spy_run
    trainer.train()
    (before, metrics_before), (inside, metrics_inside) = seen["before"], seen["inside"]
    after, metrics_after = seen["after"]
    # Inside the measurement the loss passes did log metrics and (adaptive eta) feed the controller: there is something
    # to put back. The normal context's log-probs that the HE pass needs live in the `LossStep` the measurement opens
    # and closes around its passes: none is left bound after them.
    assert len(metrics_inside["train"].get("entropy", [])) > len(metrics_before["train"].get("entropy", []))
    assert inside[0].get("_loss_step") is None and before[0].get("_loss_step") is None
    if overrides:
        controller = next(i for i, obj in enumerate(objects) if type(obj).__name__ == "EtaControllerCallback")
        assert inside[controller]["kl_count"] > before[controller]["kl_count"]
    # After: every attribute of the trainer and of each callback bound to what it was bound to (the metrics are a
    # restored copy, the step of the last measurement is new), and the metrics as they were plus the diagnostics.
    for index, (attributes_before, attributes_after) in enumerate(zip(before, after, strict=True)):
        names = attributes_before.keys() | attributes_after.keys()
        changed = {n for n in names if attributes_before.get(n, "missing") is not attributes_after.get(n, "missing")}
        assert changed <= ({"_metrics", "_mode_diagnostics_step"} if index == 0 else set()), (objects[index], changed)
    diagnostics_free_metrics = {
        k: v for k, v in metrics_after["train"].items() if not k.startswith(DIAGNOSTICS_PREFIX)
    }
    assert diagnostics_free_metrics == dict(metrics_before["train"])
    assert metrics_after["eval"] == metrics_before["eval"]
    assert metrics_after["train"][DIAGNOSTICS_PREFIX + "grad_cosine"]


def test_plot_mode_diagnostics(tmp_path):
    first = {
        "grad_cosine": 0.5,
        "grad_cosine/embed": 0.2,
        "grad_cosine/module/q_proj.lora_A": None,  # no angle (a zero gradient): a gap in the line
        "grad_norm/normal_context": 1.0,
        "grad_norm/high_entropy_context": 2.0,
        "hidden_cosine": 0.9,
        "hidden_cosine/prompt_mean": 0.8,
    }
    third = {"grad_cosine": -0.1, "grad_cosine/embed": -0.3}
    history = [
        {"step": 1, "loss": 0.1, **{DIAGNOSTICS_PREFIX + k: v for k, v in first.items()}},
        {"step": 2, "loss": 0.1},
        {"step": 3, "loss": 0.1, **{DIAGNOSTICS_PREFIX + k: v for k, v in third.items()}},
    ]
    path = tmp_path / "plots" / "mode_diagnostics.png"
    assert plot_mode_diagnostics(history, str(path)) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_mode_diagnostics([{"step": 1, "loss": 0.1}], str(tmp_path / "none.png")) is None
    assert not (tmp_path / "none.png").exists()


# ---------------------------------------------------------------------------------------------- 2 processes


def run_layout(out_dir, processes: int) -> list[dict]:
    out_dir.mkdir(parents=True)
    script = os.path.join(HERE, "diagnostics_run.py")
    if processes == 1:
        cmd = [sys.executable, script, str(out_dir)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(free_port()),
            script,
            str(out_dir),
        ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TQDM_DISABLE": "1",
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if "arn" not in line]  # drop (W|w)arnings
        raise AssertionError(f"{processes}-process run failed:\n" + "\n".join(lines[-50:]))
    summary = json.loads((out_dir / f"summary-ws{processes}.json").read_text())
    for cell in summary:
        cell["weights"] = torch.load(out_dir / f"weights-{cell['name']}-ws{processes}.pt")
    return summary


def test_two_processes_measure_the_same_global_gradients(tmp_path):
    two = {cell["name"]: cell for cell in run_layout(tmp_path / "two", 2)}
    one = {cell["name"]: cell for cell in run_layout(tmp_path / "one", 1)}
    for name, cell in two.items():
        rank0, rank1 = cell["per_rank"]
        assert cell["global_step"] == 2 and cell["ranks_same_weights"], name
        # The same passes and collectives on both processes at every step, and still one DDP gradient all-reduce.
        assert rank0["steps"] == rank1["steps"], name
        assert all(step["ddp_gradient_allreduce"] == 1 for step in rank0["steps"]), name
        # Both processes log identical diagnostics (the global gradients' cosines, the same prompts).
        assert rank0["diagnostics"] == rank1["diagnostics"], name
        # ... which are those of the same global batch trained in one process (a process's own gradients would differ
        # by far more than rounding).
        for multi, single in zip(rank0["diagnostics"], one[name]["per_rank"][0]["diagnostics"], strict=True):
            assert multi.keys() == single.keys(), name
            for key, value in multi.items():
                assert (value is None) == (single[key] is None), (name, key)
                if value is not None:
                    assert value == pytest.approx(single[key], rel=1e-5, abs=1e-6), (name, key)
    off, on = two["off"], two["on"]
    # Diagnostics on: the same weights and training metrics as off, on 2 processes.
    assert torch.equal(off["weights"], on["weights"])
    assert [diagnostics_free(h) for h in off["per_rank"][0]["metrics"]] == [
        diagnostics_free(h) for h in on["per_rank"][0]["metrics"]
    ]
    assert all(h.get(DIAGNOSTICS_PREFIX + "grad_cosine") is not None for h in on["per_rank"][0]["diagnostics"])
    # The extra work of a measured step: one loss pass and one autograd.grad per context, 2 x 2 prompt forwards (3
    # prompts in batches of 2, per context) on the decoder, and one more all-reduce (the gradients) than the loss
    # passes' own collectives; no extra backward through accelerate.
    for step_off, step_on in zip(off["per_rank"][0]["steps"], on["per_rank"][0]["steps"], strict=True):
        assert step_on["forward"] - step_off["forward"] == 2
        assert step_on["decoder_forward"] - step_off["decoder_forward"] == 2 + 4
        assert step_on.get("autograd_grad") == 2 and "autograd_grad" not in step_off
        assert step_on["backward"] == step_off["backward"]
        assert step_on["all_reduce"] > step_off["all_reduce"]
    assert all(step["autograd_grad"] == 2 for step in two["on_no_sharing"]["per_rank"][0]["steps"])
