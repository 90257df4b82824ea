"""
The multi-process test matrix of Policy Split's training step, run by tests/test_distributed_matrix.py.

`torchrun --nproc_per_node 2 distributed_matrix.py CELLS.json OUT_DIR` trains every cell (a configuration) for a few
steps on 2 CPU processes (gloo) and records, per process and per optimizer step, the model forward calls, the
backward calls, the collectives (by name) and DDP's gradient all-reduces; `python distributed_matrix.py ...` trains
the same cells in one process with the same global batch, the reference the 2-process weights must end at.

Both layouts see the same rollouts: generation is replaced by a deterministic function of the prompt and of the
rollout's index in the global generation batch (a fake `trl vllm-serve` client behind TRL's real server-mode code
for the vLLM cells), and TRL's row shuffle by a seeded one that gives each micro-batch the rows it would have on the
emulated process layout (still a different context mix on every process, as with TRL's own shuffle).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from accelerate import PartialState

sys.path.insert(0, os.path.dirname(__file__))
import trl.trainer.grpo_trainer as grpo_module
from tiny_model import arithmetic_dataset, build_model, build_tokenizer, length_reward, training_args
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.generation.vllm_client import VLLMClient
from trl.generation.vllm_generation import VLLMGeneration

from policy_split_trl import PolicySplitGRPOConfig, PolicySplitGRPOTrainer

G = 4  # rollouts per query (2 normal + 2 high-entropy): a query's group spans both processes
EMULATED_WORLD_SIZE = 2
ROLLOUTS_PER_PROCESS = 2  # per_device_train_batch_size on 2 processes; the 1-process reference takes 4
MAX_COMPLETION_LENGTH = 8
MAX_STEPS = 2
# The random tiny model's next-token distributions are almost uniform, so the bonus of Eq. 6 barely varies over a
# group, and its standardization (Eq. 4) would blow TRL's float32 log-prob rounding up into visible weight differences.
# Larger embeddings (tied to the LM head) give peaked, varied distributions, as a trained model has.
EMBED_SCALE = 20.0

# Every dimension of the matrix, the first value being the default.
DIMENSIONS: dict[str, tuple] = {
    "optimized_step": (True, False),
    "gradient_accumulation_steps": (1, 2),
    "steps_per_generation": (1, 2),
    "num_iterations": (1, 2),
    "rollout_sharing": (True, False),
    "bonus_from_loss_pass": (True, False),
    "vllm": (False, True),
    "shared_prefix": (True, False),
}
# Beyond the product: LoRA, a KL term (the reference scored in both contexts) and the per-quarter loss.
EXTRA_CELLS: list[dict[str, Any]] = [
    {"lora": True},
    {"beta": 0.04},
    {"lora": True, "beta": 0.04, "vllm": True, "gradient_accumulation_steps": 2, "steps_per_generation": 2},
    # The authors' per-quarter token mean: one more reduction in the generation step, weights on the advantages.
    {"loss_aggregation": "quarter_token_mean", "gradient_accumulation_steps": 2, "steps_per_generation": 2},
]
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "barrier",
)


def cell_name(cell: dict[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(cell.items())) or "default"


def full_matrix() -> list[dict[str, Any]]:
    """Every combination of `DIMENSIONS` (as the non-default values only), then `EXTRA_CELLS`."""
    names = list(DIMENSIONS)
    cells = []
    for values in itertools.product(*(DIMENSIONS[name] for name in names)):
        cells.append({n: v for n, v in zip(names, values, strict=True) if v != DIMENSIONS[n][0]})
    return cells + EXTRA_CELLS


def covering_subset() -> list[dict[str, Any]]:
    """
    Cells in which every pair of values of any two dimensions occurs together (a strength-2 covering array: the 6
    rows of the weight-3 binary columns of length 6 that start with 0, one column per dimension), the issue's crash
    (2 processes, gradient accumulation 2, optimized step) and `EXTRA_CELLS`.
    """
    columns = [c for c in itertools.product((0, 1), repeat=6) if sum(c) == 3 and c[0] == 0][: len(DIMENSIONS)]
    cells = []
    for row in range(6):
        cells.append(
            {
                name: DIMENSIONS[name][column[row]]
                for name, column in zip(DIMENSIONS, columns, strict=True)
                if column[row] == 1
            }
        )
    return [{"gradient_accumulation_steps": 2, "steps_per_generation": 2}, *cells, *EXTRA_CELLS]


# ---------------------------------------------------------------------------- deterministic rollouts
def completion_for(prompt: list[int], position: int, eos: int) -> list[int]:
    """A completion that depends only on the prompt and the rollout's global position (lengths 3-8, some with EOS)."""
    generator = torch.Generator().manual_seed(1000 * position + sum(prompt) % 997)
    length = 3 + (position * 5 + len(prompt)) % (MAX_COMPLETION_LENGTH - 2)
    tokens = torch.randint(10, 400, (length,), generator=generator).tolist()
    return tokens[:-1] + [eos] if position % 3 else tokens


