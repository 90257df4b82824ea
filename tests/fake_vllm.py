"""A stand-in for `vllm` (no GPU here) that accepts only what the real one accepts, for the calls this project makes.

Mirrored from the sources of the vLLM 0.22.0 and 0.31.0 wheels (the range TRL 1.16 supports: `trl[vllm]` pins
`vllm>=0.22.0,<=0.31.0`); where the two differ, the fake takes the stricter one:

- `vllm/entrypoints/llm.py`: `LLM.__init__(model, *, <named options>, **kwargs)` hands `kwargs` to `EngineArgs(...)`, a
  dataclass, so an unknown keyword is a `TypeError`. `LLM.generate(prompts, sampling_params=None, *, use_tqdm=True,
  lora_request=None, priority=None, tokenization_kwargs=None, mm_processor_kwargs=None)` and `LLM.chat(messages,
  sampling_params=None, use_tqdm=True, lora_request=None, chat_template=None, ..., chat_template_kwargs=None, ...)`.
- `vllm/engine/arg_utils.py` (`EngineArgs`) and `vllm/config/lora.py`: `enable_lora=False`, `max_lora_rank: MaxLoRARanks
  = 16` with `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]`, validated when LoRA is enabled.
- `vllm/lora/request.py`: `LoRARequest(lora_name, lora_int_id, lora_path="", ...)`.
- `vllm/lora/peft_helper.py` (`PEFTHelper.validate_legal`, when a request first loads its adapter): "LoRA rank {r} is
  greater than max_lora_rank {max_lora_rank}." (`ValueError`).
- `vllm/v1/engine/input_processor.py` (`_validate_lora`): "Got lora_request ... but LoRA is not enabled!"
  (`VLLMValidationError`: a `ValueError` in 0.22; 0.31 re-based it on its own `VLLMError`).
- `vllm/sampling_params.py`: the `SamplingParams` fields and the `_verify_args` checks on the ones we set.

`test_fake_vllm_matches_the_installed_vllm` compares these names with a real vLLM wherever one is installed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any

MIRRORED_VERSIONS = ("0.22.0", "0.31.0")

# `LLM.__init__`'s named options and the `EngineArgs` fields its `**kwargs` reach, accepted by both 0.22.0 and 0.31.0.
_LLM_KWARGS = """
    _api_process_count _api_process_rank additional_config aggregate_engine_logging all2all_backend
    allow_deprecated_quantization allowed_local_media_path allowed_media_domains async_scheduling
    attention_backend attention_config block_size chat_template code_revision collect_detailed_traces
    compilation_config config_format convert cp_kv_cache_interleave_size cpu_distributed_timeout_seconds
    cpu_offload_gb cpu_offload_params cudagraph_capture_sizes cudagraph_metrics data_parallel_address
    data_parallel_backend data_parallel_external_lb data_parallel_hybrid_lb data_parallel_multi_port_external_lb
    data_parallel_rank data_parallel_rpc_port data_parallel_size data_parallel_size_local
    data_parallel_start_rank dbo_decode_token_threshold dbo_prefill_token_threshold dcp_comm_backend
    dcp_kv_cache_interleave_size decode_context_parallel_size default_mm_loras disable_cascade_attn
    disable_chunked_mm_input disable_custom_all_reduce disable_hybrid_kv_cache_manager disable_log_stats
    disable_nccl_for_dp_synchronization disable_sliding_window distributed_executor_backend
    distributed_timeout_seconds download_dir dtype ec_transfer_config enable_chunked_prefill
    enable_cumem_allocator enable_dbo enable_elastic_ep enable_ep_weight_filter enable_eplb
    enable_expert_parallel enable_flashinfer_autotune enable_layerwise_nvtx_tracing
    enable_logging_iteration_details enable_lora enable_mamba_cache_stochastic_rounding enable_mfu_metrics
    enable_mixed_moe_lora_format enable_mm_embeds enable_mm_processor_stats enable_prefix_caching
    enable_prompt_embeds enable_return_routed_experts enable_sleep_mode enable_tower_connector_lora
    enforce_eager eplb_config expert_placement_strategy fail_on_environ_validation fully_sharded_loras
    gdn_prefill_backend generation_config gpu_memory_utilization hf_config_path hf_overrides hf_token
    ignore_patterns interleave_mm_strings io_processor_plugin ir_op_priority kernel_config kv_cache_dtype
    kv_cache_dtype_skip_layers kv_cache_memory_bytes kv_cache_metrics kv_cache_metrics_sample kv_events_config
    kv_offloading_backend kv_offloading_size kv_sharing_fast_prefill kv_transfer_config language_model_only
    limit_mm_per_prompt linear_backend load_format logits_processors logprobs_mode long_prefill_token_threshold
    lora_dtype lora_target_modules mamba_backend mamba_block_size mamba_cache_dtype mamba_cache_mode
    mamba_cache_philox_rounds mamba_config mamba_ssm_cache_dtype master_addr master_port max_cpu_loras
    max_cudagraph_capture_size max_logprobs max_lora_rank max_loras max_model_len max_num_batched_tokens
    max_num_seqs max_parallel_loading_workers media_io_kwargs mm_encoder_attn_backend mm_encoder_attn_dtype
    mm_encoder_fp8_scale_path mm_encoder_fp8_scale_save_margin mm_encoder_fp8_scale_save_path mm_encoder_only
    mm_encoder_tp_mode mm_processor_cache_gb mm_processor_cache_type mm_processor_kwargs
    mm_shm_cache_max_object_size_mb mm_tensor_ipc model model_impl model_loader_extra_config model_weights
    moe_backend nnodes node_rank num_gpu_blocks_override numa_bind numa_bind_cpus numa_bind_nodes
    offload_backend offload_group_size offload_num_in_group offload_params offload_prefetch_step
    optimization_level otlp_traces_endpoint override_generation_config performance_mode pipeline_parallel_size
    pooler_config prefill_context_parallel_size prefix_caching_hash_algo profiler_config pt_load_map_location
    quantization quantization_config ray_workers_use_nsight reasoning_config reasoning_parser
    reasoning_parser_plugin renderer_num_workers revision runner safetensors_load_strategy
    safetensors_prefetch_block_size safetensors_prefetch_num_threads scheduler_cls scheduler_reserve_full_isl
    scheduling_policy seed served_model_name show_hidden_metrics_for_version shutdown_timeout skip_mm_profiling
    skip_tokenizer_init spec_method spec_model spec_tokens specialize_active_lora speculative_config
    stream_interval structured_outputs_config tensor_parallel_size tokenizer tokenizer_mode tokenizer_revision
    tokens_only trust_remote_code ubatch_size use_fp64_gumbel use_tqdm_on_load video_pruning_rate
    weight_transfer_config worker_cls worker_extension_cls
