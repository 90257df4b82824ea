"""
Policy Split's overhead over GRPO, measured side by side: time per optimizer step, per phase, peak memory, tokens/s,
at two prompt regimes and any completion lengths.

    python -m policy_split_trl.benchmarks.step_overhead                       # embedded SmolLM2-135M, G=8, 64 tokens
    python -m policy_split_trl.benchmarks.step_overhead --prompt_regimes short long --completion_lengths 64 256
    python -m policy_split_trl.benchmarks.step_overhead --device cuda --model Qwen/Qwen3-0.6B   # GPU, vLLM colocate

Variants (each run in its own process, alternated A B C A B C ... after a warm-up step that is not counted):

- `grpo`: TRL's `GRPOTrainer`; `grpo_shared_prefix`: the same with [`~policy_split_trl.shared_prefix.SharedPrefixMixin`]
  (what `policy-split-train --method grpo` trains);
- `floor`, `floor_shared_prefix`: GRPO plus one extra loss forward/backward over the same rows (its gradient is
  GRPO's): what rollout sharing costs at the least, since every rollout is trained twice;
- `policy_split`: `PolicySplitGRPOTrainer` with its defaults (shared prefix on); `policy_split_padded`: with
  `shared_prefix=False` (TRL's padded rows, the default before issue 16);
- optional: `policy_split_low_memory` (`bonus_from_loss_pass=False`: a scoring pass, the high-entropy context trained
  in chunks) and `policy_split_reference` (`optimized_step=False`, `shared_prefix=False`: the straightforward path).

Prompt regimes: `short`, the quickstart's arithmetic questions (~50 tokens with SmolLM2's chat template), and `long`,
the same questions after `--long_prompt_tokens` (default 1,000) tokens of reference notes, as in long-context or agentic
tasks (each query its own notes). Every completion is forced to exactly its length (`min_new_tokens`), so all variants
process the same tokens. Printed per (regime, completion length): the median step time of each variant, the ratios to
`grpo`, `grpo_shared_prefix`, `floor` and `floor_shared_prefix`, peak memory (RSS of the process; peak CUDA memory on
a GPU) and a per-phase breakdown (generation, rewards, no-grad scoring, loss forward, backward, optimizer), with the
issue's targets. Written to `--output_dir`: `results.json`, `results.md` and `step_overhead.png`.
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

VARIANTS = (
    "grpo",
    "grpo_shared_prefix",
    "floor",
    "floor_shared_prefix",
    "policy_split",
    "policy_split_padded",
    "policy_split_low_memory",
    "policy_split_reference",
)
DEFAULT_VARIANTS = VARIANTS[:6]
GRPO_VARIANTS = {  # variant -> (one extra loss pass: the floor, shared prefix)
    "grpo": (False, False),
    "grpo_shared_prefix": (False, True),
    "floor": (True, False),
    "floor_shared_prefix": (True, True),
}
POLICY_SPLIT_VARIANTS = {  # variant -> PolicySplitGRPOConfig settings
    "policy_split": {},
    "policy_split_padded": {"shared_prefix": False},
    "policy_split_low_memory": {"bonus_from_loss_pass": False},
    "policy_split_reference": {"optimized_step": False, "shared_prefix": False},
}
PROMPT_REGIMES = ("short", "long")
PHASES = ("generation", "rewards", "scoring", "loss_forward", "backward", "optimizer", "other")
# Issue 16's targets, per prompt regime: ratio name -> {regime: largest value that meets it}.
TARGETS = {
    "time_policy_split_over_grpo": {"short": 1.35, "long": 1.0},
    "time_policy_split_over_floor_shared_prefix": {"short": 1.10},
    "memory_policy_split_over_grpo": {"short": 1.3},
}
# Denominators of the printed ratios: TRL's GRPO, GRPO with shared prefix, and the two floors.
BASELINES = ("grpo", "grpo_shared_prefix", "floor", "floor_shared_prefix")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m policy_split_trl.benchmarks.step_overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="embedded:smollm2-135m-instruct", help="Hub id, local path or embedded:<name>.")
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--queries", type=int, default=1, help="Queries per optimizer step (rollouts = queries x G).")
    p.add_argument(
        "--completion_lengths", type=int, nargs="+", default=[64], help="Tokens per completion, each a cell."
    )
    p.add_argument("--prompt_regimes", nargs="+", default=["short"], choices=PROMPT_REGIMES)
    p.add_argument("--long_prompt_tokens", type=int, default=1000, help="Tokens of notes before a 'long' question.")
    p.add_argument("--steps", type=int, default=3, help="Optimizer steps per run; the first is a warm-up.")
    p.add_argument("--rounds", type=int, default=2, help="Runs of each variant, alternated.")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    p.add_argument("--lora", action="store_true", help="LoRA (r 16) instead of full fine-tuning.")
    p.add_argument("--no_rollout_sharing", action="store_true", help="Policy Split without sharing (Eq. 9).")
    p.add_argument(
        "--no_optimized_step", action="store_true", help="Policy Split's straightforward path (the 'before' numbers)."
    )
    p.add_argument("--use_vllm", action="store_true", help="Generate with vLLM (colocate), as in the paper.")
    p.add_argument("--bf16", action="store_true")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: train on the GPU with bf16 and generate with vLLM colocate (when vLLM is installed).",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/step_overhead")
    p.add_argument("--run_one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    p.add_argument("--resume", action="store_true", help="Keep the runs of an interrupted invocation (runs.jsonl).")
    p.add_argument("--cell", help=argparse.SUPPRESS)  # internal: "<regime>:<completion length>" of that run
    return p


def long_prompt_dataset(num_samples: int, seed: int, context_tokens: int, tokenizer: Any) -> Any:
    """
    The quickstart's arithmetic questions, each after its own `context_tokens` tokens (or a few more) of reference
    notes ("Note 17: 12 + 5 = 17."), as a long-context or agentic prompt would carry.
    """
    import random

    from datasets import Dataset

    from policy_split_trl.data import synthetic_arithmetic

    rows = []
    for index, row in enumerate(synthetic_arithmetic(num_samples, seed=seed)):
        rng = random.Random(seed * 100_003 + index)
        notes, length = [], 0
        while length < context_tokens:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            notes.append(f"Note {len(notes) + 1}: {a} + {b} = {a + b}.")
            length += len(tokenizer(notes[-1] + "\n", add_special_tokens=False)["input_ids"])
        message = row["prompt"][0]
        content = "Reference notes (not all needed):\n" + "\n".join(notes) + "\n\n" + message["content"]
        rows.append({"prompt": [{**message, "content": content}], "solution": row["solution"]})
    return Dataset.from_list(rows)


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
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig

    from policy_split_trl import PolicySplitGRPOConfig, PolicySplitGRPOTrainer
    from policy_split_trl.data import synthetic_arithmetic
    from policy_split_trl.embedded import resolve_model_id
    from policy_split_trl.rewards import arithmetic_reward

    cuda = args.device == "cuda"
    regime, length = args.cell.split(":")
    length = int(length)
    rollouts = args.queries * args.num_generations
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
    if args.use_vllm:
        common["vllm_max_model_length"] = args.long_prompt_tokens + 512 + length if regime == "long" else 1024 + length
    model_id = resolve_model_id(args.model)
    if regime == "long":
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        dataset = long_prompt_dataset(rollouts * args.steps, args.seed, args.long_prompt_tokens, tokenizer)
    else:
        dataset = synthetic_arithmetic(rollouts * args.steps, seed=args.seed)
    if variant in POLICY_SPLIT_VARIANTS:
        settings = {"rollout_sharing": not args.no_rollout_sharing, "optimized_step": not args.no_optimized_step}
        config = PolicySplitGRPOConfig(**common, **{**settings, **POLICY_SPLIT_VARIANTS[variant]})
        trainer_cls: type = PolicySplitGRPOTrainer
    else:
        config = GRPOConfig(**common)
        trainer_cls = grpo_trainer_class(*GRPO_VARIANTS[variant])
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)
    trainer = trainer_cls(
        model=model_id, reward_funcs=[arithmetic_reward], args=config, train_dataset=dataset, peft_config=peft_config
    )
    first = dataset[0]["prompt"]
    template = trainer.processing_class.apply_chat_template
    prompt_tokens = len(template(first, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
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
        "cell": args.cell,
        "prompt_tokens": prompt_tokens,
        "steps": timer.steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "rollouts_per_step": rollouts,
        "completion_tokens_per_step": rollouts * length,
    }


def grpo_trainer_class(floor: bool, shared_prefix: bool) -> type:
    """TRL's `GRPOTrainer`, with [`SharedPrefixMixin`] as `policy-split-train` composes it, and/or the floor's pass."""
    from trl import GRPOTrainer

    from policy_split_trl.methods import COMPOSITIONS, compose_trainer
    from policy_split_trl.shared_prefix import SharedPrefixMixin

    base = compose_trainer(GRPOTrainer, [c for c in COMPOSITIONS if c.mixin is SharedPrefixMixin and shared_prefix])
    if not floor:
        return base

    class FloorGRPOTrainer(base):
        """GRPO plus one extra loss forward/backward over the same rows; the gradient is exactly GRPO's."""

        def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Any:
            loss = super()._compute_loss(model, inputs)
            extra = super()._compute_loss(model, inputs)
            # Multiplying by 0 keeps the extra pass in the graph: autograd still runs its whole backward.
            return loss + 0.0 * extra

    return FloorGRPOTrainer