def fake_generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
    """TRL's transformers generation replaced: the same rollouts whatever the process layout."""
    start = self.accelerator.process_index * len(prompt_ids)
    eos = self.processing_class.eos_token_id
    return [completion_for(p, start + i, eos) for i, p in enumerate(prompt_ids)], None


class FakeVLLMClient:
    """`trl vllm-serve` seen through TRL's `VLLMClient.generate`: its real signature, deterministic samples."""

    def __init__(self, eos: int):
        self.eos = eos
        self.requests: list[int] = []

    def generate(self, prompts, **kwargs):
        inspect.signature(VLLMClient.generate).bind(self, prompts, **kwargs)  # unknown keywords raise TypeError
        n = kwargs.get("n", 1)
        self.requests.append(n)
        completions = [completion_for(p, i * n + j, self.eos) for i, p in enumerate(prompts) for j in range(n)]
        # The sampler's log-prob of each token: near the random tiny model's own (-log 1000), so IS ratios are ~1.
        logprobs = [[[-6.9 - 0.01 * t] for t in range(len(c))] for c in completions]
        return {"prompt_ids": prompts, "completion_ids": completions, "logprobs": logprobs, "logprob_token_ids": None}


def use_fake_vllm_server(trainer: PolicySplitGRPOTrainer) -> None:
    """Switch a trainer to TRL's vLLM server mode: its real `VLLMGeneration.generate`, a fake client on process 0."""
    generation = object.__new__(VLLMGeneration)
    generation.__dict__.update(
        model=trainer.model,
        accelerator=trainer.accelerator,
        processing_class=trainer.processing_class,
        mode="server",
        structured_outputs_regex=None,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        repetition_penalty=1.0,
        max_completion_length=MAX_COMPLETION_LENGTH,
        logprobs=0,
        generation_kwargs={},
        enable_sleep_mode=False,
    )
    if trainer.accelerator.is_main_process:
        generation.vllm_client = FakeVLLMClient(trainer.processing_class.eos_token_id)
    generation.sync_weights = lambda: None  # no vLLM engine to send weights to
    trainer.vllm_generation, trainer.use_vllm, trainer.vllm_mode = generation, True, "server"
    trainer.vllm_importance_sampling_correction = True
    trainer._last_loaded_step = -1


def layout_shuffle(world_size: int, rank: int, steps_per_generation: int):
    """
    TRL's `shuffle_sequence_dict` replaced by a seeded shuffle that is the same for any process layout: the rows of
    each emulated process are permuted with that process's own seed, and micro-batch `j` of a process holding several
    emulated processes' rows takes `j`-th slices of each (what they would train at that micro-step).
    """
    calls = itertools.count()
    blocks = EMULATED_WORLD_SIZE // world_size

    def shuffle(batch: dict[str, Any]) -> dict[str, Any]:
        call = next(calls)
        num_rows = batch["completion_ids"].size(0)
        size = num_rows // blocks
        slice_size = size // steps_per_generation
        perms = []
        for block in range(blocks):
            generator = torch.Generator().manual_seed(7919 * call + rank * blocks + block)
            perms.append(block * size + torch.randperm(size, generator=generator))
        order = torch.cat(
            [perm[j * slice_size : (j + 1) * slice_size] for j in range(steps_per_generation) for perm in perms]
        )

        def permute(value):
            if isinstance(value, torch.Tensor):
                return value if value.dim() == 0 else value[order]
            return value if value is None else [value[i] for i in order]

        return {key: permute(value) for key, value in batch.items()}

    return shuffle


# ---------------------------------------------------------------------------- counting
class StepCounter(TrainerCallback):
    """Per optimizer step: model forwards, backwards, collectives by name and DDP gradient all-reduces."""

    def __init__(self, trainer: PolicySplitGRPOTrainer):
        self.trainer = trainer
        self.current: dict[str, int] = {}
        self.steps: list[dict[str, int]] = []
        trainer.model.register_forward_pre_hook(lambda *_: self.add("forward"))
        backward = trainer.accelerator.backward

        def counted_backward(loss, **kwargs):
            self.add("backward")
            return backward(loss, **kwargs)

        trainer.accelerator.backward = counted_backward

    def add(self, name: str) -> None:
        self.current[name] = self.current.get(name, 0) + 1

    def on_train_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            def hook(process_group, bucket):
                self.add("ddp_gradient_allreduce")
                return default_hooks.allreduce_hook(process_group, bucket)

            wrapped.register_comm_hook(None, hook)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(self.current)
        self.current = {}


