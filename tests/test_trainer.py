"""Real training runs of PolicySplitGRPOTrainer on a tiny Qwen3 (CPU, offline)."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from tiny_model import arithmetic_dataset, build_model, contains_digit_reward, length_reward, training_args
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

from policy_split_trl import HIGH_ENTROPY_SYSTEM_PROMPT, PolicySplitGRPOConfig, PolicySplitGRPOTrainer
from policy_split_trl.advantages import group_advantages
from policy_split_trl.contexts import HE_KEY_PREFIX, expand_contexts

G = 4
ETA, KAPPA = 0.03, 2.0


def config(tmp_path, **kwargs):
    base = training_args(
        tmp_path / "out",
        num_generations=G,
        max_steps=3,
        eta=ETA,
        kappa=KAPPA,
        # These tests pin down the method on the straightforward path, whose generation step returns the finished
        # advantages; tests/test_optimized_step.py checks that the default optimized step computes the same.
        optimized_step=False,
    )
    base.update(kwargs)
    return PolicySplitGRPOConfig(**base)


class Recorder:
    """Reward function that records what TRL passes it (one reward per completion)."""

    def __init__(self):
        self.calls = []
        recorder = self

        def record_reward(prompts, completions, policy_split_mode, **kwargs):
            rewards = length_reward(completions)
            recorder.calls.append({"prompts": prompts, "modes": policy_split_mode, "rewards": rewards})
            return rewards

        self.func = record_reward


def spy_outputs(trainer):
    """
    Record every output of `_generate_and_score_completions` (before TRL shuffles it) as the rows the loss trains
    (`expand_contexts`): with sharing, rows [0, B) every rollout in the normal context, rows [B, 2B) in the HE context.
    """
    outputs = []
    original = trainer._generate_and_score_completions

    def spy(inputs):
        out = original(inputs)
        rows = expand_contexts(out)
        outputs.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in rows.items()})
        return out

    trainer._generate_and_score_completions = spy
    return outputs


def initial_model(trainer, tokenizer):
    """The tiny model with its initial weights, patched with TRL's fused LM head like the trainer's own."""
    model = build_model(tokenizer)
    add_fused_lm_head(model, temperature=trainer.temperature, outputs=("log_probs", "entropy"))
    return model


def direct_logps(trainer, model, out):
    """Per-token log-probs of each row's completion after its own prompt, scored by `model` through TRL's path."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        return trainer._get_per_token_logps_and_entropies(model, ids, mask, out["completion_ids"].size(1))[0]


def assert_rows_scored_in_own_context(trainer, model, out, key):
    """`out[key]` equals each row's log-probs in its own context, and is told apart from the other context's."""
    b = out["prompt_ids"].size(0) // 2
    mask = out["completion_mask"].bool()
    expected = direct_logps(trainer, model, out)
    torch.testing.assert_close(out[key][mask], expected[mask], rtol=0, atol=1e-5)
    swapped = {**out, "prompt_ids": out["prompt_ids"].roll(b, 0), "prompt_mask": out["prompt_mask"].roll(b, 0)}
    assert (out[key] - direct_logps(trainer, model, swapped))[mask].abs().max() > 1e-3


def make_trainer(tmp_path, tokenizer, model=None, rewards=None, dataset=None, **kwargs):
    model = model if model is not None else build_model(tokenizer)
    return PolicySplitGRPOTrainer(
        model=model,
        reward_funcs=rewards or [length_reward],
        args=config(tmp_path, **kwargs),
        train_dataset=dataset if dataset is not None else arithmetic_dataset(16),
        processing_class=tokenizer,
    )


def policy_split_logs(trainer, prefix=""):
    return [h for h in trainer.state.log_history if f"{prefix}policy_split/bonus/abs_mean" in h]


PER_MODE_KEYS = [
    "policy_split/normal/reward",
    "policy_split/high_entropy/reward",
    "policy_split/normal/completion_length",
    "policy_split/high_entropy/completion_length",
    "policy_split/kl_high_entropy_normal",
    "policy_split/kl_normal_high_entropy",
    "policy_split/bonus/abs_mean",
    "policy_split/bonus/clip_fraction",
    "policy_split/entropy/normal_context",
    "policy_split/entropy/high_entropy_context",
]


