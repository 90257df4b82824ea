"""Run by tests/test_eta_control.py under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): the adaptive
eta after every optimizer step, on each process."""

import json
import os
import sys

import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))
from tiny_model import arithmetic_dataset, build_model, build_tokenizer, length_reward, training_args

from policy_split_trl import PolicySplitGRPOConfig, PolicySplitGRPOTrainer

G = 4


class RecordEta(TrainerCallback):
    """Added after the trainer's controller, so its `on_step_end` sees the eta the controller just set."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.etas = []

    def on_step_end(self, args, state, control, **kwargs):
        self.etas.append(self.trainer._eta)


def run(result_path: str, optimized_step: bool) -> dict:
    tokenizer = build_tokenizer()
    # Global batch 4 = one group of G = 4 split across the two ranks: by global index rank 0 holds the normal-generated
    # rollouts and rank 1 the HE-generated ones, so the KL on HE-generated tokens exists only on rank 1 before the
    # reduction; a controller fed local statistics would move differently on the two ranks.
    settings = training_args(
        os.path.join(os.path.dirname(result_path), f"out-{optimized_step}"),
        per_device_train_batch_size=2,
        num_generations=G,
        max_completion_length=8,
        max_steps=4,
        eta=0.03,
        eta_schedule="adaptive",
        target_kl_high_entropy_normal=0.004,
        eta_update_factor=1.5,
        max_entropy_ratio=1.5,
        optimized_step=optimized_step,
    )
    trainer = PolicySplitGRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=[length_reward],
        args=PolicySplitGRPOConfig(**settings),
        train_dataset=arithmetic_dataset(8),
        processing_class=tokenizer,
    )
    assert dist.get_world_size() == 2
    recorder = RecordEta(trainer)
    trainer.add_callback(recorder)
    trainer.train()

    rank = trainer.accelerator.process_index
    per_rank = [None, None]
    dist.all_gather_object(per_rank, {"rank": rank, "etas": recorder.etas, "state": trainer._eta_controller.state()})
    logs = [h for h in trainer.state.log_history if "policy_split/eta" in h]
    return {"per_rank": per_rank, "logs": logs, "global_step": trainer.state.global_step}


def main(result_path: str) -> None:
    # The optimized step takes the bonus (and the KL) from the loss pass; the straightforward one from the generation
    # step: both ways of feeding the controller.
    results = {name: run(result_path, optimized) for name, optimized in (("optimized", True), ("reference", False))}
    if dist.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
    # A clean shutdown: a rank leaving while the other still talks to it makes gloo abort the run.
    dist.barrier()
    dist.destroy_process_group()
