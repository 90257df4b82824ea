"""The step-overhead benchmark runs end to end on the tiny model and reports consistent numbers (not timed targets)."""

import json
import os

from policy_split_trl.benchmarks.step_overhead import PHASES, main, summarize


def test_summarize_medians_and_ratios():
    def run(variant, totals, rss):
        steps = [{"total": t, **{p: t / len(PHASES) for p in PHASES}} for t in totals]
        return {
            "variant": variant,
            "steps": steps,
            "peak_rss_mb": rss,
            "peak_cuda_mb": None,
            "completion_tokens_per_step": 512,
        }

    runs = [
        run("grpo", [9.0, 1.0, 3.0], 1000),
        run("policy_split", [9.0, 2.0, 2.0], 1200),
        run("floor", [9.0, 1.5, 2.5], 1100),
        run("grpo", [9.0, 2.0], 900),
    ]
    summary = summarize(runs)
    # The first step of every run is a warm-up; medians over the rest: grpo [1, 3, 2] -> 2, policy_split 2, floor 2.
    assert summary["variants"]["grpo"]["step_time_s"] == 2.0
    assert summary["variants"]["grpo"]["samples"] == 3
    assert summary["variants"]["grpo"]["peak_rss_mb"] == 1000
    assert summary["variants"]["grpo"]["completion_tokens_per_s"] == 256.0
    assert summary["ratios"] == {
        "time_policy_split_over_grpo": 1.0,
        "memory_policy_split_over_grpo": 1.2,
        "time_policy_split_over_floor": 1.0,
    }


def test_benchmark_runs_on_the_tiny_model(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "bench"
    result = main(
        [
            "--model",
            tiny_model_path,
            "--num_generations",
            "4",
            "--max_completion_length",
            "8",
            "--steps",
            "2",
            "--rounds",
            "1",
            "--output_dir",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "time_policy_split_over_grpo" in printed and "time_policy_split_over_floor" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["ratios"] == result["ratios"]
    assert os.path.exists(out / "step_overhead.png")
    for variant in ("grpo", "policy_split", "floor"):
        v = saved["variants"][variant]
        assert v["samples"] == 1 and v["step_time_s"] > 0 and v["peak_rss_mb"] > 0
        phases = v["phases_s"]
        assert phases["generation"] > 0 and phases["loss_forward"] > 0
        assert sum(phases.values()) <= v["step_time_s"] * 1.01
    # Every completion has exactly max_completion_length tokens: same work for every variant.
    assert all(r["completion_tokens_per_step"] == 4 * 8 for r in saved["runs"])
    # On-policy Policy Split has no scoring pass; the floor does two loss passes.
    assert saved["variants"]["policy_split"]["phases_s"]["scoring"] == 0