def check_sharing_output(out, num_rollouts, eta=ETA, kappa=KAPPA, placement="inside_clip"):
    """The SPEC §2.10 invariant on one generation batch with sharing: rows [0, B) normal, [B, 2B) HE context."""
    assert "policy_split_rollout" not in out, "the optimized step completes the advantages in the loss pass"
    b = num_rollouts
    assert out["prompt_ids"].size(0) == 2 * b
    assert torch.equal(out["completion_ids"][:b], out["completion_ids"][b:])
    assert out["policy_split_context"].tolist() == [0] * b + [1] * b
    mask = out["completion_mask"].bool()
    adv = out["advantages"]
    assert adv.shape == out["completion_ids"].shape
    normal, he = adv[:b], adv[b:]
    for i in range(b):  # one advantage value for all tokens of a normal-context row
        values = normal[i][mask[i]]
        assert torch.all(values == values[0])
    a = normal[:, 0]
    limit = (eta if placement == "outside_clip" else 1.0) * a.abs() / kappa
    assert ((he - a.unsqueeze(1)).abs() <= limit.unsqueeze(1) + 1e-6)[mask[b:]].all()
    assert out["num_items_in_batch"].item() == mask.sum().item()
    return a


def test_training_shares_rollouts_and_logs_per_mode_metrics(tmp_path, tokenizer):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, tokenizer, rewards=[recorder.func])
    outputs = spy_outputs(trainer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    assert trainer.state.global_step == 3
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)

    # The generation batch holds G/2 HE prompts per group, at the configured positions.
    for call in recorder.calls:
        assert call["modes"] == ["normal", "normal", "high_entropy", "high_entropy"] * 2
        for prompt, mode in zip(call["prompts"], call["modes"]):
            has_s = prompt[0]["role"] == "system" and prompt[0]["content"] == HIGH_ENTROPY_SYSTEM_PROMPT
            assert has_s == (mode == "high_entropy")

    for out, call in zip(outputs, recorder.calls):
        a = check_sharing_output(out, num_rollouts=8)
        # A_i is Eq. 2 over the joint group of G (normal + HE rollouts together)
        expected = group_advantages(torch.tensor(call["rewards"]), G)
        torch.testing.assert_close(a, expected, rtol=1e-4, atol=1e-5)
        assert (out["advantages"][8:] != a.unsqueeze(1))[out["completion_mask"][8:].bool()].any()
        # HE-context prompts decode with the system prompt; normal-context prompts without
        texts = tokenizer.batch_decode(out["prompt_ids"], skip_special_tokens=False)
        assert all(HIGH_ENTROPY_SYSTEM_PROMPT in t for t in texts[8:])
        assert not any(HIGH_ENTROPY_SYSTEM_PROMPT in t for t in texts[:8])

    logs = policy_split_logs(trainer)
    assert len(logs) == 3
    for key in PER_MODE_KEYS:
        for log in logs:
            assert math.isfinite(log[key]), key
    assert 0.0 <= logs[-1]["policy_split/bonus/clip_fraction"] <= 1.0


def test_custom_mode_split(tmp_path, tokenizer):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, tokenizer, rewards=[recorder.func], num_high_entropy_generations=1, max_steps=2)
    outputs = spy_outputs(trainer)
    trainer.train()
    for call in recorder.calls:
        assert call["modes"] == ["normal", "normal", "normal", "high_entropy"] * 2
    for out in outputs:
        check_sharing_output(out, 8)


