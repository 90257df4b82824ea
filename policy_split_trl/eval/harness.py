"""The dual-mode evaluation harness: the paper's measurements (Tables 1, 2, 5, 6, 7) for any model, both modes side
by side.

`evaluate_modes(EvalConfig(...))` samples `k` completions per problem and mode, scores every completion in its own
context (full-vocabulary token entropy in bits) and, for each non-normal mode, under the normal context too (the
forward KL of Table 5), grades it, and appends it to `generations.jsonl` as it goes, so that a crashed or interrupted
run restarts where it stopped. It then writes `results.json`, `results.md` and PNG plots.

Resuming gives exactly the records of an uninterrupted run, wherever the file was cut: a last line without its newline
(a write cut short) and the records of a problem whose k samples are not all there are dropped, and the whole batch
they belong to is sampled again with its own seed (only its missing problems are appended). Any other damage (a line
that is not a record, a sample twice, a problem short of samples before the end) is a [`GenerationsFileError`] naming
the file and line, and `generations_settings.json` refuses to resume samples drawn with other settings.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tqdm.auto import tqdm

from ..modes import MODE_PROMPTS, NORMAL_MODE, apply_system_prompt
from ..rewards import arithmetic_reward, math_accuracy_reward, multiple_choice_reward
from .backends import SamplingConfig, Scored, make_backend
from .checks import (
    EvalConfigError,
    MappingAction,
    as_json,
    as_limit,
    check_bool,
    check_int,
    check_mapping,
    check_text,
    check_text_list,
)
from .files import DamagedFileError, atomic_write_json, read_json_file
from .metrics import avg_at_k, pass_at_k, token_weighted_mean, unique_solved

logger = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.jsonl"
# What the samples in generations.jsonl were drawn with: a rerun with other settings must not resume them.
GENERATION_SETTINGS_FILE = "generations_settings.json"
ENTROPY_TEMPERATURES = ("sampling", "raw")
BACKENDS = ("auto", "transformers", "vllm")
# `judge` settings: an OpenAI-compatible endpoint, or a local transformers model.
JUDGE_ENDPOINT_KEYS = ("base_url", "model")
JUDGE_LOCAL_KEYS = ("local_model",)


@dataclass
class EvalConfig:
    """
    What to evaluate and how; every field is recorded in `results.json`.

    `policy-split-eval` reads it from the command line and a YAML file (`--config eval.yaml`, then flags override any
    field) with [`~policy_split_trl.eval.parser.EvalParser`]; [`EvalConfig.from_settings`] builds it from a mapping.

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
            LLM-as-judge for creative writing (needs `creative_writing` in `benchmarks`): `{"base_url": ...,
            "model": ...}` for an OpenAI-compatible endpoint (key from `POLICY_SPLIT_JUDGE_API_KEY`), or
            `{"local_model": path}`.
        progress (`bool`, *optional*, defaults to `True`):
            Show progress bars.

    Raises:
        [`~policy_split_trl.eval.checks.EvalConfigError`] (a `ValueError`): a field of the wrong type or out of range,
        an unknown benchmark, mode or backend, a `sources`/`limits` entry for a benchmark not evaluated, a local
        source file that does not exist or is empty; the message names the field and the fix.
    """

    model: str = field(metadata={"help": "Hub id, local folder or `embedded:<name>`."})
    output_dir: str = field(
        metadata={"help": "Where generations.jsonl, results.json, results.md and the plots go (a rerun resumes)."}
    )
    adapter: str | None = field(default=None, metadata={"help": "A PEFT/LoRA adapter folder on top of `model`."})
    benchmarks: list[str] = field(
        default_factory=lambda: ["math500"],
        metadata={
            "help": "math500 aime24 aime25 gpqa_diamond mmlu_pro gsm8k creative_writing arithmetic "
            "(policy_split_trl.eval.benchmarks.BENCHMARKS)."
        },
    )
    sources: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "Benchmark -> local file (json, jsonl, parquet, csv) to load instead of the Hub dataset; on the "
            "command line `--source NAME=FILE` (repeatable) or a JSON object.",
            "aliases": ["--source"],
            "action": MappingAction,
            "metavar": "BENCHMARK=FILE",
        },
    )
    limit: int | None = field(default=None, metadata={"help": "First N problems of each benchmark."})
    limits: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": "Benchmark -> first N problems, overriding `limit` for it; on the command line `--limit_for "
            "NAME=N` (repeatable).",
            "aliases": ["--limit_for"],
            "action": MappingAction,
            "value": as_limit,
            "metavar": "BENCHMARK=N",
        },
    )
    modes: list[str] = field(
        default_factory=lambda: [NORMAL_MODE, "high_entropy"],
        metadata={
            "help": "Modes to evaluate: normal high_entropy rewritten_high_entropy low_entropy, or names of "
            "`mode_prompts`."
        },
    )
    mode_prompts: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "Extra or overriding mode -> system prompt (e.g. the prompt a model was trained with); on the "
            "command line `--mode_prompt NAME=TEXT` or `--mode_prompt_file NAME=FILE` (repeatable).",
            "aliases": ["--mode_prompt"],
            "action": MappingAction,
            "metavar": "NAME=TEXT",
        },
    )
    k: int = field(default=8, metadata={"help": "Samples per problem and mode (the paper: 8)."})
    sampling: SamplingConfig = field(
        default_factory=SamplingConfig,
        metadata={
            "help": "Temperature, top-p, top-k and max new tokens (SamplingConfig; the paper's Table 9 by default): "
            "the flat flags --temperature, --top_p, --top_k, --max_new_tokens, or `--sampling NAME=VALUE`; a YAML "
            "`sampling:` mapping or flat keys.",
            "action": MappingAction,
            "value": as_json,
            "metavar": "NAME=VALUE",
        },
    )
    entropy_temperature: str = field(
        default="sampling",
        metadata={
            "help": "`sampling`: entropy and KL of the distribution sampled from (logits / temperature, before "
            "top-k/top-p); `raw`: of the raw model distribution (T = 1).",
            "choices": list(ENTROPY_TEMPERATURES),
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per generate/score call."})
    backend: str = field(
        default="auto",
        metadata={
            "help": "`auto` (vLLM if installed and a GPU is present), `transformers` or `vllm`.",
            "choices": list(BACKENDS),
        },
    )
    chat_template_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Passed to the chat template, e.g. '{\"enable_thinking\": true}' for Qwen3 (a JSON object, or "
            "NAME=VALUE with JSON values).",
            "action": MappingAction,
            "value": as_json,
            "metavar": "JSON",
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "Base seed; each (benchmark, mode, batch) derives its own, so a resumed run samples alike."},
    )
    compute_kl: bool = field(
        default=True,
        metadata={"help": "Score each non-normal mode's samples under the normal context for KL(pi_mode || pi)."},
    )
    judge: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "LLM-as-judge for creative_writing: base_url=URL model=NAME (an OpenAI-compatible endpoint, key "
            "from POLICY_SPLIT_JUDGE_API_KEY) or local_model=PATH; also --judge_base_url, --judge_model, "
            "--judge_local_model.",
            "action": MappingAction,
            "metavar": "KEY=VALUE",
        },
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every field (types, ranges, names, local files); raise [`EvalConfigError`] naming the first bad one."""
        from .benchmarks import BENCHMARKS

        check_text("model", self.model)
        check_text("adapter", self.adapter, optional=True)
        if not isinstance(self.output_dir, str):  # "" is allowed here: the training callback writes no files
            raise EvalConfigError(f"output_dir must be a folder path (a string), got {self.output_dir!r}.")
        check_text_list("benchmarks", self.benchmarks)
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown:
            raise EvalConfigError(f"Unknown benchmark(s) {unknown} in benchmarks; choose from {sorted(BENCHMARKS)}.")
        check_mapping("sources", self.sources, keys_from=sorted(BENCHMARKS))
        for name, source in self.sources.items():
            _check_source(name, source)
        check_int("limit", self.limit, minimum=0, optional=True)
        check_mapping("limits", self.limits, keys_from=sorted(BENCHMARKS))
        for name, limit in self.limits.items():
            check_int(f"limits[{name!r}]", limit, minimum=0)
        check_mapping("mode_prompts", self.mode_prompts)
        for name, prompt in self.mode_prompts.items():
            check_text(f"mode_prompts[{name!r}]", prompt)  # an empty system prompt is no mode at all
        check_text_list("modes", self.modes)
        known = {**MODE_PROMPTS, **self.mode_prompts}
        unknown = [m for m in self.modes if m not in known]
        if unknown:
            raise EvalConfigError(f"Unknown mode(s) {unknown}; known: {sorted(known)} (add yours with mode_prompts).")
        check_int("k", self.k, minimum=1)
        if not isinstance(self.sampling, SamplingConfig):
            raise EvalConfigError(f"sampling must be a SamplingConfig, got {self.sampling!r}.")
        if self.entropy_temperature not in ENTROPY_TEMPERATURES:
            raise EvalConfigError(
                f"entropy_temperature must be one of {ENTROPY_TEMPERATURES}, got {self.entropy_temperature!r}."
            )
        check_int("batch_size", self.batch_size, minimum=1)
        if self.backend not in BACKENDS:
            raise EvalConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}.")
        check_mapping("chat_template_kwargs", self.chat_template_kwargs)
        check_int("seed", self.seed)
        check_bool("compute_kl", self.compute_kl)
        check_bool("progress", self.progress)
        self._validate_judge()

    def _validate_judge(self) -> None:
        if self.judge is None:
            return
        check_mapping("judge", self.judge, keys_from=(*JUDGE_ENDPOINT_KEYS, *JUDGE_LOCAL_KEYS))
        if "local_model" in self.judge:
            if set(self.judge) & set(JUDGE_ENDPOINT_KEYS):
                raise EvalConfigError(f"judge: give either local_model or base_url/model, not both: {self.judge!r}.")
            check_text("judge.local_model", self.judge["local_model"])
        else:
            for key in JUDGE_ENDPOINT_KEYS:  # None: taken from the environment (see OpenAIJudge)
                check_text(f"judge.{key}", self.judge.get(key), optional=True)
        if "creative_writing" not in self.benchmarks:
            raise EvalConfigError(
                f"judge is set but benchmarks {list(self.benchmarks)} has no creative_writing, the only benchmark the "
                "judge scores: add creative_writing, or drop the judge settings."
            )

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> EvalConfig:
        """
        The config of a mapping of its fields, as an evaluation YAML, `results.json`'s `config` or a comparison's
        `evaluation` hold them, with `sampling` a mapping of [`SamplingConfig`] fields (or those as flat keys).

        Raises:
            [`EvalConfigError`]: an unknown or missing key (named, with the valid ones), or any check of `validate`.
        """
        flat = flatten_sampling(settings)
        valid = [f.name for f in fields(cls) if f.name != "sampling"] + list(SAMPLING_FIELDS)
        unknown = sorted(set(flat) - set(valid))
        if unknown:
            raise EvalConfigError(f"Unknown key(s) {unknown}; valid keys: {valid}.")
        missing = [name for name in ("model", "output_dir") if name not in flat]
        if missing:
            raise EvalConfigError(f"{missing} must be set.")
        sampling = SamplingConfig(**{name: flat.pop(name) for name in SAMPLING_FIELDS if name in flat})
        return cls(**flat, sampling=sampling)

    @property
    def system_prompts(self) -> dict[str, str | None]:
        known = {**MODE_PROMPTS, **self.mode_prompts}
        return {mode: known[mode] for mode in self.modes}

    @property
    def score_temperature(self) -> float:
        return self.sampling.temperature if self.entropy_temperature == "sampling" else 1.0


SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingConfig))


def flatten_sampling(settings: Mapping[str, Any]) -> dict[str, Any]:
    """
    Evaluation settings with their `sampling:` mapping (as YAML files and `results.json` nest it) as flat keys
    (`temperature`, ...), the form the command line has.

    Raises:
        [`EvalConfigError`]: `sampling` is not a mapping of [`SamplingConfig`] fields, or sets a key also set flat.
    """
    flat = dict(settings)
    nested = flat.pop("sampling", None)
    if nested is None:
        return flat
    if isinstance(nested, SamplingConfig):
        nested = asdict(nested)
    check_mapping("sampling", nested, keys_from=SAMPLING_FIELDS)
    twice = sorted(set(nested) & set(flat))
    if twice:
        raise EvalConfigError(f"{twice} set both under sampling and as flat keys; keep one.")
    return {**flat, **nested}


def _check_source(benchmark: str, source: Any) -> None:
    """A local benchmark file must exist and hold something; other strings are Hub ids, checked when loaded."""
    from ..data import LOCAL_FORMATS

    check_text(f"sources[{benchmark!r}]", source)
    if benchmark == "creative_writing":
        raise EvalConfigError("sources: creative_writing takes no source, its 13 prompts ship with the package.")
    if os.path.isfile(source):
        if os.path.getsize(source) == 0:
            raise EvalConfigError(f"sources[{benchmark!r}]: {source} is empty; pass the benchmark's file.")
        return
    if os.path.isdir(source):
        raise EvalConfigError(f"sources[{benchmark!r}]: {source} is a folder; pass the benchmark's file.")
    if os.path.splitext(source)[1].lower() in LOCAL_FORMATS or benchmark == "arithmetic":  # else: a Hub id
        raise EvalConfigError(
            f"sources[{benchmark!r}]: no such file {source!r} (looked for {os.path.abspath(source)}: a relative path is "
            f"relative to the working directory, {os.getcwd()}); pass an existing json/jsonl/parquet/csv file."
        )


