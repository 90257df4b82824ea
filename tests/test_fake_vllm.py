"""The fake `vllm` (tests/fake_vllm.py) refuses what the real one refuses, so the tests that use it can fail."""

import inspect
import typing

import pytest
from fake_vllm import (
    LLM_KWARGS,
    MAX_LORA_RANKS,
    SAMPLING_PARAMS_FIELDS,
    install_fake_vllm,
    save_tiny_lora_adapter,
)


@pytest.fixture(scope="module")
def adapters(tiny_model_path, tmp_path_factory):
    """Real PEFT adapters: r=32, and r=16 with one module lifted to 64 by `rank_pattern`."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "r32": save_tiny_lora_adapter(tiny_model_path, str(root / "r32"), r=32),
        "pattern64": save_tiny_lora_adapter(tiny_model_path, str(root / "p64"), r=16, rank_pattern={"q_proj": 64}),
    }


MESSAGES = [{"role": "user", "content": "1 + 1 ="}]


def test_fake_rejects_unknown_keywords(monkeypatch):
    vllm = install_fake_vllm(monkeypatch)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_lora_ranks'"):
        vllm.LLM(model="m", enable_lora=True, max_lora_ranks=32)  # a typo vLLM would refuse
    with pytest.raises(TypeError, match="Unexpected keyword argument 'max_new_tokens'"):
        vllm.SamplingParams(max_new_tokens=8)  # the transformers name, not vLLM's `max_tokens`
    llm = vllm.LLM(model="m", gpu_memory_utilization=0.5, max_model_len=None, enable_lora=False)
    with pytest.raises(TypeError):
        llm.generate(["hi"], vllm.SamplingParams(), False)  # use_tqdm and lora_request are keyword-only
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.chat(MESSAGES, {"max_tokens": 8})
    with pytest.raises(ValueError, match="top_k must be 0"):
        vllm.SamplingParams(top_k=-2)
    with pytest.raises(ValueError, match="max_lora_rank"):
        vllm.LLM(model="m", enable_lora=True, max_lora_rank=24)  # not one of MaxLoRARanks


def test_fake_rejects_an_adapter_above_max_lora_rank(monkeypatch, adapters):
    vllm = install_fake_vllm(monkeypatch)
    from vllm.lora.request import LoRARequest

    r32 = LoRARequest("adapter", 1, adapters["r32"])
    default = vllm.LLM(model="m", enable_lora=True)  # vLLM's default max_lora_rank: 16
    with pytest.raises(ValueError, match="LoRA rank 32 is greater than max_lora_rank 16"):
        default.generate([{"prompt_token_ids": [1, 2]}], vllm.SamplingParams(), lora_request=r32)
    with pytest.raises(ValueError, match="LoRA rank 32 is greater than max_lora_rank 16"):
        default.chat(MESSAGES, vllm.SamplingParams(), lora_request=r32)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        vllm.LLM(model="m").chat(MESSAGES, vllm.SamplingParams(), lora_request=r32)
    with pytest.raises(ValueError, match="LoRA rank 64 of q_proj is greater than max_lora_rank 32"):
        vllm.LLM(model="m", enable_lora=True, max_lora_rank=32).chat(
            MESSAGES, lora_request=LoRARequest("adapter", 1, adapters["pattern64"])
        )
    with pytest.raises(ValueError, match="id must be > 0"):
        LoRARequest("adapter", 0, adapters["r32"])
    # and it serves what fits
    served = vllm.LLM(model="m", enable_lora=True, max_lora_rank=32)
    out = served.chat(MESSAGES, vllm.SamplingParams(n=2, max_tokens=4), lora_request=r32)
    assert [o.text for o in out[0].outputs] == ["forty-two", "forty-two"]
    assert served.calls[-1].lora_request is r32 and served.calls[-1].sampling_params.max_tokens == 4


def test_fake_vllm_matches_the_installed_vllm():
    """Where a real vLLM is installed (GPU machines), the fake's names and limits must be the real ones."""
    vllm = pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs
    from vllm.lora.request import LoRARequest

    real_llm = set(inspect.signature(vllm.LLM.__init__).parameters) | set(EngineArgs.__dataclass_fields__)
    assert LLM_KWARGS <= real_llm, sorted(LLM_KWARGS - real_llm)
    assert SAMPLING_PARAMS_FIELDS <= set(vllm.SamplingParams.__struct_fields__)
    assert LoRARequest.__struct_fields__[:3] == ("lora_name", "lora_int_id", "lora_path")
    assert EngineArgs.enable_lora is False and EngineArgs.max_lora_rank == 16
    from vllm.config.lora import MaxLoRARanks

    assert typing.get_args(MaxLoRARanks) == MAX_LORA_RANKS
    generate = inspect.signature(vllm.LLM.generate).parameters
    assert generate["use_tqdm"].kind is generate["lora_request"].kind is inspect.Parameter.KEYWORD_ONLY
    chat = inspect.signature(vllm.LLM.chat).parameters
    assert {"sampling_params", "use_tqdm", "lora_request", "chat_template_kwargs"} <= set(chat)
