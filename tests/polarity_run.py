"""Run by tests/test_polarity.py under `accelerate launch` (1 or 2 processes, CPU, gloo).

1. `fixed`: the same three generation batches of 8 rollouts (fixed tensors, one with no token at all on the last
   process) split over the processes; `_polarity_weights` on each process's rows. Records the all-reduces per process,
   the controller state and the gathered reweighting factors, to compare 2 processes with 1.
2. `policy_split` (2 processes only): a real Policy Split run with `polarity_reweighting: both` and diagnostics; records
   the controller state and the number of polarity all-reduces of each process.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from tiny_model import arithmetic_dataset, build_model, build_tokenizer, length_reward, training_args

from policy_split_trl import PolicySplitGRPOConfig
from policy_split_trl.methods import trainer_class
from policy_split_trl.polarity import PolarityReweightingGRPOConfig, PolarityReweightingGRPOTrainer

ROWS, PROMPT, COMPLETION = 8, 5, 6


def fixed_batch(k: int, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(100 + k)
    completion_mask = (torch.rand(ROWS, COMPLETION, generator=gen) > 0.2).long()
    completion_mask[:, 0] = 1
    if k == 1:
        completion_mask[ROWS // 2 :] = 0  # the second half of the rows (the last process with 2) has no token
    return {
        "prompt_ids": torch.randint(3, vocab, (ROWS, PROMPT), generator=gen),
        "prompt_mask": torch.ones(ROWS, PROMPT, dtype=torch.long),
        "completion_ids": torch.randint(3, vocab, (ROWS, COMPLETION), generator=gen),
        "completion_mask": completion_mask,
        "advantages": torch.randn(ROWS, generator=gen),
    }


class CountReduces:
    def __init__(self, accelerator):
        self.calls, self.original = 0, accelerator.reduce
        accelerator.reduce = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)


def run_fixed(out_dir: str) -> dict:
    tokenizer = build_tokenizer()
    settings = training_args(out_dir, per_device_train_batch_size=2, num_generations=2, polarity_entropy_target=50.0)
    trainer = PolarityReweightingGRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=[length_reward],
        args=PolarityReweightingGRPOConfig(**settings),
        train_dataset=arithmetic_dataset(8),
        processing_class=tokenizer,
    )
    trainer.model.train()
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    counter = CountReduces(trainer.accelerator)
    factors = []
    for k in range(3):
        batch = fixed_batch(k, trainer.model.config.vocab_size)
        local = {key: value.chunk(world)[rank] for key, value in batch.items()}
        contexts = trainer._polarity_contexts(local)
        (factor,) = trainer._polarity_weights(local, contexts, local["advantages"])
        factors.append(trainer.accelerator.gather(factor.contiguous()).tolist())
    return {"reduces": counter.calls, "state": trainer._polarity_controller.state(), "factors": factors}


def run_policy_split(out_dir: str) -> dict:
    tokenizer = build_tokenizer()
    settings = training_args(
        out_dir,
        per_device_train_batch_size=2,
        num_generations=4,
        max_completion_length=8,
        max_steps=3,
        polarity_reweighting="both",
        polarity_diagnostics=True,
    )
    args = PolicySplitGRPOConfig(**settings)
    trainer = trainer_class("policy_split", args)(
        model=build_model(tokenizer),
        reward_funcs=[length_reward],
        args=args,
        train_dataset=arithmetic_dataset(8),
        processing_class=tokenizer,
    )
    counted = {"reduces": 0}
    weights, diagnostics = trainer._polarity_weights, trainer._log_polarity_diagnostics

    def with_count(function, reduces):
        def wrapped(*a, **k):
            counted["reduces"] += reduces
            return function(*a, **k)

        return wrapped

    # Each call makes exactly its reduces (checked with the fixed batches); count the calls per process.
    trainer._polarity_weights = with_count(weights, 2)
    trainer._log_polarity_diagnostics = with_count(diagnostics, 1)
    trainer.train()
    return {
        "reduces": counted["reduces"],
        "state": trainer._polarity_controller.state(),
        "global_step": trainer.state.global_step,
    }


def main(result_path: str, out_dir: str) -> None:
    results = {"fixed": run_fixed(os.path.join(out_dir, "fixed"))}
    if dist.is_initialized() and dist.get_world_size() == 2:
        results["policy_split"] = run_policy_split(os.path.join(out_dir, "ps"))
    per_rank = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(per_rank, results)
    else:
        per_rank = [results]
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(per_rank, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    if dist.is_initialized():  # a clean shutdown: a rank leaving while the other still talks to it aborts gloo
        dist.barrier()
        dist.destroy_process_group()
