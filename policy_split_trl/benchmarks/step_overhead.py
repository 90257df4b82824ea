"""
Policy Split's overhead over GRPO, measured side by side: time per optimizer step, per phase, peak memory, tokens/s.

    python -m policy_split_trl.benchmarks.step_overhead                       # embedded SmolLM2-135M, G=8, 64 tokens
    python -m policy_split_trl.benchmarks.step_overhead --model Qwen/Qwen3-0.6B --use_vllm --bf16 --rounds 3
    python -m policy_split_trl.benchmarks.step_overhead --lora --no_rollout_sharing --max_completion_length 128

Variants (each run in its own process, alternated A B C A B C ... after a warm-up step that is not counted):

- `grpo`: TRL's `GRPOTrainer`;
- `policy_split`: `PolicySplitGRPOTrainer` with the same settings;
- `floor`: GRPO plus one extra loss forward/backward over the same rows (its gradient is GRPO's): what rollout sharing
  costs at the least, since every rollout is trained twice;
- optional: `policy_split_low_memory` (`bonus_from_loss_pass=False`: a scoring pass, the high-entropy context trained
  in chunks) and `policy_split_reference` (`optimized_step=False`: the straightforward path, the "before").

Every completion is forced to exactly `max_completion_length` tokens (`min_new_tokens`), so all variants process the
same number of tokens. Printed: the median step time of each variant, the ratios `policy_split / grpo` and
`policy_split / floor`, peak memory (RSS of the process; peak CUDA memory on a GPU) and a per-phase breakdown
(generation, rewards, no-grad scoring, loss forward, backward, optimizer). Written to `--output_dir`: `results.json`
and `step_overhead.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

VARIANTS = ("grpo", "policy_split", "floor", "policy_split_low_memory", "policy_split_reference")
POLICY_SPLIT_VARIANTS = {  # variant -> PolicySplitGRPOConfig settings
    "policy_split": {},
    "policy_split_low_memory": {"bonus_from_loss_pass": False},
    "policy_split_reference": {"optimized_step": False},
}
PHASES = ("generation", "rewards", "scoring", "loss_forward", "backward", "optimizer", "other")
# Issue targets (paper parity: ~1.4x GRPO's wall time, Section 4.4).
TARGETS = {
    "time_policy_split_over_grpo": 1.4,
    "time_policy_split_over_floor": 1.10,
    "memory_policy_split_over_grpo": 1.3,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m policy_split_trl.benchmarks.step_overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="embedded:smollm2-135m-instruct", help="Hub id, local path or embedded:<name>.")
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--queries", type=int, default=1, help="Queries per optimizer step (rollouts = queries x G).")
    p.add_argument("--max_completion_length", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="Optimizer steps per run; the first is a warm-up.")
    p.add_argument("--rounds", type=int, default=2, help="Runs of each variant, alternated.")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS[:3]), choices=VARIANTS)
    p.add_argument("--lora", action="store_true", help="LoRA (r 16) instead of full fine-tuning.")
    p.add_argument("--no_rollout_sharing", action="store_true", help="Policy Split without sharing (Eq. 9).")
    p.add_argument(
        "--no_optimized_step", action="store_true", help="Policy Split's straightforward path (the 'before' numbers)."
    )
    p.add_argument("--use_vllm", action="store_true", help="Generate with vLLM (colocate), as in the paper.")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/step_overhead")
    p.add_argument("--run_one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    return p


# ----------------------------------------------------------------------------------------------- one run, in-process
class PhaseTimer:
    """Wall time per phase of every optimizer step, from wrappers around the trainer's methods and two callbacks."""

    def __init__(self, sync: Any) -> None:
        self.sync = sync
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.depth = 0

    def wrap(self, obj: Any, name: str, phase: str, only_no_grad: bool = False, only_grad: bool = False) -> None:
        import torch

        original = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            grad = torch.is_grad_enabled()
            if self.depth or (only_no_grad and grad) or (only_grad and not grad):
                return original(*args, **kwargs)
            self.depth += 1
            self.sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.sync()
                self.current[phase] += time.perf_counter() - start
                self.depth -= 1

        setattr(obj, name, timed)


