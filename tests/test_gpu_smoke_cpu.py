"""The GPU smoke script's CPU-capable parts at toy size, so that it cannot rot between GPU runs (~20 s)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))
import gpu_smoke

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    ctx = gpu_smoke.SmokeContext(output_dir=str(tmp_path_factory.mktemp("gpu_smoke")), cuda=False, tiny=True)
    return ctx, gpu_smoke.run_checks(list(gpu_smoke.CHECKS), ctx, isolate=False)


def test_every_check_runs_its_cpu_part(results, capsys):
    ctx, by_name = results
    assert list(by_name) == list(gpu_smoke.CHECKS)
    for name, result in by_name.items():
        assert result["ok"] is True, (name, result)
        assert result["device"] == "cpu" and result["skipped"], name  # the GPU/vLLM parts say they were skipped
    with open(os.path.join(ctx.output_dir, "results.jsonl")) as f:
        recorded = [json.loads(line) for line in f]
    assert [r["name"] for r in recorded] == list(gpu_smoke.CHECKS)


def test_colocate_routes_the_prompt_and_trains(results):
    colocate = results[1]["colocate"]
    assert colocate["he_prompt_iff_he_rollout"] and colocate["rows_normal_then_he_context"]
    assert colocate["steps"] == 2 and colocate["generation_batches"] == 2 and colocate["loss_finite"]
    assert colocate["frac_params_changed"] > 0.99  # fp32 weights + bf16 autocast at lr 3e-6


def test_t4_settings_and_memory_runs(results):
    kv = results[1]["kv_budget_t4"]
    assert kv["dtype"] == "float16" and not kv["auto_use_vllm"]  # a T4: fp16, transformers unless vLLM is forced
    assert kv["vllm_max_model_length"] == kv["max_prompt_length"] + kv["max_completion_length"]
    memory = results[1]["memory"]
    assert set(memory["runs"]) == {"grpo", "policy_split", "policy_split_bonus_from_scoring_pass"}
    assert all(run["steps"] == 2 and run["loss_finite"] for run in memory["runs"].values())


def test_result_lines_round_trip():
    line = gpu_smoke.result_line("memory", {"ok": None, "error": "x"})
    assert line.startswith("RESULT memory ok=skip {")
    assert gpu_smoke.parse_result_line(line) == ("memory", {"ok": None, "error": "x"})
    name, failed = gpu_smoke.parse_result_line(gpu_smoke.result_line("colocate", {"ok": False, "gap": 0.5}))
    assert name == "colocate" and failed == {"ok": False, "gap": 0.5}


def test_a_failing_check_is_reported_not_raised(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("no KV cache")

    monkeypatch.setitem(gpu_smoke.CHECK_FUNCTIONS, "kv_budget_t4", broken)
    ctx = gpu_smoke.SmokeContext(output_dir=str(tmp_path), cuda=False, tiny=True)
    result = gpu_smoke.run_checks(["kv_budget_t4"], ctx, isolate=False)["kv_budget_t4"]
    assert result["ok"] is False and result["error"] == "RuntimeError: no KV cache"


def test_the_make_target_needs_no_cpu_install():
    with open(os.path.join(ROOT, "Makefile")) as f:
        lines = f.read().splitlines()
    target = next(line for line in lines if line.startswith("gpu-smoke:"))
    assert target.split(":", 1)[1].strip() == ""  # no `install` prerequisite: it would put the CPU torch first
    recipe = lines[lines.index(target) + 1]
    assert "HF_HUB_OFFLINE=1" in recipe and "tests/gpu/gpu_smoke.py" in recipe