@contextlib.contextmanager
def counted_collectives(counter_ref: list):
    """Count every `torch.distributed` collective by name into the counter in `counter_ref[0]` (if any)."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name, function):
        def counted(*args, **kwargs):
            if counter_ref[0] is not None:
                counter_ref[0].add(name)
            return function(*args, **kwargs)

        return counted

    for name, function in originals.items():
        setattr(dist, name, wrap(name, function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)


# ---------------------------------------------------------------------------- one cell
def run_cell(cell: dict[str, Any], out_dir: str, model_path: str, counter_ref: list) -> dict[str, Any]:
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    settings = {name: cell.get(name, values[0]) for name, values in DIMENSIONS.items()}
    vllm = settings.pop("vllm")
    args = PolicySplitGRPOConfig(
        **training_args(
            os.path.join(out_dir, "runs", cell_name(cell)),
            per_device_train_batch_size=ROLLOUTS_PER_PROCESS * EMULATED_WORLD_SIZE // world_size,
            num_generations=G,
            max_completion_length=MAX_COMPLETION_LENGTH,
            max_steps=MAX_STEPS,
            beta=cell.get("beta", 0.0),
            loss_aggregation=cell.get("loss_aggregation", "token_mean"),
            # float64: equal math gives equal weights to ~1e-12, so a real difference between layouts cannot hide.
            model_init_kwargs={"dtype": "auto"},
        ),
        **settings,
    )
    peft_config = None
    if cell.get("lora"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = PolicySplitGRPOTrainer(
        model=model_path,
        reward_funcs=[length_reward],
        args=args,
        train_dataset=arithmetic_dataset(32),
        peft_config=peft_config,
    )
    if vllm:
        use_fake_vllm_server(trainer)
    counter = StepCounter(trainer)
    trainer.add_callback(counter)
    grpo_module.shuffle_sequence_dict = layout_shuffle(world_size, rank, args.steps_per_generation)
    initial = torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad]).clone()
    counter_ref[0] = counter
    try:
        trainer.train()
    finally:
        counter_ref[0] = None
    final = torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "cell": cell,
        "name": cell_name(cell),
        "world_size": world_size,
        "rank": rank,
        "global_step": trainer.state.global_step,
        "steps": counter.steps,
        "losses": losses,
        "initial": initial,
        "final": final,
    }


def main(cells_path: str, out_dir: str) -> None:
    with open(cells_path) as f:
        cells = json.load(f)
    state = PartialState(cpu=True)  # joins the process group now when launched by torchrun / accelerate (gloo)
    # A checkpoint folder (TRL loads the reference model of beta > 0 from it), written by the main process (transformers
    # saves only there under torch.distributed); dtype "auto" loads it in float64.
    model_path = os.path.join(out_dir, "tiny-model")
    if state.is_main_process:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer).double()
        model.get_input_embeddings().weight.data.mul_(EMBED_SCALE)
        model.save_pretrained(model_path)
        tokenizer.save_pretrained(model_path)
    state.wait_for_everyone()
    counter_ref: list = [None]
    results = []
    with counted_collectives(counter_ref):
        for cell in cells:
            # The transformers generation is replaced for every cell; the vLLM cells go through TRL's server code.
            original = GRPOTrainer._generate_single_turn
            if not cell.get("vllm"):
                GRPOTrainer._generate_single_turn = fake_generate_single_turn
            try:
                results.append(run_cell(cell, out_dir, model_path, counter_ref))
            finally:
                GRPOTrainer._generate_single_turn = original
            print(f"[rank {results[-1]['rank']}] done: {results[-1]['name']}", flush=True)
    world_size = results[0]["world_size"] if results else 1
    if world_size > 1:
        finals = [None] * world_size
        dist.all_gather_object(finals, [r["final"] for r in results])
        per_rank = [None] * world_size
        dist.all_gather_object(per_rank, [{k: r[k] for k in ("rank", "steps", "global_step")} for r in results])
    if results and results[0]["rank"] == 0:
        summary = []
        for index, result in enumerate(results):
            entry = {k: result[k] for k in ("cell", "name", "world_size", "global_step", "losses", "steps")}
            if world_size > 1:
                entry["per_rank_steps"] = [ranks[index]["steps"] for ranks in per_rank]
                entry["ranks_same_weights"] = all(torch.equal(f[index], result["final"]) for f in finals)
            torch.save(
                {"initial": result["initial"], "final": result["final"]},
                os.path.join(out_dir, f"weights-{index}-ws{world_size}.pt"),
            )
            summary.append(entry)
        with open(os.path.join(out_dir, f"summary-ws{world_size}.json"), "w") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    if dist.is_initialized():
        # A clean shutdown: a rank leaving while the other still talks to it makes gloo abort the run.
        dist.barrier()
        dist.destroy_process_group()
