"""
GPU smoke test of the paths CPU tests cannot reach: vLLM colocate, LoRA through vLLM, a T4-sized vLLM budget, and
the peak memory of a Policy Split step at real shapes. One H100/H200, under 10 minutes, fully offline.

    make gpu-smoke                                     # = python tests/gpu/gpu_smoke.py --output_dir outputs/gpu_smoke
    python tests/gpu/gpu_smoke.py --checks memory      # some checks only
    python tests/gpu/gpu_smoke.py --cpu                # the CPU-capable parts at toy size (what the CPU suite runs)
    pytest tests/gpu -m gpu -s                         # the same checks as pytest tests

Needs CUDA torch and, for the vLLM checks, `vllm` in the running environment (not the CPU torch of `make install`).
Each check prints ONE line, `RESULT <name> ok=<true|false|skip> {json}`, and appends its JSON to
`<output_dir>/results.jsonl`; on a GPU each check runs in its own process (a vLLM engine does not give its memory back
to the process that made it), whose full output goes to `<output_dir>/logs/<name>.log`.

Models: random-weight Qwen3s of the real shapes (`Qwen3Config`) with the test tokenizer of `tests/tiny_model.py`,
saved under `<output_dir>/models/` so vLLM can load them; nothing is downloaded. Checks:

- `colocate`: a 2-step Policy Split run, vLLM colocate, fp32 weights with bf16 autocast, gradient_accumulation_steps 2.
  Both modes of a query go to one generation call, with vLLM's prefix caching on (the HE system prompt and each
  query's prompt are cached prefixes). The high-entropy (HE) system prompt reaches generation (and vLLM) exactly for
  the HE rollouts
  (`policy_split_trl.modes.high_entropy_rows`); the sampler-vs-trainer log-prob gap is small in the generating
  context; each rollout's twin row reuses the generating row's importance-sampling ratio and sampler gap; the loss is
  finite and the parameters change.
- `lora_eval_backend`, `lora_dual_mode`: a rank-32 LoRA adapter through `eval.backends.make_backend(backend="vllm")`
  and `inference.DualModeModel.from_pretrained(backend="vllm")`.
- `kv_budget_t4`: `hardware.runtime_settings` for a 15 GiB compute-capability-7.5 card with the notebook's lengths and
  batch (vLLM forced on), then vLLM started with the same absolute memory on this GPU.
- `memory`: peak CUDA memory of one Policy Split step over GRPO's at Qwen3-1.7B shapes, per_device_train_batch_size
  2, 12,288-token completions (generation faked), gradient checkpointing, bf16 autocast, for the default step and for
  `bonus_from_loss_pass=False`; the ratio is printed against the target 1.3.
"""

from __future__ import annotations

import argparse
import ast
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS_DIR)
for path in (ROOT, TESTS_DIR):  # the checkout's package and tests/tiny_model.py, also without `pip install -e .`
    if path not in sys.path:
        sys.path.insert(0, path)