def test_loss_is_a_token_mean_over_both_contexts(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1)
    inputs = [row for row in arithmetic_dataset(2) for _ in range(G)]
    trainer.model.train()
    out = trainer._generate_and_score_completions(inputs)
    trainer.current_gradient_accumulation_steps = 1
    rows = expand_contexts(out)
    mask = rows["completion_mask"].float()
    adv = rows["advantages"]
    # On-policy (no old log-probs): every ratio is 1, so the dapo loss is -sum(A) / #tokens of BOTH contexts.
    loss = trainer.compute_loss(trainer.model, out)
    expected = -(adv * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    normal_sum, he_sum = (adv[:8] * mask[:8]).sum(), (adv[8:] * mask[8:]).sum()
    torch.testing.assert_close(loss, -(normal_sum + he_sum) / (2 * mask[:8].sum()), rtol=1e-5, atol=1e-6)

    # Every other loss type keeps its own normalization over the 2B rows.
    expected_by_type = {
        "grpo": (-(adv * mask).sum(1) / mask.sum(1)).mean(),  # per-row token mean, then mean over rows
        "bnpo": -(adv * mask).sum() / mask.sum(),  # token mean of the micro-batch
        "dr_grpo": -(adv * mask).sum() / (adv.size(0) * trainer.max_completion_length),
    }
    for loss_type in ("grpo", "bnpo", "dr_grpo", "sapo", "luspo", "cispo", "vespo"):
        trainer.loss_type = loss_type
        loss = trainer.compute_loss(trainer.model, out)
        assert torch.isfinite(loss), loss_type
        if loss_type in ("grpo", "bnpo", "dr_grpo"):
            torch.testing.assert_close(loss, expected_by_type[loss_type], rtol=1e-5, atol=1e-6)


def test_without_sharing_each_rollout_trains_in_its_own_context(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, rollout_sharing=False, max_steps=2)
    outputs = spy_outputs(trainer)
    trainer.train()
    for out in outputs:
        assert out["prompt_ids"].size(0) == 8
        is_he = out["policy_split_context"].bool()
        assert is_he.tolist() == [False, False, True, True] * 2
        mask = out["completion_mask"].bool()
        texts = tokenizer.batch_decode(out["prompt_ids"])
        assert [HIGH_ENTROPY_SYSTEM_PROMPT in t for t in texts] == is_he.tolist()
        adv = out["advantages"]
        for i in range(8):
            if not is_he[i]:
                assert torch.all(adv[i][mask[i]] == adv[i][mask[i]][0])
        assert out["num_items_in_batch"].item() == mask.sum().item()
        # the bonus is still computed (from both contexts) for the HE rows
        he_adv = adv[is_he]
        assert (he_adv != he_adv[:, :1])[mask[is_he]].any()
    assert all(math.isfinite(log["policy_split/kl_high_entropy_normal"]) for log in policy_split_logs(trainer))


def test_eta_zero_is_grpo_with_sharing(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, eta=0.0, max_steps=2)
    outputs = spy_outputs(trainer)
    trainer.train()
    for out in outputs:
        assert torch.equal(out["advantages"][:8], out["advantages"][8:])
    assert all(log["policy_split/bonus/abs_mean"] == 0.0 for log in policy_split_logs(trainer))


def test_eta_outside_clip(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, eta=0.5, eta_placement="outside_clip", max_steps=1)
    outputs = spy_outputs(trainer)
    trainer.train()
    check_sharing_output(outputs[0], 8, eta=0.5, placement="outside_clip")


def test_num_iterations_2_uses_old_logps_of_both_contexts(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, num_iterations=2, max_steps=4)
    outputs = spy_outputs(trainer)
    trainer.train()
    assert trainer.state.global_step == 4
    assert len(outputs) == 2  # one generation batch per two optimizer steps
    out = outputs[0]
    check_sharing_output(out, 8)
    assert out["old_per_token_logps"].shape == out["completion_ids"].shape
    # old log-probs are the generating policy's, in each row's own context
    assert_rows_scored_in_own_context(trainer, initial_model(trainer, tokenizer), out, "old_per_token_logps")


def test_steps_per_generation_2(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, steps_per_generation=2, max_steps=4, per_device_train_batch_size=4)
    outputs = spy_outputs(trainer)
    trainer.train()
    assert trainer.state.global_step == 4
    assert len(outputs) == 2
    for out in outputs:
        check_sharing_output(out, 8)
        assert "old_per_token_logps" in out  # generation is ahead of the optimizer: importance ratios needed


def test_beta_has_reference_logps_for_both_contexts(tmp_path, tokenizer, tiny_model_path):
    trainer = make_trainer(
        tmp_path, tokenizer, model=tiny_model_path, beta=0.04, max_steps=2, gradient_checkpointing=True
    )
    outputs = spy_outputs(trainer)
    trainer.train()
    out = outputs[0]
    check_sharing_output(out, 8)
    # at the first generation the reference equals the initial policy, in each row's own context
    assert_rows_scored_in_own_context(trainer, initial_model(trainer, tokenizer), out, "ref_per_token_logps")
    assert all(math.isfinite(h["kl"]) for h in trainer.state.log_history if "kl" in h)


def test_lora(tmp_path, tokenizer):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = PolicySplitGRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=[length_reward],
        args=config(tmp_path, max_steps=2, beta=0.04),
        train_dataset=arithmetic_dataset(16),
        processing_class=tokenizer,
        peft_config=lora,
    )
    outputs = spy_outputs(trainer)
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    base_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora" not in n}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(params[n], p) for n, p in lora_before.items())
    assert all(torch.equal(params[n], p) for n, p in base_before.items())
    check_sharing_output(outputs[0], 8)
    # the reference is the adapter-disabled model: the initial weights (lora_B starts at 0)
    assert_rows_scored_in_own_context(trainer, initial_model(trainer, tokenizer), outputs[-1], "ref_per_token_logps")
    assert len(policy_split_logs(trainer)) == 2


