"""The step-overhead benchmark runs end to end on the tiny model and reports consistent numbers (not timed targets)."""

import json
import os

from policy_split_trl.benchmarks.step_overhead import PHASES, main, summarize


def test_summarize_medians_ratios_and_verdicts():
    def run(variant, totals, rss, cell="short:64"):
        steps = [{"total": t, **{p: t / len(PHASES) for p in PHASES}} for t in totals]
        return {
            "variant": variant,
            "cell": cell,
            "prompt_tokens": 50,
            "steps": steps,
            "peak_rss_mb": rss,
            "peak_cuda_mb": None,
            "completion_tokens_per_step": 512,
        }

    runs = [
        run("grpo", [9.0, 1.0, 3.0], 1000),
        run("policy_split", [9.0, 2.0, 2.0], 1200),
        run("floor_shared_prefix", [9.0, 1.5, 2.5], 1100),
        run("grpo", [9.0, 2.0], 900),
        run("grpo", [9.0, 4.0], 1000, cell="long:64"),
        run("policy_split", [9.0, 3.0], 1000, cell="long:64"),
    ]
    summary = summarize(runs)
    short = summary["cells"]["short:64"]
    # The first step of every run is a warm-up; medians over the rest: grpo [1, 3, 2] -> 2, policy_split 2, floor 2.
    assert short["variants"]["grpo"]["step_time_s"] == 2.0
    assert short["variants"]["grpo"]["samples"] == 3
    assert short["variants"]["grpo"]["peak_rss_mb"] == 1000
    assert short["variants"]["grpo"]["completion_tokens_per_s"] == 256.0
    assert short["ratios"] == {
        "time_policy_split_over_grpo": 1.0,
        "time_policy_split_over_floor_shared_prefix": 1.0,
        "memory_policy_split_over_grpo": 1.2,
        "memory_floor_shared_prefix_over_grpo": 1.1,
    }
    assert summary["cells"]["long:64"]["ratios"] == {
        "time_policy_split_over_grpo": 0.75,
        "memory_policy_split_over_grpo": 1.0,
    }
    verdicts = {(v["cell"], v["ratio"]): (v["target"], v["met"]) for v in summary["verdicts"]}
    assert verdicts == {
        ("short:64", "time_policy_split_over_grpo"): (1.35, True),
        ("short:64", "time_policy_split_over_floor_shared_prefix"): (1.10, True),
        ("short:64", "memory_policy_split_over_grpo"): (1.3, True),
        ("long:64", "time_policy_split_over_grpo"): (1.0, True),  # faster than GRPO: strictly below 1
    }


def test_benchmark_runs_on_the_tiny_model_and_resumes(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = [
        "--model",
        tiny_model_path,
        "--num_generations",
        "4",
        "--completion_lengths",
        "8",
        "--prompt_regimes",
        "short",
        "long",
        "--long_prompt_tokens",
        "60",
        "--variants",
        "grpo",
        "floor_shared_prefix",
        "policy_split",
        "--steps",
        "2",
        "--rounds",
        "1",
        "--output_dir",
        str(out),
    ]
    result = main(argv)
    printed = capsys.readouterr().out
    assert "time_policy_split_over_grpo" in printed and "time_policy_split_over_floor_shared_prefix" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["cells"].keys() == {"short:8", "long:8"}
    assert saved["verdicts"] == result["verdicts"] and len(saved["verdicts"]) == 4
    assert os.path.exists(out / "step_overhead.png")
    short, long = (saved["cells"][c]["variants"] for c in ("short:8", "long:8"))
    assert long["grpo"]["prompt_tokens"] >= short["grpo"]["prompt_tokens"] + 60
    for cell in (short, long):
        for variant in ("grpo", "policy_split", "floor_shared_prefix"):
            v = cell[variant]
            assert v["samples"] == 1 and v["step_time_s"] > 0 and v["peak_rss_mb"] > 0
            phases = v["phases_s"]
            assert phases["generation"] > 0 and phases["loss_forward"] > 0
            assert sum(phases.values()) <= v["step_time_s"] * 1.01
        # On-policy Policy Split has no scoring pass.
        assert cell["policy_split"]["phases_s"]["scoring"] == 0
    # Every completion has exactly its length: same work for every variant.
    assert all(r["completion_tokens_per_step"] == 4 * 8 for r in saved["runs"])
    # An interrupted invocation resumes from runs.jsonl: nothing is run again, the same summary comes out.
    assert len((out / "runs.jsonl").read_text().splitlines()) == 6
    again = main([*argv, "--resume"])
    assert "Resuming: 6 runs already done" in capsys.readouterr().out
    assert again["cells"] == result["cells"]