NOTEBOOK = os.path.join(ROOT, "notebooks", "policy_split_qwen3_lora.ipynb")
# The notebook's defaults, used where its parameters cell cannot be read.
NOTEBOOK_DEFAULTS = {"MAX_PROMPT_LENGTH": 512, "MAX_COMPLETION_LENGTH": 512, "PER_DEVICE_BATCH": 8, "GRAD_ACCUM": 4}
CHECKS = ("colocate", "lora_eval_backend", "lora_dual_mode", "kv_budget_t4", "memory")
# Upper bounds per check in its own process on an H100/H200 (vLLM start-up included); typical runs take about half.
TIMEOUTS_S = {"colocate": 240, "lora_eval_backend": 180, "lora_dual_mode": 180, "kv_budget_t4": 150, "memory": 240}
# Real Qwen3 shapes (Hugging Face configs); the vocabulary is Qwen3's, the tokenizer the test one (ids above its
# vocabulary decode to nothing, so rewards read token ids).
QWEN3_SHAPES = {
    "0.6b": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16},
    "1.7b": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16},
}
QWEN3_COMMON = {"num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960}
T4_MEMORY_GIB, T4_CAPABILITY = 15.0, (7, 5)
MEMORY_TARGET_FALLBACK = 1.3  # policy_split_trl.benchmarks.step_overhead.TARGETS["memory_policy_split_over_grpo"]
LORA_RANK = 32  # the LoRA recipes' lora_r
PAPER_LEARNING_RATE = 3e-6
GAP_TOLERANCE = 0.1  # mean |log pi_vllm - log pi_trainer| per token, generating context (bf16 sampler, fp32 master)


# ---------------------------------------------------------------- plumbing


@dataclass
class SmokeContext:
    """
    Where and at what size the checks run.

    Args:
        output_dir (`str`):
            Models, logs and `results.jsonl`.
        cuda (`bool`):
            Run on the GPU (real shapes) or on CPU (toy size, the parts that need no vLLM/CUDA).
        tiny (`bool`):
            Toy shapes everywhere (the CPU default; `--size tiny` on a GPU for a quick plumbing run).
    """

    output_dir: str
    cuda: bool
    tiny: bool
    notes: dict[str, Any] = field(default_factory=dict)

    def model(self, size: str) -> str:
        """A saved random-weight Qwen3 (`size`, or the tiny test model at toy size); built once per output_dir."""
        size = "tiny" if self.tiny else size
        folder = os.path.join(self.output_dir, "models", f"qwen3-{size}-random")
        if not os.path.exists(os.path.join(folder, "config.json")):
            save_random_qwen3(size, folder, cuda=self.cuda)
        return folder


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def qwen3_config(size: str, tokenizer: Any) -> Any:
    """A `Qwen3Config` of a real size with the test tokenizer's special tokens."""
    from transformers import Qwen3Config

    if size not in QWEN3_SHAPES:
        raise ValueError(f"Unknown size {size!r}; choose one of {sorted(QWEN3_SHAPES)} (or tiny).")
    return Qwen3Config(
        **QWEN3_SHAPES[size],
        **QWEN3_COMMON,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


def save_random_qwen3(size: str, folder: str, cuda: bool) -> str:
    """Write a random Qwen3 (`tiny`: the test model) and the test tokenizer as a checkpoint vLLM can load."""
    import torch
    from tiny_model import build_model, build_tokenizer
    from transformers import Qwen3ForCausalLM

    tokenizer = build_tokenizer()
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    if size == "tiny":
        model = build_model(tokenizer)
    else:
        torch.manual_seed(0)
        with torch.device("cuda" if cuda else "cpu"):
            model = Qwen3ForCausalLM(qwen3_config(size, tokenizer)).to(torch.bfloat16)  # vLLM serves it in bf16
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    del model
    os.replace(partial, folder)  # whole or absent: an interrupted build is never taken for a model
    return folder


def token_reward(completions: list, completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
    """A dense reward from the token ids (random ids mostly decode to nothing): advantages are rarely 0."""
    return [(sum(ids) % 97) / 97 for ids in completion_ids]


def tensors_of(batch: dict[str, Any]) -> dict[str, Any]:
    """The row tensors of a batch, detached copies (the trainer changes some in place later)."""
    import torch

    return {k: v.detach().clone() for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}


def changed_fraction(before: list[Any], parameters: Any) -> float:
    """Fraction of the elements of `parameters` that differ from their copies `before`."""
    after = list(parameters)
    changed = sum(int((a.detach() != b).sum()) for a, b in zip(after, before, strict=True))
    return changed / sum(b.numel() for b in before)


def finite_losses(log_history: list[dict[str, Any]]) -> bool:
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return bool(losses) and all(math.isfinite(float(loss)) for loss in losses)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def fake_generation(length: int, low: int, high: int):
    """Every completion exactly `length` random token ids in `[low, high)` (no EOS): generation costs nothing."""
    import torch
    from trl import GRPOTrainer

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        generator = torch.Generator().manual_seed(len(prompt_ids))
        return [torch.randint(low, high, (length,), generator=generator).tolist() for _ in prompt_ids], None

    # Policy Split's own `_generate_single_turn` calls this one through `super()`.
    with mock.patch.object(GRPOTrainer, "_generate_single_turn", generate):
        yield


def notebook_parameters(path: str = NOTEBOOK) -> dict[str, Any]:
    """The literal assignments of the notebook's `parameters` cell (its defaults), or `NOTEBOOK_DEFAULTS`."""
    values = dict(NOTEBOOK_DEFAULTS)
    try:
        with open(path) as f:
            cells = json.load(f)["cells"]
    except (OSError, ValueError, KeyError):
        return values
    for cell in cells:
        if "parameters" not in cell.get("metadata", {}).get("tags", []):
            continue
        for node in ast.parse("".join(cell["source"])).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    values[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:  # an expression (e.g. a call): not a setting this check reads
                    pass
    return values


# ---------------------------------------------------------------- 1. vLLM colocate


def check_colocate(ctx: SmokeContext) -> dict[str, Any]:
    import torch
    from tiny_model import arithmetic_dataset
    from trl import GRPOTrainer

    from policy_split_trl import PolicySplitGRPOConfig, PolicySplitGRPOTrainer
    from policy_split_trl.contexts import expand_contexts as expand  # the rows a loss pass trains: both contexts
    from policy_split_trl.modes import high_entropy_rows

    use_vllm = ctx.cuda and vllm_installed()
    group, num_he, per_device, accumulation = 4, 2, 4, 2
    args = PolicySplitGRPOConfig(
        output_dir=os.path.join(ctx.output_dir, "runs", "colocate"),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        num_generations=group,
        num_high_entropy_generations=num_he,
        max_completion_length=32 if ctx.cuda else 12,
        max_steps=2,
        learning_rate=PAPER_LEARNING_RATE,
        bf16=True,
        use_cpu=not ctx.cuda,
        gradient_checkpointing=True,
        model_init_kwargs={"dtype": "float32"},
        use_vllm=use_vllm,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.15,
        vllm_max_model_length=1024,
        loss_type="dapo",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    trl_batches, sent, received, rows = [], [], [], []
    trl_generate_and_score = GRPOTrainer._generate_and_score_completions

    def trl_output(self, inputs):  # TRL's batch, before Policy Split builds its rows
        output = trl_generate_and_score(self, inputs)
        trl_batches.append(tensors_of(output))
        return output

    with mock.patch.object(GRPOTrainer, "_generate_and_score_completions", trl_output):
        trainer = PolicySplitGRPOTrainer(
            model=ctx.model("0.6b"), reward_funcs=[token_reward], args=args, train_dataset=arithmetic_dataset(32)
        )
        single_turn, generate_and_score = trainer._generate_single_turn, trainer._generate_and_score_completions

        def spy_single_turn(prompt_ids, *a, **k):  # what TRL sends to generation (vLLM or transformers)
            sent.append([list(ids) for ids in prompt_ids])
            return single_turn(prompt_ids, *a, **k)

        def spy_generate_and_score(inputs):
            output = generate_and_score(inputs)
            rows.append(tensors_of(expand(output)))
            return output

        trainer._generate_single_turn = spy_single_turn
        trainer._generate_and_score_completions = spy_generate_and_score
        if use_vllm:
            llm = trainer.vllm_generation.llm
            llm_generate = llm.generate

            def spy_llm_generate(prompts, *a, **k):  # what vLLM itself receives
                received.append([list(p["prompt_token_ids"]) for p in prompts])
                return llm_generate(prompts, *a, **k)

            llm.generate = spy_llm_generate
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train()

    tokenizer, he_text = trainer.processing_class, trainer.args.high_entropy_system_prompt
    result: dict[str, Any] = {"vllm": use_vllm, "steps": trainer.state.global_step, "generation_batches": len(sent)}

    def has_he(ids: list[int]) -> bool:
        return he_text in tokenizer.decode(ids)

    expected = [high_entropy_rows(torch.arange(len(batch)), group, num_he).tolist() for batch in sent]
    result["he_prompt_iff_he_rollout"] = bool(sent) and all(
        [has_he(ids) for ids in batch] == flags for batch, flags in zip(sent, expected, strict=True)
    )
    gates = ["he_prompt_iff_he_rollout"]
    # Rows [0, B): every rollout in the normal context, [B, 2B): in the HE context, same tokens.
    layout = []
    for batch, flags in zip(rows, expected, strict=True):
        num_rollouts = len(flags)
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"])]
        layout.append(
            batch["policy_split_context"].tolist() == [0] * num_rollouts + [1] * num_rollouts
            and [has_he(p) for p in prompts] == [False] * num_rollouts + [True] * num_rollouts
            and torch.equal(batch["completion_ids"][:num_rollouts], batch["completion_ids"][num_rollouts:])
        )
    result["rows_normal_then_he_context"] = bool(layout) and all(layout)
    gates.append("rows_normal_then_he_context")
    # Both modes of a query in one generation call: every batch sent holds HE and normal prompts.
    result["both_modes_in_one_call"] = bool(sent) and all(any(f) and not all(f) for f in expected)
    gates.append("both_modes_in_one_call")
    if use_vllm:
        result["vllm_received_what_trl_sent"] = received == sent
        gates.append("vllm_received_what_trl_sent")
        # The HE system prompt and each query's prompt are cached prefixes (vLLM's automatic prefix caching).
        engine = trainer.vllm_generation.llm.llm_engine
        cache_config = getattr(getattr(engine, "vllm_config", engine), "cache_config", None)
        result["vllm_prefix_caching"] = bool(getattr(cache_config, "enable_prefix_caching", False))
        gates.append("vllm_prefix_caching")
        result.update(_importance_sampling(trl_batches[0], rows[0], torch.tensor(expected[0])))
        gates += ["gap_generating_small", "generating_logps_reused", "twin_reuses_is_ratio", "twin_carries_gap"]
    else:
        result["skipped"] = ["vllm_routing", "importance_sampling (needs vLLM on a GPU)"]
    result["loss_finite"] = finite_losses(trainer.state.log_history)
    result["frac_params_changed"] = round(changed_fraction(before, trainer.model.parameters()), 4)
    result["logged"] = {
        k: v for k, v in trainer.state.log_history[0].items() if k.startswith(("sampling/", "policy_split/kl"))
    }
    result["ok"] = all(result[g] for g in gates) and result["loss_finite"] and result["steps"] == 2
    result["ok"] = result["ok"] and result["frac_params_changed"] > 0.99
    result["gates"] = gates + ["loss_finite", "steps == 2", "frac_params_changed > 0.99"]
    del trainer
    free_memory()
    return result


def _importance_sampling(trl_batch: dict[str, Any], rows: dict[str, Any], is_he: Any) -> dict[str, Any]:
    """The sampler/trainer gap per generating mode and context, and what the twin rows carry."""
    import torch

    num_rollouts = is_he.numel()
    he = is_he.to(trl_batch["completion_mask"].device).bool().unsqueeze(1)
    sampling, old_generating = trl_batch["sampling_per_token_logps"], trl_batch["old_per_token_logps"]
    mask = trl_batch["completion_mask"].bool() & ~torch.isnan(sampling)
    old_normal, old_he = rows["old_per_token_logps"][:num_rollouts], rows["old_per_token_logps"][num_rollouts:]
    old_twin = torch.where(he, old_normal, old_he)

    def mean_gap(other: torch.Tensor, generating_he: bool) -> float:
        selected = mask & (he if generating_he else ~he)
        return round((sampling - other).abs()[selected].mean().item(), 5)

    gap_generating = {"normal": mean_gap(old_generating, False), "high_entropy": mean_gap(old_generating, True)}
    gap_twin = {"normal": mean_gap(old_twin, False), "high_entropy": mean_gap(old_twin, True)}
    ratio = rows["importance_sampling_ratio"]
    # Each row's sampler log-probs minus its own old log-probs must be the generating context's gap, in both contexts.
    gap = (sampling - old_generating)[mask]
    carried = max(
        ((rows["sampling_per_token_logps"][part] - rows["old_per_token_logps"][part])[mask] - gap).abs().max().item()
        for part in (slice(0, num_rollouts), slice(num_rollouts, 2 * num_rollouts))
    )
    return {
        "gap_generating_ctx": gap_generating,
        "gap_twin_ctx": gap_twin,
        "gap_generating_small": max(gap_generating.values()) < GAP_TOLERANCE,
        # TRL's old log-probs serve the generating context (only the twin context is scored again).
        "generating_logps_reused": bool(
            torch.allclose(torch.where(he, old_he, old_normal)[mask], old_generating[mask], rtol=0, atol=1e-6)
        ),
        "twin_reuses_is_ratio": bool(
            torch.equal(ratio[:num_rollouts], ratio[num_rollouts:])
            and torch.equal(ratio[:num_rollouts], trl_batch["importance_sampling_ratio"])
        ),
        "twin_gap_max_abs_diff": carried,
        "twin_carries_gap": carried < 1e-4,
    }


# ---------------------------------------------------------------- 2. LoRA rank 32 through vLLM


def lora_adapter(ctx: SmokeContext) -> tuple[str, str]:
    """(base model folder, rank-32 adapter folder on every linear layer), built once per output_dir."""
    base = ctx.model("0.6b")
    adapter = os.path.join(ctx.output_dir, "models", f"lora-r{LORA_RANK}-" + os.path.basename(base))
    if not os.path.exists(os.path.join(adapter, "adapter_config.json")):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
        model.save_pretrained(adapter)
        AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
        del model
    return base, adapter


def _backend(ctx: SmokeContext) -> tuple[str, list[str]]:
    """vLLM where the check is meant to run it, transformers (the same API call) where it cannot."""
    if ctx.cuda and vllm_installed():
        return "vllm", []
    return "transformers", ["vllm (needs vLLM on a GPU): ran backend='transformers'"]


def check_lora_eval_backend(ctx: SmokeContext) -> dict[str, Any]:
    from policy_split_trl.eval.backends import SamplingConfig, make_backend

    backend_name, skipped = _backend(ctx)
    base, adapter = lora_adapter(ctx)
    backend = make_backend(
        base, adapter=adapter, backend=backend_name, gpu_memory_utilization=0.25, max_model_len=1024
    )
    completions = backend.generate([[{"role": "user", "content": "1 + 1 ="}]], 2, SamplingConfig(max_new_tokens=8))
    result: dict[str, Any] = {"backend": backend_name, "lora_rank": LORA_RANK, "skipped": skipped}
    llm = getattr(backend, "llm", None)
    if llm is not None:
        lora_config = getattr(getattr(llm.llm_engine, "vllm_config", None), "lora_config", None)
        result["vllm_max_lora_rank"] = getattr(lora_config, "max_lora_rank", None)
    result["completions"] = [len(c) for c in completions[0]]
    result["ok"] = len(completions) == 1 and len(completions[0]) == 2 and all(len(c) > 0 for c in completions[0])
    return result


def check_lora_dual_mode(ctx: SmokeContext) -> dict[str, Any]:
    from policy_split_trl.inference import DualModeModel

    backend_name, skipped = _backend(ctx)
    base, adapter = lora_adapter(ctx)
    model = DualModeModel.from_pretrained(base, adapter=adapter, backend=backend_name)
    messages = [{"role": "user", "content": "1 + 1 ="}]
    replies = {mode: model.generate(messages, mode, max_new_tokens=8) for mode in model.modes}
    return {
        "backend": backend_name,
        "lora_rank": LORA_RANK,
        "skipped": skipped,
        "modes": sorted(replies),
        "ok": sorted(replies) == ["high_entropy", "normal"] and all(isinstance(r, str) for r in replies.values()),
    }


# ---------------------------------------------------------------- 3. a T4-sized vLLM budget


def check_kv_budget_t4(ctx: SmokeContext) -> dict[str, Any]:
    try:
        from policy_split_trl.hardware import model_footprint, runtime_settings
    except ImportError as error:
        return {"ok": None, "error": f"policy_split_trl.hardware not available: {error}"}
    from tiny_model import build_tokenizer

    notebook = notebook_parameters()
    prompt, completion = notebook["MAX_PROMPT_LENGTH"], notebook["MAX_COMPLETION_LENGTH"]
    num_seqs = notebook["PER_DEVICE_BATCH"] * notebook["GRAD_ACCUM"]  # what TRL lets vLLM hold at once
    config = qwen3_config("0.6b", build_tokenizer())
    weights_gib, kv_bytes = model_footprint(config)
    footprint = {"weights_gib": weights_gib, "kv_cache_bytes_per_token": kv_bytes, "max_num_seqs": num_seqs}
    auto = runtime_settings(T4_MEMORY_GIB, T4_CAPABILITY, prompt, completion, None, **footprint)
    # vLLM on a T4 only when asked (automatically it is transformers there): the tightest budget the notebook allows.
    settings = runtime_settings(T4_MEMORY_GIB, T4_CAPABILITY, prompt, completion, True, **footprint)
    result: dict[str, Any] = {
        "emulated_gib": T4_MEMORY_GIB,
        "compute_capability": list(T4_CAPABILITY),
        "max_prompt_length": prompt,
        "max_completion_length": completion,
        "max_num_seqs": num_seqs,
        "auto_use_vllm": auto.use_vllm,
        "auto_reason": auto.reason,
        "dtype": settings.dtype,
        "vllm_gpu_memory_utilization": settings.vllm_gpu_memory_utilization,
        "vllm_max_model_length": settings.vllm_max_model_length,
        "kv_cache_gib_per_max_length_sequence": round(kv_bytes * settings.vllm_max_model_length / 2**30, 3),
    }
    consistent = settings.vllm_max_model_length == prompt + completion and settings.fp16 and not settings.bf16
    if not (ctx.cuda and vllm_installed()):
        return {**result, "settings_consistent": consistent, "ok": consistent, "skipped": ["vllm start (GPU)"]}
    import torch
    from vllm import LLM, SamplingParams

    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    # The same absolute budget as on the 15 GiB card: vLLM sizes its KV cache from utilization x total memory.
    result["gpu_memory_utilization_here"] = round(settings.vllm_gpu_memory_utilization * T4_MEMORY_GIB / total_gib, 4)
    llm = LLM(
        model=ctx.model("0.6b"),
        gpu_memory_utilization=result["gpu_memory_utilization_here"],
        max_model_len=settings.vllm_max_model_length,
        max_num_seqs=num_seqs,
        max_num_batched_tokens=4096,
        logprobs_mode="processed_logprobs",
        dtype=settings.dtype,
        seed=0,  # TRL's colocate arguments
    )
    outputs = llm.generate([{"prompt_token_ids": [3, 4, 5]}], SamplingParams(max_tokens=8), use_tqdm=False)
    cache = getattr(llm.llm_engine, "vllm_config", None)
    cache = getattr(cache, "cache_config", None)
    if cache is not None and getattr(cache, "num_gpu_blocks", None):
        result["kv_cache_tokens"] = cache.num_gpu_blocks * cache.block_size
    result["vllm_started"] = len(outputs) == 1
    result["ok"] = consistent and result["vllm_started"]
    return result


# ---------------------------------------------------------------- 4. peak memory, Policy Split over GRPO


def check_memory(ctx: SmokeContext) -> dict[str, Any]:
    import torch
    from tiny_model import SPECIAL_TOKENS, arithmetic_dataset, build_model, build_tokenizer
    from transformers import Qwen3ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from policy_split_trl import PolicySplitGRPOConfig, PolicySplitGRPOTrainer

    try:
        from policy_split_trl.benchmarks.step_overhead import TARGETS

        target = TARGETS["memory_policy_split_over_grpo"]
    except (ImportError, KeyError):
        target = MEMORY_TARGET_FALLBACK
    cuda, tokenizer = ctx.cuda, build_tokenizer()
    size = "tiny" if ctx.tiny else "1.7b"
    length, per_device = (16 if ctx.tiny else 12288), 2

    class PeakMemory(TrainerCallback):
        def __init__(self) -> None:
            self.start, self.peak, self.seconds = [], [], []

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.start.append(torch.cuda.memory_allocated() / 2**30)
            self.t0 = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
                self.peak.append(torch.cuda.max_memory_allocated() / 2**30)
            self.seconds.append(time.perf_counter() - self.t0)

    def run(variant: str, **settings: Any) -> dict[str, Any]:
        torch.manual_seed(0)
        with torch.device("cuda" if cuda else "cpu"):  # float32 weights, bf16 autocast: the recipes' DDP setting
            model = build_model(tokenizer) if ctx.tiny else Qwen3ForCausalLM(qwen3_config(size, tokenizer))
        common = {
            "output_dir": os.path.join(ctx.output_dir, "runs", f"memory_{variant}"),
            "max_steps": 2,
            "per_device_train_batch_size": per_device,
            "gradient_accumulation_steps": 1,
            "num_generations": 2,
            "max_completion_length": length,
            "learning_rate": PAPER_LEARNING_RATE,
            "bf16": True,
            "use_cpu": not cuda,
            "gradient_checkpointing": True,
            "loss_type": "dapo",
            "logging_steps": 1,
            "report_to": "none",
            "save_strategy": "no",
            "seed": 0,
        }
        trainer_class, config_class = (
            (GRPOTrainer, GRPOConfig) if variant == "grpo" else (PolicySplitGRPOTrainer, PolicySplitGRPOConfig)
        )
        trainer = trainer_class(
            model=model,
            reward_funcs=[token_reward],
            args=config_class(**common, **settings),
            train_dataset=arithmetic_dataset(8),
            processing_class=tokenizer,
        )
        peak = PeakMemory()
        trainer.add_callback(peak)
        with fake_generation(length, len(SPECIAL_TOKENS), len(tokenizer)):
            trainer.train()
        out = {
            "steps": trainer.state.global_step,
            "loss_finite": finite_losses(trainer.state.log_history),
            "sec_per_step": [round(s, 2) for s in peak.seconds],
        }
        if cuda:  # the last step: optimizer states exist, nothing is allocated for the first time
            out.update(peak_gib=round(peak.peak[-1], 2), activation_gib=round(peak.peak[-1] - peak.start[-1], 2))
        del trainer, model
        free_memory()
        return out

    runs = {
        "grpo": run("grpo"),
        "policy_split": run("policy_split"),
        "policy_split_bonus_from_scoring_pass": run("policy_split_low_memory", bonus_from_loss_pass=False),
    }
    result: dict[str, Any] = {
        "shapes": size,
        "per_device_train_batch_size": per_device,
        "completion_tokens": length,
        "precision": "float32 weights, bf16 autocast",
        "target_ratio": target,
        "runs": runs,
    }
    completed = all(r["steps"] == 2 and r["loss_finite"] for r in runs.values())
    if not cuda:
        return {**result, "ok": completed, "skipped": ["peak CUDA memory (GPU)"]}
    grpo = runs["grpo"]
    for name in ("policy_split", "policy_split_bonus_from_scoring_pass"):
        runs[name]["ratio"] = round(runs[name]["peak_gib"] / grpo["peak_gib"], 3)
        runs[name]["activation_ratio"] = round(runs[name]["activation_gib"] / max(grpo["activation_gib"], 1e-9), 3)
    result["ok"] = completed and all(runs[n]["ratio"] <= target for n in runs if n != "grpo")
    return result


CHECK_FUNCTIONS: dict[str, Callable[[SmokeContext], dict[str, Any]]] = {
    "colocate": check_colocate,
    "lora_eval_backend": check_lora_eval_backend,
    "lora_dual_mode": check_lora_dual_mode,
    "kv_budget_t4": check_kv_budget_t4,
    "memory": check_memory,
}


# ---------------------------------------------------------------- running and reporting


def result_line(name: str, result: dict[str, Any]) -> str:
    """`RESULT <name> ok=<true|false|skip> {json}`: `ok` None means nothing could be checked here."""
    ok = result.get("ok")
    flag = "skip" if ok is None else str(bool(ok)).lower()
    details = {k: v for k, v in result.items() if k != "ok"}
    return f"RESULT {name} ok={flag} {json.dumps(details, default=str)}"


def parse_result_line(line: str) -> tuple[str, dict[str, Any]]:
    """The inverse of [`result_line`]: `(name, result)`."""
    _, name, flag, payload = line.strip().split(" ", 3)
    result = json.loads(payload)
    result["ok"] = {"ok=true": True, "ok=false": False, "ok=skip": None}[flag]
    return name, result


def run_check(name: str, ctx: SmokeContext) -> dict[str, Any]:
    """Run one check in this process; an exception is a failed check with its error, not a crash of the run."""
    t0 = time.perf_counter()
    try:
        result = CHECK_FUNCTIONS[name](ctx)
    except Exception as error:  # noqa: BLE001 - reported as the check's result
        result = {
            "ok": False,
            "error": f"{type(error).__name__}: {str(error)[:500]}",
            "traceback": traceback.format_exc()[-1500:],
        }
    result["device"] = "cuda" if ctx.cuda else "cpu"
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def run_isolated(name: str, ctx: SmokeContext, timeout_s: float | None = None) -> dict[str, Any]:
    """Run one check in a fresh process (its own CUDA context and vLLM engine); its output goes to logs/<name>.log."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--checks",
        name,
        "--child",
        "--output_dir",
        ctx.output_dir,
        "--size",
        "tiny" if ctx.tiny else "real",
        *([] if ctx.cuda else ["--cpu"]),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log_path = os.path.join(ctx.output_dir, "logs", f"{name}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    timeout_s = timeout_s or TIMEOUTS_S[name]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, timeout=timeout_s, check=False
            )
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = None
    with open(log_path) as log:
        output = log.read()
    lines = [line for line in output.splitlines() if line.startswith(f"RESULT {name} ")]
    if lines:
        return parse_result_line(lines[-1])[1]
    reason = f"timed out after {timeout_s:g} s" if returncode is None else f"exited with {returncode}, no RESULT line"
    return {
        "ok": False,
        "error": reason,
        "log": log_path,
        "tail": output[-1500:],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def run_checks(names: list[str], ctx: SmokeContext, isolate: bool, record: bool = True) -> dict[str, dict[str, Any]]:
    """Run `names`, print one RESULT line each and (with `record`) append them to `<output_dir>/results.jsonl`."""
    os.makedirs(ctx.output_dir, exist_ok=True)
    results = {}
    for name in names:
        result = run_isolated(name, ctx) if isolate else run_check(name, ctx)
        results[name] = result
        print(result_line(name, result), flush=True)
        if record:
            with open(os.path.join(ctx.output_dir, "results.jsonl"), "a") as f:
                f.write(
                    json.dumps({"name": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **result}, default=str)
                    + "\n"
                )
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python tests/gpu/gpu_smoke.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS)
    parser.add_argument("--output_dir", default=os.path.join("outputs", "gpu_smoke"))
    parser.add_argument("--cpu", action="store_true", help="Run on CPU at toy size (the parts that need no GPU).")
    parser.add_argument("--size", choices=("real", "tiny"), default=None, help="Default: real on a GPU, tiny on CPU.")
    parser.add_argument("--no_isolate", action="store_true", help="Run every check in this process.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one isolated check: print only
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the checks; the exit status is 1 when any check failed (a skipped one does not)."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fully offline: the models are built here
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    tiny = (args.size or ("real" if cuda else "tiny")) == "tiny"
    if not cuda and not tiny:
        raise SystemExit("--size real needs a CUDA GPU; use --cpu (toy size) on this machine.")
    ctx = SmokeContext(output_dir=os.path.abspath(args.output_dir), cuda=cuda, tiny=tiny)
    # On a GPU, each check in its own process: a vLLM engine keeps its memory until its process ends.
    isolate = cuda and not args.no_isolate and not args.child
    results = run_checks(args.checks, ctx, isolate=isolate, record=not args.child)
    return int(any(result.get("ok") is False for result in results.values()))


if __name__ == "__main__":
    sys.exit(main())
