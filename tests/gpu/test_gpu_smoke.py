"""
The GPU smoke checks (`gpu_smoke.py` here) as pytest tests, each in its own process like `make gpu-smoke`:

    pytest tests/gpu -m gpu -s

They skip themselves without a CUDA GPU, and the vLLM ones without vLLM. `GPU_SMOKE_OUTPUT_DIR` keeps the built models
and logs (default: a pytest temporary folder).
"""

import importlib.util
import os

import gpu_smoke
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (pip install vllm)")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    output_dir = os.environ.get("GPU_SMOKE_OUTPUT_DIR") or str(tmp_path_factory.mktemp("gpu_smoke"))
    return gpu_smoke.SmokeContext(output_dir=os.path.abspath(output_dir), cuda=True, tiny=False)


def run_and_check(name, ctx):
    result = gpu_smoke.run_checks([name], ctx, isolate=True)[name]
    assert result["ok"] is True, result
    assert not result.get("skipped"), result  # on a GPU with vLLM nothing may fall back to the CPU path
    return result


@needs_vllm
def test_colocate_routing_importance_sampling_and_training(ctx):
    result = run_and_check("colocate", ctx)
    assert result["vllm"] and result["twin_reuses_is_ratio"] and result["twin_carries_gap"]


@needs_vllm
@pytest.mark.parametrize("name", ["lora_eval_backend", "lora_dual_mode"])
def test_lora_rank_32_through_vllm(name, ctx):
    assert run_and_check(name, ctx)["backend"] == "vllm"


@needs_vllm
def test_vllm_starts_in_a_t4_sized_budget(ctx):
    assert run_and_check("kv_budget_t4", ctx)["vllm_started"]


def test_policy_split_peak_memory_over_grpo(ctx):
    result = run_and_check("memory", ctx)
    assert result["runs"]["policy_split"]["ratio"] <= result["target_ratio"]
