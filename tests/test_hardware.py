"""`policy_split_trl.hardware`: the GPU -> settings rules of the notebook (precision, vLLM, its context and share)."""

import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import Qwen3Config

from policy_split_trl import hardware
from policy_split_trl.hardware import (
    GIB,
    QWEN3_0_6B_WEIGHTS_GIB,
    QWEN3_KV_CACHE_BYTES_PER_TOKEN,
    TRAINING_MEMORY_GIB,
    VLLM_OVERHEAD_GIB,
    GpuInfo,
    RuntimeSettings,
    detect_gpu,
    install_requirements,
    model_footprint,
    parse_nvidia_smi,
    runtime_settings,
)

# GPU memory as torch reports it (`total_memory / 2**30`), a little under the marketing figure.
T4 = (15095 / 1024, (7, 5))
A100_40GB = (40339 / 1024, (8, 0))
A100_80GB = (81050 / 1024, (8, 0))
H100 = (81008 / 1024, (9, 0))
L4 = (22.06, (8, 9))
NOTEBOOK_LENGTHS = (512, 512)  # the notebook's MAX_PROMPT_LENGTH, MAX_COMPLETION_LENGTH
QWEN3_0_6B = Qwen3Config(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
)
QWEN3_1_7B = Qwen3Config(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
)


def _kv_gib(tokens: int) -> float:
    return QWEN3_KV_CACHE_BYTES_PER_TOKEN * tokens / GIB


def _vllm_budget_gib(settings: RuntimeSettings) -> float:
    """The KV cache vLLM is left with: its share of the GPU minus the weights and its overhead."""
    share_gib = settings.vllm_gpu_memory_utilization * settings.total_memory_gib
    return share_gib - QWEN3_0_6B_WEIGHTS_GIB - VLLM_OVERHEAD_GIB


def test_t4_uses_fp16_and_transformers_generation():
    settings = runtime_settings(*T4, *NOTEBOOK_LENGTHS)
    assert settings.on_gpu and settings.fp16 and not settings.bf16 and settings.dtype == "float16"
    assert not settings.use_vllm  # auto: a T4 trains alone on its memory
    assert settings.vllm_max_model_length == 1024
    # The marketing 15 GiB (nvidia-smi) decides the same as torch's 14.7 GiB.
    assert runtime_settings(15.0, (7, 5), *NOTEBOOK_LENGTHS) == RuntimeSettings(
        True, False, True, False, 0.3, 1024, 15.0, (7, 5), settings.reason
    )


@pytest.mark.parametrize(
    ("gpu", "share"),
    [(A100_40GB, 0.2), (A100_80GB, 0.1), (H100, 0.1), (L4, 0.3)],
    ids=["a100-40", "a100-80", "h100", "l4"],
)
def test_ampere_and_newer_use_bf16_and_vllm_sized_to_the_gpu(gpu, share):
    settings = runtime_settings(*gpu, *NOTEBOOK_LENGTHS)
    assert settings.bf16 and not settings.fp16 and settings.dtype == "bfloat16"
    assert settings.use_vllm
    assert settings.vllm_max_model_length == 1024
    assert settings.vllm_gpu_memory_utilization == share
    # The share holds the weights, the overhead and (but for the L4, capped at 30 %) the KV cache of the whole
    # generation batch (32 sequences of 1,024 tokens), and leaves training at least what a T4 gives it.
    whole_batch = _kv_gib(32 * 1024)
    assert _vllm_budget_gib(settings) >= (whole_batch if gpu is not L4 else _kv_gib(1024))
    assert settings.total_memory_gib * (1 - share) >= TRAINING_MEMORY_GIB


def test_the_share_follows_the_model_and_the_context():
    small = runtime_settings(*A100_40GB, *NOTEBOOK_LENGTHS)
    weights_gib, kv_bytes = model_footprint(QWEN3_1_7B)
    bigger_model = runtime_settings(
        *A100_40GB, *NOTEBOOK_LENGTHS, weights_gib=weights_gib, kv_cache_bytes_per_token=kv_bytes
    )
    longer = runtime_settings(*A100_40GB, 1024, 4096)
    assert small.vllm_gpu_memory_utilization < bigger_model.vllm_gpu_memory_utilization == 0.25
    assert longer.vllm_max_model_length == 5120 and longer.vllm_gpu_memory_utilization == 0.3  # capped
    assert longer.use_vllm  # 70 % of an A100 40 GB still leaves training its 14 GiB


