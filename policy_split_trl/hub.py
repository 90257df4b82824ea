"""What a trained dual-mode model carries: `policy_split.json` (its modes and their exact system prompts, and the
training hyper-parameters) next to the weights, and a "Modes" section in its model card."""

from __future__ import annotations

import json
import os
from typing import Any

from .modes import HIGH_ENTROPY_MODE, NORMAL_MODE
from .version import __version__

POLICY_SPLIT_FILE = "policy_split.json"
FORMAT_VERSION = 1

MODE_PURPOSES = {
    NORMAL_MODE: "trained for correctness (GRPO advantage only); use it for answers",
    HIGH_ENTROPY_MODE: "trained with an entropy/divergence bonus; explores other reasoning paths (sampling, search, "
    "diverse or creative generation)",
}

_TRAINING_FIELDS = (
    "eta",
    "kappa",
    "alpha",
    "normal_eta",
    "eta_placement",
    "loss_aggregation",
    "rollout_sharing",
    "num_generations",
    "num_high_entropy_generations",
    "loss_type",
    "beta",
    "epsilon",
    "learning_rate",
    "temperature",
    "max_completion_length",
)
# Recorded with `eta_schedule="adaptive"` only: `eta` is then the initial value of a controller, not the eta
# trained with.
_ADAPTIVE_ETA_FIELDS = (
    "eta_schedule",
    "target_kl_high_entropy_normal",
    "eta_target_tolerance",
    "eta_update_factor",
    "eta_min",
    "eta_max",
    "max_entropy_ratio",
)


def policy_split_metadata(args: Any) -> dict[str, Any]:
    """
    The content of `policy_split.json` for a [`PolicySplitGRPOConfig`].

    Args:
        args (`PolicySplitGRPOConfig`):
            The training configuration.

    Returns:
        `dict`: format version, paper, modes (name -> system prompt and purpose) and training hyper-parameters.
    """
    adaptive = getattr(args, "eta_schedule", None) == "adaptive"
    training_fields = _TRAINING_FIELDS + (_ADAPTIVE_ETA_FIELDS if adaptive else ())
    return {
        "format_version": FORMAT_VERSION,
        "library": f"policy-split-trl {__version__}",
        "paper": "arXiv:2604.11510",
        "modes": {
            NORMAL_MODE: {"system_prompt": None, "purpose": MODE_PURPOSES[NORMAL_MODE]},
            HIGH_ENTROPY_MODE: {
                "system_prompt": args.high_entropy_system_prompt,
                "purpose": MODE_PURPOSES[HIGH_ENTROPY_MODE],
            },
        },
        "training": {name: getattr(args, name) for name in training_fields if hasattr(args, name)},
    }


