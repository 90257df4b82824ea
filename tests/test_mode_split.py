"""The mode-split experiment: aggregation over seeds against hand values, resume, and a 2-step run on the tiny model."""

import json
import math
import os

import pytest

from policy_split_trl.benchmarks import mode_split
from policy_split_trl.benchmarks.mode_split import (
    CURVE_METRICS,
    SUMMARY_METRICS,
    SettingsMismatchError,
    aggregate_curves,
    aggregate_metrics,
    check_settings,
    format_mean_std,
    main,
    mean_std,
    paired_differences,
    summarize,
    summary_markdown,
)


def _run(method, seed, metrics, curve=None):
    return {"method": method, "seed": seed, "metrics": metrics, "probe_curve": curve or []}


def test_mean_std_hand_values():
    mean, std = mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    # Sample std (n - 1): ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3.
    assert std == pytest.approx(math.sqrt(7 / 3))
    assert mean_std([0.5]) == (0.5, None)  # one seed: no spread
    with pytest.raises(ValueError):
        mean_std([])


def test_aggregate_metrics_per_method_over_seeds():
    runs = [
        _run("a", 2, {"x": 4.0, "y": 1.0}),
        _run("a", 0, {"x": 1.0, "y": None}),  # a missing value is left out, not counted as 0
        _run("a", 1, {"x": 2.0, "y": 3.0}),
        _run("b", 0, {"x": 10.0}),
    ]
    out = aggregate_metrics(runs, ["x", "y"])
    assert list(out) == ["a", "b"]
    assert out["a"]["x"]["mean"] == pytest.approx(7 / 3)
    assert out["a"]["x"]["std"] == pytest.approx(math.sqrt(7 / 3))
    assert out["a"]["x"]["seeds"] == [0, 1, 2] and out["a"]["x"]["values"] == [1.0, 2.0, 4.0]
    assert out["a"]["y"] == {
        "mean": 2.0,
        "std": pytest.approx(math.sqrt(2)),
        "n": 2,
        "values": [3.0, 1.0],
        "seeds": [1, 2],
    }
    assert out["b"]["x"]["mean"] == 10.0 and out["b"]["x"]["std"] is None
    assert "y" not in out["b"]
    assert format_mean_std(out["a"]["x"], 2) == "2.33 ± 1.53"
    assert format_mean_std(out["b"]["x"], 1) == "10.0"
    assert format_mean_std(None) == "–"


def test_paired_differences_by_seed():
    runs = [
        _run("ps", 0, {"kl": 0.30}),
        _run("ps", 1, {"kl": 0.10}),
        _run("ps", 2, {"kl": 0.50}),
        _run("ps", 3, {"kl": 0.25}),
        _run("share", 0, {"kl": 0.10}),
        _run("share", 1, {"kl": 0.20}),  # seed 2 missing: not paired
        _run("share", 3, {"kl": 0.25}),  # a tie: not counted as "> 0"
    ]
    out = paired_differences(runs, "ps", "share", ["kl"])
    assert out["kl"]["seeds"] == [0, 1, 3]
    assert out["kl"]["values"] == pytest.approx([0.20, -0.10, 0.0])
    assert out["kl"]["mean"] == pytest.approx(1 / 30)
    # deviations 1/6, -2/15, -1/30: (25 + 16 + 1) / 900 / 2 = 7/300
    assert out["kl"]["std"] == pytest.approx(math.sqrt(7 / 300))
    assert out["kl"]["positive"] == 1 and out["kl"]["n"] == 3


def test_aggregate_curves_over_common_steps():
    def curve(points):
        return [{"step": s, **dict.fromkeys(CURVE_METRICS, v)} for s, v in points]

    runs = [
        _run("a", 0, {}, curve([(0, 1.0), (2, 3.0), (4, 5.0)])),
        _run("a", 1, {}, curve([(0, 1.0), (2, 5.0)])),  # stopped early: step 4 is not averaged over one seed
        _run("b", 0, {}, curve([(0, 2.0), (2, 2.5)])),
    ]
    out = aggregate_curves(runs)
    assert out["a"]["steps"] == [0, 2] and out["a"]["n"] == 2
    assert out["a"]["kl_high_entropy_normal"]["mean"] == [1.0, 4.0]
    assert out["a"]["kl_high_entropy_normal"]["std"] == [0.0, pytest.approx(math.sqrt(2))]
    assert out["b"]["entropy_gap"] == {"mean": [2.0, 2.5], "std": [None, None]}


