"""Wall time per optimizer step, PolicySplitGRPOTrainer vs GRPOTrainer, side by side on the tiny model (CPU).

    python tests/bench_step_time.py [--rounds 3] [--steps 6] [--num_generations 8] [--max_completion_length 32]

Runs GRPO and Policy Split alternately (A B A B ...) with identical configs and seeds, drops each run's first step
(warm-up), and prints the median per-step time (TRL's `step_time`: generation + scoring + loss/backward) and the ratio.
Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from tiny_model import arithmetic_dataset, build_model, build_tokenizer, length_reward
from trl import GRPOConfig, GRPOTrainer

from policy_split_trl import PolicySplitGRPOConfig, PolicySplitGRPOTrainer


def run(kind: str, tokenizer, args) -> list[float]:
    common = {
        "output_dir": tempfile.mkdtemp(),
        "per_device_train_batch_size": args.batch_size,
        "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length,
        "max_steps": args.steps,
        "learning_rate": 1e-5,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "seed": 0,
        "disable_tqdm": True,
    }
    trainer_cls, config = (
        (GRPOTrainer, GRPOConfig(**common))
        if kind == "grpo"
        else (PolicySplitGRPOTrainer, PolicySplitGRPOConfig(**common))
    )
    torch.manual_seed(0)
    trainer = trainer_cls(
        model=build_model(tokenizer),
        reward_funcs=[length_reward],
        args=config,
        train_dataset=arithmetic_dataset(args.batch_size * args.steps),
        processing_class=tokenizer,
    )
    trainer.train()
    times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_completion_length", type=int, default=32)
    args = parser.parse_args()
    tokenizer = build_tokenizer()
    times = {"grpo": [], "policy_split": []}
    start = time.perf_counter()
    for _ in range(args.rounds):
        for kind in ("grpo", "policy_split"):
            times[kind] += run(kind, tokenizer, args)
    grpo, ps = statistics.median(times["grpo"]), statistics.median(times["policy_split"])
    print(
        f"G={args.num_generations} batch={args.batch_size} completion_len={args.max_completion_length} "
        f"rounds={args.rounds} steps/run={args.steps} (first step of each run dropped)"
    )
    print(f"median step time  GRPO: {grpo:.4f}s  PolicySplit: {ps:.4f}s  ratio PS/GRPO: {ps / grpo:.3f}")
    print(f"total wall time {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