def test_a_16_gb_ampere_gpu_keeps_transformers_generation():
    # bf16 yes, but vLLM's 30 % would leave training under the 14 GiB the notebook's defaults are sized for.
    settings = runtime_settings(14.6, (8, 6), *NOTEBOOK_LENGTHS)
    assert settings.bf16 and not settings.use_vllm
    assert "14 GiB" in settings.reason


def test_v100_has_no_bf16():
    settings = runtime_settings(31.7, (7, 0), *NOTEBOOK_LENGTHS)
    assert settings.fp16 and not settings.bf16 and not settings.use_vllm


def test_cpu_uses_fp32_and_no_vllm():
    settings = runtime_settings(None, None, *NOTEBOOK_LENGTHS)
    assert not settings.on_gpu and not settings.bf16 and not settings.fp16 and not settings.use_vllm
    assert settings.dtype == "float32" and settings.vllm_max_model_length == 1024
    assert settings.describe().startswith("CPU: float32, transformers generation")
    assert runtime_settings(None, None, *NOTEBOOK_LENGTHS, use_vllm=False) == settings


def test_vllm_forced_on_a_t4_fits_its_kv_cache():
    settings = runtime_settings(*T4, *NOTEBOOK_LENGTHS, use_vllm=True)
    assert settings.use_vllm and settings.fp16 and not settings.bf16
    assert settings.vllm_gpu_memory_utilization == 0.3
    assert settings.vllm_max_model_length == 1024
    # The budget that broke vLLM before: at Qwen3's 40,960 tokens one sequence needs more KV cache than is left.
    assert _vllm_budget_gib(settings) >= 10 * _kv_gib(1024)
    assert _vllm_budget_gib(settings) < _kv_gib(40960)
    assert "vLLM generation with 30% of the GPU" in settings.describe()


def test_vllm_forced_off_on_an_h100():
    settings = runtime_settings(*H100, *NOTEBOOK_LENGTHS, use_vllm=False)
    assert settings.bf16 and not settings.use_vllm and settings.vllm_max_model_length == 1024


