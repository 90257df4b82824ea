"""`shared_prefix`: each prompt encoded once per log-prob pass, with TRL's log-probs, entropies and gradients."""

import logging
import types

import pytest
import torch
from accelerate import Accelerator
from tiny_model import arithmetic_dataset, build_model, length_reward, training_args
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

from policy_split_trl import ClipCovGRPOTrainer, MethodConfig, PolicySplitGRPOConfig, PolicySplitGRPOTrainer
from policy_split_trl.methods import apply_method, trainer_class
from policy_split_trl.shared_prefix import (
    SharedPrefixMixin,
    pack_rows,
    prompt_groups,
    rows_per_pack,
    split_keeping_groups,
    unsupported_reason,
)


def test_prompt_groups_by_tokens_and_padding_in_order_of_first_appearance():
    ids = torch.tensor([[0, 5, 6, 1, 2], [7, 8, 9, 3, 4], [0, 5, 6, 2, 2], [0, 5, 6, 1, 1], [9, 9, 6, 1, 1]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]])
    # Row 3 has row 0's tokens but less prompt (its 5 is padding); row 4's padding holds other ids: same as row 3.
    assert prompt_groups(ids, mask, logits_to_keep=2).tolist() == [0, 1, 0, 2, 2]


def test_split_keeping_groups_moves_cuts_to_group_boundaries_but_never_the_count():
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    sizes = [len(c) for c in split_keeping_groups(groups, 2)]
    assert sizes == [3, 5]  # ideal cut 4, boundary 3 within half a slice (2)
    # Cuts at 3 (ideal round(8/3) = 3) and 5 (ideal; the boundary 7 is too far): 3 passes as asked.
    assert [c.tolist() for c in split_keeping_groups(groups, 3)] == [[0, 1, 2], [3, 4], [5, 6, 7]]
    assert [len(c) for c in split_keeping_groups(torch.zeros(2, dtype=torch.long), 4)] == [1, 1]
    assert [c.tolist() for c in split_keeping_groups(groups, 1)] == [list(range(8))]


