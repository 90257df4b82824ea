"""Per-mode summaries of a training run: a before/after table and a plot of the per-mode metrics over steps."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from .eval.report import load_pyplot, save_figure
from .modes import HIGH_ENTROPY_MODE, NORMAL_MODE

# (row label, metric key without the "eval_" prefix; `{mode}` is filled in per column)
_TABLE_ROWS: list[tuple[str, str]] = [
    ("reward", "policy_split/{mode}/reward"),
    ("completion length (tokens)", "policy_split/{mode}/completion_length"),
    ("token entropy, own context (nats)", "policy_split/entropy/{mode}_context"),
]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def mode_table(before: dict[str, float], after: dict[str, float], reward_names: Sequence[str] = ()) -> str:
    """
    A markdown table of the per-mode evaluation metrics before and after training.

    Args:
        before (`dict[str, float]`):
            Metrics of `trainer.evaluate()` before training (keys with the `eval_` prefix).
        after (`dict[str, float]`):
            The same after training.
        reward_names (`Sequence[str]`, *optional*):
            Reward function names to add one row each (`policy_split/{mode}/rewards/<name>/mean`).

    Returns:
        `str`: the table.
    """
    # With a single reward function its row would repeat the total reward.
    per_func = [] if len(reward_names) < 2 else reward_names
    rows = list(_TABLE_ROWS) + [(f"reward: {n}", f"policy_split/{{mode}}/rewards/{n}/mean") for n in per_func]
    lines = [
        "| metric | normal: before | normal: after | high-entropy: before | high-entropy: after |",
        "|---|---|---|---|---|",
    ]
    for label, key in rows:
        cells = [
            _fmt(metrics.get("eval_" + key.format(mode=mode)))
            for mode in (NORMAL_MODE, HIGH_ENTROPY_MODE)
            for metrics in (before, after)
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    kl_key = "eval_policy_split/kl_high_entropy_normal"
    lines.append(f"| KL(pi_HE ‖ pi), HE samples | {_fmt(before.get(kl_key))} | {_fmt(after.get(kl_key))} | | |")
    return "\n".join(lines)


def plot_mode_metrics(log_history: list[dict[str, Any]], path: str) -> str | None:
    """
    Plot per-mode reward, per-context token entropy and the inter-mode KL over training steps to a PNG.

    Args:
        log_history (`list[dict]`):
            `trainer.state.log_history`.
        path (`str`):
            Where to write the PNG.

    Returns:
        `str | None`: the path, or `None` when there is nothing to plot or matplotlib is missing.
    """
    logs = [h for h in log_history if "policy_split/normal/reward" in h]
    plt = load_pyplot()
    if not logs or plt is None:
        return None
    steps = [h["step"] for h in logs]
    panels = [
        ("reward per generating mode", "policy_split/{mode}/reward"),
        ("token entropy per context (nats)", "policy_split/entropy/{mode}_context"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, key) in zip(axes, panels, strict=False):
        for mode, label in ((NORMAL_MODE, "normal"), (HIGH_ENTROPY_MODE, "high entropy")):
            ax.plot(steps, [h.get(key.format(mode=mode), math.nan) for h in logs], marker=".", label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    axes[2].plot(steps, [h.get("policy_split/kl_high_entropy_normal", math.nan) for h in logs], marker=".")
    axes[2].set_title("KL(pi_HE || pi) on HE samples")
    axes[2].set_xlabel("step")
    return save_figure(fig, plt, path)


def write_mode_report(output_dir: str, before: dict, after: dict, reward_names: Sequence[str] = ()) -> str:
    """Write `mode_report.md` and `mode_report.json` (before/after per-mode metrics) into `output_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    table = mode_table(before, after, reward_names)
    with open(os.path.join(output_dir, "mode_report.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(output_dir, "mode_report.json"), "w") as f:
        json.dump({"before": before, "after": after}, f, indent=2)
    return table
