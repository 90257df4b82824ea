"""
Does Policy Split split the modes? GRPO, GRPO with rollout sharing (Policy Split at eta 0) and Policy Split trained
side by side, paired by seed, with the gap between the modes measured the same way for all three.

    python -m policy_split_trl.benchmarks.mode_split                        # SmolLM2-135M on CPU, the defaults
    python -m policy_split_trl.benchmarks.mode_split --seeds 0 1 2 3 4 --max_steps 40 --output_dir outputs/ms40
    python -m policy_split_trl.benchmarks.mode_split --learning_rate 2e-5   # any policy-split-train flag is passed on

Every method trains with the same recipe (default `recipes/quickstart.yaml`: seeded arithmetic, 1 query x 8 rollouts
of up to 24 tokens per step, the embedded SmolLM2-135M-Instruct), the same budget and the same seeds, through the
training script's own functions (`policy_split_trl.training`: argument parsing, `apply_method`, dataset, rewards,
model loading). Measured:

- during training, at step 0 and every `--probe_every` steps (and at the last step), a fixed held-out probe
  ([`~policy_split_trl.probe.ModeGapProbe`]): completions sampled ONCE from the initial model after held-out prompts, in
  both modes, saved in `probe.json` and scored by every method and seed in both contexts: the full-vocabulary token
  entropy without and with the high-entropy (HE) system prompt and `KL(pi_HE || pi)` (nats, temperature 1). It is the
  same measurement for plain GRPO (never trained with the HE prompt) as for the two dual-mode methods, and it moves
  only when the model does;
- at the end of each run, the paper's Table 5 per mode with the dual-mode evaluation harness
  ([`~policy_split_trl.eval.harness.evaluate_modes`]) on held-out arithmetic problems: accuracy and mean token entropy
  (bits) per mode, |dAcc|, |dEnt|, |dLen| and `KL(pi_HE || pi)` on the HE samples;
- from the trainer's logs: the fraction of groups whose rewards all agree (`frac_reward_zero_std`: no gradient) and
  the mean reward.

Written to `--output_dir`: `probe.json`, per run `runs/<method>/seed<seed>/run.json` (a rerun skips a finished run;
its settings must equal the saved ones, or the rerun stops naming what differs), `summary.json`, `summary.md` (mean
+- std over seeds of every metric per method, and the per-seed differences of `--paired A B`) and `mode_split.png`
(probe KL and both contexts' entropies over steps: mean line, +-std band over seeds, one colour per method).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_CONFIG = "recipes/mode_split_cpu.yaml"
DEFAULT_METHODS = ("grpo", "grpo_rollout_sharing", "policy_split")
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_PAIRED = ("policy_split", "grpo_rollout_sharing")
PROBE_FILE = "probe.json"
RUN_FILE = "run.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
PLOT_FILE = "mode_split.png"
# Set by this driver for every run; the same flags among the forwarded ones would fight it.
_DRIVER_FLAGS = ("config", "method", "seed", "max_steps", "output_dir", "model_name_or_path", "dry_run")
# The probe's curves: key in a probe measurement -> plot/table label (nats).
CURVE_METRICS: dict[str, str] = {
    "kl_high_entropy_normal": "probe KL(pi_HE ‖ pi) (nats)",
    "entropy_normal_context": "probe entropy, normal context (nats)",
    "entropy_high_entropy_context": "probe entropy, HE context (nats)",
    "entropy_gap": "probe entropy gap, HE - normal (nats)",
}
# Every per-run metric of the summary: key -> label, in table order.
SUMMARY_METRICS: dict[str, str] = {
    **{f"probe/{key}": f"{label}, last step" for key, label in CURVE_METRICS.items()},
    "eval/accuracy_normal": "Acc normal (%)",
    "eval/accuracy_high_entropy": "Acc HE (%)",
    "eval/entropy_bits_normal": "Ent normal (bits)",
    "eval/entropy_bits_high_entropy": "Ent HE (bits)",
    "eval/abs_delta_accuracy": "abs dAcc (%)",
    "eval/abs_delta_entropy_bits": "abs dEnt (bits)",
    "eval/abs_delta_length": "abs dLen (tokens)",
    "eval/kl_high_entropy_normal": "KL(pi_HE ‖ pi), HE samples (nats)",
    "train/frac_reward_zero_std": "groups with zero reward std (fraction)",
    "train/reward": "train reward (mean over steps)",
    "train/seconds_per_step": "train s/step",
}


class SettingsMismatchError(ValueError):
    """A saved run or probe was made with other settings than the ones asked for now."""


# ------------------------------------------------------------------------------------------------- aggregation
def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """
    Mean and sample standard deviation (`n - 1` in the denominator) of `values`.

    Args:
        values (`Sequence[float]`):
            One value per seed; at least one.

    Returns:
        `tuple[float, float | None]`: the mean, and the standard deviation (`None` for a single value: one seed gives
        no spread).

    Raises:
        `ValueError`: for no values.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value.")
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values, xbar=mean) if len(values) > 1 else None


def aggregate_metrics(
    runs: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None = None
) -> dict[str, dict[str, dict[str, Any]]]:
    """
    Mean +- std over seeds of each metric, per method.

    Args:
        runs (`Sequence[Mapping]`):
            Run records, each with `method`, `seed` and `metrics` (metric name -> value; a missing metric or `None` is
            left out of that method's values).
        metrics (`Sequence[str]`, *optional*):
            Which metrics, in order; defaults to every metric of the runs.

    Returns:
        `dict`: `{method: {metric: {"mean", "std", "n", "values", "seeds"}}}`, methods in the order of `runs`; `std` is
        `None` with one seed. Metrics with no value for a method are absent from it.
    """
    if metrics is None:
        metrics = list(dict.fromkeys(name for run in runs for name in run["metrics"]))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for method in dict.fromkeys(run["method"] for run in runs):
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        out[method] = {}
        for name in metrics:
            pairs = [(r["seed"], r["metrics"][name]) for r in mine if r["metrics"].get(name) is not None]
            if not pairs:
                continue
            mean, std = mean_std([v for _, v in pairs])
            out[method][name] = {
                "mean": mean,
                "std": std,
                "n": len(pairs),
                "values": [v for _, v in pairs],
                "seeds": [s for s, _ in pairs],
            }
    return out


