"""Outputs of the dual-mode evaluation: `results.json`, `results.md` (tables laid out like the paper's Tables 1, 2, 5
and 6) and PNG plots (per-mode token-entropy histograms, accuracy vs entropy)."""

from __future__ import annotations

import math
import os
from typing import Any

from .files import atomic_save, atomic_write_json, atomic_write_text

PERCENT = 100.0


def format_number(value: Any, scale: float = 1.0, digits: int = 2) -> str:
    """`value * scale` with `digits` decimals; "–" for a missing or NaN value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value * scale:.{digits}f}"


def table1_markdown(results: dict[str, Any]) -> str:
    """Table 1 layout: MATH-500 | AIME-24/25 | GPQA-Diamond | MMLU-Pro | Average, Acc (%) and Ent (bits) each."""
    from .benchmarks import TABLE1_COLUMNS

    table = results.get("table1") or {}
    columns = [c for c in [*TABLE1_COLUMNS, "Average"] if any(c in row for row in table.values())]
    if not columns:
        return ""
    head = "| mode | " + " | ".join(f"{c} Acc | {c} Ent" for c in columns) + " |"
    lines = [head, "|---|" + "---|" * (2 * len(columns))]
    for mode, row in table.items():
        cells = []
        for c in columns:
            cell = row.get(c, {})
            cells += [format_number(cell.get("accuracy"), PERCENT), format_number(cell.get("entropy_bits"), digits=3)]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def benchmark_markdown(results: dict[str, Any]) -> str:
    """Every benchmark and mode: avg@k, pass@k (best-of-k, Table 6), entropy, length, problems only this mode solved."""
    lines = [
        "| benchmark | mode | problems | avg@k (%) | pass@k (%) | entropy (bits) | length (tokens) | unique solved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for benchmark, modes in results["per_benchmark"].items():
        for mode, m in modes.items():
            lines.append(
                f"| {benchmark} | {mode} | {m['problems']} | {format_number(m['avg_at_k'], PERCENT)} | "
                f"{format_number(m['pass_at_k'], PERCENT)} | {format_number(m['entropy_bits'], digits=3)} | {format_number(m['mean_length'], digits=1)}"
                f" | {m.get('unique_solved', '–')} |"
            )
    return "\n".join(lines)


def table5_markdown(results: dict[str, Any]) -> str:
    """Table 5 layout: |dAcc|, |dEnt|, |dLen| between each mode and the normal mode, and KL(pi_mode || pi)."""
    rows = [(b, mode, c) for b, modes in results.get("comparisons", {}).items() for mode, c in modes.items()]
    if not rows:
        return ""
    lines = [
        "| benchmark | mode vs normal | abs dAcc (%) | abs dEnt (bits) | abs dLen (tokens) | KL(pi_mode ‖ pi) |",
        "|---|---|---|---|---|---|",
    ]
    for benchmark, mode, c in rows:
        lines.append(
            f"| {benchmark} | {mode} | {format_number(c['abs_delta_accuracy'], PERCENT)} | "
            f"{format_number(c['abs_delta_entropy_bits'], digits=3)} | {format_number(c['abs_delta_length'], digits=1)} | "
            f"{format_number(c['kl_mode_normal'], digits=4)} |"
        )
    return "\n".join(lines)


def creative_markdown(results: dict[str, Any]) -> str:
    """Table 2 layout: Div-N-Gram and Div-BLEU (and the judge's score when run) per mode."""
    creative, judge = results.get("creative") or {}, results.get("judge") or {}
    if not creative:
        return ""
    lines = [
        "| mode | prompts | Div-N-Gram | Div-BLEU | judge (0-100) | judge unparseable |",
        "|---|---|---|---|---|---|",
    ]
    for mode, m in creative.items():
        j = judge.get(mode, {})
        lines.append(
            f"| {mode} | {m['prompts']} | {format_number(m['div_ngram'], digits=4)} | {format_number(m['div_bleu'], digits=4)} | "
            f"{format_number(j.get('overall'), digits=1)} | {j.get('n_unparseable', '–')} |"
        )
    error = (results.get("judge_status") or {}).get("error")
    if error:  # the judge column is missing or partial: say why under the table
        lines += ["", f"Judge: {error}"]
    return "\n".join(lines)


def results_markdown(results: dict[str, Any]) -> str:
    """All tables, with the settings that determine them."""
    config, entropy = results["config"], results["entropy"]
    sampling = config["sampling"]
    title = f"# Dual-mode evaluation of `{config['model']}`" + (
        f" + `{config['adapter']}`" if config.get("adapter") else ""
    )
    settings = (
        f"k={config['k']} samples per problem and mode; temperature {sampling['temperature']}, top-p "
        f"{sampling['top_p']}, top-k {sampling['top_k']}, max {sampling['max_new_tokens']} new tokens; entropy in bits "
        f"of the {entropy['distribution']} distribution; backend {config['backend_used']}."
    )
    parts = [title, settings]
    for title, table in (
        ("Accuracy and entropy (Table 1 layout)", table1_markdown(results)),
        ("Per benchmark and mode", benchmark_markdown(results)),
        ("Dual-mode comparison (Table 5 layout)", table5_markdown(results)),
        ("Creative writing (Table 2 layout)", creative_markdown(results)),
    ):
        if table:
            parts += [f"## {title}", table]
    return "\n\n".join(parts) + "\n"


def plot_entropy_histograms(records: list[dict], modes: list[str], path: str) -> str | None:
    """Histogram of per-token entropies (bits) of each mode's samples, all benchmarks pooled."""
    plt = load_pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in modes:
        values = [e for r in records if r["mode"] == mode for e in r["entropy_bits"]]
        if values:
            ax.hist(values, bins=50, alpha=0.5, density=True, label=f"{mode} ({len(values)} tokens)")
    ax.set_xlabel("token entropy (bits)")
    ax.set_ylabel("density")
    ax.set_title("Per-token entropy by mode")
    ax.legend()
    return save_figure(fig, plt, path)


def plot_accuracy_vs_entropy(results: dict[str, Any], path: str) -> str | None:
    """One point per graded (benchmark, mode): avg@k against mean token entropy. `None` when nothing is graded."""
    modes = sorted({m for modes in results["per_benchmark"].values() for m in modes})
    points = {
        mode: [
            (m["entropy_bits"], m["avg_at_k"] * PERCENT, b)
            for b, ms in results["per_benchmark"].items()
            if (m := ms.get(mode)) and m["graded"]
        ]
        for mode in modes
    }
    plt = load_pyplot()
    if plt is None or not any(points.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    markers = "osD^v<>"
    for i, (mode, mode_points) in enumerate(points.items()):
        if mode_points:
            ax.scatter(
                [p[0] for p in mode_points], [p[1] for p in mode_points], marker=markers[i % len(markers)], label=mode
            )
            for x, y, b in mode_points:
                ax.annotate(b, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    top = max(y for mode_points in points.values() for _, y, _ in mode_points)
    ax.set_ylim(0, max(1.0, top * 1.15))  # accuracy is never negative; leave room for the labels
    ax.set_xlabel("mean token entropy (bits)")
    ax.set_ylabel("avg@k accuracy (%)")
    ax.set_title("Accuracy vs entropy per mode")
    ax.legend()
    return save_figure(fig, plt, path)


def load_pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend, or `None` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, plt: Any, path: str) -> str:
    """Lay out, write (creating the folder, replacing `path` in one step: a crash never leaves half a PNG) and close a
    figure; returns `path`."""
    fig.tight_layout()
    # The format named explicitly: without it, matplotlib would add ".png" to an extensionless temporary name.
    image_format = os.path.splitext(path)[1][1:].lower() or "png"
    try:
        atomic_save(path, lambda temporary: fig.savefig(temporary, dpi=100, format=image_format))
    finally:
        plt.close(fig)
    return path


def write_outputs(output_dir: str, results: dict[str, Any], records: list[dict], modes: list[str]) -> None:
    """Write `results.json`, `results.md`, `entropy_histogram.png` and `accuracy_vs_entropy.png`, each replaced in one
    step (a crash leaves the previous version or the new one, never a cut file)."""
    plots = {
        "entropy_histogram": plot_entropy_histograms(
            records, modes, os.path.join(output_dir, "entropy_histogram.png")
        ),
        "accuracy_vs_entropy": plot_accuracy_vs_entropy(results, os.path.join(output_dir, "accuracy_vs_entropy.png")),
    }
    results["plots"] = {k: os.path.basename(v) for k, v in plots.items() if v}
    # results.json last: it is what a comparison's rerun takes as "evaluation done", so it never precedes the others.
    atomic_write_text(os.path.join(output_dir, "results.md"), results_markdown(results))
    atomic_write_json(os.path.join(output_dir, "results.json"), results, default=str)
