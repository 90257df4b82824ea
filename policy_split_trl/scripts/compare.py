"""Compare methods the way the paper's Table 1 does (`policy-split-compare`): train each method with the same recipe and
budget, evaluate every trained model with the dual-mode harness, and write one table, one JSON and one plot.

    policy-split-compare --config recipes/compare/quickstart.yaml
    policy-split-compare --config recipes/compare/paper_qwen3_1.7b.yaml --dry_run
    policy-split-compare --config recipes/compare/quickstart.yaml --methods grpo policy_split --output_dir outputs/cmp

The config's keys are the fields of `policy_split_trl.comparison.CompareConfig` (see `--help`; a flag overrides the
file): `train_config` (the base recipe, relative to the file), `methods`, `train_overrides` (flags added to every
training: one budget for all), `seed`, `output_dir`, `launcher` and `evaluation` (EvalConfig fields). Each method
trains in its own process into `<output_dir>/<method>/model`, then is evaluated with `policy-split-eval --config
<output_dir>/<method>/eval_config.yaml` into `<method>/eval`; `comparison.md`, `.json` and `.png` are rewritten after
every method. A rerun skips finished trainings and evaluations and resumes an unfinished evaluation.
"""

from __future__ import annotations

from typing import Any

from policy_split_trl.comparison import CompareConfig, CompareConfigError, CompareParser, MethodFailedError, compare
from policy_split_trl.eval.checks import EvalConfigError
from policy_split_trl.eval.files import DamagedFileError


def make_parser() -> CompareParser:
    return CompareParser(prog="policy-split-compare", description=__doc__)


def main(config: CompareConfig) -> dict[str, Any]:
    """Run the comparison (or its dry run); returns `comparison.json`'s content (or the dry run's commands)."""
    return compare(config)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `argv` (default: the command line) and run."""
    return main(make_parser().parse(argv))


def cli() -> None:
    """Console entry point `policy-split-compare`: a config, state-file or method failure exits with its message."""
    try:
        run()
    except (CompareConfigError, MethodFailedError, DamagedFileError, EvalConfigError) as error:
        raise SystemExit(f"policy-split-compare: {error}") from None


if __name__ == "__main__":
    cli()
