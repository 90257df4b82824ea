"""Running a comparison: plan every method (parse its training arguments, lay out its files), train each in its own
process (the launcher), evaluate each trained model in its own process (`policy-split-eval --config`, so that every
vLLM engine frees its GPU memory), and write the table after every method ([`~policy_split_trl.comparison.table`]).

Each method trains into `<output_dir>/<method>/model`, its output going to the console and to `<method>/train.log`;
`<method>/train_done.json` (wall time, steps, settings) marks it finished. Its model is then evaluated into
`<method>/eval` (`normal` and `high_entropy` modes for the methods trained with the high-entropy prompt, `normal`
otherwise) with the settings in `<method>/eval_config.yaml`. A rerun skips finished trainings and evaluations and
resumes an unfinished evaluation through the harness's `generations.jsonl`, so an interrupted comparison continues
where it stopped. Every file the driver writes is replaced in one step (a crash leaves the old or the new version), and
a damaged one is an error naming it and the fix (a damaged `results.json` is only recomputed from the samples).
"""

from __future__ import annotations

import codecs
import dataclasses
import datetime
import difflib
import glob
import hashlib
import os
import shlex
import subprocess
import sys
import time
import warnings
from typing import Any

import yaml

from policy_split_trl.eval.files import DamagedFileError, atomic_write_json, atomic_write_text, read_json_file
from policy_split_trl.eval.harness import EvalConfig
from policy_split_trl.hub import POLICY_SPLIT_FILE, load_policy_split_config, mode_prompts
from policy_split_trl.methods import apply_method, method_settings
from policy_split_trl.training import explicit_arguments, make_parser

from .config import ORIGINAL, CompareConfig, CompareConfigError, MethodRun, override_flags
from .table import budget_line, comparison_markdown, json_safe, write_comparison

# Evaluation settings that change what is sampled: a resumed evaluation must keep them (the harness reuses every
# sample already in generations.jsonl).
SAMPLE_FIELDS = ("k", "sampling", "seed", "entropy_temperature", "chat_template_kwargs", "mode_prompts")
# The request of the training in progress: checkpoints are resumed only by the same request.
TRAIN_REQUEST_FILE = "train_request.json"
# The settings of a method's evaluation: what `policy-split-eval --config` runs, and what a resume is checked against.
EVAL_CONFIG_FILE = "eval_config.yaml"


class MethodFailedError(RuntimeError):
    """A method's training or evaluation process failed; the message names the method and its log file."""


# ---------------------------------------------------------------- training commands


def resolve_launcher(launcher: list[str]) -> list[str]:
    """`python` -> this interpreter; a bare program next to it (a virtual environment's `accelerate`) -> its path."""
    first, rest = launcher[0], list(launcher[1:])
    if first in ("python", "python3"):
        return [sys.executable, *rest]
    beside = os.path.join(os.path.dirname(sys.executable), first)
    if os.sep not in first and os.path.isfile(beside) and os.access(beside, os.X_OK):
        return [beside, *rest]
    return [first, *rest]


def train_arguments(config: CompareConfig, method: str) -> list[str]:
    """The training script's arguments for `method` (what follows the launcher)."""
    seed = ["--seed", str(config.seed)] if config.seed is not None else []
    return [
        "--config",
        config.train_config,
        "--method",
        method,
        *seed,
        "--output_dir",
        os.path.join(config.method_dir(method), "model"),
        *override_flags(config.train_overrides),
    ]


def training_command(config: CompareConfig, method: str) -> list[str]:
    """The full command that trains `method`: launcher + [`train_arguments`]."""
    return [*resolve_launcher(config.launcher), *train_arguments(config, method)]


def training_flags(parser: Any) -> set[str]:
    """The flags of a `TrlParser` (without `--`): its dataclasses' fields, their aliases and `no_` complements."""
    names = set()
    for dtype in parser.dataclass_types:
        for f in dataclasses.fields(dtype):
            if f.init:
                aliases = f.metadata.get("aliases", [])
                names |= {f.name, f.name.replace("_", "-"), *(a.lstrip("-") for a in aliases)}
                if f.default is True:  # HfArgumentParser's `--no_<name>` for a flag that defaults to true
                    names.add(f"no_{f.name}")
    return names