def paired_differences(
    runs: Sequence[Mapping[str, Any]], method: str, baseline: str, metrics: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """
    Per-seed differences `method - baseline` of each metric, over the seeds both have, and their mean +- std.

    Pairing by seed removes what the two runs of a seed share (the data order, the probe, the evaluation problems), so
    the spread of the difference is smaller than the two methods' own spreads when the seed matters.

    Args:
        runs (`Sequence[Mapping]`):
            Run records (`method`, `seed`, `metrics`).
        method, baseline (`str`):
            The two methods compared.
        metrics (`Sequence[str]`, *optional*):
            Which metrics; defaults to every metric of the runs.

    Returns:
        `dict`: `{metric: {"mean", "std", "n", "values", "seeds", "positive"}}`; `positive` counts the seeds where the
        difference is > 0. Metrics without a paired seed are absent.
    """
    if metrics is None:
        metrics = list(dict.fromkeys(name for run in runs for name in run["metrics"]))
    by_seed = {m: {r["seed"]: r["metrics"] for r in runs if r["method"] == m} for m in (method, baseline)}
    seeds = sorted(set(by_seed[method]) & set(by_seed[baseline]))
    out: dict[str, dict[str, Any]] = {}
    for name in metrics:
        pairs = [
            (seed, by_seed[method][seed][name] - by_seed[baseline][seed][name])
            for seed in seeds
            if by_seed[method][seed].get(name) is not None and by_seed[baseline][seed].get(name) is not None
        ]
        if not pairs:
            continue
        values = [v for _, v in pairs]
        mean, std = mean_std(values)
        out[name] = {
            "mean": mean,
            "std": std,
            "n": len(values),
            "values": values,
            "seeds": [s for s, _ in pairs],
            "positive": sum(v > 0 for v in values),
        }
    return out


def aggregate_curves(
    runs: Sequence[Mapping[str, Any]], metrics: Sequence[str] = tuple(CURVE_METRICS)
) -> dict[str, dict[str, Any]]:
    """
    Mean and std over seeds of the probe curves, step by step, per method.

    Args:
        runs (`Sequence[Mapping]`):
            Run records, each with `method`, `seed` and `probe_curve` (a list of `{"step": int, <metric>: float}`).
        metrics (`Sequence[str]`, *optional*):
            Which metrics of the curves; defaults to [`CURVE_METRICS`].

    Returns:
        `dict`: `{method: {"steps": [...], "n": seeds, <metric>: {"mean": [...], "std": [...]}}}` over the steps every
        seed of the method measured; `std` entries are `None` with one seed.
    """
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(run["method"] for run in runs):
        curves = [{p["step"]: p for p in r["probe_curve"]} for r in runs if r["method"] == method]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        entry: dict[str, Any] = {"steps": steps, "n": len(curves)}
        for name in metrics:
            stats = [mean_std([c[step][name] for c in curves]) for step in steps]
            entry[name] = {"mean": [m for m, _ in stats], "std": [s for _, s in stats]}
        out[method] = entry
    return out


def format_mean_std(stats: Mapping[str, Any] | None, digits: int = 4) -> str:
    """`"mean ± std"` (just the mean with one seed, `"–"` without values)."""
    if not stats:
        return "–"
    text = f"{stats['mean']:.{digits}f}"
    return text if stats.get("std") is None else f"{text} ± {stats['std']:.{digits}f}"


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """
    The summary as markdown: one row per metric, one column per method (mean ± std over seeds), and the paired
    difference `A - B` of `--paired` with the number of seeds where it is > 0.

    Args:
        summary (`Mapping`):
            What [`summarize`] returns.

    Returns:
        `str`.
    """
    methods = list(summary["metrics"])
    labels = summary["labels"]
    paired = summary.get("paired")
    header = ["metric", *(f"{labels[m]} (n={summary['seeds_per_method'][m]})" for m in methods)]
    if paired:
        header.append(f"{labels[paired['method']]} - {labels[paired['baseline']]}, paired (seeds > 0)")
    lines = [
        f"Mode split: {summary['description']}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    initial = summary.get("initial_probe") or {}
    for name, label in SUMMARY_METRICS.items():
        cells = [format_mean_std(summary["metrics"][m].get(name)) for m in methods]
        if paired:
            diff = paired["differences"].get(name)
            cells.append("–" if not diff else f"{format_mean_std(diff)} ({diff['positive']}/{diff['n']})")
        if all(c == "–" for c in cells):
            continue
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if initial:
        lines += [
            "",
            "Probe at step 0 (the initial model, the same for every run): "
            + ", ".join(f"{CURVE_METRICS[k]} {initial[k]:.4f}" for k in CURVE_METRICS if k in initial),
        ]
    return "\n".join(lines) + "\n"


def plot_mode_split(
    curves: Mapping[str, Mapping[str, Any]], path: str, labels: Mapping[str, str] | None = None
) -> str | None:
    """
    Plot the probe curves over training steps: one panel per metric of [`CURVE_METRICS`], one colour per method, the
    mean over seeds as a line and a band of +-1 std.

    Args:
        curves (`Mapping`):
            What [`aggregate_curves`] returns.
        path (`str`):
            The PNG to write (replaced in one step).
        labels (`Mapping[str, str]`, *optional*):
            Method -> legend label.

    Returns:
        `str` or `None`: `path`, or `None` when matplotlib is not installed.
    """
    from policy_split_trl.eval.report import load_pyplot, save_figure

    plt = load_pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, title) in zip(axes.flat, CURVE_METRICS.items(), strict=True):
        for i, (method, entry) in enumerate(curves.items()):
            steps, mean, std = entry["steps"], entry[name]["mean"], entry[name]["std"]
            colour = colours[i % len(colours)]
            label = f"{(labels or {}).get(method, method)} (n={entry['n']})"
            ax.plot(steps, mean, color=colour, marker="o", markersize=3, label=label)
            if all(s is not None for s in std) and steps:
                ax.fill_between(
                    steps,
                    [m - s for m, s in zip(mean, std, strict=True)],
                    [m + s for m, s in zip(mean, std, strict=True)],
                    color=colour,
                    alpha=0.2,
                    linewidth=0,
                )
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Fixed held-out probe: mean over seeds, band = ±1 std", fontsize=11)
    return save_figure(fig, plt, path)


# ----------------------------------------------------------------------------------------------- settings, resume
def settings_differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The keys (dotted, nested mappings walked) whose values differ between `saved` and `current`, as `key: a -> b`."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += settings_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def check_settings(saved: Mapping[str, Any], current: Mapping[str, Any], path: str) -> None:
    """
    Raise [`SettingsMismatchError`] when `saved` (read from `path`) and `current` differ, naming every difference and
    the fix; return quietly when they are equal.
    """
    differences = settings_differences(saved, current)
    if differences:
        raise SettingsMismatchError(
            f"{path} was made with other settings than this command's: " + "; ".join(differences) + ". Rerun with "
            "the original settings to resume, pass another --output_dir for the new ones, or delete "
            f"{os.path.dirname(path) or path} to redo it."
        )


def _json_safe(value: Any) -> Any:
    """Round-trip through JSON (tuples become lists), so that saved and fresh settings compare equal."""
    return json.loads(json.dumps(value, default=str))


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- the driver
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m policy_split_trl.benchmarks.mode_split",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--seed 3` is a training flag (refused), not `--seeds 3`
        epilog="Other flags are passed to every run's policy-split-train parser (e.g. --learning_rate 2e-5).",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help="The training recipe every method uses.")
    p.add_argument("--model", help="Override the recipe's model_name_or_path (Hub id, local path, embedded:<name>).")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="Keys of policy_split_trl.methods.")
    p.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="The same for every method.")
    p.add_argument("--max_steps", type=int, default=24, help="Optimizer steps per run.")
    p.add_argument(
        "--max_operand",
        type=int,
        default=10,
        help="Train on synthetic arithmetic with operands in [0, N], minus held-out problems that the probe and the "
        "evaluation use (files written to <output_dir>/data). 0: the recipe's own dataset, the probe from its test "
        "split and the evaluation on the arithmetic benchmark.",
    )
    p.add_argument("--operations", default="+-", help="Operators of that arithmetic (any of + - *).")
    p.add_argument("--probe_every", type=int, default=6, help="Probe at step 0, every N steps and at the last step.")
    p.add_argument("--probe_prompts", type=int, default=8, help="Held-out prompts of the probe.")
    p.add_argument("--probe_samples_per_mode", type=int, default=1, help="Probe completions per prompt and mode.")
    p.add_argument("--probe_max_new_tokens", type=int, help="Probe completion length; default the recipe's.")
    p.add_argument(
        "--probe_seed",
        type=int,
        default=1000,
        help="Seed of the probe's samples and of its prompts (the recipe's test split drawn with this seed; "
        "synthetic:arithmetic's test split uses seed + 1, so keep it away from the training seeds).",
    )
    p.add_argument("--eval_limit", type=int, default=8, help="Held-out arithmetic problems of the final evaluation.")
    p.add_argument("--eval_k", type=int, default=4, help="Samples per problem and mode in the final evaluation.")
    p.add_argument("--eval_temperature", type=float, default=0.6)
    p.add_argument("--eval_top_p", type=float, default=0.95)
    p.add_argument("--eval_top_k", type=int, default=20)
    p.add_argument("--eval_max_new_tokens", type=int, default=32)
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--no_eval", action="store_true", help="Skip the final Table-5 evaluation (probe and logs only).")
    p.add_argument(
        "--paired",
        nargs=2,
        default=list(DEFAULT_PAIRED),
        metavar=("A", "B"),
        help="Report per-seed differences A - B (when both are among --methods).",
    )
    p.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help="torch CPU threads (torch.set_num_threads). 1 by default: on a CPU shared with other jobs a second "
        "thread waits at every operation for a busy core (SmolLM2 decoding measured 7-9x slower with 2 threads "
        "than with 1 on a busy 2-core machine). 0: torch's default.",
    )
    p.add_argument("--output_dir", default="outputs/mode_split")
    return p


