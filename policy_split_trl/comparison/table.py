"""The comparison table (Table 1 layout): one row per method and a `+ HE prompt` row under each dual-mode method, Acc
(avg@k) and Ent (bits) per benchmark, written as `comparison.md`, `comparison.json` and `comparison.png`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import TYPE_CHECKING, Any

from policy_split_trl.eval.benchmarks import TABLE1_COLUMNS, table1_column
from policy_split_trl.eval.files import DamagedFileError, atomic_write_json, atomic_write_text, read_json_file
from policy_split_trl.eval.harness import package_versions
from policy_split_trl.eval.report import PERCENT, format_number, load_pyplot, save_figure
from policy_split_trl.polarity import plot_polarity
from policy_split_trl.training import LOG_HISTORY_FILE

from .config import PER_METHOD_EVAL_FIELDS, CompareConfig

if TYPE_CHECKING:
    from .config import MethodRun

HE_ROW_LABEL = "+ HE prompt"


def json_safe(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples as lists, other objects as their `str`)."""
    return json.loads(json.dumps(value, default=str))


def table_columns(benchmarks: list[str]) -> list[str]:
    """One column per benchmark, Table 1's where it has one (AIME-24 and AIME-25 share `AIME-24/25`)."""
    columns: list[str] = []
    for benchmark in benchmarks:
        column = table1_column(benchmark) or benchmark
        if column not in columns:
            columns.append(column)
    return columns


def _cell(results: dict[str, Any], mode: str, column: str) -> tuple[float, float]:
    """(avg@k accuracy as a fraction, mean token entropy in bits) of one mode under one column; NaN when absent."""
    if column in TABLE1_COLUMNS:  # the harness pools AIME-24 and AIME-25 into one column
        cell = (results.get("table1") or {}).get(mode, {}).get(column)
        return (cell["accuracy"], cell["entropy_bits"]) if cell else (math.nan, math.nan)
    metrics = results["per_benchmark"].get(column, {}).get(mode)
    return (metrics["avg_at_k"], metrics["entropy_bits"]) if metrics else (math.nan, math.nan)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values and not any(math.isnan(v) for v in values) else math.nan