def parse_training(config: CompareConfig, method: str) -> tuple[Any, Any, Any]:
    """
    Parse `method`'s training arguments in this process, as `policy-split-train` will, with the method applied.

    Nothing is loaded: this checks every flag before any training starts, and gives the budget and method settings
    for the records. `use_cpu` is forced so that this process never takes a GPU (a bf16 recipe still parses).

    Returns:
        `(script_args, training_args, model_args)`.
    """
    parser = make_parser("policy-split-train")
    # Exact names only: argparse would take `max_step` for `--max_steps` (a prefix) and let the recipe's value win.
    known = training_flags(parser)
    unknown = [key for key in config.train_overrides if key not in known]
    if unknown:
        hints = {key: difflib.get_close_matches(key, known, n=1) for key in unknown}
        hint = "; ".join(f"{key}: did you mean {match[0]}?" for key, match in hints.items() if match)
        raise CompareConfigError(
            f"Unknown training flag(s) {unknown} in train_overrides (flags of policy-split-train)"
            + (f"; {hint}" if hint else ".")
        )
    argv = [*train_arguments(config, method), "--use_cpu", "true"]
    try:
        with warnings.catch_warnings():  # deprecation notices are the training process's to show, once per method
            warnings.simplefilter("ignore", FutureWarning)
            parsed = parser.parse_args_and_config(args=argv)
        script_args, training_args, model_args = parsed
        # What the training process will decide from the same arguments (the command line's --method wins over the
        # base recipe's settings, with a warning; train_overrides count as flags and may contradict the method).
        apply_method(method, training_args, explicit_arguments(train_arguments(config, method)))
    except SystemExit:  # argparse has printed why
        raise CompareConfigError(
            f"{method}: the training arguments do not parse (see the message above): {shlex.join(argv)}"
        ) from None
    except ValueError as error:
        raise CompareConfigError(f"{method}: {error}") from None
    return script_args, training_args, model_args


def training_budget(script_args: Any, training_args: Any, model_args: Any) -> dict[str, Any]:
    """What must be equal across methods for a fair comparison."""
    budget = {
        "model": model_args.model_name_or_path,
        "dataset": script_args.dataset_name,
        "max_steps": training_args.max_steps,
        "num_generations": training_args.num_generations,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "max_completion_length": training_args.max_completion_length,
        "learning_rate": training_args.learning_rate,
        "seed": training_args.seed,
    }
    if training_args.max_steps <= 0:  # an epoch budget instead
        budget["num_train_epochs"] = training_args.num_train_epochs
        budget["max_train_samples"] = script_args.max_train_samples
    return budget


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def training_request(config: CompareConfig, method: str) -> dict[str, Any]:
    """What a finished training was asked for; a rerun with another request must not reuse the model silently."""
    return {
        "method": method,
        "train_config_sha256": _sha256(config.train_config),
        "seed": config.seed,
        "train_overrides": override_flags(config.train_overrides),
    }


def trained_steps(model_dir: str, max_steps: int) -> int | None:
    """
    Optimizer steps of a finished training: the last checkpoint's trainer state is exact (the Trainer saves one at the
    end of a `save_strategy: steps` run); without checkpoints, `max_steps` is what the Trainer ran to. `None` (shown
    as "–") when unknown: an epoch budget without checkpoints, or a checkpoint whose `trainer_state.json` is
    damaged (the highest readable one could be below the truth).
    """
    steps = []
    for path in glob.glob(os.path.join(model_dir, "checkpoint-*", "trainer_state.json")):
        unknown = "the number of training steps is recorded as unknown"
        try:
            state = read_json_file(path, "a checkpoint's trainer state", unknown)
        except DamagedFileError as error:
            print(f"WARNING: {error}", flush=True)
            return None
        step = state.get("global_step")
        if isinstance(step, bool) or not isinstance(step, int):
            print(f"WARNING: {path} has no integer global_step: {unknown}.", flush=True)
            return None
        steps.append(step)
    if steps:
        return max(steps)
    return max_steps if max_steps > 0 else None


def _latest_checkpoint(model_dir: str) -> str | None:
    checkpoints = [p for p in glob.glob(os.path.join(model_dir, "checkpoint-*")) if p.rsplit("-", 1)[1].isdigit()]
    return max(checkpoints, key=lambda p: int(p.rsplit("-", 1)[1])) if checkpoints else None