def _record_key(record: dict) -> tuple[str, str, str]:
    return record["benchmark"], record["problem_id"], record["mode"]


class GenerationsFileError(DamagedFileError):
    """`generations.jsonl` is damaged or was sampled with other settings; the message names the file, line and fix."""


# Field -> accepted types of a generations.jsonl record (what `iter_records` writes).
_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "benchmark": (str,),
    "problem_id": (str,),
    "mode": (str,),
    "sample": (int,),
    "kind": (str,),
    "completion": (str,),
    "num_tokens": (int,),
    "correct": (bool, type(None)),
    "entropy_bits": (list,),
    "kl_sum": (int, float, type(None)),
}


def _fix_line(path: str, line: int) -> str:
    return (
        f"keep the lines before it to resume from there (`head -n {line - 1} {path} > fixed && mv fixed {path}`), "
        "or delete the file to sample everything again"
    )


def _parse_record(path: str, line: int, text: bytes) -> dict:
    """One complete line of `generations.jsonl` as a record, or a [`GenerationsFileError`] naming file and line."""
    where = f"{path} line {line}"
    if not text.strip():
        raise GenerationsFileError(f"{where} is empty: {_fix_line(path, line)}.")
    try:
        record = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GenerationsFileError(
            f"{where} is not valid JSON ({error}; cut short or overwritten?): {_fix_line(path, line)}."
        ) from None
    if not isinstance(record, dict):
        raise GenerationsFileError(f"{where} is not a generation record (a JSON object): {_fix_line(path, line)}.")
    missing = [name for name in _RECORD_FIELDS if name not in record]
    if missing:
        raise GenerationsFileError(f"{where} lacks {missing}: {_fix_line(path, line)}.")
    for name, types in _RECORD_FIELDS.items():
        value = record[name]
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise GenerationsFileError(f"{where}: {name} has the wrong type ({value!r}): {_fix_line(path, line)}.")
    if record["sample"] < 0 or record["num_tokens"] < 0 or len(record["entropy_bits"]) != record["num_tokens"]:
        raise GenerationsFileError(
            f"{where}: sample and num_tokens must be >= 0 and num_tokens the number of entropies "
            f"(sample {record['sample']}, num_tokens {record['num_tokens']}, {len(record['entropy_bits'])} "
            f"entropies): {_fix_line(path, line)}."
        )
    return record


