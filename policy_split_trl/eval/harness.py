"""The dual-mode evaluation harness: the paper's measurements (Tables 1, 2, 5, 6, 7) for any model, both modes side
by side.

`evaluate_modes(EvalConfig(...))` samples `k` completions per problem and mode, scores every completion in its own
context (full-vocabulary token entropy in bits) and, for each non-normal mode, under the normal context too (the
forward KL of Table 5), grades it, and appends it to `generations.jsonl` as it goes, so that a crashed or interrupted
run restarts where it stopped. It then writes `results.json`, `results.md` and PNG plots.
"""

from __future__ import annotations

import json
import math
import os
import platform
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..modes import MODE_PROMPTS, NORMAL_MODE, apply_system_prompt
from ..rewards import arithmetic_reward, math_accuracy_reward, multiple_choice_reward
from .backends import SamplingConfig, Scored, make_backend
from .metrics import avg_at_k, pass_at_k, token_weighted_mean, unique_solved

GENERATIONS_FILE = "generations.jsonl"
ENTROPY_TEMPERATURES = ("sampling", "raw")


@dataclass
class EvalConfig:
    """
    What to evaluate and how; every field is recorded in `results.json`.

    Args:
        model (`str`):
            Hub id, local folder or `embedded:<name>`.
        output_dir (`str`):
            Where `generations.jsonl`, `results.json`, `results.md` and the plots go (a rerun resumes from it).
        adapter (`str`, *optional*):
            A PEFT/LoRA adapter folder on top of `model`.
        benchmarks (`list[str]`, *optional*, defaults to `["math500"]`):
            Names from `policy_split_trl.eval.benchmarks.BENCHMARKS` (`math500`, `aime24`, `aime25`, `gpqa_diamond`,
            `mmlu_pro`, `gsm8k`, `creative_writing`, `arithmetic`).
        sources (`dict[str, str]`, *optional*):
            Benchmark name -> local file to load instead of the Hub dataset.
        limit (`int`, *optional*):
            First N problems of each benchmark.
        limits (`dict[str, int]`, *optional*):
            Benchmark name -> first N problems, overriding `limit` for that benchmark.
        modes (`list[str]`, *optional*, defaults to `["normal", "high_entropy"]`):
            Modes to evaluate: names of `MODE_PROMPTS` (`rewritten_high_entropy`, `low_entropy` too) or of
            `mode_prompts`.
        mode_prompts (`dict[str, str]`, *optional*):
            Extra or overriding mode name -> system prompt (e.g. the prompt a model was trained with).
        k (`int`, *optional*, defaults to `8`):
            Samples per problem and mode (the paper: 8).
        sampling (`SamplingConfig`, *optional*):
            Temperature / top-p / top-k / max new tokens; defaults to the paper's inference settings (Table 9).
        entropy_temperature (`str`, *optional*, defaults to `"sampling"`):
            `"sampling"`: entropy and KL of the distribution sampled from (logits / temperature, before top-k/top-p);
            `"raw"`: of the raw model distribution (T = 1).
        batch_size (`int`, *optional*, defaults to `8`):
            Sequences per generate/score call.
        backend (`str`, *optional*, defaults to `"auto"`):
            `"auto"` (vLLM if installed and a GPU is present), `"transformers"` or `"vllm"`.
        chat_template_kwargs (`dict`, *optional*):
            e.g. `{"enable_thinking": true}` for Qwen3.
        seed (`int`, *optional*, defaults to `0`):
            Base seed; each (benchmark, mode, batch) derives its own, so a resumed run samples as an uninterrupted one.
        compute_kl (`bool`, *optional*, defaults to `True`):
            Score each non-normal mode's samples under the normal context for KL(pi_mode || pi).
        judge (`dict`, *optional*):
            LLM-as-judge for creative writing: `{"base_url": ..., "model": ...}` for an OpenAI-compatible endpoint
            (key from `POLICY_SPLIT_JUDGE_API_KEY`), or `{"local_model": path}`.
        progress (`bool`, *optional*, defaults to `True`):
            Show progress bars.
    """

    model: str
    output_dir: str
    adapter: str | None = None
    benchmarks: list[str] = field(default_factory=lambda: ["math500"])
    sources: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    limits: dict[str, int] = field(default_factory=dict)
    modes: list[str] = field(default_factory=lambda: [NORMAL_MODE, "high_entropy"])
    mode_prompts: dict[str, str] = field(default_factory=dict)
    k: int = 8
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    entropy_temperature: str = "sampling"
    batch_size: int = 8
    backend: str = "auto"
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    compute_kl: bool = True
    judge: dict[str, Any] | None = None
    progress: bool = True

    def __post_init__(self):
        if self.entropy_temperature not in ENTROPY_TEMPERATURES:
            raise ValueError(
                f"entropy_temperature must be one of {ENTROPY_TEMPERATURES}, got {self.entropy_temperature!r}."
            )
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}.")
        if not self.modes:
            raise ValueError("modes must name at least one mode.")
        known = {**MODE_PROMPTS, **self.mode_prompts}
        unknown = [m for m in self.modes if m not in known]
        if unknown:
            raise ValueError(f"Unknown mode(s) {unknown}; known: {sorted(known)} (add yours with mode_prompts).")

    @property
    def system_prompts(self) -> dict[str, str | None]:
        known = {**MODE_PROMPTS, **self.mode_prompts}
        return {mode: known[mode] for mode in self.modes}

    @property
    def score_temperature(self) -> float:
        return self.sampling.temperature if self.entropy_temperature == "sampling" else 1.0