def write_policy_split_json(output_dir: str, args: Any) -> str:
    """Write `policy_split.json` for `args` into `output_dir`; returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, POLICY_SPLIT_FILE)
    with open(path, "w") as f:
        json.dump(policy_split_metadata(args), f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path


def _policy_split_config_problem(meta: Any) -> str | None:
    """What makes `policy_split.json` content unusable (a missing key, a wrong type), or `None` if it is usable."""
    if not isinstance(meta, dict):
        return f"the content must be a JSON object, got a {type(meta).__name__}"
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        return f"format_version must be an integer, got {version!r}"
    modes = meta.get("modes")
    if modes is None:
        return "no 'modes' object (mode name -> {'system_prompt': ..., 'purpose': ...})"
    if not isinstance(modes, dict):
        return f"'modes' must be an object, got a {type(modes).__name__}"
    for name in (NORMAL_MODE, HIGH_ENTROPY_MODE):
        if name not in modes:
            return f"'modes' has no {name!r} entry (found: {sorted(modes)})"
    for name, mode in modes.items():
        if not isinstance(mode, dict) or "system_prompt" not in mode:
            return f"modes.{name} must be an object with a 'system_prompt' (a string, or null for no system prompt)"
        prompt = mode["system_prompt"]
        if prompt is not None and not isinstance(prompt, str):
            return f"modes.{name}.system_prompt must be a string or null, got a {type(prompt).__name__}"
        if not isinstance(mode.get("purpose", ""), str):
            return f"modes.{name}.purpose must be a string"
    he_prompt = modes[HIGH_ENTROPY_MODE]["system_prompt"]
    if not isinstance(he_prompt, str) or not he_prompt.strip():
        return f"modes.{HIGH_ENTROPY_MODE}.system_prompt must be the non-empty prompt the model was trained with"
    if not isinstance(meta.get("training", {}), dict):
        return "'training' must be an object of hyper-parameters"
    return None


def load_policy_split_config(model_id: str, revision: str | None = None) -> dict[str, Any]:
    """
    Read `policy_split.json` from a local model folder or a Hub repository, checked: valid JSON, an object with both
    modes and their system prompts (the high-entropy one a non-empty string), a `format_version` this library reads.

    Args:
        model_id (`str`):
            Local folder or Hub id of a model trained with Policy Split.
        revision (`str`, *optional*):
            Hub revision.

    Returns:
        `dict`: the file's content.

    Raises:
        `FileNotFoundError`: a local folder without the file.
        `ValueError`: a file that is not valid JSON or misses a key / has a wrong type, naming the file and the key.
    """
    if os.path.isdir(model_id):
        path = os.path.join(model_id, POLICY_SPLIT_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_id} has no {POLICY_SPLIT_FILE}: was it trained with policy-split-trl?")
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model_id, POLICY_SPLIT_FILE, revision=revision)
    fix = (
        "Restore the file (copy it from the checkpoint it came from), or write it again from the training config "
        "with policy_split_trl.hub.write_policy_split_json."
    )
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}; truncated?). {fix}"
        ) from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}). {fix}") from error
    version = meta.get("format_version", 0) if isinstance(meta, dict) else 0
    if isinstance(version, int) and version > FORMAT_VERSION:  # checked first: a newer format may differ in shape
        raise ValueError(
            f"{path}: {POLICY_SPLIT_FILE} format {version} is newer than this library reads ({FORMAT_VERSION}); "
            "upgrade policy-split-trl."
        )
    problem = _policy_split_config_problem(meta)
    if problem is not None:
        raise ValueError(f"{path}: {problem}. {fix}")
    return meta


def mode_prompts(meta: dict[str, Any]) -> dict[str, str | None]:
    """Mode name -> system prompt, from `policy_split.json` content (for `apply_mode(..., mode_prompts=...)`)."""
    return {name: mode["system_prompt"] for name, mode in meta["modes"].items()}


def _metrics_table(results: dict[str, Any]) -> str:
    from .eval.report import PERCENT, format_number

    rows = [
        "| benchmark | mode | avg@k (%) | pass@k (%) | entropy (bits) | length (tokens) |",
        "|---|---|---|---|---|---|",
    ]
    for benchmark, modes in results.get("per_benchmark", {}).items():
        for mode, m in modes.items():
            cells = [
                format_number(m.get("avg_at_k"), PERCENT),
                format_number(m.get("pass_at_k"), PERCENT),
                format_number(m.get("entropy_bits"), digits=3),
                format_number(m.get("mean_length"), digits=1),
            ]
            rows.append(f"| {benchmark} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def modes_card_section(meta: dict[str, Any], model_id: str, eval_results: dict[str, Any] | None = None) -> str:
    """
    The model card's "Modes" section: what each mode is for, how to call each (transformers and vLLM, with the stored
    prompt), the training recipe, and the latest per-mode metrics when an evaluation `results.json` is given.

    Args:
        meta (`dict`):
            `policy_split.json` content.
        model_id (`str`):
            The id users load the model with (Hub id or folder name).
        eval_results (`dict`, *optional*):
            Content of a `policy-split-eval` `results.json`.

    Returns:
        `str`: markdown.
    """
    he_prompt = meta["modes"][HIGH_ENTROPY_MODE]["system_prompt"]
    lines = [
        "## Modes",
        "",
        (
            "This model was trained with [Policy Split](https://huggingface.co/papers/2604.11510): one set of weights, "
            "two modes selected by the system prompt. The exact prompts are stored in `policy_split.json`."
        ),
        "",
        "| mode | system prompt | what it is for |",
        "|---|---|---|",
    ]
    for name, mode in meta["modes"].items():
        prompt = "(none)" if mode["system_prompt"] is None else mode["system_prompt"].replace("|", "\\|")
        lines.append(f"| `{name}` | {prompt} | {mode['purpose']} |")
    lines += [
        "",
        "### Use either mode with transformers",
        "",
        "```python",
        "from transformers import pipeline",
        "from policy_split_trl import apply_mode",
        "from policy_split_trl.hub import load_policy_split_config, mode_prompts",
        "",
        f'prompts = mode_prompts(load_policy_split_config("{model_id}"))',
        f'generator = pipeline("text-generation", model="{model_id}")',
        'messages = [{"role": "user", "content": "How many primes are there below 100?"}]',
        'print(generator(apply_mode(messages, "normal", prompts), max_new_tokens=512)[0]["generated_text"][-1])',
        'print(generator(apply_mode(messages, "high_entropy", prompts), max_new_tokens=512)[0]["generated_text"][-1])',
        "```",
        "",
        "### With vLLM",
        "",
        "```python",
        "from vllm import LLM, SamplingParams",
        "",
        f'llm = LLM(model="{model_id}")',
        f"HIGH_ENTROPY = {json.dumps(he_prompt, ensure_ascii=False)}",
        'messages = [{"role": "system", "content": HIGH_ENTROPY}, {"role": "user", "content": "..."}]',
        "print(llm.chat(messages, SamplingParams(temperature=0.6, top_p=0.95, top_k=20, max_tokens=4096)))",
        "```",
        "",
        "### Training recipe",
        "",
        "| hyper-parameter | value |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | {v} |" for k, v in meta.get("training", {}).items()]
    if eval_results:
        lines += ["", "### Latest evaluation (per mode)", "", _metrics_table(eval_results)]
    return "\n".join(lines) + "\n"


class DualModeHubMixin:
    """
    What a dual-mode trainer saves besides TRL's files: `policy_split.json` next to the weights of every checkpoint
    and of the final model, and a "Modes" section in the model card. Mixed into [`PolicySplitGRPOTrainer`] before
    TRL's `GRPOTrainer`; both overrides call `super()` first.
    """

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        # Next to the weights of every checkpoint and of the final model (full or adapter): the modes and their exact
        # prompts, so that inference uses what training used.
        write_policy_split_json(output_dir or self.args.output_dir, self.args)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        eval_results: str | dict | None = None,
    ) -> None:
        """
        TRL's model card plus a "Modes" section (how to call each mode, the recipe, and the latest per-mode metrics).

        Args:
            model_name, dataset_name, tags:
                As in TRL.
            eval_results (`str` or `dict`, *optional*):
                A `policy-split-eval` `results.json` (path or content) whose per-mode metrics go into the card.
        """
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        if isinstance(eval_results, str):
            with open(eval_results) as f:
                eval_results = json.load(f)
        model_id = self.hub_model_id or model_name or os.path.basename(os.path.normpath(self.args.output_dir))
        with open(os.path.join(self.args.output_dir, "README.md"), "a") as f:
            f.write("\n" + modes_card_section(policy_split_metadata(self.args), model_id, eval_results))
