"""`optimized_step`: every optimized path gives the advantages, loss and gradients of the straightforward path."""

import pytest
import torch
from tiny_model import arithmetic_dataset, length_reward, training_args
from transformers import AutoModelForCausalLM
from trl import GRPOTrainer

from policy_split_trl import PolicySplitGRPOConfig, PolicySplitGRPOTrainer
from policy_split_trl.contexts import HIGH_ENTROPY_CONTEXT, NORMAL_CONTEXT
from policy_split_trl.optimized_step import forward_plan, width_sorted_chunks

G = 4


def test_width_sorted_chunks_group_rows_by_prompt_width_but_never_change_the_count():
    mask = torch.ones(4, 110, dtype=torch.long)
    mask[[1, 3], :90] = 0  # two short (normal) prompts padded to the long (high-entropy) width
    assert [g.tolist() for g in width_sorted_chunks(mask, logits_to_keep=10, num_chunks=2)] == [[0, 2], [1, 3]]
    # The count is what was asked, whatever the widths: all rows alike still make two passes (same on every process).
    assert [g.tolist() for g in width_sorted_chunks(torch.ones(4, 20), 10, 2)] == [[0, 1], [2, 3]]
    assert [g.tolist() for g in width_sorted_chunks(mask, 10, 1)] == [[0, 1, 2, 3]]
    assert [g.tolist() for g in width_sorted_chunks(mask, 10, 3)] == [[0, 2], [1], [3]]
    assert [g.tolist() for g in width_sorted_chunks(torch.ones(1, 20), 10, 4)] == [[0]]
    # Completion padding (right side) never moves a row.
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :15] = 0
    mask[0, 25:] = 0
    assert [g.tolist() for g in width_sorted_chunks(mask, 10, 2)] == [[0], [1]]


def test_forward_plan_from_summed_positions():
    # 2 x 4 rows: normal prompts 20 wide, HE prompts 120 wide, 10 completion tokens. One joint pass: 8 x 130 = 1040
    # positions; each context at its own width: 4 x 30 + 4 x 130 = 640 (38% fewer): two passes; HE rows: 520 / 120.
    assert forward_plan(torch.tensor([1040.0, 640.0, 120.0, 520.0])) == (2, 5)
    # 12K-token completions: the prompts hardly matter, one pass; the HE rows fit in one normal-sized chunk... or two.
    assert forward_plan(torch.tensor([8 * 12400.0, 4 * 12300.0 + 4 * 12400.0, 4 * 12300.0, 4 * 12400.0])) == (1, 2)
    assert forward_plan(torch.tensor([100.0, 100.0, 50.0, 50.0])) == (1, 1)
    assert forward_plan(torch.tensor([100.0, 90.0, 45.0, 45.0])) == (2, 1)  # exactly 10% saved


def make(tmp_path, tokenizer, optimized, model_path, peft_config=None, shared_prefix=False, **kwargs):
    args = training_args(
        tmp_path / f"out-{optimized}",
        shared_prefix=shared_prefix,
        num_generations=G,
        max_completion_length=10,
        per_device_eval_batch_size=8,
        optimized_step=optimized,
        **kwargs,
    )
    return PolicySplitGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64),
        reward_funcs=[length_reward],
        args=PolicySplitGRPOConfig(**args),
        train_dataset=arithmetic_dataset(16),
        eval_dataset=arithmetic_dataset(4),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def pair(tmp_path, tokenizer, model_path, shared_prefix=False, **kwargs):
    """
    Two trainers on the same weights, `optimized_step` on (with `shared_prefix` as asked) and the straightforward
    path (TRL's padded rows), in float64: cutting the padding shifts RoPE positions, which is exact in exact
    arithmetic, while in float32 the rounding of cos/sin at other positions alone moves log-probs by ~1e-3 on this
    random model and would hide real errors.
    """
    return make(tmp_path, tokenizer, True, model_path, shared_prefix=shared_prefix, **kwargs), make(
        tmp_path, tokenizer, False, model_path, **kwargs
    )