def test_summary_markdown_has_every_method_and_the_paired_column():
    runs = [
        _run(m, s, {"probe/kl_high_entropy_normal": v})
        for m, s, v in [
            ("policy_split", 0, 0.4),
            ("policy_split", 1, 0.2),
            ("grpo_rollout_sharing", 0, 0.1),
            ("grpo_rollout_sharing", 1, 0.1),
        ]
    ]
    for r in runs:
        r["probe_curve"] = [{"step": 0, **dict.fromkeys(CURVE_METRICS, 0.0)}]
    summary = summarize(runs, ["policy_split", "grpo_rollout_sharing"], "test")
    text = summary_markdown(summary)
    header = next(line for line in text.splitlines() if line.startswith("| metric"))
    assert "Policy Split (n=2)" in header and "GRPO w/ sharing (n=2)" in header and "paired" in header
    row = next(line for line in text.splitlines() if line.startswith("| probe KL"))
    assert row.split(" | ")[1:] == ["0.3000 ± 0.1414", "0.1000 ± 0.0000", "0.2000 ± 0.1414 (2/2) |"]
    # A metric no run has is not a row; each row has as many cells as the header.
    assert "Acc normal" not in text
    assert row.count("|") == header.count("|")


def test_probe_callback_measures_at_zero_every_k_and_the_last_step():
    from types import SimpleNamespace

    from policy_split_trl.benchmarks.mode_split import make_callbacks

    class FakeProbe:
        completions = ((1, 2, 3),)

        def measure(self, model):
            return {"entropy_normal_context": 1.0, "entropy_high_entropy_context": 1.5, "kl_high_entropy_normal": 0.1}

    printed = []
    probe_cb, progress_cb = make_callbacks(FakeProbe(), every=2, max_steps=5, progress=lambda *a: printed.append(a))
    model = SimpleNamespace(device="cpu", training=True, eval=lambda: None, train=lambda mode=True: None)
    probe_cb.trainer = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: m), model=model)
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    probe_cb.on_train_begin(None, state, None)
    for step in range(1, 6):
        state.global_step = step
        probe_cb.on_step_end(None, state, None)
        progress_cb.on_log(None, state, None, logs={"frac_reward_zero_std": 0.5, "reward": 0.25})
    assert [p["step"] for p in probe_cb.curve] == [0, 2, 4, 5]
    assert probe_cb.curve[-1]["entropy_gap"] == pytest.approx(0.5)
    assert [a[0] for a in printed] == [1, 2, 3, 4, 5]
    state.is_world_process_zero = False  # only the main process prints
    progress_cb.on_log(None, state, None, logs={"frac_reward_zero_std": 0.5})
    assert len(printed) == 5


def test_check_settings_names_the_difference():
    saved = {"max_steps": 24, "training": {"learning_rate": 1e-5, "beta": 0.0}}
    check_settings(saved, json.loads(json.dumps(saved)), "x/run.json")  # equal: quiet
    with pytest.raises(SettingsMismatchError, match=r"training\.learning_rate: 1e-05 -> 2e-05") as error:
        check_settings(saved, {"max_steps": 24, "training": {"learning_rate": 2e-5, "beta": 0.0}}, "x/run.json")
    assert "max_steps" not in str(error.value)


def test_driver_flags_cannot_be_forwarded(tmp_path):
    with pytest.raises(ValueError, match="--seed is set by this driver"):
        main(["--seed", "3", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown"):
        main(["--methods", "grpo", "nope", "--output_dir", str(tmp_path)])


def test_probe_with_completion_logits_only_matches_the_full_forward(model, tokenizer):
    from policy_split_trl.benchmarks.mode_split import probe_point
    from policy_split_trl.probe import ModeGapProbe

    prompts = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "the sum of a number"}]]
    # Completions of different lengths: the shorter one is right-padded inside the kept window.
    probe = ModeGapProbe(prompts, [[5, 6, 7, 8], [9, 10]], "You are in high entropy mode.", tokenizer)
    full = probe.measure(model)
    cut = probe_point(probe, model, 3)
    assert cut["step"] == 3
    for key, value in full.items():
        assert cut[key] == pytest.approx(value, abs=1e-5), key
    assert cut["kl_high_entropy_normal"] > 0  # two different contexts: a real, non-zero number was compared
    assert cut["entropy_gap"] == pytest.approx(full["entropy_high_entropy_context"] - full["entropy_normal_context"])