# ---------------------------------------------------------------- running processes


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def stream_process(command: list[str], log_path: str) -> int:
    """
    Run `command`, copying its output (stdout and stderr) to the console and appending it to `log_path`.

    Returns:
        `int`: its exit status.
    """
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # live progress in the console and the log
    with open(log_path, "ab") as log:
        log.write(
            f"\n===== {datetime.datetime.now().isoformat(timespec='seconds')}\n$ {shlex.join(command)}\n".encode()
        )
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            # read1: whatever is there, so that progress bars (which end lines with \r) show as they move
            while chunk := process.stdout.read1(65536):
                log.write(chunk)
                log.flush()
                sys.stdout.write(decoder.decode(chunk))
                sys.stdout.flush()
            return process.wait()
        finally:
            if process.poll() is None:  # interrupted (Ctrl-C reaches the child too): do not leave it running
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


# ---------------------------------------------------------------- one method


def plan(config: CompareConfig) -> list[MethodRun]:
    """Parse every method's training arguments (no training) and lay out its files."""
    runs = []
    for index, method in enumerate(config.methods, start=1):
        # The original model is the recipe's base model: its settings are parsed as for GRPO, and nothing is trained.
        script_args, training_args, model_args = parse_training(config, "grpo" if method == ORIGINAL else method)
        runs.append(
            MethodRun(
                name=method,
                index=index,
                dir=config.method_dir(method),
                command=[] if method == ORIGINAL else training_command(config, method),
                request=training_request(config, method),
                budget=training_budget(script_args, training_args, model_args),
                settings={} if method == ORIGINAL else method_settings(method, training_args),
                base_model=model_args.model_name_or_path,
                chat_template_kwargs=training_args.chat_template_kwargs,
            )
        )
    return runs


def _read_state(path: str, what: str, fix: str) -> dict[str, Any] | None:
    """A state file of the comparison (`None` if absent); a damaged one raises [`CompareConfigError`] naming `fix`."""
    try:
        return read_json_file(path, what, fix)
    except DamagedFileError as error:
        raise CompareConfigError(str(error)) from None


def _read_eval_settings(path: str, fix: str) -> dict[str, Any] | None:
    """`eval_config.yaml` of a method's last evaluation (`None` if absent); a damaged one raises
    [`CompareConfigError`] naming `fix`."""
    if not os.path.exists(path):
        return None
    what = f"{path} (the settings of the last evaluation)"
    try:
        with open(path, encoding="utf-8") as f:
            settings = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise CompareConfigError(f"{what} is not valid YAML ({' '.join(str(error).split())}): {fix}.") from None
    if not isinstance(settings, dict):
        raise CompareConfigError(f"{what} is not a YAML mapping of evaluation settings: {fix}.")
    return settings


def _read_results(path: str) -> dict[str, Any] | None:
    """
    An evaluation's `results.json`, or `None` when it is absent or unusable (damaged, or without the fields the
    comparison reads): it is computed from `generations.jsonl`, so the evaluation is simply run again (resuming: no
    sample is drawn again).
    """
    try:
        results = read_json_file(path, "an evaluation's results", "it is computed again from generations.jsonl")
    except DamagedFileError as error:
        print(f"WARNING: {error}", flush=True)
        return None
    if results is not None and not all(isinstance(results.get(key), dict) for key in ("config", "per_benchmark")):
        print(f"WARNING: {path} lacks config/per_benchmark; it is computed again from generations.jsonl.", flush=True)
        return None
    return results