@dataclass
class _Line:
    number: int  # 1-based
    start: int  # byte offset of the line's first byte
    record: dict


def _scan_generations(path: str) -> tuple[list[_Line], int]:
    """
    Every complete line of `generations.jsonl` (one ending with a newline) as a checked record, and the byte offset
    where the complete lines end.

    The writer puts a record and its newline in one write, so a last line without a newline is a write cut short (a
    crash, a full disk): it is left out. Any other line that is not a record raises [`GenerationsFileError`].
    """
    if not os.path.exists(path):
        return [], 0
    if not os.path.isfile(path):
        raise GenerationsFileError(f"{path} is not a file: delete it (or use another output_dir).")
    lines, offset = [], 0
    with open(path, "rb") as f:
        for number, text in enumerate(f, start=1):
            if not text.endswith(b"\n"):  # only the last line can lack it
                break
            lines.append(_Line(number, offset, _parse_record(path, number, text)))
            offset += len(text)
    return lines, offset


def read_generations(path: str) -> list[dict]:
    """
    The records of `generations.jsonl` (`[]` if there is none).

    A last line without its newline (a write cut short by a crash) is left out; any other line that is not a
    complete record raises [`GenerationsFileError`] naming the file and line, never skipped silently.
    """
    return [line.record for line in _scan_generations(path)[0]]


