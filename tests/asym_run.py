"""Run by tests/test_asym_grpo.py under `torchrun --nproc_per_node 2` on CPU (gloo): AsymGRPO and Policy Split over
AsymGRPO with a group straddling the two processes, and GRPO (with the package's guards) / Policy Split for their
collective counts. Writes, per
run and per process: each generation step's gathered success flags, the advantages computed for the whole batch, the
local advantages trained, and the collectives by name."""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from distributed_matrix import COLLECTIVES
from tiny_model import arithmetic_dataset, build_model, build_tokenizer, training_args
from trl import GRPOConfig, GRPOTrainer

import policy_split_trl.asym_grpo as asym_module
from policy_split_trl import PolicySplitGRPOConfig, PolicySplitGRPOTrainer
from policy_split_trl.asym_grpo import AsymGRPOConfig, AsymGRPOTrainer
from policy_split_trl.methods import trainer_class
from policy_split_trl.safety import SafeTrainingMixin

G = 4


class SafeGRPOTrainer(SafeTrainingMixin, GRPOTrainer):
    """GRPO with the guards every trainer of the package has (one all-reduce per micro-step): AsymGRPO's baseline."""


def parity_reward(completions, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(len(t) % 2 == 0) for t in texts]


def run(name: str, out_dir: str) -> dict:
    tokenizer = build_tokenizer()
    # 6 rollouts per process, 12 in all: groups [0, 4), [4, 8), [8, 12); the middle one has 2 rollouts on each process.
    settings = training_args(
        os.path.join(out_dir, name), per_device_train_batch_size=6, num_generations=G, max_completion_length=8
    )
    if name == "grpo":
        cls, args = SafeGRPOTrainer, GRPOConfig(**settings)
    elif name == "asym_grpo":
        cls, args = AsymGRPOTrainer, AsymGRPOConfig(**settings)
    else:
        args = PolicySplitGRPOConfig(
            **settings,
            num_high_entropy_generations=2,
            base_advantage="asym_grpo" if name == "policy_split_asym" else "grpo",
        )
        cls = trainer_class("policy_split", args)
        assert (cls is PolicySplitGRPOTrainer) == (name == "policy_split")
    trainer = cls(
        model=build_model(tokenizer),
        reward_funcs=[parity_reward],
        args=args,
        train_dataset=arithmetic_dataset(16),
        processing_class=tokenizer,
    )
    steps = []
    formula = asym_module.asym_group_advantages

    def recorded_formula(success, *args, **kwargs):
        result = formula(success, *args, **kwargs)
        steps.append({"rewards": success.tolist(), "all_advantages": result.tolist()})
        return result

    generate = trainer._generate_and_score_completions

    def recorded_generate(inputs):
        output = generate(inputs)
        if steps:
            advantages = output["advantages"]
            steps[-1]["local"] = (advantages[:, 0] if advantages.dim() == 2 else advantages).tolist()
        return output

    trainer._generate_and_score_completions = recorded_generate
    asym_module.asym_group_advantages = recorded_formula
    counts: dict[str, int] = {}
    originals = {c: getattr(dist, c) for c in COLLECTIVES}

    def wrap(collective, function):
        def counted(*args, **kwargs):
            counts[collective] = counts.get(collective, 0) + 1
            return function(*args, **kwargs)

        return counted

    for collective, function in originals.items():
        setattr(dist, collective, wrap(collective, function))
    try:
        trainer.train()
    finally:
        for collective, function in originals.items():
            setattr(dist, collective, function)
        asym_module.asym_group_advantages = formula
    assert trainer.state.global_step == 2 and dist.get_world_size() == 2
    return {"rank": dist.get_rank(), "steps": steps, "collectives": counts}


def main(result_path: str) -> None:
    results = {}
    for name in ("grpo", "asym_grpo", "policy_split", "policy_split_asym"):
        torch.manual_seed(0)
        mine = run(name, os.path.dirname(result_path))
        per_rank = [None, None]
        dist.all_gather_object(per_rank, mine)
        results[name] = per_rank
    if dist.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
    # A clean shutdown: a rank leaving while the other still talks to it makes gloo abort the run.
    dist.barrier()
    dist.destroy_process_group()