def train_method(run: MethodRun, total: int, started: float) -> dict[str, Any]:
    """Train `run` unless its `train_done.json` says it is done; returns that record."""
    if run.name == ORIGINAL:
        return {"method": ORIGINAL, "label": run.spec.label, "wall_time_s": None, "steps": 0}
    done = _read_state(
        run.done_path, "the record of a finished training", f"delete it to train {run.name} again (into {run.dir})"
    )
    if done is not None and not all(key in done for key in ("request", "wall_time_s", "steps")):
        raise CompareConfigError(
            f"{run.done_path} (the record of a finished training) lacks request/wall_time_s/steps: delete it to train "
            f"{run.name} again."
        )
    prefix = f"[{run.index}/{total}] {run.name}"
    if done is None and os.path.isfile(os.path.join(run.eval_dir, "generations.jsonl")):
        raise CompareConfigError(
            f"{run.name}: {run.eval_dir} holds an evaluation, but {run.done_path} is missing, so the model it "
            f"evaluated is not known to be the one about to be trained; delete {run.eval_dir} to train and evaluate "
            "again."
        )
    if done is not None:
        if done.get("request") != json_safe(run.request):
            raise CompareConfigError(
                f"{run.name}: {run.done_path} records a training with other settings ({done.get('request')} vs now "
                f"{json_safe(run.request)}); delete {run.dir} to retrain it, or restore the comparison config."
            )
        wall = f"{done['wall_time_s']:.0f} s" if isinstance(done["wall_time_s"], (int, float)) else "?"
        print(f"{prefix}: already trained ({wall}, {done['steps']} steps), not retrained.", flush=True)
        return done
    command, resumed = list(run.command), None
    request_path = os.path.join(run.dir, TRAIN_REQUEST_FILE)
    checkpoint = _latest_checkpoint(run.model_dir)
    if checkpoint and "--resume_from_checkpoint" not in command:
        fix = f"delete {run.model_dir} to train from scratch"
        if _read_state(request_path, "the settings of the interrupted training", fix) != json_safe(run.request):
            raise CompareConfigError(
                f"{run.name}: {checkpoint} comes from a training with other settings (see {request_path}); delete "
                f"{run.model_dir} to train from scratch, or restore the comparison config."
            )
        command += ["--resume_from_checkpoint", checkpoint]  # an interrupted run with checkpoints goes on from there
        resumed = checkpoint
    atomic_write_json(request_path, json_safe(run.request))
    print(
        f"{prefix} ({run.spec.label}): training [elapsed {_hms(time.monotonic() - started)}]"
        + (f", resuming from {checkpoint}" if resumed else "")
        + f"\n$ {shlex.join(command)}",
        flush=True,
    )
    start = time.monotonic()
    status = stream_process(command, run.train_log)
    wall = time.monotonic() - start
    if status != 0:
        raise MethodFailedError(
            f"Training {run.name} ({run.spec.label}) failed with exit status {status} after {wall:.0f} s; see "
            f"{run.train_log}."
        )
    record = {
        "method": run.name,
        "label": run.spec.label,
        "wall_time_s": round(wall, 2),
        "steps": trained_steps(run.model_dir, run.budget["max_steps"]),
        "resumed_from_checkpoint": resumed,  # then the wall time covers only the last attempt
        "settings": run.settings,
        "budget": run.budget,
        "command": command,
        "request": run.request,
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    record = json_safe(record)
    atomic_write_json(run.done_path, record)  # the mark of a finished training: complete, or not there
    print(f"{prefix}: trained {record['steps']} steps in {wall:.0f} s -> {run.model_dir}", flush=True)
    return record


def method_eval_config(config: CompareConfig, run: MethodRun) -> EvalConfig:
    """The harness config of one trained model: its modes, its stored high-entropy prompt, adapter or full model."""
    kwargs: dict[str, Any] = {}
    if run.name == ORIGINAL:
        model = run.base_model
    elif os.path.isfile(os.path.join(run.model_dir, "adapter_config.json")):  # LoRA: the adapter on its base model
        model, kwargs["adapter"] = run.base_model, run.model_dir
    else:
        model = run.model_dir
    if run.spec.dual_mode and os.path.isfile(os.path.join(run.model_dir, POLICY_SPLIT_FILE)):
        # The prompt the model was trained with (a recipe may replace the paper's).
        prompts = mode_prompts(load_policy_split_config(run.model_dir))
        kwargs["mode_prompts"] = {mode: prompts[mode] for mode in run.modes if prompts.get(mode)}
    if "chat_template_kwargs" not in config.evaluation and run.chat_template_kwargs:
        kwargs["chat_template_kwargs"] = dict(run.chat_template_kwargs)  # evaluate in the chat format trained in
    return config.eval_config(model=model, output_dir=run.eval_dir, modes=run.modes, **kwargs)


def evaluate_method(config: CompareConfig, run: MethodRun, total: int, started: float) -> dict[str, Any]:
    """Evaluate `run`'s model (in a subprocess) unless its results are up to date; returns its `results.json`."""
    prefix = f"[{run.index}/{total}] {run.name}"
    eval_config = json_safe(dataclasses.asdict(method_eval_config(config, run)))
    results = _read_results(os.path.join(run.eval_dir, "results.json"))
    judge_error = ((results or {}).get("judge_status") or {}).get("error")  # a judge to ask again
    if (
        results is not None
        and not judge_error
        and {k: v for k, v in results["config"].items() if k != "backend_used"} == eval_config
    ):
        print(f"{prefix}: evaluation up to date ({run.eval_dir}).", flush=True)
        return results
    request_path = os.path.join(run.dir, EVAL_CONFIG_FILE)
    previous = _read_eval_settings(request_path, f"delete it (the harness still checks {run.eval_dir})")
    if previous is not None and os.path.isfile(os.path.join(run.eval_dir, "generations.jsonl")):
        changed = [name for name in SAMPLE_FIELDS if previous.get(name) != eval_config.get(name)]
        if changed:
            raise CompareConfigError(
                f"{run.name}: evaluation settings {changed} differ from those of the samples already in "
                f"{run.eval_dir}/generations.jsonl, which a resumed evaluation would reuse; delete {run.eval_dir} "
                "to evaluate again, or restore them."
            )
    # YAML (what `policy-split-eval --config` reads; JSON through PyYAML would turn `1e-05` into a string). Writing it
    # makes run.dir: the original model has no training to have made it.
    atomic_write_text(request_path, yaml.safe_dump(eval_config, sort_keys=False, allow_unicode=True))
    command = [sys.executable, "-m", "policy_split_trl.scripts.evaluate", "--config", request_path]
    print(
        f"{prefix}: evaluating modes {run.modes} on {eval_config['benchmarks']} -> {run.eval_dir} "
        f"[elapsed {_hms(time.monotonic() - started)}]",
        flush=True,
    )
    status = stream_process(command, run.eval_log)
    if status != 0:
        raise MethodFailedError(
            f"Evaluating {run.name} ({run.spec.label}) failed with exit status {status}; see {run.eval_log}."
        )
    results = _read_results(os.path.join(run.eval_dir, "results.json"))
    if results is None:
        raise MethodFailedError(
            f"Evaluating {run.name} wrote no usable {run.eval_dir}/results.json; see {run.eval_log}."
        )
    return results


# ---------------------------------------------------------------- driver


def compare(config: CompareConfig) -> dict[str, Any]:
    """
    Train and evaluate every method of `config` (resuming what is done), then write the comparison; with
    `config.dry_run`, only check the config, and print the commands and where their outputs would go.

    Returns:
        `dict`: the content of `comparison.json`; with `dry_run`, `{"commands": {method: command}}`.
    """
    runs = plan(config)
    total = len(runs)
    if config.dry_run:
        evaluation = config.eval_config(model="<model>", output_dir="<eval>", modes=["normal"])
        print(f"policy-split-compare dry run: {total} method(s), nothing trained\n{budget_line(runs[0].budget)}")
        print(
            f"Evaluation: {evaluation.benchmarks}, limit {evaluation.limit}, k={evaluation.k}, "
            f"{dataclasses.asdict(evaluation.sampling)}, backend {evaluation.backend}"
        )
        for run in runs:
            if run.name == ORIGINAL:
                print(f"[{run.index}/{total}] {run.name}: the base model {run.base_model}, not trained")
            else:
                state = "trained" if os.path.isfile(run.done_path) else "to train"
                print(f"[{run.index}/{total}] {run.name} ({run.spec.label}), {state}:\n  {shlex.join(run.command)}")
            print(f"  then evaluate modes {run.modes} -> {run.eval_dir}")
        print(f"Comparison: {os.path.join(config.output_dir, 'comparison.md')} (.json, .png)")
        return {"commands": {run.name: run.command for run in runs if run.name != ORIGINAL}}

    started = time.monotonic()
    trained: dict[str, dict] = {}
    results: dict[str, dict] = {}
    for run in runs:
        trained[run.name] = train_method(run, total, started)
        results[run.name] = evaluate_method(config, run, total, started)
        summary = write_comparison(config, runs, trained, results)
    print(f"\n{comparison_markdown(summary)}")
    print(
        f"Comparison of {total} method(s) in {_hms(time.monotonic() - started)}: "
        + ", ".join(os.path.join(config.output_dir, f"comparison.{ext}") for ext in ("md", "json", "png"))
    )
    return summary