def test_vllm_forced_where_it_cannot_run_is_an_early_error():
    with pytest.raises(ValueError, match="use_vllm=True` needs a CUDA GPU.*USE_VLLM"):
        runtime_settings(None, None, *NOTEBOOK_LENGTHS, use_vllm=True)
    # Qwen3's whole context on a T4: one sequence's KV cache alone is over 30 % of the GPU.
    with pytest.raises(ValueError, match="use_vllm=True`: vLLM needs .*MAX_COMPLETION_LENGTH"):
        runtime_settings(*T4, 8192, 32768, use_vllm=True)
    # ... which automatic mode declines quietly on a 24 GB GPU, while an A100 40 GB still holds two such sequences.
    assert "does not fit" in runtime_settings(*L4, 8192, 32768).reason
    assert not runtime_settings(*L4, 8192, 32768).use_vllm
    assert runtime_settings(*A100_40GB, 8192, 32768).use_vllm


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((15.0, None, 512, 512), "compute_capability"),
        ((None, (7, 5), 512, 512), "total_memory_gib"),
        ((15.0, "7.5", 512, 512), "compute_capability"),
        ((15.0, (7,), 512, 512), "compute_capability"),
        ((0.0, (7, 5), 512, 512), "total_memory_gib"),
        ((15.0, (7, 5), 0, 512), "max_prompt_length"),
        ((15.0, (7, 5), 512, 51.2), "max_completion_length"),
        ((15.0, (7, 5), 512, 512, "auto"), "use_vllm"),
    ],
)
def test_bad_input_names_the_field(args, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        runtime_settings(*args)


def test_model_footprint_matches_qwen3():
    assert model_footprint(QWEN3_0_6B) == (
        pytest.approx(QWEN3_0_6B_WEIGHTS_GIB, abs=0.005),
        QWEN3_KV_CACHE_BYTES_PER_TOKEN,
    )
    assert model_footprint(QWEN3_1_7B) == (pytest.approx(3.2, abs=0.005), QWEN3_KV_CACHE_BYTES_PER_TOKEN)
    tiny = Qwen3Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    assert 0 < model_footprint(tiny)[0] < 0.01  # the tests' tiny model: small, but a valid `weights_gib`
    untied = Qwen3Config(**{**QWEN3_0_6B.to_dict(), "tie_word_embeddings": False})
    assert model_footprint(untied)[0] == pytest.approx(QWEN3_0_6B_WEIGHTS_GIB + 151936 * 1024 * 2 / GIB, abs=0.01)
    with pytest.raises(ValueError, match="intermediate_size.*weights_gib"):
        model_footprint(SimpleNamespace(vocab_size=10, hidden_size=8, num_hidden_layers=2, num_attention_heads=2))


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("Tesla T4, 7.5, 15360\n", GpuInfo("Tesla T4", 15.0, (7, 5))),
        (
            "NVIDIA A100-SXM4-80GB, 8.0, 81920\nNVIDIA A100-SXM4-80GB, 8.0, 81920\n",
            GpuInfo("NVIDIA A100-SXM4-80GB", 80.0, (8, 0)),
        ),
        ("", None),
        ('Field "compute_cap" is not a valid field to query.\n', None),
        ("Tesla T4, [N/A], 15360\n", None),
    ],
)
def test_parse_nvidia_smi(output, expected):
    assert parse_nvidia_smi(output) == expected


def test_detect_gpu_without_nvidia_smi_or_driver():
    def missing(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    def no_driver(command, **kwargs):
        return subprocess.CompletedProcess(command, 9, stdout="NVIDIA-SMI has failed\n")

    def t4(command, **kwargs):
        assert command[0] == "nvidia-smi" and "--query-gpu=name,compute_cap,memory.total" in command
        return subprocess.CompletedProcess(command, 0, stdout="Tesla T4, 7.5, 15360\n")

    assert detect_gpu(missing) is None
    assert detect_gpu(no_driver) is None
    assert detect_gpu(t4) == GpuInfo("Tesla T4", 15.0, (7, 5))


@pytest.mark.parametrize(
    ("gpu", "use_vllm", "load_in_4bit", "have", "expected"),
    [
        (T4, None, False, {"policy_split_trl"}, []),
        (T4, None, True, {"policy_split_trl"}, ["bitsandbytes"]),
        (T4, True, False, {"policy_split_trl"}, ["policy-split-trl[vllm]"]),
        (A100_40GB, None, False, {"policy_split_trl"}, ["policy-split-trl[vllm]"]),
        (A100_40GB, None, True, set(), ["policy-split-trl[vllm]", "bitsandbytes"]),
        (A100_40GB, None, True, {"policy_split_trl", "vllm", "bitsandbytes"}, []),
        (A100_40GB, False, False, set(), ["policy-split-trl"]),
        ((None, None), None, True, {"policy_split_trl"}, []),  # 4-bit is GPU-only: no bitsandbytes on CPU
        ((None, None), None, False, set(), ["policy-split-trl"]),
    ],
)
def test_install_requirements(gpu, use_vllm, load_in_4bit, have, expected):
    settings = runtime_settings(*gpu, *NOTEBOOK_LENGTHS, use_vllm=use_vllm)
    assert install_requirements(settings, load_in_4bit, installed=have.__contains__) == expected


def test_is_installed():
    assert hardware.is_installed("json")
    assert not hardware.is_installed("no_such_module_policy_split")


def test_hardware_module_imports_only_the_standard_library():
    # The notebook's install cell loads it before vLLM may replace torch: torch must not be imported by it.
    tree = ast.parse(Path(hardware.__file__).read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0
    }
    assert imported - {"__future__"} <= set(sys.stdlib_module_names), imported