def run_one(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant for `args.steps` steps in this process and return its per-step times and peak memory."""
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from policy_split_trl import PolicySplitGRPOConfig, PolicySplitGRPOTrainer
    from policy_split_trl.data import synthetic_arithmetic
    from policy_split_trl.embedded import resolve_model_id
    from policy_split_trl.rewards import arithmetic_reward

    cuda = torch.cuda.is_available()
    rollouts = args.queries * args.num_generations
    length = args.max_completion_length
    common: dict[str, Any] = {
        "output_dir": tempfile.mkdtemp(prefix="step_overhead-"),
        "per_device_train_batch_size": rollouts,
        "num_generations": args.num_generations,
        "max_completion_length": length,
        "max_steps": args.steps,
        "learning_rate": 1e-6,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "seed": args.seed,
        "disable_tqdm": True,
        "use_cpu": not cuda,
        "bf16": args.bf16,
        "loss_type": "dapo",
        "beta": 0.0,
        "temperature": 1.0,
        "use_vllm": args.use_vllm,
        "vllm_mode": "colocate",
        # Every completion exactly `length` tokens: all variants process the same tokens.
        "generation_kwargs": {"min_tokens": length} if args.use_vllm else {"min_new_tokens": length},
    }
    if variant in POLICY_SPLIT_VARIANTS:
        settings = {"rollout_sharing": not args.no_rollout_sharing, "optimized_step": not args.no_optimized_step}
        config = PolicySplitGRPOConfig(**common, **{**settings, **POLICY_SPLIT_VARIANTS[variant]})
        trainer_cls: type = PolicySplitGRPOTrainer
    else:
        config = GRPOConfig(**common)
        trainer_cls = GRPOTrainer if variant == "grpo" else _floor_trainer_class()
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)
    trainer = trainer_cls(
        model=resolve_model_id(args.model),
        reward_funcs=[arithmetic_reward],
        args=config,
        train_dataset=synthetic_arithmetic(rollouts * args.steps, seed=args.seed),
        peft_config=peft_config,
    )
    timer = PhaseTimer(torch.cuda.synchronize if cuda else lambda: None)
    if hasattr(trainer, "_generate"):
        timer.wrap(trainer, "_generate", "generation")
    timer.wrap(trainer, "_calculate_rewards", "rewards")
    timer.wrap(trainer, "_get_per_token_logps_and_entropies", "scoring", only_no_grad=True)
    timer.wrap(trainer, "compute_loss", "loss_forward", only_grad=True)

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            timer.sync()
            timer.current.clear()
            self.start = time.perf_counter()

        def on_pre_optimizer_step(self, *a: Any, **k: Any) -> None:
            timer.sync()
            self.optimizer_start = time.perf_counter()

        def on_optimizer_step(self, *a: Any, **k: Any) -> None:
            timer.sync()
            timer.current["optimizer"] += time.perf_counter() - self.optimizer_start

        def on_step_end(self, *a: Any, **k: Any) -> None:
            timer.sync()
            total = time.perf_counter() - self.start
            phases = dict(timer.current)
            # TRL's training_step = _prepare_inputs (generation, rewards, scoring) + compute_loss + backward.
            step_time = trainer._metrics["train"]["step_time"][-1] if trainer._metrics["train"]["step_time"] else 0
            prepared = sum(phases.get(k, 0.0) for k in ("generation", "rewards", "scoring"))
            phases["backward"] = max(step_time - prepared - phases.get("loss_forward", 0.0), 0.0)
            phases["other"] = max(total - sum(phases.values()), 0.0)
            timer.steps.append({"total": total, **{k: phases.get(k, 0.0) for k in PHASES}})

    trainer.add_callback(StepClock())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return {
        "variant": variant,
        "steps": timer.steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "rollouts_per_step": rollouts,
        "completion_tokens_per_step": rollouts * length,
    }


def _floor_trainer_class() -> type:
    from trl import GRPOTrainer

    class FloorGRPOTrainer(GRPOTrainer):
        """GRPO plus one extra loss forward/backward over the same rows; the gradient is exactly GRPO's."""

        def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Any:
            loss = super()._compute_loss(model, inputs)
            extra = super()._compute_loss(model, inputs)
            # Multiplying by 0 keeps the extra pass in the graph: autograd still runs its whole backward.
            return loss + 0.0 * extra

    return FloorGRPOTrainer


# -------------------------------------------------------------------------------------------------------- the driver
def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median per-step time and phases per variant (warm-up steps dropped), peak memory, tokens/s and the ratios."""
    by_variant: dict[str, dict[str, Any]] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        steps = [s for r in runs if r["variant"] == variant for s in r["steps"][1:]]
        mine = [r for r in runs if r["variant"] == variant]
        total = statistics.median(s["total"] for s in steps)
        by_variant[variant] = {
            "step_time_s": total,
            "phases_s": {k: statistics.median(s[k] for s in steps) for k in PHASES},
            "samples": len(steps),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
            "peak_cuda_mb": max(r["peak_cuda_mb"] for r in mine) if mine[0]["peak_cuda_mb"] is not None else None,
            "completion_tokens_per_s": mine[0]["completion_tokens_per_step"] / total,
        }
    ratios: dict[str, float] = {}
    for name in (v for v in POLICY_SPLIT_VARIANTS if v in by_variant):
        ps = by_variant[name]
        if "grpo" in by_variant:
            grpo = by_variant["grpo"]
            ratios[f"time_{name}_over_grpo"] = ps["step_time_s"] / grpo["step_time_s"]
            memory = "peak_cuda_mb" if grpo["peak_cuda_mb"] is not None else "peak_rss_mb"
            ratios[f"memory_{name}_over_grpo"] = ps[memory] / grpo[memory]
        if "floor" in by_variant:
            ratios[f"time_{name}_over_floor"] = ps["step_time_s"] / by_variant["floor"]["step_time_s"]
    return {"variants": by_variant, "ratios": ratios, "targets": TARGETS}


def format_report(summary: dict[str, Any], settings: dict[str, Any]) -> str:
    lines = [
        "Step overhead: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "",
        "| variant | step (s) | " + " | ".join(PHASES) + " | peak RSS (MB) | peak CUDA (MB) | completion tok/s |",
        "|---|---|" + "---|" * len(PHASES) + "---|---|---|",
    ]
    for name, v in summary["variants"].items():
        cuda = "" if v["peak_cuda_mb"] is None else f"{v['peak_cuda_mb']:.0f}"
        lines.append(
            f"| {name} | {v['step_time_s']:.3f} | "
            + " | ".join(f"{v['phases_s'][k]:.3f}" for k in PHASES)
            + f" | {v['peak_rss_mb']:.0f} | {cuda} | {v['completion_tokens_per_s']:.1f} |"
        )
    lines.append("")
    for name, value in summary["ratios"].items():
        target = summary["targets"].get(name.replace("_low_memory", "").replace("_reference", ""))
        verdict = f" (target <= {target}: {'met' if value <= target else 'NOT met'})" if target else ""
        lines.append(f"{name}: {value:.3f}{verdict}")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: str) -> str | None:
    from policy_split_trl.eval.report import load_pyplot, save_figure

    plt = load_pyplot()
    if plt is None:
        return None
    names = list(summary["variants"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = [0.0] * len(names)
    for phase in PHASES:
        values = [summary["variants"][n]["phases_s"][phase] for n in names]
        label = "loss forward (+ backward of parts trained first)" if phase == "loss_forward" else phase
        ax.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("seconds per optimizer step (median)")
    ax.set_title("Policy Split vs GRPO: time per phase")
    ax.tick_params(axis="x", labelrotation=15)
    ax.legend(fontsize=8)
    return save_figure(fig, plt, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.run_one:
        print(json.dumps(run_one(args.run_one, args)))
        return {}
    os.makedirs(args.output_dir, exist_ok=True)
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--run_one"]
    runs = []
    started = time.perf_counter()
    for round_index in range(args.rounds):
        for variant in args.variants:
            print(
                f"[{time.perf_counter() - started:7.1f}s] round {round_index + 1}/{args.rounds}: {variant}", flush=True
            )
            # One process per run: peak memory is the variant's own, and no run warms another's caches.
            proc = subprocess.run(
                [sys.executable, "-m", "policy_split_trl.benchmarks.step_overhead", *forwarded, "--run_one", variant],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"{variant} run failed:\n{proc.stderr[-4000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary = summarize(runs)
    settings = {
        "model": args.model,
        "G": args.num_generations,
        "queries": args.queries,
        "completion_tokens": args.max_completion_length,
        "lora": args.lora,
        "rollout_sharing": not args.no_rollout_sharing,
        "optimized_step": not args.no_optimized_step,
        "vllm": args.use_vllm,
        "rounds": args.rounds,
        "steps_per_run": args.steps,
    }
    report = format_report(summary, settings)
    print(report)
    result = {"settings": settings, **summary, "runs": runs, "wall_time_s": time.perf_counter() - started}
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(report + "\n")
    png = plot(summary, os.path.join(args.output_dir, "step_overhead.png"))
    print(f"Results: {args.output_dir}/results.json, results.md" + (f", {png}" if png else ""))
    return result


if __name__ == "__main__":
    main()