# -------------------------------------------------------------------------------------------------------- the driver
# Ratios printed besides those of every Policy Split variant: what shared prefixes and the extra pass cost GRPO.
GRPO_RATIOS = (("grpo_shared_prefix", "grpo"), ("floor", "grpo"), ("floor_shared_prefix", "grpo_shared_prefix"))


def summarize_cell(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """
    One (prompt regime, completion length) cell: median per-step time and phases per variant (warm-up steps dropped),
    peak memory, tokens/s, and the ratios of every Policy Split variant to each of [`BASELINES`] present.
    """
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
            "prompt_tokens": mine[0].get("prompt_tokens"),
        }
    pairs = [(v, b) for v in POLICY_SPLIT_VARIANTS for b in BASELINES] + list(GRPO_RATIOS)
    ratios: dict[str, float] = {}
    for name, baseline in pairs:
        if name in by_variant and baseline in by_variant:
            ratios[f"time_{name}_over_{baseline}"] = (
                by_variant[name]["step_time_s"] / by_variant[baseline]["step_time_s"]
            )
    if "grpo" in by_variant:
        grpo = by_variant["grpo"]
        memory = "peak_cuda_mb" if grpo["peak_cuda_mb"] is not None else "peak_rss_mb"
        for name in (v for v in by_variant if v != "grpo"):
            ratios[f"memory_{name}_over_grpo"] = by_variant[name][memory] / grpo[memory]
    return {"variants": by_variant, "ratios": ratios}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """[`summarize_cell`] of every cell (`"<regime>:<completion length>"`), and the issue's targets with verdicts."""
    cells = {
        cell: summarize_cell([r for r in runs if r["cell"] == cell]) for cell in dict.fromkeys(r["cell"] for r in runs)
    }
    verdicts = []
    for cell, summary in cells.items():
        regime = cell.split(":")[0]
        for name, thresholds in TARGETS.items():
            if regime in thresholds and name in summary["ratios"]:
                value, target = summary["ratios"][name], thresholds[regime]
                met = value <= target if target != 1.0 else value < target  # "faster than GRPO": strictly
                verdicts.append({"cell": cell, "ratio": name, "value": value, "target": target, "met": met})
    return {"cells": cells, "targets": TARGETS, "verdicts": verdicts}