def resume_point(path: str, k: int) -> tuple[list[dict], int]:
    """
    Where a run that appends to `path` must start: the records to keep and the byte length of the file they fill.

    An interrupted run leaves a prefix of what the uninterrupted run writes: whole problems (k samples each, in
    order), then possibly some samples of the next problem, then possibly a line cut short. Those last two are dropped
    (the batch is sampled again). Anything else — a sample twice, a sample index >= k, a problem short of samples with
    other records after it — is not what a crash leaves and raises [`GenerationsFileError`].

    Args:
        path (`str`):
            The `generations.jsonl` file.
        k (`int`):
            Samples per problem and mode.

    Returns:
        `tuple[list[dict], int]`: the records of complete problems, and the byte offset to cut the file at.
    """
    lines, complete = _scan_generations(path)
    by_key: dict[tuple[str, str, str], list[_Line]] = defaultdict(list)
    for line in lines:
        key, sample = _record_key(line.record), line.record["sample"]
        if any(other.record["sample"] == sample for other in by_key[key]):
            raise GenerationsFileError(
                f"{path} line {line.number}: sample {sample} of {key} is there more than once (two runs appending "
                f"at the same time, or a file written by an older version that appended after a cut line): "
                f"{_fix_line(path, line.number)}."
            )
        if sample >= k:
            raise GenerationsFileError(
                f"{path} line {line.number}: sample {sample} of {key}, but k={k}: it was sampled with a larger k; "
                "rerun with that k, or use another output_dir."
            )
        by_key[key].append(line)
    tail_key = _record_key(lines[-1].record) if lines else None
    cut = complete
    for key, group in by_key.items():
        if len(group) == k:
            continue
        if key == tail_key and all(line.number > len(lines) - len(group) for line in group):
            cut = group[0].start  # the samples of the problem in flight when the run stopped
            continue
        raise GenerationsFileError(
            f"{path} line {group[-1].number}: {key} has {len(group)} of k={k} samples, and other records follow "
            f"them (not what an interrupted run leaves: another k, or an edited file): "
            f"{_fix_line(path, group[-1].number)}."
        )
    kept = [line.record for line in lines if line.start < cut]
    return kept, cut


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
        `list[dict]`: the records of one batch (k per problem), except those of its problems already in `done`,
        ready for `generations.jsonl`.

    Batches are always cut from the full problem list, and a batch with any problem to do is sampled whole with its
    own seed, so a resumed run draws exactly what an uninterrupted one would (the batch's prompts are padded and
    sampled together: the same problems with others around them would draw other samples).
    """
    done = done or set()
    temperature = config.score_temperature
    per_call = max(1, config.batch_size // config.k)
    for benchmark, items in problems.items():
        for mode_index, (mode, system_prompt) in enumerate(config.system_prompts.items()):
            batches = [items[start : start + per_call] for start in range(0, len(items), per_call)]
            batches = [b for b in batches if any((benchmark, p.id, mode) not in done for p in b)]
            if not batches:
                continue
            todo = sum((benchmark, p.id, mode) not in done for b in batches for p in b)
            bar = tqdm(total=todo, desc=f"{benchmark} [{mode}]", unit="problem", disable=not config.progress)
            for batch in batches:
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
                    if (benchmark, problem.id, mode) in done:  # sampled again only to keep the batch as it was
                        index += len(group)
                        continue
                    grades = _grade(problem, texts[index : index + len(group)])
                    for j in range(len(group)):
                        i = index + j
                        kl_sum = None
                        if normal[i] is not None:
                            kl_sum = sum(a - b for a, b in zip(own[i].logprobs, normal[i].logprobs, strict=True))
                        records.append(
                            {
                                "benchmark": benchmark,
                                "problem_id": problem.id,
                                "mode": mode,
                                "sample": j,
                                "kind": problem.kind,
                                "completion": texts[i],
                                "num_tokens": len(flat[i]),
                                "correct": grades[j],
                                "entropy_bits": [round(e, 4) for e in own[i].entropy_bits],
                                "kl_sum": kl_sum,
                            }
                        )
                    index += len(group)
                yield records
                bar.update(len(records) // config.k)
            bar.close()


def prepare_generations(path: str, config: EvalConfig) -> set[tuple[str, str, str]]:
    """
    Make `path` ready to append to, and return the `(benchmark, problem_id, mode)` keys it already has in full.

    Checks the file line by line and against the settings its samples were drawn with (`generations_settings.json`
    next to it), then drops what an interruption left unfinished (see [`resume_point`]). Nothing is changed when a
    check fails.

    Raises:
        [`GenerationsFileError`]: a damaged line (naming file and line), or samples drawn with other settings.
    """
    records, cut = resume_point(path, config.k)
    check_generation_settings(os.path.dirname(path), config, has_samples=bool(records))
    size = os.path.getsize(path) if os.path.exists(path) else 0
    if cut < size:
        logger.warning(
            "%s: dropping its last %d bytes (a line cut short and/or the samples of an unfinished problem); their "
            "batch is sampled again.",
            path,
            size - cut,
        )
        with open(path, "rb+") as f:  # truncating is one step: a crash leaves the old or the cut file
            f.truncate(cut)
            os.fsync(f.fileno())
    return _completed(records, config.k)


def generate_and_score(
    config: EvalConfig, backend: Any, problems: dict[str, list], path: str, done: set | None = None
) -> int:
    """
    Run [`iter_records`] for everything not yet complete in `path` and append each batch to it as soon as it is done
    (flushed to disk), so an interrupted run loses at most the batch in flight.

    Args:
        done (`set`, *optional*):
            What [`prepare_generations`] returned for `path`; it is called here when `None`.

    Returns:
        `int`: number of completions generated by this call (0 when everything was already done).
    """
    if done is None:
        done = prepare_generations(path, config)
    generated = 0
    with open(path, "a", encoding="utf-8") as out:
        for records in iter_records(config, backend, problems, done):
            # One write per batch, each record with its newline: a crash can only cut the file, never mix lines.
            out.write("".join(json.dumps(record) + "\n" for record in records))
            out.flush()
            os.fsync(out.fileno())
            generated += len(records)
    return generated


def generation_settings(config: EvalConfig) -> dict[str, Any]:
    """What determines the samples of a run (so a resume must keep it): model, k, sampling, seed, prompts, ..."""

    def local(path: str | None) -> str | None:  # a folder named relatively or absolutely is the same model
        return os.path.abspath(path) if path and os.path.exists(path) else path

    settings = {
        "model": local(config.model),
        "adapter": local(config.adapter),
        "k": config.k,
        "sampling": asdict(config.sampling),
        "seed": config.seed,
        "entropy_temperature": config.entropy_temperature,
        "chat_template_kwargs": config.chat_template_kwargs,
        "compute_kl": config.compute_kl,
        "system_prompts": config.system_prompts,
    }
    return json.loads(json.dumps(settings))


def check_generation_settings(output_dir: str, config: EvalConfig, has_samples: bool) -> None:
    """
    Refuse to resume samples drawn with other settings (they would be averaged with this run's), then record this
    run's settings (adding its new modes) in `generations_settings.json`.

    Args:
        output_dir (`str`):
            The run's folder.
        config (`EvalConfig`):
            This run.
        has_samples (`bool`):
            Whether `generations.jsonl` holds samples to resume.

    Raises:
        [`GenerationsFileError`]: naming the settings that differ and the fix.
    """
    path = os.path.join(output_dir, GENERATION_SETTINGS_FILE)
    fix = f"delete it and {GENERATIONS_FILE} to sample everything again"
    saved = read_json_file(path, "the settings the samples were drawn with", fix) if has_samples else None
    current = generation_settings(config)
    if saved is None and has_samples:
        logger.warning(
            "%s has no %s (written before it existed): assuming its samples were drawn with this run's settings.",
            os.path.join(output_dir, GENERATIONS_FILE),
            GENERATION_SETTINGS_FILE,
        )
    if saved is not None:
        changed = [key for key in current if key != "system_prompts" and saved.get(key) != current[key]]
        changed += [
            f"system prompt of {mode!r}"
            for mode, prompt in current["system_prompts"].items()
            if mode in saved.get("system_prompts", {}) and saved["system_prompts"][mode] != prompt
        ]
        if changed:
            was = {key: saved.get(key) for key in changed if key in current}
            now = {key: current[key] for key in changed if key in current}
            raise GenerationsFileError(
                f"{os.path.join(output_dir, GENERATIONS_FILE)} holds samples drawn with other settings: {changed} "
                f"differ ({was} then, {now} now; see {path}). Rerun with the same settings to resume, or use another "
                f"output_dir (or delete {GENERATIONS_FILE} and {GENERATION_SETTINGS_FILE}) to evaluate anew."
            )
        current["system_prompts"] = {**saved.get("system_prompts", {}), **current["system_prompts"]}
    if saved != current:
        atomic_write_json(path, current)


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


def package_versions() -> dict[str, str]:
    """Python and the installed versions of the packages that determine the numbers (recorded with every result)."""
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for package in ("policy-split-trl", "torch", "transformers", "trl", "peft", "vllm", "math-verify", "sacrebleu"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            continue
    return versions


def load_problems(config: EvalConfig) -> dict[str, list]:
    """
    The problems of every benchmark of `config`, with the failure to read a local source file named.

    Raises:
        [`EvalConfigError`]: a source file that cannot be read (naming the benchmark, the file and, for a JSON Lines
        file, the first line that is not JSON), or a benchmark whose problem ids repeat (their samples would mix).
    """
    from .benchmarks import load_benchmark

    problems = {}
    for name in config.benchmarks:
        source = config.sources.get(name)
        try:
            items = load_benchmark(name, source=source, limit=config.limits.get(name, config.limit))
        except Exception as error:
            if source is None or not os.path.isfile(source):
                raise  # the Hub's own message says what failed
            # `data.load_local_file` names the file and, for JSON, the first line that does not parse.
            raise EvalConfigError(f"{name}: cannot read its source file: {error}") from error
        repeated = sorted({p.id for p in items if sum(q.id == p.id for q in items) > 1})[:5]
        if repeated:
            raise EvalConfigError(
                f"{name}: problem ids {repeated} repeat in {source or 'the dataset'}; each problem needs its own id "
                "(its samples are stored under it): make the file's `id` column unique, or drop it."
            )
        problems[name] = items
    return problems


def evaluate_modes(config: EvalConfig, backend: Any = None) -> dict[str, Any]:
    """
    Run (or resume) a dual-mode evaluation and write its outputs into `config.output_dir`.

    Everything that can be checked without the model is checked first (settings, source files, an existing
    `generations.jsonl` and the settings it was sampled with, the judge's settings), so a bad input fails before the
    model loads, and nothing in `output_dir` is changed by a failed check.

    Args:
        config (`EvalConfig`):
            What to evaluate.
        backend (*optional*):
            A ready backend (e.g. the training model wrapped in `TransformersBackend`); built from `config` if `None`.

    Returns:
        `dict`: the content of `results.json`. With a judge, `results["judge_status"]["error"]` says why its scores
        are missing or incomplete (it scored no story, or was stopped after repeated failures), `None` when it scored
        every story it was asked about; this function does not raise for it, so the samples and the other metrics are
        kept (`policy-split-eval` exits non-zero with that message).

    Raises:
        [`EvalConfigError`]: a bad setting or source file. [`GenerationsFileError`]: a damaged `generations.jsonl` or
        one sampled with other settings.
    """
    from .report import write_outputs

    if not config.output_dir:
        raise EvalConfigError("output_dir is empty: pass the folder to write results to (a rerun resumes from it).")
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise EvalConfigError(f"output_dir {config.output_dir!r} is a file: pass a folder.")
    judge = _make_judge(config) if config.judge else None  # an endpoint judge's settings fail here, not after hours
    problems = load_problems(config)
    os.makedirs(config.output_dir, exist_ok=True)
    path = os.path.join(config.output_dir, GENERATIONS_FILE)
    done = prepare_generations(path, config)  # before the model loads: a damaged file fails first
    backend = backend or make_backend(
        config.model, config.adapter, config.backend, config.batch_size, config.chat_template_kwargs
    )
    generated = generate_and_score(config, backend, problems, path, done)
    records = read_generations(path)
    results = compute_results(config, records, problems)
    results["creative"] = creative_metrics(records, config.modes)
    if config.judge:
        results["judge"], results["judge_status"] = _run_judge(config, judge, records, problems)
    results["config"] = {**asdict(config), "backend_used": getattr(backend, "name", type(backend).__name__)}
    results["entropy"] = {
        "unit": "bits",
        "distribution": "sampling (logits / temperature, before top-k/top-p)"
        if config.entropy_temperature == "sampling"
        else "raw (temperature 1)",
        "temperature": config.score_temperature,
    }
    results["versions"] = package_versions()
    results["generated_this_run"] = generated
    write_outputs(config.output_dir, results, records, config.modes)
    return results


def _make_judge(config: EvalConfig) -> Any:
    """An endpoint judge now (cheap, and a missing model name fails before sampling); a local model's path, to load
    once the samples are done (it would hold memory during sampling)."""
    from .judge import OpenAIJudge

    settings = dict(config.judge or {})
    if "local_model" in settings:
        return settings["local_model"]
    try:
        return OpenAIJudge(base_url=settings.get("base_url"), model=settings.get("model"))
    except ValueError as error:
        raise EvalConfigError(f"judge: {error} (policy-split-eval: --judge_model).") from None


def _run_judge(
    config: EvalConfig, judge: Any, records: list[dict], problems: dict[str, list]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Judge every mode's stories with one circuit breaker; returns the per-mode summaries and the judge's status."""
    from .judge import JudgeCircuitBreaker, TransformersJudge, judge_stories

    if isinstance(judge, str):
        judge = TransformersJudge(judge)
    breaker = JudgeCircuitBreaker()
    prompt_text = {p.id: p.prompt[-1]["content"] for items in problems.values() for p in items}
    out = {}
    for mode in config.modes:
        items = [
            (prompt_text[r["problem_id"]], r["completion"])
            for r in records
            if r["kind"] == "creative" and r["mode"] == mode and r["problem_id"] in prompt_text
        ]
        if items:
            out[mode] = judge_stories(judge, items, progress=config.progress, breaker=breaker)
    return out, judge_status(out, breaker.reason)


def judge_status(summaries: dict[str, dict[str, Any]], stopped: str | None) -> dict[str, Any]:
    """
    Whether the judge did its job: `error` is `None` when it scored every story it was asked about (unparseable
    replies aside, which are counted), else why the judge scores are missing or partial.

    Args:
        summaries (`dict[str, dict]`):
            Mode -> what [`~policy_split_trl.eval.judge.judge_stories`] returned.
        stopped (`str`, *optional*):
            Why the circuit breaker stopped the judge, if it did.
    """
    total = sum(s["n_items"] for s in summaries.values())
    scored = sum(s["n_scored"] for s in summaries.values())
    error = None
    if total and not scored:
        counts = {key: sum(s[key] for s in summaries.values()) for key in ("n_unparseable", "n_errors", "n_skipped")}
        error = f"the judge scored none of the {total} stories ({counts})" + (f": {stopped}" if stopped else "")
    elif stopped:
        error = f"the judge was stopped after scoring {scored} of {total} stories: {stopped}"
    return {"stories": total, "scored": scored, "stopped": stopped, "error": error}
