"""Evaluate a model in several modes side by side (`policy-split-eval`); the same as `policy_split_trl.eval.evaluate_modes`.

    policy-split-eval --model embedded:smollm2-135m-instruct --benchmarks gsm8k creative_writing --limit 50 --k 4 \\
        --max_new_tokens 256 --output_dir outputs/eval
    policy-split-eval --model my-org/qwen3-1.7b-policy-split --benchmarks math500 aime24 aime25 gpqa_diamond mmlu_pro \\
        --modes normal high_entropy rewritten_high_entropy low_entropy --chat_template_kwargs '{"enable_thinking": true}'
    policy-split-eval --config eval.yaml --limit 10     # EvalConfig fields in a YAML file; flags override them

Every flag is an `EvalConfig` field (`policy_split_trl.eval.harness`) or a `SamplingConfig` one, flat; see `--help`.
A rerun with the same `--output_dir` resumes from its `generations.jsonl`. A bad flag or file exits with status 1
and a message naming it; so does a run whose judge (when asked for) scored no story or was stopped after repeated
failures (every other result is written first).
"""

from __future__ import annotations

from typing import Any

from policy_split_trl.eval.checks import EvalConfigError
from policy_split_trl.eval.files import DamagedFileError
from policy_split_trl.eval.harness import EvalConfig, evaluate_modes
from policy_split_trl.eval.parser import EvalParser
from policy_split_trl.eval.report import results_markdown


def make_parser() -> EvalParser:
    return EvalParser(prog="policy-split-eval", description=__doc__)


def main(config: EvalConfig) -> dict[str, Any]:
    """Evaluate `config`, print its tables; returns the results (also written to `config.output_dir`)."""
    results = evaluate_modes(config)
    print(results_markdown(results))
    print(f"Results: {config.output_dir}/results.json, results.md, generations.jsonl")
    return results


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `argv` (default: the command line) and evaluate; returns the results."""
    return main(make_parser().parse(argv))


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