def format_report(summary: dict[str, Any], settings: dict[str, Any]) -> str:
    lines = ["Step overhead: " + ", ".join(f"{k}={v}" for k, v in settings.items())]
    for cell, cell_summary in summary["cells"].items():
        regime, length = cell.split(":")
        tokens = next(iter(cell_summary["variants"].values()))["prompt_tokens"]
        lines += [
            "",
            f"### {regime} prompts (~{tokens} tokens, normal context), {length}-token completions",
            "",
            "| variant | step (s) | " + " | ".join(PHASES) + " | peak RSS (MB) | peak CUDA (MB) | completion tok/s |",
            "|---|---|" + "---|" * len(PHASES) + "---|---|---|",
        ]
        for name, v in cell_summary["variants"].items():
            cuda = "" if v["peak_cuda_mb"] is None else f"{v['peak_cuda_mb']:.0f}"
            lines.append(
                f"| {name} | {v['step_time_s']:.3f} | "
                + " | ".join(f"{v['phases_s'][k]:.3f}" for k in PHASES)
                + f" | {v['peak_rss_mb']:.0f} | {cuda} | {v['completion_tokens_per_s']:.1f} |"
            )
        lines.append("")
        verdicts = {v["ratio"]: v for v in summary["verdicts"] if v["cell"] == cell}
        for name, value in cell_summary["ratios"].items():
            verdict = verdicts.get(name)
            mark = (
                f" (target {'<' if verdict and verdict['target'] == 1.0 else '<='} {verdict['target']}: "
                if verdict
                else ""
            )
            mark += ("met)" if verdict["met"] else "NOT met)") if verdict else ""
            lines.append(f"{name}: {value:.3f}{mark}")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: str) -> str | None:
    """Per cell, one stacked bar of phases per variant (median seconds per step), with its peak memory on top."""
    from policy_split_trl.eval.report import load_pyplot, save_figure

    plt = load_pyplot()
    if plt is None:
        return None
    cells = list(summary["cells"])
    fig, axes = plt.subplots(1, len(cells), figsize=(max(8.0, 4.5 * len(cells)), 5.5), squeeze=False)
    for ax, cell in zip(axes[0], cells, strict=True):
        variants = summary["cells"][cell]["variants"]
        names = list(variants)
        bottom = [0.0] * len(names)
        for phase in PHASES:
            values = [variants[n]["phases_s"][phase] for n in names]
            label = "loss forward (+ backward of parts trained first)" if phase == "loss_forward" else phase
            ax.bar(names, values, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        for x, (name, top) in enumerate(zip(names, bottom, strict=True)):
            memory = variants[name]["peak_cuda_mb"] or variants[name]["peak_rss_mb"]
            ax.annotate(f"{memory / 1024:.1f} GB", (x, top), ha="center", va="bottom", fontsize=7)
        regime, length = cell.split(":")
        ax.set_title(f"{regime} prompts, {length}-token completions", fontsize=10)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    axes[0][0].set_ylabel("seconds per optimizer step (median)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7)
    fig.suptitle("Time per phase (peak memory on top): Policy Split vs GRPO, shared prefixes on/off", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return save_figure(fig, plt, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.device == "cuda":  # bf16, and vLLM colocate where it can run; the same in the driver and in each run
        from policy_split_trl.eval.backends import vllm_available

        args.bf16, args.use_vllm = True, args.use_vllm or vllm_available()
    if args.run_one:
        print(json.dumps(run_one(args.run_one, args)))
        return {}
    os.makedirs(args.output_dir, exist_ok=True)
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--resume",)]
    settings = {
        "model": args.model,
        "device": args.device,
        "G": args.num_generations,
        "queries": args.queries,
        "long_prompt_tokens": args.long_prompt_tokens,
        "lora": args.lora,
        "rollout_sharing": not args.no_rollout_sharing,
        "optimized_step": not args.no_optimized_step,
        "vllm": args.use_vllm,
        "bf16": args.bf16,
        "rounds": args.rounds,
        "steps_per_run": args.steps,
        "seed": args.seed,
    }
    # Every finished run is appended here at once: `--resume` after a crash or an interruption skips them.
    journal = os.path.join(args.output_dir, "runs.jsonl")
    runs = []
    if args.resume and os.path.exists(journal):
        with open(journal) as f:
            runs = [r for r in map(json.loads, f) if r.get("settings") == settings]
        print(f"Resuming: {len(runs)} runs already done ({journal}).")
    elif os.path.exists(journal):
        os.remove(journal)
    cells = [f"{regime}:{length}" for regime in args.prompt_regimes for length in args.completion_lengths]
    plan = [(cell, r, v) for cell in cells for r in range(args.rounds) for v in args.variants]
    done = {(r["cell"], r["round"], r["variant"]) for r in runs}
    started = time.perf_counter()
    for index, (cell, round_index, variant) in enumerate(plan):
        if (cell, round_index, variant) in done:
            continue
        elapsed = time.perf_counter() - started
        print(f"[{elapsed:7.1f}s] run {index + 1}/{len(plan)}: {cell} round {round_index + 1}: {variant}", flush=True)
        # One process per run: peak memory is the variant's own, and no run warms another's caches.
        command = [sys.executable, "-m", "policy_split_trl.benchmarks.step_overhead", *forwarded]
        proc = subprocess.run(
            [*command, "--run_one", variant, "--cell", cell], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{variant} ({cell}) run failed; rerun with --resume to continue:\n{proc.stderr[-4000:]}"
            )
        run = {**json.loads(proc.stdout.strip().splitlines()[-1]), "round": round_index, "settings": settings}
        runs.append(run)
        with open(journal, "a") as f:
            f.write(json.dumps(run) + "\n")
    runs.sort(key=lambda r: plan.index((r["cell"], r["round"], r["variant"])))
    summary = summarize(runs)
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