# --------------------------------------------------------------------------------------------- end to end (tiny)
def _tiny_argv(model_path, output_dir, *extra):
    return [
        "--model",
        model_path,
        "--methods",
        "grpo",
        "policy_split",
        "--paired",
        "policy_split",
        "grpo",
        "--seeds",
        "0",
        "--max_steps",
        "2",
        "--probe_every",
        "1",
        "--probe_prompts",
        "2",
        "--probe_samples_per_mode",
        "1",
        "--eval_limit",
        "2",
        "--eval_k",
        "1",
        "--eval_max_new_tokens",
        "8",
        "--output_dir",
        str(output_dir),
        "--max_completion_length",
        "8",
        *extra,
    ]


@pytest.fixture(scope="module")
def finished(tiny_model_path, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("mode_split")
    summary = main(_tiny_argv(tiny_model_path, output_dir))
    return tiny_model_path, output_dir, summary


def test_end_to_end_on_the_tiny_model(finished):
    _, output_dir, summary = finished
    for name in ("probe.json", "summary.json", "summary.md", "mode_split.png"):
        assert os.path.getsize(output_dir / name) > 0, name
    saved = json.loads((output_dir / "summary.json").read_text())
    assert saved["seeds_per_method"] == {"grpo": 1, "policy_split": 1}
    assert set(saved["metrics"]["grpo"]) == set(SUMMARY_METRICS)  # every metric, plain GRPO included
    assert saved["paired"]["method"] == "policy_split" and saved["paired"]["baseline"] == "grpo"
    assert saved["curves"]["policy_split"]["steps"] == [0, 1, 2]
    assert saved["plot"].endswith("mode_split.png") and summary["plot"] == saved["plot"]
    runs = {}
    for method in ("grpo", "policy_split"):
        run = json.loads((output_dir / "runs" / method / "seed0" / "run.json").read_text())
        assert run["status"] == "finished" and run["steps"] == 2
        assert [p["step"] for p in run["probe_curve"]] == [0, 1, 2]
        assert set(run["evaluation"]) >= {"normal", "high_entropy", "comparison"}
        assert run["metrics"]["train/frac_reward_zero_std"] is not None
        runs[method] = run
    # The probe is the same sequences for every run and the initial model the same: identical step-0 values.
    for key in CURVE_METRICS:
        assert runs["grpo"]["probe_curve"][0][key] == pytest.approx(runs["policy_split"]["probe_curve"][0][key])
    assert runs["policy_split"]["settings"]["method_settings"]["eta"] == 0.03
    assert runs["policy_split"]["settings"]["method_settings"]["eta_placement"] == "inside_clip"
    md = (output_dir / "summary.md").read_text()
    assert "| probe KL" in md and "GRPO (n=1)" in md and "Policy Split (n=1)" in md


def test_resume_skips_finished_runs(finished, monkeypatch):
    model_path, output_dir, summary = finished

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(mode_split, "run_one", fail)
    again = main(_tiny_argv(model_path, output_dir))
    assert again["metrics"]["policy_split"] == summary["metrics"]["policy_split"]


def test_resume_with_other_settings_raises(finished, monkeypatch):
    model_path, output_dir, _ = finished
    monkeypatch.setattr(mode_split, "run_one", lambda *a, **k: pytest.fail("must stop before training"))
    with pytest.raises(SettingsMismatchError, match=r"run\.json.*max_steps: 2 -> 3"):
        main(_tiny_argv(model_path, output_dir)[:-2] + ["--max_steps", "3", "--max_completion_length", "8"])
    with pytest.raises(SettingsMismatchError, match="learning_rate"):
        main(_tiny_argv(model_path, output_dir, "--learning_rate", "3e-5"))
    with pytest.raises(SettingsMismatchError, match=r"probe\.json.*prompts: 2 -> 3"):
        main(_tiny_argv(model_path, output_dir, "--probe_prompts", "3"))