def parse_arguments(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """
    This driver's arguments and the flags passed on to every run's training parser, checked before anything loads.

    Raises:
        `ValueError`: an unknown method, a repeated method or seed, a non-positive count, or a forwarded flag this
        driver sets itself.
    """
    from policy_split_trl.methods import METHODS

    argv = list(sys.argv[1:] if argv is None else argv)
    args, train_flags = build_parser().parse_known_args(argv)
    args.argv = argv
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}.")
    for name in ("methods", "seeds"):
        values = getattr(args, name)
        if len(set(values)) != len(values):
            raise ValueError(f"--{name} lists a value twice: {values}.")
    for name in ("max_steps", "probe_every", "probe_prompts", "probe_samples_per_mode", "eval_limit", "eval_k"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if not os.path.isfile(args.config):
        raise ValueError(f"--config {args.config} does not exist (a path relative to the current directory).")
    if args.max_operand < 0:
        raise ValueError(f"--max_operand must be >= 0 (0: the recipe's dataset), got {args.max_operand}.")
    owned = _DRIVER_FLAGS + (("dataset_name",) if args.max_operand else ())
    for flag in train_flags:
        name = flag[2:].split("=", 1)[0] if flag.startswith("--") else None
        if name in owned:
            hint = " (pass --max_operand 0 to train on your own dataset)" if name == "dataset_name" else ""
            raise ValueError(f"--{name} is set by this driver for every run; use its own option instead{hint}.")
    return args, train_flags


def train_argv(
    args: argparse.Namespace, train_flags: Sequence[str], method: str, seed: int, run_dir: str
) -> list[str]:
    """The `policy-split-train` command line of one run (what its parser and `explicit_arguments` read)."""
    argv = [
        "--config",
        args.config,
        "--method",
        method,
        "--seed",
        str(seed),
        "--max_steps",
        str(args.max_steps),
        "--output_dir",
        os.path.join(run_dir, "trainer"),
        # This driver measures and evaluates itself, prints its own progress and keeps no checkpoint.
        "--mode_report",
        "false",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--logging_steps",
        "1",
        "--disable_tqdm",
        "true",
    ]
    if args.model:
        argv += ["--model_name_or_path", args.model]
    if args.max_operand:
        argv += ["--dataset_name", task_files(args)["train"]]
    return argv + list(train_flags)


def task_files(args: argparse.Namespace) -> dict[str, str]:
    """The paths of the training and held-out arithmetic files of `--max_operand` (see [`write_task_files`])."""
    folder = os.path.join(os.path.abspath(args.output_dir), "data")
    return {"train": os.path.join(folder, "train.jsonl"), "heldout": os.path.join(folder, "heldout.jsonl")}


def write_task_files(
    paths: Mapping[str, str], max_operand: int, operations: str, heldout_size: int, train_size: int = 1000
) -> dict[str, Any]:
    """
    Write the experiment's arithmetic task: `heldout_size` distinct held-out problems (the probe's prompts first, then
    the evaluation's) and `train_size` training rows drawn with [`~policy_split_trl.data.synthetic_arithmetic`] minus
    every held-out problem, as JSON Lines with `prompt` (the question; the training script and the harness add the
    task instruction) and `solution`.

    Args:
        paths (`Mapping[str, str]`):
            `{"train": ..., "heldout": ...}` file paths.
        max_operand (`int`), operations (`str`):
            The generator's operand range `[0, max_operand]` and operators.
        heldout_size (`int`):
            Held-out problems to write.
        train_size (`int`, *optional*, defaults to `1000`):
            Rows drawn for training before the held-out problems are removed.

    Returns:
        `dict`: what was written (sizes, settings and the files' sha256), for the run settings.

    Raises:
        `ValueError`: fewer distinct problems than `heldout_size` (or none left for training) at this operand range.
    """
    from policy_split_trl.data import synthetic_arithmetic
    from policy_split_trl.eval.benchmarks import ARITHMETIC_EVAL_SEED
    from policy_split_trl.eval.files import atomic_write_text

    distinct = (max_operand + 1) ** 2 * len(set(operations))
    if heldout_size >= distinct:
        raise ValueError(
            f"--max_operand {max_operand} with {operations!r} has {distinct} distinct problems: too few for "
            f"{heldout_size} held-out ones and training. Raise --max_operand or lower --probe_prompts/--eval_limit."
        )
    heldout: dict[str, str] = {}
    drawn = synthetic_arithmetic(
        20 * heldout_size, seed=ARITHMETIC_EVAL_SEED, max_operand=max_operand, operations=operations, task="none"
    )
    for row in drawn:
        heldout.setdefault(row["prompt"][0]["content"], row["solution"])
        if len(heldout) == heldout_size:
            break
    if len(heldout) < heldout_size:
        raise ValueError(f"Only {len(heldout)} distinct held-out problems drawn; lower --probe_prompts/--eval_limit.")
    train = [
        (row["prompt"][0]["content"], row["solution"])
        for row in synthetic_arithmetic(
            train_size, seed=0, max_operand=max_operand, operations=operations, task="none"
        )
        if row["prompt"][0]["content"] not in heldout
    ]
    texts = {
        "heldout": "".join(json.dumps({"prompt": q, "solution": a}) + "\n" for q, a in heldout.items()),
        "train": "".join(json.dumps({"prompt": q, "solution": a}) + "\n" for q, a in train),
    }
    for name, text in texts.items():
        os.makedirs(os.path.dirname(paths[name]), exist_ok=True)
        atomic_write_text(paths[name], text)
    return {
        "max_operand": max_operand,
        "operations": operations,
        "heldout": len(heldout),
        "train": len(train),
        **{f"{name}_sha256": _sha256_text(text) for name, text in texts.items()},
    }


def parse_run(argv: list[str]) -> tuple[Any, Any, Any]:
    """Parse and settle one run's arguments exactly as `policy-split-train` does (`prepare_run`: method settings)."""
    from policy_split_trl.training import (
        explicit_arguments,
        make_parser,
        prepare_run,
    )

    script_args, training_args, model_args = make_parser().parse_args_and_config(args=argv)
    prepare_run(script_args, training_args, explicit_arguments(argv))
    return script_args, training_args, model_args


def build_trainer(script_args: Any, training_args: Any, model_args: Any) -> Any:
    """The run's trainer, built from the training script's own functions (rewards, dataset, model id)."""
    from policy_split_trl.embedded import resolve_model_id
    from policy_split_trl.methods import trainer_class
    from policy_split_trl.training import load_reward_funcs, load_split

    reward_funcs = load_reward_funcs(script_args)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    train_dataset = load_split(
        script_args, script_args.dataset_train_split, script_args.max_train_samples, training_args.seed
    )
    return trainer_class(script_args.method, training_args)(
        model=resolve_model_id(model_args.model_name_or_path),
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
    )


def probe_settings(args: argparse.Namespace, script_args: Any, training_args: Any, model_args: Any) -> dict[str, Any]:
    """What the probe is sampled from and with: a saved probe is reused only with the same settings."""
    return _json_safe(
        {
            "model": model_args.model_name_or_path,
            "task": script_args.task,
            "prompts": args.probe_prompts,
            "data": {"heldout_sha256": args.task_info["heldout_sha256"]}
            if args.task_info
            else {"dataset_name": script_args.dataset_name, "split": script_args.dataset_test_split},
            "samples_per_mode": args.probe_samples_per_mode,
            "max_new_tokens": args.probe_max_new_tokens or training_args.max_completion_length,
            "temperature": 1.0,
            "seed": args.probe_seed,
            "high_entropy_system_prompt_sha256": _sha256_text(training_args.high_entropy_system_prompt),
            "chat_template_kwargs": training_args.chat_template_kwargs,
        }
    )


def load_or_sample_probe(
    args: argparse.Namespace, script_args: Any, training_args: Any, model_args: Any
) -> tuple[Any, dict[str, Any]]:
    """
    The probe of this experiment: read from `<output_dir>/probe.json`, or sampled once from the initial model and
    saved there. Returns the [`~policy_split_trl.probe.ModeGapProbe`] and its record (settings and sequences).

    Raises:
        [`SettingsMismatchError`]: a saved probe made with other settings.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from policy_split_trl.data import load_prompt_dataset
    from policy_split_trl.embedded import resolve_model_id
    from policy_split_trl.eval.files import atomic_write_json, read_json_file
    from policy_split_trl.probe import ModeGapProbe
    from policy_split_trl.training import load_split

    path = os.path.join(args.output_dir, PROBE_FILE)
    settings = probe_settings(args, script_args, training_args, model_args)
    model_path = resolve_model_id(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    saved = read_json_file(path, "the probe's sequences", "delete it (and the runs measured with it) to sample anew")
    if saved is not None:
        check_settings(saved["settings"], settings, path)
        probe = ModeGapProbe(
            saved["prompts"],
            saved["completions"],
            training_args.high_entropy_system_prompt,
            tokenizer,
            training_args.chat_template_kwargs,
        )
        return probe, saved
    # Held-out prompts: the recipe's test split (never trained on), drawn with the probe's own seed.
    if args.max_operand:  # the first held-out problems, never trained on
        heldout = load_prompt_dataset(task_files(args)["heldout"], task=script_args.task)
        prompts = list(heldout.select(range(args.probe_prompts))["prompt"])
    else:  # the recipe's test split, drawn with the probe's own seed
        prompts = list(
            load_split(script_args, script_args.dataset_test_split, args.probe_prompts, args.probe_seed)["prompt"]
        )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    started = time.perf_counter()
    probe = ModeGapProbe.sample(
        model,
        tokenizer,
        prompts,
        training_args.high_entropy_system_prompt,
        num_per_mode=args.probe_samples_per_mode,
        max_new_tokens=settings["max_new_tokens"],
        temperature=1.0,
        seed=args.probe_seed,
        chat_template_kwargs=training_args.chat_template_kwargs,
    )
    initial = probe_point(probe, model, 0)
    del model
    gc.collect()
    record = {
        "settings": settings,
        "prompts": _json_safe(list(probe.prompts)),
        "completions": [list(map(int, c)) for c in probe.completions],
        "initial": initial,
        "sample_seconds": time.perf_counter() - started,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write_json(path, record)
    return probe, record


class CompletionLogitsOnly:
    """
    `model` as [`~policy_split_trl.probe.ModeGapProbe.measure`] sees it, with the LM head run only at the last
    `keep` positions (`logits_to_keep`): the probe reads the logits of its completion positions only (the last
    `completion width + 1` of every row, prompts being left-padded), and the full-vocabulary head over the ~100-token
    prompts would otherwise cost more than the rest of the forward on a 135M model.

    Args:
        model (`PreTrainedModel`):
            A causal LM whose forward takes `logits_to_keep` (every transformers causal LM, and PEFT models of them).
        keep (`int`):
            Positions to keep: the probe's completion width + 1.
    """

    def __init__(self, model: Any, keep: int) -> None:
        self.model = model
        self.keep = keep

    @property
    def device(self) -> Any:
        return self.model.device

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self) -> CompletionLogitsOnly:
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> CompletionLogitsOnly:
        self.model.train(mode)
        return self

    def __call__(self, **kwargs: Any) -> Any:
        return self.model(**kwargs, logits_to_keep=self.keep)


def probe_point(probe: Any, model: Any, step: int) -> dict[str, float]:
    """One probe measurement of `model` at `step`, with the entropy gap (HE - normal context)."""
    values = probe.measure(CompletionLogitsOnly(model, max(len(c) for c in probe.completions) + 1))
    values["entropy_gap"] = values["entropy_high_entropy_context"] - values["entropy_normal_context"]
    return {"step": step, **values}


def make_callbacks(probe: Any, every: int, max_steps: int, progress: Any) -> tuple[Any, Any]:
    """
    The run's two callbacks: the probe (step 0, every `every` steps, the last step) and the progress printer.

    The probe runs on every process (the same forward passes everywhere, so a sharded model's collectives match);
    only the main process prints.
    """
    from transformers import TrainerCallback

    class ProbeCallback(TrainerCallback):
        """Measure `probe` on the model being trained at step 0, every `every` steps and at the last step."""

        def __init__(self) -> None:
            self.trainer: Any = None
            self.curve: list[dict[str, float]] = []
            self.seconds = 0.0

        def _measure(self, step: int) -> None:
            started = time.perf_counter()
            model = self.trainer.accelerator.unwrap_model(self.trainer.model)
            self.curve.append(probe_point(probe, model, step))
            self.seconds += time.perf_counter() - started

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 0:
                self._measure(0)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % every == 0 or state.global_step == max_steps:
                self._measure(state.global_step)

    class ProgressCallback(TrainerCallback):
        """Call `progress(step, seconds since training began, logs)` at every log of a training step."""

        def __init__(self) -> None:
            self.started = time.perf_counter()
            self.trainer: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if not state.is_world_process_zero or not logs or "frac_reward_zero_std" not in logs:
                return
            progress(state.global_step, time.perf_counter() - self.started, logs)

    return ProbeCallback(), ProgressCallback()


def run_settings(
    args: argparse.Namespace,
    train_flags: Sequence[str],
    method: str,
    seed: int,
    probe_record: Mapping[str, Any],
    training_args: Any,
) -> dict[str, Any]:
    """What makes a run what it is: compared with a saved run's settings before it is reused."""
    from policy_split_trl.methods import method_settings

    with open(args.config, encoding="utf-8") as f:
        recipe_sha = _sha256_text(f.read())
    evaluation = (
        None
        if args.no_eval
        else {
            "benchmark": "arithmetic",
            "limit": args.eval_limit,
            "k": args.eval_k,
            "temperature": args.eval_temperature,
            "top_p": args.eval_top_p,
            "top_k": args.eval_top_k,
            "max_new_tokens": args.eval_max_new_tokens,
        }
    )
    return _json_safe(
        {
            "method": method,
            "seed": seed,
            "config": os.path.abspath(args.config),
            "config_sha256": recipe_sha,
            "model": args.model,
            "max_steps": args.max_steps,
            "train_flags": list(train_flags),
            "task": args.task_info,
            "probe_every": args.probe_every,
            "probe_sha256": _sha256_text(
                json.dumps([probe_record["prompts"], probe_record["completions"]], sort_keys=True)
            ),
            "evaluation": evaluation,
            "method_settings": method_settings(method, training_args),
            "training": {
                name: getattr(training_args, name)
                for name in (
                    "learning_rate",
                    "num_generations",
                    "per_device_train_batch_size",
                    "gradient_accumulation_steps",
                    "max_completion_length",
                    "temperature",
                    "top_p",
                    "top_k",
                    "beta",
                    "loss_type",
                    "lr_scheduler_type",
                    "num_iterations",
                )
            },
        }
    )


def evaluate_run(args: argparse.Namespace, trainer: Any, run_dir: str, label: str) -> dict[str, Any]:
    """
    Table 5 per mode for the trained model (in memory) with the dual-mode harness on held-out arithmetic; returns
    `{"normal": ..., "high_entropy": ..., "comparison": ...}` from its `results.json`.
    """
    from policy_split_trl.eval.backends import SamplingConfig, TransformersBackend
    from policy_split_trl.eval.harness import EvalConfig, evaluate_modes

    model = trainer.accelerator.unwrap_model(trainer.model)
    training_args = trainer.args
    config = EvalConfig(
        model=label,
        output_dir=os.path.join(run_dir, "eval"),
        benchmarks=["arithmetic"],
        limit=args.eval_limit,
        sources={"arithmetic": task_files(args)["heldout"]} if args.max_operand else {},
        modes=["normal", "high_entropy"],
        mode_prompts={"high_entropy": training_args.high_entropy_system_prompt},
        k=args.eval_k,
        sampling=SamplingConfig(
            temperature=args.eval_temperature,
            top_p=args.eval_top_p,
            top_k=args.eval_top_k,
            max_new_tokens=args.eval_max_new_tokens,
        ),
        batch_size=args.eval_batch_size,
        backend="transformers",
        chat_template_kwargs=training_args.chat_template_kwargs or {},
        seed=0,
        progress=False,
    )
    was_training = model.training
    model.eval()
    try:
        backend = TransformersBackend(
            model,
            trainer.processing_class,
            batch_size=args.eval_batch_size,
            chat_template_kwargs=config.chat_template_kwargs,
        )
        results = evaluate_modes(config, backend=backend)
    finally:
        model.train(was_training)
    per_mode = results["per_benchmark"]["arithmetic"]
    return {
        "normal": per_mode["normal"],
        "high_entropy": per_mode["high_entropy"],
        "comparison": results["comparisons"]["arithmetic"]["high_entropy"],
        "entropy": results["entropy"],
    }


def run_metrics(
    probe_curve: Sequence[Mapping[str, float]],
    evaluation: Mapping[str, Any] | None,
    log_history: Sequence[Mapping[str, Any]],
    train_seconds: float,
    steps: int,
) -> dict[str, float | None]:
    """The flat per-run metrics of [`SUMMARY_METRICS`] from the probe curve, the evaluation and the trainer's logs."""
    last = probe_curve[-1]
    metrics: dict[str, float | None] = {f"probe/{k}": last[k] for k in CURVE_METRICS}
    if evaluation:
        normal, he, gap = evaluation["normal"], evaluation["high_entropy"], evaluation["comparison"]
        metrics.update(
            {
                "eval/accuracy_normal": 100 * normal["avg_at_k"],
                "eval/accuracy_high_entropy": 100 * he["avg_at_k"],
                "eval/entropy_bits_normal": normal["entropy_bits"],
                "eval/entropy_bits_high_entropy": he["entropy_bits"],
                "eval/abs_delta_accuracy": 100 * gap["abs_delta_accuracy"],
                "eval/abs_delta_entropy_bits": gap["abs_delta_entropy_bits"],
                "eval/abs_delta_length": gap["abs_delta_length"],
                "eval/kl_high_entropy_normal": gap["kl_mode_normal"],
            }
        )
    step_logs = [e for e in log_history if "frac_reward_zero_std" in e]
    for key in ("frac_reward_zero_std", "reward"):
        values = [e[key] for e in step_logs if e.get(key) is not None]
        metrics[f"train/{key}"] = statistics.fmean(values) if values else None
    metrics["train/seconds_per_step"] = train_seconds / steps if steps else None
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def run_one(
    args: argparse.Namespace,
    train_flags: Sequence[str],
    method: str,
    seed: int,
    probe: Any,
    probe_record: Mapping[str, Any],
    run_dir: str,
    parsed: tuple[Any, Any, Any],
    progress: Any,
) -> dict[str, Any]:
    """Train one (method, seed), probing as it goes, evaluate it, and write and return its `run.json` record."""
    import torch
    from transformers import PrinterCallback

    from policy_split_trl.eval.files import atomic_write_json
    from policy_split_trl.methods import METHODS

    script_args, training_args, model_args = parsed
    settings = run_settings(args, train_flags, method, seed, probe_record, training_args)
    # An unfinished run starts over: samples of its evaluation came from a model that no longer exists.
    shutil.rmtree(os.path.join(run_dir, "eval"), ignore_errors=True)
    started = time.perf_counter()
    trainer = build_trainer(script_args, training_args, model_args)
    probe_cb, progress_cb = make_callbacks(probe, args.probe_every, args.max_steps, progress)
    probe_cb.trainer = progress_cb.trainer = trainer
    trainer.add_callback(probe_cb)
    trainer.add_callback(progress_cb)
    trainer.remove_callback(PrinterCallback)  # the progress lines say what matters; run.json keeps every log
    train_started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_started - probe_cb.seconds
    steps = trainer.state.global_step
    evaluation = None
    eval_seconds = 0.0
    if not args.no_eval:
        eval_started = time.perf_counter()
        evaluation = evaluate_run(args, trainer, run_dir, f"{method} seed {seed} (in memory, after training)")
        eval_seconds = time.perf_counter() - eval_started
    log_history = _json_safe(trainer.state.log_history)
    record = {
        "method": method,
        "label": METHODS[method].label,
        "seed": seed,
        "status": "finished",
        "settings": settings,
        "steps": steps,
        "probe_curve": probe_cb.curve,
        "evaluation": evaluation,
        "metrics": run_metrics(probe_cb.curve, evaluation, log_history, train_seconds, steps),
        "seconds": {
            "total": time.perf_counter() - started,
            "train": train_seconds,
            "probe": probe_cb.seconds,
            "eval": eval_seconds,
        },
        "log_history": log_history,
    }
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    atomic_write_json(os.path.join(run_dir, RUN_FILE), _json_safe(record))
    return record


def summarize(
    runs: Sequence[Mapping[str, Any]],
    paired: Sequence[str] | None,
    description: str,
    initial_probe: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """
    The experiment's summary: per method mean +- std over seeds of [`SUMMARY_METRICS`], the probe curves, and the
    paired differences of `paired` (`[A, B]`, when both ran).
    """
    from policy_split_trl.methods import METHODS

    methods = list(dict.fromkeys(r["method"] for r in runs))
    summary: dict[str, Any] = {
        "description": description,
        "labels": {m: METHODS[m].label for m in methods},
        "seeds_per_method": {m: sum(r["method"] == m for r in runs) for m in methods},
        "metrics": aggregate_metrics(runs, list(SUMMARY_METRICS)),
        "curves": aggregate_curves(runs),
        "initial_probe": dict(initial_probe) if initial_probe else None,
        "paired": None,
    }
    if paired and paired[0] in methods and paired[1] in methods:
        summary["paired"] = {
            "method": paired[0],
            "baseline": paired[1],
            "differences": paired_differences(runs, paired[0], paired[1], list(SUMMARY_METRICS)),
        }
    return summary


def _hms(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the experiment; returns the summary (also written to `summary.json`)."""
    from policy_split_trl.eval.files import (
        atomic_write_json,
        atomic_write_text,
        read_json_file,
    )

    args, train_flags = parse_arguments(argv)
    started = time.perf_counter()
    if args.num_threads > 0:
        import torch

        torch.set_num_threads(args.num_threads)
    args.task_info = (
        write_task_files(task_files(args), args.max_operand, args.operations, args.probe_prompts + args.eval_limit)
        if args.max_operand
        else None
    )
    plan = [(method, seed) for seed in args.seeds for method in args.methods]  # paired runs finish together
    print(
        f"Mode split: {len(args.methods)} methods x {len(args.seeds)} seeds = {len(plan)} runs of "
        f"{args.max_steps} steps -> {args.output_dir}",
        flush=True,
    )
    # Everything parsed and checked before the first model loads.
    parsed = {(m, s): parse_run(train_argv(args, train_flags, m, s, _run_dir(args, m, s))) for m, s in plan}
    first = parsed[plan[0]]
    probe, probe_record = load_or_sample_probe(args, *first)
    print(
        f"Probe: {len(probe.completions)} held-out sequences; initial model: "
        + ", ".join(f"{k} {probe_record['initial'][k]:.4f}" for k in CURVE_METRICS),
        flush=True,
    )

    runs: list[dict[str, Any]] = []
    pending: list[tuple[str, int]] = []
    for method, seed in plan:
        run_dir = _run_dir(args, method, seed)
        path = os.path.join(run_dir, RUN_FILE)
        saved = read_json_file(path, "a finished run", "delete its folder to run it again")
        settings = run_settings(args, train_flags, method, seed, probe_record, parsed[(method, seed)][1])
        if saved is not None:
            check_settings(saved["settings"], settings, path)
            runs.append(saved)
        else:
            pending.append((method, seed))
    if len(pending) < len(plan):
        print(f"Resuming: {len(plan) - len(pending)} finished run(s) kept, {len(pending)} to run.", flush=True)

    seconds_per_step: dict[str, list[float]] = {}
    for r in runs:
        seconds_per_step.setdefault(r["method"], []).append(r["seconds"]["total"] / max(r["steps"], 1))
    for index, (method, seed) in enumerate(pending):
        run_dir = _run_dir(args, method, seed)
        run_started = time.perf_counter()

        def estimate(m: str, current: float | None = None) -> float:
            """Seconds per step (training + probe + evaluation, per step) of method `m` so far."""
            known = seconds_per_step.get(m) or ([current] if current else None)
            if known:
                return statistics.fmean(known)
            others = [v for values in seconds_per_step.values() for v in values] or ([current] if current else [])
            return statistics.fmean(others) if others else 0.0

        def progress(
            step: int,
            elapsed: float,
            logs: Mapping[str, Any],
            method: str = method,
            seed: int = seed,
            index: int = index,
        ) -> None:
            per_step = elapsed / max(step, 1)
            run_left = per_step * (args.max_steps - step)
            rest = sum(estimate(m, per_step) * args.max_steps for m, _ in pending[index + 1 :])
            print(
                f"[{_hms(time.perf_counter() - started)}] run {index + 1}/{len(pending)} {method} seed {seed}: "
                f"step {step}/{args.max_steps}, reward {logs.get('reward', math.nan):.3f}, zero-std groups "
                f"{logs['frac_reward_zero_std']:.2f}, {per_step:.1f} s/step, run ETA {_hms(run_left)}, "
                f"all ETA {_hms(run_left + rest)}",
                flush=True,
            )

        print(
            f"[{_hms(time.perf_counter() - started)}] run {index + 1}/{len(pending)}: {method} seed {seed}", flush=True
        )
        record = run_one(
            args, train_flags, method, seed, probe, probe_record, run_dir, parsed[(method, seed)], progress
        )
        seconds_per_step.setdefault(method, []).append((time.perf_counter() - run_started) / max(record["steps"], 1))
        last = record["probe_curve"][-1]
        print(
            f"[{_hms(time.perf_counter() - started)}] done {method} seed {seed} in {_hms(record['seconds']['total'])}"
            f": probe KL {last['kl_high_entropy_normal']:.4f}, entropy gap {last['entropy_gap']:+.4f} nats, "
            f"zero-std groups {record['metrics']['train/frac_reward_zero_std']:.2f}",
            flush=True,
        )
        runs.append(record)
        _write_summary(args, runs, probe_record, started, atomic_write_json, atomic_write_text)

    summary = _write_summary(args, runs, probe_record, started, atomic_write_json, atomic_write_text)
    print(summary_markdown(summary))
    print(
        f"Wrote {args.output_dir}/{SUMMARY_MD}, {SUMMARY_JSON}"
        + (f", {PLOT_FILE}" if summary["plot"] else "")
        + f"; wall time this invocation {_hms(time.perf_counter() - started)}",
        flush=True,
    )
    return summary


def _run_dir(args: argparse.Namespace, method: str, seed: int) -> str:
    return os.path.join(args.output_dir, "runs", method, f"seed{seed}")


def _write_summary(
    args: argparse.Namespace,
    runs: Sequence[Mapping[str, Any]],
    probe_record: Mapping[str, Any],
    started: float,
    write_json: Any,
    write_text: Any,
) -> dict[str, Any]:
    """Summarize the finished runs in plan order and write `summary.json`, `summary.md` and the plot."""
    order = {(m, s): i for i, (m, s) in enumerate((m, s) for m in args.methods for s in args.seeds)}
    ordered = sorted(runs, key=lambda r: order.get((r["method"], r["seed"]), len(order)))
    first = ordered[0]["settings"]
    description = (
        f"{probe_record['settings']['model']} ({args.config}), {args.max_steps} steps, seeds "
        f"{sorted({r['seed'] for r in ordered})}; lr {first['training']['learning_rate']}, G "
        f"{first['training']['num_generations']}, {first['training']['per_device_train_batch_size']} rollouts/step, "
        f"{first['training']['max_completion_length']} tokens; probe {len(probe_record['completions'])} sequences "
        f"every {args.probe_every} steps (nats, T 1); evaluation "
        + (
            "off"
            if args.no_eval
            else f"{args.eval_limit} arithmetic problems x {args.eval_k} samples per mode at "
            f"T {args.eval_temperature} (entropy in bits of that distribution)"
        )
    )
    summary = summarize(ordered, args.paired, description, probe_record.get("initial"))
    summary["runs"] = [
        {"method": r["method"], "seed": r["seed"], "metrics": r["metrics"], "seconds": r["seconds"]} for r in ordered
    ]
    summary["wall_time_s"] = {
        "this_invocation": time.perf_counter() - started,
        "runs_total": sum(r["seconds"]["total"] for r in ordered),
    }
    summary["command"] = " ".join(["python -m policy_split_trl.benchmarks.mode_split", *args.argv])
    summary["plot"] = plot_mode_split(summary["curves"], os.path.join(args.output_dir, PLOT_FILE), summary["labels"])
    write_json(os.path.join(args.output_dir, SUMMARY_JSON), _json_safe(summary))
    write_text(os.path.join(args.output_dir, SUMMARY_MD), summary_markdown(summary))
    return summary


if __name__ == "__main__":
    main()