def _record_key(record: dict) -> tuple[str, str, str]:
    return record["benchmark"], record["problem_id"], record["mode"]


def read_generations(path: str) -> list[dict]:
    """Records of `generations.jsonl`; a last line cut short by a crash is ignored."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


_GRADERS = {"math": math_accuracy_reward, "multiple_choice": multiple_choice_reward, "arithmetic": arithmetic_reward}


def _grade(problem: Any, texts: list[str]) -> list[bool | None]:
    if problem.kind not in _GRADERS:  # creative writing has no gold answer
        return [None] * len(texts)
    rewards = _GRADERS[problem.kind](texts, [problem.answer] * len(texts))
    return [None if r is None else r == 1.0 for r in rewards]


def _completed(records: Iterable[dict], k: int) -> set[tuple[str, str, str]]:
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    for record in records:
        counts[_record_key(record)] += 1
    return {key for key, n in counts.items() if n >= k}


def iter_records(
    config: EvalConfig, backend: Any, problems: dict[str, list], done: set[tuple[str, str, str]] | None = None
) -> Iterator[list[dict]]:
    """
    Sample, score and grade every (benchmark, problem, mode) not in `done`; yield the records one batch at a time.

    Args:
        config (`EvalConfig`):
            Modes, k, sampling, entropy temperature, KL switch, batch size, seed.
        backend:
            A backend with `generate` and `score`.
        problems (`dict[str, list[Problem]]`):
            Benchmark name -> problems.
        done (`set`, *optional*):
            `(benchmark, problem_id, mode)` keys to skip (already complete).

    Yields:
        `list[dict]`: the records of one batch (k per problem), ready for `generations.jsonl`.
    """
    done = done or set()
    temperature = config.score_temperature
    for benchmark, items in problems.items():
        for mode_index, (mode, system_prompt) in enumerate(config.system_prompts.items()):
            todo = [p for p in items if (benchmark, p.id, mode) not in done]
            if not todo:
                continue
            per_call = max(1, config.batch_size // config.k)
            bar = tqdm(total=len(todo), desc=f"{benchmark} [{mode}]", unit="problem", disable=not config.progress)
            for start in range(0, len(todo), per_call):
                batch = todo[start : start + per_call]
                prompts = [apply_system_prompt(p.prompt, system_prompt) for p in batch]
                # A seed per (benchmark, mode, problem batch): a resumed run draws what an uninterrupted one would.
                seed = zlib.crc32(f"{config.seed}|{benchmark}|{mode_index}|{batch[0].id}".encode())
                samples = backend.generate(prompts, config.k, config.sampling, seed=seed)
                flat_prompts = [p for p, group in zip(prompts, samples, strict=True) for _ in group]
                flat = [c for group in samples for c in group]
                own = backend.score(flat_prompts, flat, temperature)
                normal: list[Scored | None] = [None] * len(flat)
                if config.compute_kl and system_prompt is not None:
                    normal = backend.score([p.prompt for p in batch for _ in range(config.k)], flat, temperature)
                texts = _decode(backend, flat)
                records, index = [], 0
                for problem, group in zip(batch, samples, strict=True):
                    grades = _grade(problem, texts[index : index + len(group)])
                    for j in range(len(group)):
                        i = index + j
                        kl_sum = None
                        if normal[i] is not None:
                            kl_sum = sum(a - b for a, b in zip(own[i].logprobs, normal[i].logprobs, strict=True))
                        records.append({
                            "benchmark": benchmark, "problem_id": problem.id, "mode": mode, "sample": j,
                            "kind": problem.kind, "completion": texts[i], "num_tokens": len(flat[i]),
                            "correct": grades[j], "entropy_bits": [round(e, 4) for e in own[i].entropy_bits],
                            "kl_sum": kl_sum,
                        })  # fmt: skip
                    index += len(group)
                yield records
                bar.update(len(batch))
            bar.close()


def generate_and_score(config: EvalConfig, backend: Any, problems: dict[str, list], path: str) -> int:
    """
    Run [`iter_records`] for everything not yet complete in `path` and append each batch to it as soon as it is done,
    so an interrupted run loses at most the batch in flight.

    Returns:
        `int`: number of completions generated by this call (0 when everything was already done).
    """
    generated = 0
    with open(path, "a") as out:
        for records in iter_records(config, backend, problems, _completed(read_generations(path), config.k)):
            out.writelines(json.dumps(record) + "\n" for record in records)
            out.flush()
            generated += len(records)
    return generated


def _decode(backend: Any, completions: list[list[int]]) -> list[str]:
    tokenizer = backend.scorer.tokenizer if hasattr(backend, "scorer") else backend.tokenizer
    return tokenizer.batch_decode(completions, skip_special_tokens=True)


def compute_results(config: EvalConfig, records: list[dict], problems: dict[str, list]) -> dict[str, Any]:
    """Per (benchmark, mode) metrics, the Table-1 grouping, and the gaps between each mode and the normal mode."""
    from .benchmarks import BENCHMARKS, TABLE1_COLUMNS, table1_column

    def column_of(benchmark: str) -> str | None:
        # Custom problem sets (e.g. a training callback's held-out slice) belong to no Table 1 column.
        return table1_column(benchmark) if benchmark in BENCHMARKS else None

    wanted = {(b, p.id) for b, items in problems.items() for p in items}
    by_key: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        if (record["benchmark"], record["problem_id"]) in wanted and record["mode"] in config.modes:
            by_key[(record["benchmark"], record["mode"])].append(record)

    per_benchmark: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (benchmark, mode), rows in by_key.items():
        per_benchmark[benchmark][mode] = _mode_metrics(rows)
    for benchmark, modes in per_benchmark.items():
        solved = {mode: _correct_by_problem(by_key[(benchmark, mode)]) for mode in modes if modes[mode]["graded"]}
        for mode, count in unique_solved(solved).items():
            modes[mode]["unique_solved"] = count

    # Table 1: AIME-24 and AIME-25 pool into one column; the average is over the four columns.
    table1: dict[str, dict[str, dict[str, float]]] = {}
    for mode in config.modes:
        row: dict[str, dict[str, float]] = {}
        for column in TABLE1_COLUMNS:
            rows = [r for (b, m), rs in by_key.items() if m == mode and column_of(b) == column for r in rs]
            if rows:
                metrics = _mode_metrics(rows)
                row[column] = {"accuracy": metrics["avg_at_k"], "entropy_bits": metrics["entropy_bits"]}
        if row:
            row["Average"] = {
                key: sum(v[key] for v in row.values()) / len(row) for key in ("accuracy", "entropy_bits")
            }
            table1[mode] = row

    comparisons: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for benchmark, modes in per_benchmark.items():
        if NORMAL_MODE not in modes:
            continue
        base = modes[NORMAL_MODE]
        for mode, metrics in modes.items():
            if mode == NORMAL_MODE:
                continue
            comparisons[benchmark][mode] = {
                "abs_delta_accuracy": abs(metrics["avg_at_k"] - base["avg_at_k"]),
                "abs_delta_entropy_bits": abs(metrics["entropy_bits"] - base["entropy_bits"]),
                "abs_delta_length": abs(metrics["mean_length"] - base["mean_length"]),
                "kl_mode_normal": metrics.get("kl_mode_normal", math.nan),
            }
    return {"per_benchmark": dict(per_benchmark), "table1": table1, "comparisons": dict(comparisons)}


def _correct_by_problem(rows: list[dict]) -> dict[str, list[bool]]:
    grouped: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        if r["correct"] is not None:
            grouped[r["problem_id"]].append(bool(r["correct"]))
    return dict(grouped)


def _mode_metrics(rows: list[dict]) -> dict[str, float]:
    correct = list(_correct_by_problem(rows).values())
    entropy_sums = [sum(r["entropy_bits"]) for r in rows]
    counts = [len(r["entropy_bits"]) for r in rows]
    metrics = {
        "problems": len({r["problem_id"] for r in rows}),
        "samples": len(rows),
        "graded": bool(correct),
        "avg_at_k": avg_at_k(correct) if correct else math.nan,
        "pass_at_k": pass_at_k(correct) if correct else math.nan,
        "entropy_bits": token_weighted_mean(entropy_sums, counts),
        "mean_length": sum(r["num_tokens"] for r in rows) / len(rows),
        "ungradable": sum(r["correct"] is None for r in rows) if correct else 0,
    }
    kl_rows = [r for r in rows if r.get("kl_sum") is not None]
    if kl_rows:
        metrics["kl_mode_normal"] = token_weighted_mean(
            [r["kl_sum"] for r in kl_rows], [r["num_tokens"] for r in kl_rows]
        )
    return metrics


def creative_metrics(records: list[dict], modes: list[str]) -> dict[str, dict[str, float]]:
    """Div-N-Gram (Eq. 11) and Div-BLEU (Eq. 12) per mode, each over the k stories of a prompt, averaged."""
    from .creative import div_bleu, div_ngram, mean_over_prompts

    out: dict[str, dict[str, float]] = {}
    for mode in modes:
        stories: dict[str, list[str]] = defaultdict(list)
        for r in records:
            if r["kind"] == "creative" and r["mode"] == mode:
                stories[r["problem_id"]].append(r["completion"])
        groups = [g for g in stories.values() if len(g) >= 2]
        if groups:
            out[mode] = {
                "div_ngram": mean_over_prompts(div_ngram, groups),
                "div_bleu": mean_over_prompts(div_bleu, groups),
                "prompts": len(groups),
            }
    return out


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for package in ("policy-split-trl", "torch", "transformers", "trl", "peft", "vllm", "math-verify", "sacrebleu"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            continue
    return versions


def evaluate_modes(config: EvalConfig, backend: Any = None) -> dict[str, Any]:
    """
    Run (or resume) a dual-mode evaluation and write its outputs into `config.output_dir`.

    Args:
        config (`EvalConfig`):
            What to evaluate.
        backend (*optional*):
            A ready backend (e.g. the training model wrapped in `TransformersBackend`); built from `config` if `None`.

    Returns:
        `dict`: the content of `results.json`.
    """
    from .benchmarks import load_benchmark
    from .report import write_outputs

    os.makedirs(config.output_dir, exist_ok=True)
    problems = {
        name: load_benchmark(name, source=config.sources.get(name), limit=config.limits.get(name, config.limit))
        for name in config.benchmarks
    }
    backend = backend or make_backend(
        config.model, config.adapter, config.backend, config.batch_size, config.chat_template_kwargs
    )
    path = os.path.join(config.output_dir, GENERATIONS_FILE)
    generated = generate_and_score(config, backend, problems, path)
    records = read_generations(path)
    results = compute_results(config, records, problems)
    results["creative"] = creative_metrics(records, config.modes)
    if config.judge and any(p.kind == "creative" for items in problems.values() for p in items):
        results["judge"] = _run_judge(config, records, problems)
    results["config"] = {**asdict(config), "backend_used": getattr(backend, "name", type(backend).__name__)}
    results["entropy"] = {
        "unit": "bits",
        "distribution": "sampling (logits / temperature, before top-k/top-p)"
        if config.entropy_temperature == "sampling"
        else "raw (temperature 1)",
        "temperature": config.score_temperature,
    }
    results["versions"] = _versions()
    results["generated_this_run"] = generated
    write_outputs(config.output_dir, results, records, config.modes)
    return results


def _run_judge(config: EvalConfig, records: list[dict], problems: dict[str, list]) -> dict[str, Any]:
    from .judge import OpenAIJudge, TransformersJudge, judge_stories

    settings = dict(config.judge or {})
    judge = (
        TransformersJudge(settings.pop("local_model"))
        if "local_model" in settings
        else OpenAIJudge(base_url=settings.get("base_url"), model=settings.get("model"))
    )
    prompt_text = {p.id: p.prompt[-1]["content"] for items in problems.values() for p in items}
    out = {}
    for mode in config.modes:
        items = [(prompt_text[r["problem_id"]], r["completion"]) for r in records
                 if r["kind"] == "creative" and r["mode"] == mode and r["problem_id"] in prompt_text]  # fmt: skip
        if items:
            out[mode] = judge_stories(judge, items)
    return out
