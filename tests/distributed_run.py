"""Run by tests/test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo)."""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from tiny_model import arithmetic_dataset, build_model, build_tokenizer, length_reward, training_args
from trl import GRPOTrainer

from policy_split_trl import (
    EntropyDrivenAdvantageGRPOConfig,
    EntropyDrivenAdvantageGRPOTrainer,
    PolicySplitGRPOConfig,
    PolicySplitGRPOTrainer,
)
from policy_split_trl.advantages import group_advantages, normalize_bonus, response_mean_entropy
from policy_split_trl.contexts import expand_contexts

G = 4


def main(result_path: str) -> None:
    tokenizer = build_tokenizer()
    modes_seen = []

    def recording_reward(completions, policy_split_mode, **kwargs):
        modes_seen.append(list(policy_split_mode))
        return length_reward(completions)

    # Global batch 4 = one group of G = 4, split across the two ranks.
    settings = training_args(
        os.path.join(os.path.dirname(result_path), "out"),
        per_device_train_batch_size=2,
        num_generations=G,
        max_completion_length=8,
        max_steps=3,
    )
    args = PolicySplitGRPOConfig(**settings)
    trainer = PolicySplitGRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=[recording_reward],
        args=args,
        train_dataset=arithmetic_dataset(8),
        processing_class=tokenizer,
    )
    world_size = dist.get_world_size()
    assert world_size == 2, f"expected 2 processes, got {world_size}"
    assert trainer.accelerator.num_processes == 2

    outputs = []
    original = trainer._generate_and_score_completions

    def spy(inputs):
        out = original(inputs)
        rows = expand_contexts(out)  # the rows the loss trains: every rollout in both contexts
        outputs.append({k: v.detach().clone() for k, v in rows.items() if isinstance(v, torch.Tensor)})
        return out

    trainer._generate_and_score_completions = spy
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    weights_changed = any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))

    # Eq. 4 through the trainer's own distributed path, with the one group split across the ranks, against the
    # single-process function applied to the gathered raw tokens.
    rank = trainer.accelerator.process_index
    generator = torch.Generator().manual_seed(100 + rank)
    bonus = torch.randn(2, 6, generator=generator) * (rank + 1) + rank
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4 - rank :] = 0  # different lengths on each rank
    local = trainer._normalize_bonus(bonus, mask, G)
    gathered_local = trainer.accelerator.gather(local)
    reference = normalize_bonus(trainer.accelerator.gather(bonus), trainer.accelerator.gather(mask), G)
    eq4_max_diff = (gathered_local - reference).abs().max().item()

    invariant_ok = True
    for out in outputs:
        b = out["prompt_ids"].size(0) // 2
        m = out["completion_mask"][b:].bool()
        a = out["advantages"][:b, 0]
        invariant_ok &= bool(
            ((out["advantages"][b:] - a[:, None]).abs() <= args.eta * a.abs()[:, None] / 2 + 1e-6)[m].all()
        )
        invariant_ok &= (
            out["num_items_in_batch"].item()
            == trainer.accelerator.gather(out["completion_mask"].sum()).sum().item() // 1
        )

    # EDGE-GRPO's entropy-driven advantage with the group split across the ranks: each rank's A / P^ uses the mean
    # response entropy of the whole group (gathered), against the same formula on the gathered tensors.
    rewards_seen = []

    def recorded_length_reward(completions, **kwargs):
        # Varies with the text (not only its length), so a group's advantages are not all 0.
        rewards = [float(sum(map(ord, str(c))) % 5) for c in completions]
        rewards_seen.extend(rewards)
        return rewards

    # A low temperature: the random model's distributions are near uniform (entropies equal to 1e-5) at T = 1.
    edge_settings = {**settings, "output_dir": os.path.join(os.path.dirname(result_path), "edge"), "temperature": 0.1}
    edge = EntropyDrivenAdvantageGRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=[recorded_length_reward],
        args=EntropyDrivenAdvantageGRPOConfig(**edge_settings),
        train_dataset=arithmetic_dataset(8),
        processing_class=tokenizer,
    )
    edge.model.train()
    local_rows = [row for row in arithmetic_dataset(1) for _ in range(G)][rank * 2 : rank * 2 + 2]
    out = edge._generate_and_score_completions(local_rows)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        _, entropies, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            edge, edge.model, ids, mask, out["completion_ids"].size(1), compute_entropy=True
        )
    response = edge.accelerator.gather(response_mean_entropy(entropies, out["completion_mask"]))
    grpo = group_advantages(edge.accelerator.gather(torch.tensor(rewards_seen[-2:])), G)
    expected = grpo * response.view(-1, G).mean(1).repeat_interleave(G) / response
    edge_advantages = edge.accelerator.gather(out["advantages"])
    edge_max_diff = (edge_advantages - expected).abs().max().item()
    # Not vacuous: some A != 0, and P^ != 1 (the response entropies of the group differ).
    edge_nontrivial = bool((grpo != 0).any() and ((edge_advantages - grpo).abs() > 1e-4).any())

    # A non-finite loss on ONE process stops BOTH at the same optimizer step (no process left waiting in a collective),
    # before the update.
    nan_args = PolicySplitGRPOConfig(**{**settings, "output_dir": os.path.join(os.path.dirname(result_path), "nan")})
    guarded = PolicySplitGRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=[length_reward],
        args=nan_args,
        train_dataset=arithmetic_dataset(8),
        processing_class=tokenizer,
    )
    original_loss = GRPOTrainer._compute_loss

    def nan_on_rank_1(self, model, inputs):
        loss = original_loss(self, model, inputs)
        return loss * float("nan") if rank == 1 and self.state.global_step == 1 else loss

    GRPOTrainer._compute_loss = nan_on_rank_1
    try:
        guarded.train()
        nan_stop = None
    except FloatingPointError as error:
        nan_stop = str(error).split(":")[0]
    finally:
        GRPOTrainer._compute_loss = original_loss
    nan_weights_finite = all(bool(torch.isfinite(p).all()) for p in guarded.model.parameters())

    per_rank = [None, None]
    dist.all_gather_object(
        per_rank,
        {
            "rank": rank,
            "modes": modes_seen,
            "rows": [o["prompt_ids"].size(0) for o in outputs],
            "weights_changed": weights_changed,
            "invariant_ok": invariant_ok,
            "nan_stop": nan_stop,
            "nan_weights_finite": nan_weights_finite,
        },
    )
    if rank == 0:
        logs = [h for h in trainer.state.log_history if "policy_split/bonus/abs_mean" in h]
        with open(result_path, "w") as f:
            json.dump(
                {
                    "world_size": world_size,
                    "eq4_max_diff": eq4_max_diff,
                    "edge_max_diff": edge_max_diff,
                    "edge_nontrivial": edge_nontrivial,
                    "per_rank": per_rank,
                    "global_step": trainer.state.global_step,
                    "logs": logs,
                },
                f,
            )


if __name__ == "__main__":
    main(sys.argv[1])
    # A clean shutdown: a rank leaving while the other still talks to it makes gloo abort the run.
    dist.barrier()
    dist.destroy_process_group()