def comparison_rows(
    runs: list[MethodRun], results: dict[str, dict], trained: dict[str, dict], columns: list[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """
    One row per method (its Table 1 label) and a `+ HE prompt` row under each dual-mode method.

    Returns:
        `(rows, average_over)`: the rows, and the columns their `average` is taken over: Table 1's columns when there
        are 2 or more of them (like Table 1, whose average leaves other benchmarks out), all graded columns otherwise;
        none with fewer than 2 graded columns.
    """
    rows = []
    for run in runs:
        if run.name not in results:
            continue
        for mode in run.modes:
            cells = {c: _cell(results[run.name], mode, c) for c in columns}
            first = mode == "normal"
            rows.append(
                {
                    "method": run.name,
                    "label": run.spec.label if first else HE_ROW_LABEL,
                    "mode": mode,
                    "accuracy": {c: v[0] for c, v in cells.items()},
                    "entropy_bits": {c: v[1] for c, v in cells.items()},
                    "train_wall_time_s": trained[run.name]["wall_time_s"] if first else None,
                    "train_steps": trained[run.name]["steps"] if first else None,
                }
            )
    graded = [c for c in columns if any(not math.isnan(row["accuracy"][c]) for row in rows)]
    table1 = [c for c in graded if c in TABLE1_COLUMNS]
    average_over = table1 if len(table1) >= 2 else graded if len(graded) >= 2 else []
    for row in rows:
        row["average"] = (
            {key: _mean([row[key][c] for c in average_over]) for key in ("accuracy", "entropy_bits")}
            if average_over
            else None
        )
    return rows, average_over


def budget_line(budget: dict[str, Any], versions: dict[str, str] | None = None) -> str:
    """The line above the table: the training budget every method shared, and the package versions."""
    if budget["max_steps"] > 0:
        length = f"max_steps {budget['max_steps']}"
    else:
        length = f"{budget['num_train_epochs']} epoch(s) of {budget.get('max_train_samples') or 'all'} prompts"
    shown = [
        f"{name} {versions[name]}"
        for name in ("policy-split-trl", "trl", "transformers", "torch", "vllm")
        if name in (versions or {})
    ]
    return (
        f"Budget (the same for every method): `{budget['model']}` on `{budget['dataset']}`, {length}, "
        f"num_generations {budget['num_generations']}, per-device batch {budget['per_device_train_batch_size']} x "
        f"{budget['gradient_accumulation_steps']} accumulation, max_completion_length "
        f"{budget['max_completion_length']}, learning rate {budget['learning_rate']}, seed {budget['seed']}."
        + (f" Versions: {', '.join(shown)}." if shown else "")
    )


def comparison_markdown(summary: dict[str, Any]) -> str:
    """`comparison.md`: the budget and evaluation settings, then the table (Table 1 layout)."""
    columns, rows, evaluation = summary["columns"], summary["rows"], summary["evaluation"]
    shown = columns + (["Average"] if summary["average_over"] else [])
    head = "| method | " + " | ".join(f"{c} Acc | {c} Ent" for c in shown) + " | train time (s) | train steps |"
    lines = [head, "|---|" + "---|" * (2 * len(shown) + 2)]
    for row in rows:
        cells = []
        for c in columns:
            cells += [format_number(row["accuracy"][c], PERCENT), format_number(row["entropy_bits"][c], digits=3)]
        if summary["average_over"]:
            average = row["average"]
            cells += [format_number(average["accuracy"], PERCENT), format_number(average["entropy_bits"], digits=3)]
        same_model = row["mode"] != "normal"  # the HE row is the model of the row above
        cells += [
            "" if same_model else format_number(row["train_wall_time_s"], digits=1),
            "" if same_model else str(row["train_steps"] if row["train_steps"] is not None else "–"),
        ]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    sampling = evaluation["sampling"]
    problems = ", ".join(f"{b} ({n} problems)" for b, n in summary["problems"].items())
    notes = (
        f"Evaluation: {problems}; k={evaluation['k']} samples per problem and mode, temperature "
        f"{sampling['temperature']}, top-p {sampling['top_p']}, top-k {sampling['top_k']}, max "
        f"{sampling['max_new_tokens']} new tokens. Acc: avg@k (%); Ent: mean token entropy (bits) of the sampled "
        f"distribution; `{HE_ROW_LABEL}`: the model of the row above, sampled with its high-entropy system prompt."
    )
    if summary["average_over"]:
        notes += f" Average: mean over {', '.join(summary['average_over'])}."
    return (
        "\n\n".join(["# Method comparison (Table 1 layout)", summary["budget_line"], notes, "\n".join(lines)]) + "\n"
    )


def plot_comparison(summary: dict[str, Any], path: str) -> str | None:
    """Grouped bars per method/mode: accuracy (%) in the top panel, mean token entropy (bits) below."""
    plt = load_pyplot()
    rows = summary["rows"]
    if plt is None or not rows:
        return None
    columns = summary["columns"] + (["Average"] if summary["average_over"] else [])
    names, previous = [], ""
    for row in rows:
        names.append(f"{previous}\n{HE_ROW_LABEL}" if row["mode"] != "normal" else row["label"])
        previous = row["label"] if row["mode"] == "normal" else previous

    def value(row: dict, key: str, column: str) -> float:
        return (row["average"] or {}).get(key, math.nan) if column == "Average" else row[key][column]

    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.3 * len(rows) + 2), 7), sharex=True)
    width = 0.8 / len(columns)
    for ax, key, scale, ylabel in (
        (axes[0], "accuracy", PERCENT, "avg@k accuracy (%)"),
        (axes[1], "entropy_bits", 1.0, "mean token entropy (bits)"),
    ):
        for j, column in enumerate(columns):
            xs = [i + (j - (len(columns) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, [value(row, key, column) * scale for row in rows], width, label=column)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("Method comparison")
    axes[0].legend(fontsize=8)
    axes[1].set_xticks(range(len(rows)))
    axes[1].set_xticklabels(names, fontsize=8)
    return save_figure(fig, plt, path)


def write_comparison(
    config: CompareConfig, runs: list[MethodRun], trained: dict[str, dict], results: dict[str, dict]
) -> dict[str, Any]:
    """Write `comparison.md`, `comparison.json` and `comparison.png` for the methods evaluated so far."""
    # The settings as the harness ran them (with the defaults filled in); the per-model fields differ by method.
    first_results = next(iter(results.values()))
    evaluation = {
        k: v for k, v in first_results["config"].items() if k not in (*PER_METHOD_EVAL_FIELDS, "backend_used")
    }
    columns = table_columns(evaluation["benchmarks"])
    rows, average_over = comparison_rows(runs, results, trained, columns)
    budgets = {run.name: run.budget for run in runs}
    budget = runs[0].budget
    problems = {b: next(iter(modes.values()))["problems"] for b, modes in first_results["per_benchmark"].items()}
    versions = package_versions()
    summary = {
        "config_file": config.config_file,
        "train_config": config.train_config,
        "launcher": config.launcher,
        "train_overrides": config.train_overrides,
        "budget": budget,
        "budget_line": budget_line(budget, versions),
        "evaluation": evaluation,
        "problems": problems,
        "versions": versions,
        "columns": columns,
        "average_over": average_over,
        "units": {"accuracy": "avg@k, fraction of 1 (x100 in the table)", "entropy_bits": "bits per token"},
        "rows": rows,
        "methods": {
            run.name: {
                "label": run.spec.label,
                "dual_mode": run.spec.dual_mode,
                "reference": run.spec.reference,
                "dir": run.dir,
                "train": trained.get(run.name),
                "per_benchmark": results[run.name]["per_benchmark"] if run.name in results else None,
            }
            for run in runs
        },
    }
    if any(b != budget for b in budgets.values()):
        summary["budgets_differ"] = budgets
    os.makedirs(config.output_dir, exist_ok=True)
    plot = plot_comparison(summary, os.path.join(config.output_dir, "comparison.png"))
    summary["plot"] = os.path.basename(plot) if plot else None
    # Runs trained with `polarity_diagnostics`: the fraction of expanding tokens over steps, side by side.
    histories = {run.spec.label: history for run in runs if (history := read_log_history(run.model_dir)) is not None}
    polarity_plot = plot_polarity(histories, os.path.join(config.output_dir, "polarity.png"))
    summary["polarity_plot"] = os.path.basename(polarity_plot) if polarity_plot else None
    atomic_write_json(os.path.join(config.output_dir, "comparison.json"), json_safe(summary))
    atomic_write_text(os.path.join(config.output_dir, "comparison.md"), comparison_markdown(summary))
    return summary


def read_log_history(model_dir: str) -> list[dict[str, Any]] | None:
    """A trained method's `log_history.json` (written by `policy-split-train` next to its model), or `None`."""
    path = os.path.join(model_dir, LOG_HISTORY_FILE)
    if not os.path.isfile(path):
        return None
    try:
        data = read_json_file(path, "the run's logged metrics", f"delete {path} (only the plots read it)")
    except DamagedFileError as error:  # a plot is not worth stopping the comparison for
        warnings.warn(str(error), stacklevel=2)
        return None
    history = data.get("log_history")
    return history if isinstance(history, list) else None
