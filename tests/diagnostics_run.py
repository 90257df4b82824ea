"""
Mode diagnostics on several processes, run by tests/test_diagnostics.py.

`torchrun --nproc_per_node 2 diagnostics_run.py OUT_DIR` trains each cell of `CELLS` for `MAX_STEPS` steps on 2 CPU
processes (gloo); `python diagnostics_run.py OUT_DIR` trains the same global batches in one process (the layout
helpers of tests/distributed_matrix.py: deterministic rollouts, a layout-independent shuffle, float64 models). Per
process and optimizer step it records the model forward calls (`forward`: the causal LM; `decoder_forward`: its inner
decoder, which the hidden-state similarity calls directly), `accelerate` backward calls, `torch.autograd.grad` calls,
every `torch.distributed` collective by name and DDP's gradient all-reduces, plus the logged diagnostics, the training
metrics and the final weights. Process 0 writes `summary-ws<N>.json` and `weights-<cell>-ws<N>.pt`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from accelerate import PartialState

sys.path.insert(0, os.path.dirname(__file__))
import trl.trainer.grpo_trainer as grpo_module
from distributed_matrix import (
    EMBED_SCALE,
    EMULATED_WORLD_SIZE,
    MAX_COMPLETION_LENGTH,
    ROLLOUTS_PER_PROCESS,
    StepCounter,
    counted_collectives,
    fake_generate_single_turn,
    layout_shuffle,
)
from tiny_model import arithmetic_dataset, build_model, build_tokenizer, length_reward, training_args
from trl import GRPOTrainer

from policy_split_trl import PolicySplitGRPOConfig, PolicySplitGRPOTrainer
from policy_split_trl.diagnostics import DIAGNOSTICS_PREFIX

G = 4
MAX_STEPS = 2
# 3 prompts in batches of per_device_train_batch_size (2 on 2 processes): 2 forward passes per context, the last one
# smaller.
NUM_PROMPTS = 3
CELLS: dict[str, dict[str, Any]] = {
    "off": {},
    "on": {"mode_diagnostics_steps": 1, "mode_diagnostics_prompts": NUM_PROMPTS},
    "on_no_sharing": {"mode_diagnostics_steps": 1, "mode_diagnostics_prompts": NUM_PROMPTS, "rollout_sharing": False},
}


def run_cell(name: str, settings: dict[str, Any], out_dir: str, model_path: str, counter_ref: list) -> dict[str, Any]:
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    args = PolicySplitGRPOConfig(
        **training_args(
            os.path.join(out_dir, "runs", name),
            per_device_train_batch_size=ROLLOUTS_PER_PROCESS * EMULATED_WORLD_SIZE // world_size,
            num_generations=G,
            max_completion_length=MAX_COMPLETION_LENGTH,
            max_steps=MAX_STEPS,
            model_init_kwargs={"dtype": "auto"},  # float64, as saved
        ),
        **settings,
    )
    trainer = PolicySplitGRPOTrainer(
        model=model_path, reward_funcs=[length_reward], args=args, train_dataset=arithmetic_dataset(32)
    )
    counter = StepCounter(trainer)
    trainer.add_callback(counter)
    trainer.model.get_decoder().register_forward_pre_hook(lambda *_: counter.add("decoder_forward"))
    grpo_module.shuffle_sequence_dict = layout_shuffle(world_size, rank, args.steps_per_generation)
    counter_ref[0] = counter
    try:
        trainer.train()
    finally:
        counter_ref[0] = None
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "name": name,
        "rank": rank,
        "world_size": world_size,
        "global_step": trainer.state.global_step,
        "steps": counter.steps,
        "diagnostics": [{k: v for k, v in h.items() if k.startswith(DIAGNOSTICS_PREFIX)} for h in logs],
        "metrics": [{k: v for k, v in h.items() if not k.startswith(DIAGNOSTICS_PREFIX)} for h in logs],
        "final": torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad]),
    }


def main(out_dir: str) -> None:
    state = PartialState(cpu=True)
    model_path = os.path.join(out_dir, "tiny-model")
    if state.is_main_process:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer).double()
        model.get_input_embeddings().weight.data.mul_(EMBED_SCALE)
        model.save_pretrained(model_path)
        tokenizer.save_pretrained(model_path)
    state.wait_for_everyone()
    counter_ref: list = [None]
    grad = torch.autograd.grad

    def counted_grad(*args: Any, **kwargs: Any) -> Any:
        if counter_ref[0] is not None:
            counter_ref[0].add("autograd_grad")
        return grad(*args, **kwargs)

    torch.autograd.grad = counted_grad
    original_generate = GRPOTrainer._generate_single_turn
    GRPOTrainer._generate_single_turn = fake_generate_single_turn
    results = []
    try:
        with counted_collectives(counter_ref):
            for name, settings in CELLS.items():
                results.append(run_cell(name, settings, out_dir, model_path, counter_ref))
    finally:
        torch.autograd.grad = grad
        GRPOTrainer._generate_single_turn = original_generate
    world_size = results[0]["world_size"]
    per_rank = [[{k: r[k] for k in ("rank", "steps", "diagnostics", "metrics")} for r in results]]
    finals = [[r["final"] for r in results]]
    if world_size > 1:
        per_rank, finals = [None] * world_size, [None] * world_size
        dist.all_gather_object(
            per_rank, [{k: r[k] for k in ("rank", "steps", "diagnostics", "metrics")} for r in results]
        )
        dist.all_gather_object(finals, [r["final"] for r in results])
    if results[0]["rank"] == 0:
        summary = []
        for index, result in enumerate(results):
            summary.append(
                {
                    "name": result["name"],
                    "global_step": result["global_step"],
                    "per_rank": [ranks[index] for ranks in per_rank],
                    "ranks_same_weights": all(torch.equal(f[index], result["final"]) for f in finals),
                }
            )
            torch.save(result["final"], os.path.join(out_dir, f"weights-{result['name']}-ws{world_size}.pt"))
        with open(os.path.join(out_dir, f"summary-ws{world_size}.json"), "w") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    main(sys.argv[1])
    if dist.is_initialized():
        # A clean shutdown: a rank leaving while the other still talks to it makes gloo abort the run.
        dist.barrier()
        dist.destroy_process_group()