"""
LLM_KWARGS = frozenset(_LLM_KWARGS.split())

# The public `SamplingParams` fields of both versions (a msgspec Struct: an unknown keyword is a `TypeError`).
_SAMPLING_PARAMS_FIELDS = """
    allowed_token_ids bad_words detokenize extra_args flat_logprobs frequency_penalty ignore_eos
    include_stop_str_in_output logit_bias logprob_token_ids logprobs max_tokens min_p min_tokens n output_kind
    output_text_buffer_length presence_penalty prompt_logprobs repetition_detection repetition_penalty
    routed_experts_prompt_start seed skip_clone skip_reading_prefix_cache skip_special_tokens
    spaces_between_special_tokens stop stop_token_ids structured_outputs temperature thinking_token_budget top_k
    top_p
"""
SAMPLING_PARAMS_FIELDS = frozenset(_SAMPLING_PARAMS_FIELDS.split())

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # `MaxLoRARanks`, vllm/config/lora.py
DEFAULT_MAX_LORA_RANK = 16


class VLLMValidationError(ValueError):
    """vllm/exceptions.py (0.22: a `ValueError`)."""


class SamplingParams:
    """
    `vllm.SamplingParams`: its field names with their real defaults, and the checks of `_verify_args` on the fields
    this project sets. Keywords only (the real one also takes them by position; nothing here does that).
    """

    def __init__(self, **kwargs: Any):
        for name in kwargs:
            if name not in SAMPLING_PARAMS_FIELDS:
                raise TypeError(f"Unexpected keyword argument '{name}'")  # msgspec's wording
        self.n, self.temperature, self.top_p, self.top_k = 1, 1.0, 1.0, 0
        self.seed, self.max_tokens, self.min_tokens = None, 16, 0
        for name, value in kwargs.items():
            setattr(self, name, value)
        self._verify_args()

    def _verify_args(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise VLLMValidationError(f"n must be an int >= 1, got {self.n!r}.")
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 2.0:  # 0.31 caps it at 2
            raise VLLMValidationError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise VLLMValidationError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int):
            raise TypeError(f"top_k must be an integer, got {type(self.top_k).__name__}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise VLLMValidationError(f"max_tokens must be at least 1, got {self.max_tokens}.")


@dataclass
class LoRARequest:
    """`vllm.lora.request.LoRARequest` (a msgspec Struct with these fields, in this order)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None
    tensorizer_config_dict: dict | None = None
    load_inplace: bool = False
    is_3d_lora_weight: bool = False

    def __post_init__(self):
        if self.lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")
        assert self.lora_path, "lora_path cannot be empty"


@dataclass
class CompletionOutput:
    """The part of `vllm.outputs.CompletionOutput` we read."""

    index: int
    text: str
    token_ids: list[int]


@dataclass
class RequestOutput:
    """The part of `vllm.outputs.RequestOutput` we read."""

    prompt: Any
    outputs: list[CompletionOutput]


@dataclass
class Call:
    """One `generate`/`chat` call, as the fake received it."""

    method: str
    prompts: list[Any]
    sampling_params: SamplingParams
    lora_request: LoRARequest | None
    kwargs: dict[str, Any] = field(default_factory=dict)