def test_width_sorted_chunks_keep_a_prompts_rows_in_one_pass():
    from policy_split_trl.optimized_step import width_sorted_chunks

    mask = torch.ones(8, 12, dtype=torch.long)  # two queries' rows interleaved, all prompts equally wide
    groups = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    assert [c.tolist() for c in width_sorted_chunks(mask, 4, 2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [c.tolist() for c in width_sorted_chunks(mask, 4, 2, groups)] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    mask[[1, 3, 5, 7], :3] = 0  # group 1 is narrower: by width first, then by group
    assert [c.tolist() for c in width_sorted_chunks(mask, 4, 2, groups)] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert len(width_sorted_chunks(mask, 4, 3, groups)) == 3  # the count never changes


def test_rows_per_pack_from_the_cost_model():
    # SmolLM2-135M (hidden 576: token cost 3456), G=8, 100-token prompt, 64-token completions:
    # k=8: 620 tokens -> 620 * 3456 + 620^2 = 2,527,120; k=4: 2 x (360 * 3456 + 360^2) = 2,747,520;
    # k=1 (padded): 8 x (164 * 3456 + 164^2) = 4,749,440.
    assert rows_per_pack(100, 64, 8, 3456.0) == 8
    # 4K-token completions of an 8B model (hidden 4096): packing two already costs more than it saves.
    assert rows_per_pack(100, 4096, 16, 6 * 4096.0) == 1
    assert rows_per_pack(100, 64, 1, 3456.0) == 1
    # 52-token prompts, 256-token completions: k=2 is the cheapest, 4 x (566 * 3456 + 566^2) = 9,105,808, but saves
    # only 1.8% of the padded rows' 8 x (308 * 3456 + 308^2) = 9,274,496: not the 10% asked, so TRL's rows.
    assert rows_per_pack(52, 256, 8, 3456.0) == 1
    assert rows_per_pack(52, 256, 8, 3456.0, min_saving=0.0) == 2


def test_pack_rows_layout_by_hand():
    # One prompt [pad, 5, 6] for two rollouts [1, 2] and [3, <pad>].
    ids = torch.tensor([[0, 5, 6, 1, 2], [0, 5, 6, 3, 4]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    packed = pack_rows(ids, mask, 2, torch.tensor([0, 0]), per_pack=2)
    # The shared part is the prompt but its last token, each slot [last prompt token, completion].
    assert packed.input_ids.tolist() == [[5, 6, 1, 2, 6, 3, 4]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 1, 2, 3]]
    assert packed.shift_labels.tolist() == [[-100, 1, 2, -100, 3, -100, -100]]
    assert packed.row_pack.tolist() == [0, 0] and packed.row_columns.tolist() == [[1, 2], [4, 5]]
    visible = packed.attention_mask[0, 0].int().tolist()
    assert visible[1] == [1, 1, 0, 0, 0, 0, 0]  # the first slot's prompt token: the shared part and itself
    assert visible[4] == [1, 0, 0, 0, 1, 0, 0]  # the second slot's: the shared part and itself, not slot 1
    assert visible[5] == [1, 0, 0, 0, 1, 1, 0]
    # Completion padding: the real keys of its slot and itself (its output is never used); no key of another slot.
    assert visible[6] == [1, 0, 0, 0, 1, 1, 1]
    assert visible[3] == [1, 1, 1, 1, 0, 0, 0]
    # per_pack=1: one sequence per row, the padded row less the shared left padding.
    single = pack_rows(ids, mask, 2, torch.tensor([0, 0]), per_pack=1)
    assert single.input_ids.tolist() == [[5, 6, 1, 2], [5, 6, 3, 4]]


class _Padded:
    _get_per_token_logps_and_entropies = GRPOTrainer._get_per_token_logps_and_entropies


class _Harness(SharedPrefixMixin, _Padded):
    """What the mixin reads from a trainer, and TRL's pass under it."""

    def __init__(self, shared_prefix: bool):
        self.accelerator = Accelerator(cpu=True)
        self.args = types.SimpleNamespace(shared_prefix=shared_prefix)


def _rows(vocab: int, completion_width: int = 6):
    """Two prompts (5 and 9 tokens) x 3 rollouts of decreasing length, interleaved, left/right padded as TRL pads."""
    generator = torch.Generator().manual_seed(0)
    width = 9
    rows = []
    for length in (5, 9):
        prompt = torch.randint(3, vocab, (length,), generator=generator)
        for r in range(3):
            completion = torch.randint(3, vocab, (completion_width,), generator=generator)
            ids = torch.cat([torch.zeros(width - length, dtype=torch.long), prompt, completion])
            kept = completion_width - r
            mask = torch.cat(
                [torch.zeros(width - length), torch.ones(length), torch.ones(kept), torch.zeros(r)]
            ).long()
            rows.append((ids, mask))
    order = [0, 3, 1, 4, 2, 5]
    return torch.stack([rows[i][0] for i in order]), torch.stack([rows[i][1] for i in order])


@pytest.mark.parametrize(
    "attention,dtype,tolerance",
    # float64: the log-probs are identical; the gradients differ only by TRL's float32 LM head. Eager attention in
    # float64 gives NaN on left padding in TRL's own path (min-float mask overflow), so it is checked in float32.
    [("sdpa", torch.float64, 1e-6), ("eager", torch.float32, 1e-5)],
)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_packed_pass_gives_trls_log_probs_entropies_and_gradients(
    tokenizer, attention, dtype, tolerance, checkpointing
):
    model = build_model(tokenizer).to(dtype)
    model.config._attn_implementation = attention
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    ids, mask = _rows(model.config.vocab_size)
    completion = mask[:, -6:].bool()
    results = {}
    for shared in (False, True):
        model.zero_grad()
        logps, entropies, _ = _Harness(shared)._get_per_token_logps_and_entropies(
            model, ids, mask, 6, compute_entropy=True
        )
        logps, entropies = (torch.where(completion, x, 0.0) for x in (logps, entropies))
        (logps.sum() + 0.3 * entropies.sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results[shared] = (logps.detach(), entropies.detach(), grads)
    for padded, packed in zip(results[False], results[True], strict=True):
        torch.testing.assert_close(packed, padded, rtol=tolerance, atol=tolerance)
    if dtype == torch.float64:
        assert torch.equal(results[True][0], results[False][0])  # log-probs bit for bit
    # Gradients reach the prompt through the shared keys/values: the embeddings of prompt-only tokens move.
    prompt_only = set(ids[:, :9][mask[:, :9].bool()].tolist()) - set(ids[:, 9:][completion].tolist())
    embedding_grad = model.get_input_embeddings().weight.grad
    assert embedding_grad[sorted(prompt_only)].abs().sum() > 0


def test_unsupported_models_fall_back_to_trls_rows_with_one_log_line(tokenizer, caplog):
    model = build_model(tokenizer).double()
    assert unsupported_reason(model) is None
    model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in unsupported_reason(model)
    config = model.config
    config._attn_implementation = "sdpa"
    config.layer_types, config.use_sliding_window, config.sliding_window = (
        ["sliding_attention", "full_attention"],
        True,
        64,
    )
    model = type(model)(config).double()  # a model with a sliding-window layer (Mistral/Gemma style)
    assert "sliding_attention" in unsupported_reason(model)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    ids, mask = _rows(model.config.vocab_size)
    harness = _Harness(True)
    with caplog.at_level(logging.WARNING, logger="policy_split_trl.shared_prefix"):
        fallback = [harness._get_per_token_logps_and_entropies(model, ids, mask, 6)[0] for _ in range(2)]
    padded = _Harness(False)._get_per_token_logps_and_entropies(model, ids, mask, 6)[0]
    assert all(torch.equal(f, padded) for f in fallback)
    reason = "layer types ['full_attention', 'sliding_attention'] are not all full causal attention"
    assert [r.getMessage() for r in caplog.records] == [f"shared_prefix: padded rows instead ({reason})."]


def _count_forwards(model):
    """Every forward of `model` and the token positions it ran."""
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    return seen


def test_policy_split_step_packs_its_passes_in_the_same_number_of_forwards(tmp_path, tokenizer, tiny_model_path):
    positions = {}
    for shared in (True, False):
        args = PolicySplitGRPOConfig(
            **training_args(tmp_path / str(shared), num_generations=4, max_steps=1, shared_prefix=shared, beta=0.04)
        )
        trainer = PolicySplitGRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float64),
            reward_funcs=[length_reward],
            args=args,
            train_dataset=arithmetic_dataset(8),
            processing_class=tokenizer,
        )
        seen = _count_forwards(trainer.model)
        seen_ref = _count_forwards(trainer.ref_model)
        trainer.train()
        generation = trainer.args.max_completion_length  # generate() runs one forward per new token
        positions[shared] = (len(seen) > generation, len(seen_ref), sum(seen_ref))
        trainer.model.zero_grad()
    # The reference model scores the twin context: the same number of passes, each prompt encoded once per pass.
    assert positions[True][1] == positions[False][1] >= 1
    assert positions[True][2] < positions[False][2]


def test_every_method_gets_the_mixin_right_before_grpo_trainer(tmp_path):
    config = MethodConfig(**training_args(tmp_path))
    assert config.shared_prefix  # the default, for every method: comparisons stay fair
    grpo = trainer_class("grpo", apply_method("grpo", config))
    assert grpo.__mro__[1:3] == (SharedPrefixMixin, GRPOTrainer)
    clip_cov = trainer_class("clip_cov", apply_method("clip_cov", config))
    mro = clip_cov.__mro__
    assert mro[1] is ClipCovGRPOTrainer and mro.index(SharedPrefixMixin) + 1 == mro.index(GRPOTrainer)
    assert SharedPrefixMixin in trainer_class("policy_split", apply_method("policy_split", config)).__mro__
    config.shared_prefix = False
    assert trainer_class("grpo", apply_method("grpo", config)) is GRPOTrainer


def test_grpo_with_shared_prefix_trains_as_grpo(tmp_path, tokenizer, tiny_model_path):
    shared_cls = trainer_class("grpo", apply_method("grpo", MethodConfig(**training_args(tmp_path))))
    trainers = [
        cls(
            model=AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float64),
            reward_funcs=[length_reward],
            args=GRPOConfig(**training_args(tmp_path / cls.__name__, num_generations=4)),
            train_dataset=arithmetic_dataset(16),
            processing_class=tokenizer,
        )
        for cls in (shared_cls, GRPOTrainer)
    ]
    for trainer in trainers:
        torch.manual_seed(0)
        trainer.train()
    logs = [[h for h in t.state.log_history if "loss" in h and "grad_norm" in h] for t in trainers]
    assert len(logs[0]) == len(logs[1]) == 2
    for a, b in zip(*logs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # The weights, within TRL's float32 LM head rounding as Adam scales it (see tests/test_distributed_matrix.py).
    initial = torch.cat([p.flatten() for p in AutoModelForCausalLM.from_pretrained(tiny_model_path).parameters()])
    weights = [torch.cat([p.detach().flatten() for p in t.model.parameters()]) for t in trainers]
    update = (weights[1] - initial).abs().max()
    assert (weights[0] - weights[1]).abs().max() <= 1e-3 * update and update > 0