def generate(trainer, train=True):
    trainer.model.train(train)
    torch.manual_seed(123)
    inputs = [row for row in arithmetic_dataset(2) for _ in range(G)]
    out = trainer._generate_and_score_completions(inputs)
    trainer.current_gradient_accumulation_steps = 1
    return out


class LossRecorder:
    """Records the advantages and row count of every `GRPOTrainer._compute_loss` call (after the loss pass)."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = GRPOTrainer._compute_loss

        def recorded(trainer, model, inputs):
            loss = original(trainer, model, inputs)
            self.calls.append({k: inputs[k].detach().clone() for k in ("advantages", "policy_split_context")})
            return loss

        monkeypatch.setattr(GRPOTrainer, "_compute_loss", recorded)

    def by_context(self):
        """Advantages of the recorded calls, normal-context rows then HE-context rows."""
        rows = {NORMAL_CONTEXT: [], HIGH_ENTROPY_CONTEXT: []}
        for call in self.calls:
            for ctx, found in rows.items():
                found.append(call["advantages"][call["policy_split_context"] == ctx])
        self.calls.clear()
        return torch.cat(rows[NORMAL_CONTEXT] + rows[HIGH_ENTROPY_CONTEXT])


def loss_and_grad(trainer, out):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, out)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    trainer.model.zero_grad()
    return loss.detach(), grads


def metric(trainer, name):
    return trainer._metrics["train"][name][-1]


@pytest.mark.parametrize(
    "settings",
    [
        {},  # on-policy: bonus from the loss pass, contexts trained separately, no scoring pass
        {"num_iterations": 2, "beta": 0.04},  # old and reference log-probs of both contexts from scoring passes
        {"normal_eta": 0.01, "loss_type": "grpo"},  # one loss pass (normal rows need the bonus too), per-row mean
        {"loss_type": "bnpo", "eta_placement": "outside_clip"},  # token mean over the micro-batch, Eq. 3 as typeset
        {"bonus_from_loss_pass": False, "loss_type": "grpo"},  # scoring pass, HE rows in normal-sized chunks
        {"loss_aggregation": "quarter_token_mean"},  # quarter weights on the advantages the loss pass completes
        {"loss_aggregation": "quarter_token_mean", "bonus_from_loss_pass": False},  # ... and on finished ones
    ],
    ids=["on_policy", "off_policy_beta", "normal_eta_grpo", "bnpo_outside", "low_memory", "quarters", "quarters_low"],
)
@pytest.mark.parametrize("shared_prefix", [False, True], ids=["padded", "shared_prefix"])
def test_optimized_step_equals_the_reference_path(
    tmp_path, tokenizer, tiny_model_path, monkeypatch, settings, shared_prefix
):
    fast, reference = pair(tmp_path, tokenizer, tiny_model_path, shared_prefix=shared_prefix, **settings)
    out_fast, out_ref = generate(fast), generate(reference)
    torch.testing.assert_close(out_fast["completion_ids"], out_ref["completion_ids"])  # the same rollouts
    recorder = LossRecorder(monkeypatch)
    loss_fast, grad_fast = loss_and_grad(fast, out_fast)
    adv_fast = recorder.by_context()
    loss_ref, grad_ref = loss_and_grad(reference, out_ref)
    adv_ref = recorder.by_context()
    torch.testing.assert_close(adv_fast, adv_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-6, atol=1e-7)  # a mean of O(1) terms
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-5, atol=1e-6)
    assert grad_ref.abs().max() > 0
    for name in (
        "policy_split/bonus/abs_mean",
        "policy_split/kl_high_entropy_normal",
        "policy_split/entropy/high_entropy_context",
    ):
        assert metric(fast, name) == pytest.approx(metric(reference, name), rel=1e-6, abs=1e-9), name


def test_on_policy_step_has_no_scoring_pass_and_one_context_per_forward(
    tmp_path, tokenizer, tiny_model_path, monkeypatch
):
    fast, reference = pair(tmp_path, tokenizer, tiny_model_path)
    calls = []
    original = GRPOTrainer._get_per_token_logps_and_entropies

    def counting(trainer, model, input_ids, *args, **kwargs):
        calls.append((trainer.args.optimized_step, torch.is_grad_enabled(), input_ids.size(0), input_ids.size(1)))
        return original(trainer, model, input_ids, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", counting)
    out_fast, out_ref = generate(fast), generate(reference)
    assert [c for c in calls if not c[1]] == [(False, False, 16, calls[0][3])]  # only the reference path scores
    calls.clear()
    loss_and_grad(fast, out_fast)
    loss_and_grad(reference, out_ref)
    fast_calls = [c for c in calls if c[0]]
    ref_calls = [c for c in calls if not c[0]]
    assert [c[2] for c in ref_calls] == [16]  # the reference: one pass over both contexts, padded to one width
    assert [c[2] for c in fast_calls] == [8, 8]  # optimized: one context per forward/backward
    normal_width, he_width = fast_calls[0][3], fast_calls[1][3]
    assert normal_width < he_width == ref_calls[0][3]  # normal rows at their own width, not the HE prompt's


def test_eval_loss_and_a_full_training_run_match(tmp_path, tokenizer, tiny_model_path):
    fast, reference = pair(tmp_path, tokenizer, tiny_model_path)
    out_fast, out_ref = generate(fast, train=False), generate(reference, train=False)
    with torch.no_grad():
        torch.testing.assert_close(
            fast.compute_loss(fast.model, out_fast),
            reference.compute_loss(reference.model, out_ref),
            rtol=1e-4,
            atol=1e-6,
        )
    for trainer in (fast, reference):
        torch.manual_seed(0)
        trainer.train()
    logs = [
        [h for h in t.state.log_history if "loss" in h and "policy_split/bonus/abs_mean" in h]
        for t in (fast, reference)
    ]
    assert len(logs[0]) == len(logs[1]) == 2
    for a, b in zip(*logs, strict=True):
        assert a["policy_split/bonus/abs_mean"] == pytest.approx(b["policy_split/bonus/abs_mean"], rel=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(
    "settings",
    [
        {"peft_config": "lora"},
        {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4},
        {"peft_config": "lora", "shared_prefix": True},
        {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4, "shared_prefix": True},
        {"gradient_checkpointing": True, "shared_prefix": True},
    ],
    ids=["lora", "gradient_accumulation", "lora_shared", "accumulation_shared", "checkpointing_shared"],
)
def test_training_runs_match_with_lora_and_accumulation(tmp_path, tokenizer, tiny_model_path, settings):
    from peft import LoraConfig

    if settings.get("peft_config") == "lora":
        settings = {**settings, "peft_config": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")}
    fast, reference = pair(tmp_path, tokenizer, tiny_model_path, **settings)
    for trainer in (fast, reference):
        torch.manual_seed(0)
        trainer.train()
    logs = [[h for h in t.state.log_history if "loss" in h and "grad_norm" in h] for t in (fast, reference)]
    assert len(logs[0]) == len(logs[1]) == 2
    for a, b in zip(*logs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_low_memory_trains_the_high_entropy_context_in_normal_sized_chunks(
    tmp_path, tokenizer, tiny_model_path, monkeypatch
):
    fast, _ = pair(tmp_path, tokenizer, tiny_model_path, bonus_from_loss_pass=False)
    out = generate(fast)
    shapes = []
    original = GRPOTrainer._get_per_token_logps_and_entropies

    def recording(trainer, model, input_ids, *args, **kwargs):
        shapes.append(tuple(input_ids.shape))
        return original(trainer, model, input_ids, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", recording)
    loss_and_grad(fast, out)
    (normal_rows, normal_width), *he_chunks = shapes
    assert normal_rows == 8 and len(he_chunks) > 1 and sum(rows for rows, _ in he_chunks) == 8
    # Each HE chunk holds about as many positions as the normal rows (within one row of rounding).
    assert all(rows * width <= normal_rows * normal_width + width for rows, width in he_chunks)