def test_checkpoint_resume_continues_the_global_step(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert checkpoint.is_dir()
    card = tmp_path / "out" / "checkpoint-2" / "README.md"
    if not card.exists():
        card = tmp_path / "out" / "README.md"
    assert "policy-split" in card.read_text()

    resumed = make_trainer(tmp_path, tokenizer, max_steps=4, save_strategy="steps", save_steps=2)
    outputs = spy_outputs(resumed)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    assert len(outputs) == 2  # only steps 3 and 4 ran after the resume
    steps = [h["step"] for h in resumed.state.log_history if "policy_split/bonus/abs_mean" in h]
    assert steps == [1, 2, 3, 4]


def test_eval_logs_per_mode_metrics(tmp_path, tokenizer):
    recorder = Recorder()
    trainer = PolicySplitGRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=[recorder.func, contains_digit_reward],
        args=config(
            tmp_path,
            max_steps=2,
            eval_strategy="steps",
            eval_steps=2,
            per_device_eval_batch_size=8,
            num_generations_eval=4,
            num_high_entropy_generations_eval=1,
        ),
        train_dataset=arithmetic_dataset(16),
        eval_dataset=arithmetic_dataset(4, seed=1),
        processing_class=tokenizer,
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 1
    for key in PER_MODE_KEYS:
        assert math.isfinite(evals[0][f"eval_{key}"]), key
    assert math.isfinite(evals[0]["eval_policy_split/high_entropy/rewards/contains_digit_reward/mean"])
    # 2 training generations (2 normal + 2 HE per group), then 4 eval prompts x 4 (3 normal + 1 HE per group)
    assert [c["modes"] for c in recorder.calls[:2]] == [["normal", "normal", "high_entropy", "high_entropy"] * 2] * 2
    eval_calls = recorder.calls[2:]
    assert sum(len(c["modes"]) for c in eval_calls) == 16
    for call in eval_calls:
        assert call["modes"] == ["normal", "normal", "normal", "high_entropy"] * (len(call["modes"]) // 4)


def test_model_card_has_policy_split_tag(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1)
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "policy-split" in card and "trl" in card and "grpo" in card
    assert "2604.11510" in card
    assert "policy-split" in trainer.model.model_tags


def test_plain_text_prompts(tmp_path, tokenizer):
    recorder = Recorder()
    trainer = make_trainer(
        tmp_path, tokenizer, rewards=[recorder.func], dataset=arithmetic_dataset(8, conversational=False), max_steps=1
    )
    outputs = spy_outputs(trainer)
    trainer.train()
    for prompt, mode in zip(recorder.calls[0]["prompts"], recorder.calls[0]["modes"]):
        assert prompt.startswith(HIGH_ENTROPY_SYSTEM_PROMPT + "\n\n") == (mode == "high_entropy")
    check_sharing_output(outputs[0], 8)


def test_rejects_a_plain_grpo_config(tmp_path, tokenizer):
    from trl import GRPOConfig

    with pytest.raises(TypeError, match="PolicySplitGRPOConfig"):
        PolicySplitGRPOTrainer(
            model=build_model(tokenizer),
            reward_funcs=[length_reward],
            args=GRPOConfig(
                output_dir=str(tmp_path),
                report_to="none",
                use_cpu=True,
                per_device_train_batch_size=8,
                num_generations=4,
            ),
            train_dataset=arithmetic_dataset(8),
            processing_class=tokenizer,
        )


def test_vllm_importance_sampling_is_shared_by_the_twin_row(tmp_path, tokenizer):
    """vLLM's sampler correction belongs to the generating context; the twin row reuses it (SPEC §2.11)."""
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1)
    trainer.model.train()
    # Pretend vLLM generated: TRL's transformers path produces the tokens, the "sampler" log-probs are the trainer's
    # own (scored in the generating context) plus a known mismatch, and one token vLLM could not score (None).
    trainer.use_vllm = True
    trainer.vllm_importance_sampling_correction = True
    trainer.vllm_importance_sampling_mode = "token_truncate"
    trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max = None, 10.0
    real_generate = GRPOTrainer._generate_single_turn

    def fake_vllm(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        trainer.use_vllm = False
        completion_ids, _ = real_generate(trainer, prompt_ids, images, multimodal_fields, num_generations)
        trainer.use_vllm = True
        logprobs = []
        for p, c in zip(prompt_ids, completion_ids):
            ids = torch.tensor([p + c])
            with torch.no_grad():
                lp = F.log_softmax(trainer.model(input_ids=ids).logits[0, len(p) - 1 : -1].float(), -1)
            seq = (lp.gather(-1, torch.tensor(c).unsqueeze(-1)).squeeze(-1) - 0.1).tolist()
            seq[0] = None
            logprobs.append(seq)
        return completion_ids, logprobs

    trainer._generate_single_turn = fake_vllm
    inputs = [row for row in arithmetic_dataset(2) for _ in range(G)]
    out = trainer._generate_and_score_completions(inputs)
    rows = expand_contexts(out)
    b, mask = 8, rows["completion_mask"].bool()
    ratio = rows["importance_sampling_ratio"]
    assert torch.equal(ratio[:b], ratio[b:])
    # mismatch of +0.1 nats in the generating context -> ratio exp(0.1) on every token but the unscored first one
    torch.testing.assert_close(
        ratio[:, 1:][mask[:, 1:]], torch.full_like(ratio[:, 1:][mask[:, 1:]], math.exp(0.1)), rtol=1e-3, atol=1e-3
    )
    assert torch.all(ratio[:, 0] == 1.0)
    sampling, old = rows["sampling_per_token_logps"], rows["old_per_token_logps"]
    assert torch.isfinite(sampling).all()
    gap = (sampling - old)[mask]
    torch.testing.assert_close(gap.reshape(2, -1)[0], gap.reshape(2, -1)[1], rtol=1e-5, atol=1e-5)
    assert (sampling - old)[:, 0].abs().max() < 1e-6  # unscored token: no correction, no NaN
    trainer.current_gradient_accumulation_steps = 1
    trainer.off_policy_mask_threshold = 0.5  # OPSM reads sampling log-probs: must not mask shared rows wholesale
    assert torch.isfinite(trainer.compute_loss(trainer.model, out))


def test_vllm_server_generates_each_mode_from_its_own_prompt(tmp_path, tokenizer, monkeypatch):
    trainer = make_trainer(tmp_path, tokenizer, max_steps=1, num_generations=8, num_high_entropy_generations=2)
    seen = []
    monkeypatch.setattr(
        GRPOTrainer,
        "_generate_single_turn",
        lambda self, p, i, m, num_generations, h=False: seen.append(num_generations) or ([], None),
    )
    trainer.use_vllm, trainer.vllm_mode = True, "server"
    trainer.model.train()
    trainer._generate_single_turn([[1]] * 8, None, {}, 8)
    trainer.vllm_mode = "colocate"
    trainer._generate_single_turn([[1]] * 8, None, {}, 8)
    # server: runs of 6 normal + 2 HE prompts -> n = gcd(6, 2) = 2 samples per distinct prompt; colocate untouched
    assert seen == [2, 8]


def test_no_nan_when_all_rewards_are_equal(tmp_path, tokenizer):
    def constant_reward(completions, **kwargs):
        return [1.0] * len(completions)

    trainer = make_trainer(tmp_path, tokenizer, rewards=[constant_reward], max_steps=2)
    outputs = spy_outputs(trainer)
    trainer.train()
    for out in outputs:
        assert torch.equal(out["advantages"], torch.zeros_like(out["advantages"]))
    for log in policy_split_logs(trainer):
        assert log["policy_split/bonus/abs_mean"] == 0.0
        assert log["policy_split/bonus/clip_fraction"] == 0.0
        assert math.isfinite(log["loss"])


@pytest.mark.skipif(os.environ.get("POLICY_SPLIT_SKIP_SLOW") == "1", reason="slow")
def test_gradient_accumulation(tmp_path, tokenizer):
    trainer = make_trainer(
        tmp_path, tokenizer, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2
    )
    outputs = spy_outputs(trainer)
    trainer.train()
    assert trainer.state.global_step == 2
    for out in outputs:
        check_sharing_output(out, 8)


def test_every_micro_batch_holds_both_contexts_of_its_rollouts(tmp_path, tokenizer, monkeypatch):
    """
    TRL shuffles a generation batch's rows and splits them into micro-batches. A row is a rollout carrying both of its
    contexts, so every micro-batch trains each of its rollouts in both contexts: the same structure on every process.
    """
    trainer = make_trainer(
        tmp_path, tokenizer, per_device_train_batch_size=2, steps_per_generation=4, max_steps=4, optimized_step=True
    )
    passes = []
    original = GRPOTrainer._compute_loss

    def record(self, model, inputs):
        passes.append((inputs["policy_split_context"].tolist(), inputs["completion_ids"].clone()))
        return original(self, model, inputs)

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", record)
    micro_batches = []
    original_loss = trainer._compute_loss

    def record_micro_batch(model, inputs):
        micro_batches.append(inputs)
        return original_loss(model, inputs)

    trainer._compute_loss = record_micro_batch
    trainer.train()
    assert len(micro_batches) == 4
    for inputs in micro_batches:
        assert HE_KEY_PREFIX + "prompt_ids" in inputs and inputs["completion_ids"].size(0) == 2
    # Each micro-batch: a normal-context pass and HE-context pass(es) over the same two rollouts.
    steps = [passes[i : i + len(passes) // 4] for i in range(0, len(passes), len(passes) // 4)]
    for step, inputs in zip(steps, micro_batches):
        assert step[0][0] == [0, 0] and all(set(ctx) == {1} for ctx, _ in step[1:])
        assert torch.equal(torch.cat([ids for _, ids in step[1:]]), step[0][1])
        torch.testing.assert_close(step[0][1], inputs["completion_ids"])


@pytest.mark.parametrize("rollout_sharing", [True, False])
def test_quarter_token_mean_is_the_mean_of_quarter_token_means(tmp_path, tokenizer, monkeypatch, rollout_sharing):
    """
    On-policy the clipped surrogate of a token is `-A_t` (ratio 1), so TRL's `dapo` loss is `-sum A_t / N` and the
    `quarter_token_mean` loss must be `-(1/Q) sum_q mean_{t in q} A_t` over the (context, generating mode) quarters.
    """

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        # Normal rollouts of 9-12 tokens, HE rollouts of 2-4 ending in EOS: the quarters have very different sizes.
        eos = self.processing_class.eos_token_id
        lengths = [9 + i % 4 if i % G < G // 2 else 2 + i % 3 for i in range(len(prompt_ids))]
        return [[20 + (i * 7 + t) % 300 for t in range(n - 1)] + [eos] for i, n in enumerate(lengths)], None

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", generate)
    kwargs = {"eta": 0.5, "rollout_sharing": rollout_sharing, "max_steps": 1}
    dataset = arithmetic_dataset(2)
    inputs = [row for row in dataset for _ in range(G)]
    losses = {}
    for aggregation in ("token_mean", "quarter_token_mean"):
        trainer = make_trainer(tmp_path, tokenizer, loss_aggregation=aggregation, dataset=dataset, **kwargs)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        torch.manual_seed(0)
        out = trainer._generate_and_score_completions(inputs)
        assert ("policy_split_loss_weight" in out) == (aggregation == "quarter_token_mean")
        with torch.no_grad():
            losses[aggregation] = trainer.compute_loss(trainer.model, out).item()
        rows = expand_contexts(out)
        mask = rows["completion_mask"].bool()
        advantages = rows["advantages"].expand_as(mask) if rows["advantages"].dim() == 2 else rows["advantages"]
        advantages = advantages.unsqueeze(1).expand_as(mask) if advantages.dim() == 1 else advantages
        generated_he = torch.tensor([i % G >= G // 2 for i in range(len(inputs))])
        if rollout_sharing:
            generated_he = generated_he.repeat(2)
        context = rows["policy_split_context"].bool()
        quarter_means = [
            advantages[mask & (context == ctx).unsqueeze(1) & (generated_he == gen).unsqueeze(1)].double().mean()
            for ctx in (False, True)
            for gen in (False, True)
            if bool(((context == ctx) & (generated_he == gen)).any())
        ]
        assert len(quarter_means) == (4 if rollout_sharing else 2)
        expected = {
            "token_mean": -advantages[mask].double().mean().item(),
            "quarter_token_mean": -torch.stack(quarter_means).mean().item(),
        }[aggregation]
        assert losses[aggregation] == pytest.approx(expected, abs=1e-5)
    # The modes' rollouts differ in length, so the two aggregations are not the same loss.
    assert losses["token_mean"] != pytest.approx(losses["quarter_token_mean"], abs=1e-4)


def test_quarter_token_mean_needs_dapo(tmp_path):
    with pytest.raises(ValueError, match="loss_aggregation='quarter_token_mean' re-weights"):
        config(tmp_path, loss_aggregation="quarter_token_mean", loss_type="grpo")
