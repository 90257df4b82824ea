"""Evaluate a model in several modes side by side (`policy-split-eval`); the same as `policy_split_trl.eval.evaluate_modes`.

    policy-split-eval --model embedded:smollm2-135m-instruct --benchmarks gsm8k creative_writing --limit 50 --k 4 \\
        --max_new_tokens 256 --output_dir outputs/eval
    policy-split-eval --model my-org/qwen3-1.7b-policy-split --benchmarks math500 aime24 aime25 gpqa_diamond mmlu_pro \\
        --modes normal high_entropy rewritten_high_entropy low_entropy --chat_template_kwargs '{"enable_thinking": true}'

A rerun with the same `--output_dir` resumes from its `generations.jsonl`. A bad flag or file exits with status 1
and a message naming it; so does a run whose judge (when asked for) scored no story or was stopped after repeated
failures (every other result is written first).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from policy_split_trl.eval.backends import SamplingConfig
from policy_split_trl.eval.checks import EvalConfigError
from policy_split_trl.eval.files import DamagedFileError
from policy_split_trl.eval.harness import ENTROPY_TEMPERATURES, EvalConfig, evaluate_modes


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    """`["a=x", "b=y"]` -> `{"a": "x", "b": "y"}`; a value without `=`, or a name given twice, is an error."""
    pairs: dict[str, str] = {}
    for value in values or []:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise EvalConfigError(f"{flag} takes NAME=VALUE, got {value!r}.")
        if name in pairs:
            raise EvalConfigError(f"{flag} gives {name!r} twice ({pairs[name]!r} and {rest!r}); keep one.")
        pairs[name] = rest
    return pairs


def _json_object(text: str) -> dict[str, Any]:
    """argparse type of `--chat_template_kwargs`: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'must be a JSON object such as \'{{"enable_thinking": true}}\', got {text!r}')
    return value


def read_prompt_file(name: str, path: str) -> str:
    """The system prompt of mode `name` from a UTF-8 text file (`--mode_prompt_file NAME=FILE`), stripped."""
    where = f"--mode_prompt_file {name}={path}"
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise EvalConfigError(
            f"{where}: the file {what} (looked for {os.path.abspath(path)}; a relative path is relative to the "
            "working directory); pass a text file holding the mode's system prompt."
        )
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except UnicodeDecodeError as error:
        raise EvalConfigError(f"{where}: not UTF-8 text ({error}); save the prompt as UTF-8.") from None
    if not text:
        raise EvalConfigError(f"{where}: the file is empty; write the mode's system prompt in it.")
    return text


def _limits(values: list[str] | None) -> dict[str, int]:
    limits = {}
    for name, text in _pairs(values, "--limit_for").items():
        try:
            limits[name] = int(text)
        except ValueError:
            raise EvalConfigError(f"--limit_for {name}={text}: the limit must be an integer.") from None
    return limits


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="policy-split-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True, help="Hub id, local folder or embedded:<name>.")
    p.add_argument("--adapter", help="PEFT/LoRA adapter folder on top of --model.")
    p.add_argument("--benchmarks", nargs="+", default=["math500"],
                   help="math500 aime24 aime25 gpqa_diamond mmlu_pro gsm8k arithmetic creative_writing")  # fmt: skip
    p.add_argument("--source", action="append", metavar="BENCHMARK=FILE", help="Local file for a benchmark.")
    p.add_argument("--limit", type=int, help="First N problems of each benchmark.")
    p.add_argument("--limit_for", action="append", metavar="BENCHMARK=N", help="First N problems of one benchmark.")
    p.add_argument("--modes", nargs="+", default=["normal", "high_entropy"],
                   help="normal high_entropy rewritten_high_entropy low_entropy, or names from --mode_prompt")  # fmt: skip
    p.add_argument("--mode_prompt", action="append", metavar="NAME=TEXT", help="An extra mode's system prompt.")
    p.add_argument("--mode_prompt_file", action="append", metavar="NAME=FILE", help="An extra mode's prompt file.")
    p.add_argument("--k", type=int, default=8, help="Samples per problem and mode (paper: 8).")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--top_k", type=int, default=20, help="0 disables top-k.")
    p.add_argument("--max_new_tokens", type=int, default=32768)
    p.add_argument("--entropy_temperature", choices=ENTROPY_TEMPERATURES, default="sampling",
                   help="Entropy/KL of the sampled distribution (logits/T) or of the raw one (T=1).")  # fmt: skip
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--backend", choices=["auto", "transformers", "vllm"], default="auto")
    p.add_argument("--chat_template_kwargs", type=_json_object, default={},
                   help='A JSON object, e.g. {"enable_thinking": true}')  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_kl", action="store_true", help="Skip scoring non-normal modes under the normal context.")
    p.add_argument("--judge_base_url", help="OpenAI-compatible endpoint for the creative-writing judge.")
    p.add_argument("--judge_model", help="Judge model name at that endpoint (key: $POLICY_SPLIT_JUDGE_API_KEY).")
    p.add_argument("--judge_local_model", help="A local transformers model as the judge instead.")
    p.add_argument("--output_dir", required=True)
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The [`EvalConfig`] of parsed arguments; reads `--mode_prompt_file` files. Raises `EvalConfigError`."""
    mode_prompts = _pairs(args.mode_prompt, "--mode_prompt")
    for name, path in _pairs(args.mode_prompt_file, "--mode_prompt_file").items():
        if name in mode_prompts:
            raise EvalConfigError(f"Mode {name!r} is given by both --mode_prompt and --mode_prompt_file; keep one.")
        mode_prompts[name] = read_prompt_file(name, path)
    judge: dict[str, Any] | None = None
    if args.judge_local_model:
        judge = {"local_model": args.judge_local_model}
    elif args.judge_base_url or args.judge_model:
        judge = {"base_url": args.judge_base_url, "model": args.judge_model}
    return EvalConfig(
        model=args.model,
        adapter=args.adapter,
        benchmarks=args.benchmarks,
        sources=_pairs(args.source, "--source"),
        limit=args.limit,
        limits=_limits(args.limit_for),
        modes=args.modes,
        mode_prompts=mode_prompts,
        k=args.k,
        sampling=SamplingConfig(args.temperature, args.top_p, args.top_k, args.max_new_tokens),
        entropy_temperature=args.entropy_temperature,
        batch_size=args.batch_size,
        backend=args.backend,
        chat_template_kwargs=args.chat_template_kwargs,
        seed=args.seed,
        compute_kl=not args.no_kl,
        judge=judge,
        output_dir=args.output_dir,
    )


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `argv` and evaluate; returns the results (also written to `--output_dir`)."""
    config = config_from_args(build_parser().parse_args(argv))
    results = evaluate_modes(config)
    from policy_split_trl.eval.report import results_markdown

    print(results_markdown(results))
    print(f"Results: {config.output_dir}/results.json, results.md, generations.jsonl")
    return results


def cli() -> None:
    """
    Console entry point `policy-split-eval`: a bad setting or file, a damaged `generations.jsonl`, or a judge that was
    asked for but scored no story (or was stopped after repeated failures) exits with status 1 and the reason.
    """
    try:
        results = run()
    except (EvalConfigError, DamagedFileError) as error:
        raise SystemExit(f"policy-split-eval: {error}") from None
    error = (results.get("judge_status") or {}).get("error")
    if error:
        raise SystemExit(
            f"policy-split-eval: {error}. Every other result is in {results['config']['output_dir']}; rerun the same "
            "command once the judge is fixed (the samples are reused, only the judging is done again)."
        )


if __name__ == "__main__":
    cli()