_built: list[LLM] = []


class LLM:
    """
    `vllm.LLM`: checks its keywords, and every LoRA request against `enable_lora` and `max_lora_rank` as the engine
    would when the request loads its adapter; replies with `reply_token_ids` / `reply_text` and records each call in
    `calls`.
    """

    reply_token_ids: tuple[int, ...] = (5, 6, 2)
    reply_text: str = "forty-two"

    def __init__(self, model: str, **kwargs: Any):
        for name in kwargs:
            if name not in LLM_KWARGS:
                raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument '{name}'")
        self.model = model
        self.kwargs = kwargs
        self.enable_lora = kwargs.get("enable_lora", False)
        self.max_lora_rank = kwargs.get("max_lora_rank", DEFAULT_MAX_LORA_RANK)
        # `LoRAConfig` (pydantic: its ValidationError is a ValueError) is built only when LoRA is enabled.
        if self.enable_lora and self.max_lora_rank not in MAX_LORA_RANKS:
            raise ValueError(f"max_lora_rank: input should be one of {MAX_LORA_RANKS}, got {self.max_lora_rank!r}")
        self.calls: list[Call] = []
        _built.append(self)

    def _check_lora(self, lora_request: LoRARequest | None) -> None:
        if lora_request is None:
            return
        if not isinstance(lora_request, LoRARequest):
            raise TypeError(f"Invalid lora_request type {type(lora_request)}")
        if not self.enable_lora:
            raise VLLMValidationError(f"Got lora_request {lora_request} but LoRA is not enabled!")
        with open(os.path.join(lora_request.lora_path, "adapter_config.json")) as f:
            config = json.load(f)
        if config["r"] > self.max_lora_rank:
            raise ValueError(f"LoRA rank {config['r']} is greater than max_lora_rank {self.max_lora_rank}.")
        # Real vLLM checks only `r` there, then fails copying a larger `rank_pattern` module into its buffers, which
        # are `max_lora_rank` wide (vllm/lora/layers/base_linear.py, `set_lora`).
        for module, rank in (config.get("rank_pattern") or {}).items():
            if rank > self.max_lora_rank:
                raise ValueError(f"LoRA rank {rank} of {module} is greater than max_lora_rank {self.max_lora_rank}.")

    def _run(self, method: str, prompts: list[Any], sampling_params: Any, lora_request: Any, **kwargs) -> list:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        self._check_lora(lora_request)
        self.calls.append(Call(method, prompts, sampling_params, lora_request, kwargs))
        reply = [CompletionOutput(i, self.reply_text, list(self.reply_token_ids)) for i in range(sampling_params.n)]
        return [RequestOutput(prompt, reply) for prompt in prompts]

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: LoRARequest | None = None,
        priority: list[int] | None = None,
        tokenization_kwargs: dict | None = None,
        mm_processor_kwargs: dict | None = None,
    ) -> list:
        prompts = prompts if isinstance(prompts, list | tuple) else [prompts]
        for prompt in prompts:
            # a plain string, or a `TextPrompt` / `TokensPrompt` dict (vllm/inputs/data.py)
            keys = set(prompt) if isinstance(prompt, dict) else set()
            if not isinstance(prompt, str) and not {"prompt", "prompt_token_ids"} & keys:
                raise TypeError(f"A prompt is a str, a TextPrompt or a TokensPrompt, got {prompt!r}")
        return self._run("generate", list(prompts), sampling_params, lora_request, use_tqdm=use_tqdm)

    def chat(
        self,
        messages: list,
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | None = None,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list | None = None,
        chat_template_kwargs: dict | None = None,
        tokenization_kwargs: dict | None = None,
        mm_processor_kwargs: dict | None = None,
    ) -> list:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        return self._run(
            "chat",
            conversations,
            sampling_params,
            lora_request,
            use_tqdm=use_tqdm,
            chat_template_kwargs=chat_template_kwargs,
        )


def install_fake_vllm(monkeypatch: Any) -> types.ModuleType:
    """
    Put the fake in `sys.modules` as `vllm`, `vllm.lora` and `vllm.lora.request` for one test (undone by `monkeypatch`).
    The returned module's `built` lists the `LLM`s built since.
    """
    _built.clear()
    vllm = types.ModuleType("vllm")
    vllm.__version__ = MIRRORED_VERSIONS[-1]
    vllm.LLM, vllm.SamplingParams, vllm.built = LLM, SamplingParams, _built
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    vllm.lora, lora.request = lora, request
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)
    return vllm


def save_tiny_lora_adapter(model_path: str, output_dir: str, r: int = 32, **lora_kwargs: Any) -> str:
    """A real PEFT LoRA adapter of rank `r` on the model at `model_path`, saved with its tokenizer; returns the folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], **lora_kwargs)
    get_peft_model(model, config).save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(output_dir)
    return output_dir
