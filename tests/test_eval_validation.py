"""Bad input to the evaluation: every `EvalConfig` / `SamplingConfig` field, every CLI flag and every file it reads is
refused early (before the model loads) with a message naming the field or file and the fix."""

import dataclasses
import json
import math
import os
import sys

import pytest

from policy_split_trl.eval.backends import SamplingConfig
from policy_split_trl.eval.checks import EvalConfigError
from policy_split_trl.eval.harness import EvalConfig, evaluate_modes
from policy_split_trl.eval.parser import EvalParser
from policy_split_trl.scripts import evaluate as evaluate_script
from policy_split_trl.scripts.evaluate import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATH500 = os.path.join(ROOT, "tests", "data", "math500.jsonl")
NO_MODEL = "/nonexistent/model"  # every check below must fail before a model is needed


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", math.nan, r"sampling.temperature must be a finite number, got nan"),
        ("temperature", math.inf, r"sampling.temperature must be a finite number, got inf"),
        ("temperature", 0.0, r"sampling.temperature must be in \(0.0, inf\), got 0.0"),
        ("temperature", "6e-1", r"sampling.temperature must be a finite number, got '6e-1'"),  # PyYAML's reading
        ("temperature", True, r"sampling.temperature must be a finite number, got True"),
        ("top_p", math.nan, r"sampling.top_p must be a finite number"),
        ("top_p", 1.5, r"sampling.top_p must be in \(0.0, 1.0\], got 1.5"),
        ("top_p", 0, r"sampling.top_p must be in \(0.0, 1.0\]"),
        ("top_k", -1, r"sampling.top_k must be an integer >= 0, got -1"),
        ("top_k", 20.5, r"sampling.top_k must be an integer >= 0, got 20.5"),
        ("max_new_tokens", math.inf, r"sampling.max_new_tokens must be an integer >= 1, got inf"),
        ("max_new_tokens", 0, r"sampling.max_new_tokens must be an integer >= 1"),
        ("max_new_tokens", "256", r"sampling.max_new_tokens must be an integer >= 1, got '256'"),
    ],
)
def test_sampling_config_refuses_bad_values(field, value, message):
    with pytest.raises(EvalConfigError, match=message):
        SamplingConfig(**{field: value})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model", "", r"model must be a non-empty string"),
        ("adapter", " ", r"adapter must be a non-empty string or None"),
        ("output_dir", 3, r"output_dir must be a folder path"),
        ("benchmarks", "math500", r"benchmarks must be a non-empty list of names, got 'math500'"),
        ("benchmarks", [], r"benchmarks must be a non-empty list"),
        ("benchmarks", ["math-500"], r"Unknown benchmark\(s\) \['math-500'\]"),
        ("sources", {"math-500": MATH500}, r"sources names \['math-500'\], which is not among \["),
        ("sources", {"math500": 3}, r"sources\['math500'\] must be a non-empty string"),
        ("sources", ["math500"], r"sources must be a mapping"),
        ("limit", -1, r"limit must be an integer >= 0 or None, got -1"),
        ("limit", "5", r"limit must be an integer >= 0 or None, got '5'"),
        ("limit", True, r"limit must be an integer >= 0 or None, got True"),
        ("limits", {"math500": 2.5}, r"limits\['math500'\] must be an integer >= 0, got 2.5"),
        ("limits", {"gsm-8k": 2}, r"limits names \['gsm-8k'\]"),
        ("modes", "normal", r"modes must be a non-empty list of names, got 'normal'"),
        ("modes", ["nrmal"], r"Unknown mode\(s\) \['nrmal'\]"),
        ("mode_prompts", {"mine": ""}, r"mode_prompts\['mine'\] must be a non-empty string"),
        ("mode_prompts", {"mine": None}, r"mode_prompts\['mine'\] must be a non-empty string"),
        ("k", 0, r"k must be an integer >= 1, got 0"),
        ("k", 2.0, r"k must be an integer >= 1, got 2.0"),
        ("sampling", {"temperature": 0.6}, r"sampling must be a SamplingConfig"),
        ("entropy_temperature", "T=1", r"entropy_temperature must be one of \('sampling', 'raw'\)"),
        ("batch_size", 0, r"batch_size must be an integer >= 1, got 0"),
        ("backend", "cuda", r"backend must be one of \('auto', 'transformers', 'vllm'\), got 'cuda'"),
        ("chat_template_kwargs", '{"enable_thinking": true}', r"chat_template_kwargs must be a mapping"),
        ("seed", 1.5, r"seed must be an integer, got 1.5"),
        ("compute_kl", "false", r"compute_kl must be true or false, got 'false'"),
        ("progress", 0, r"progress must be true or false, got 0"),
        ("judge", {"model": "m"}, r"judge is set but benchmarks \['math500'\] has no creative_writing"),
        ("judge", {"base_url": "http://x", "modle": "m"}, r"judge names \['modle'\]"),
        ("judge", {"local_model": "x", "model": "m"}, r"either local_model or base_url/model, not both"),
        ("judge", {"local_model": ""}, r"judge.local_model must be a non-empty string"),
    ],
)
def test_eval_config_refuses_bad_fields(field, value, message):
    with pytest.raises(EvalConfigError, match=message):
        EvalConfig(**{"model": NO_MODEL, "output_dir": "out", field: value})


@pytest.fixture
def files(tmp_path):
    """Bad benchmark and prompt files, and a good copy of the first MATH-500 lines."""
    with open(MATH500) as f:
        lines = f.readlines()[:3]
    paths = {
        "good": tmp_path / "good.jsonl",
        "empty": tmp_path / "empty.jsonl",
        "blank": tmp_path / "blank.txt",
        "truncated": tmp_path / "truncated.jsonl",
        "corrupt_middle": tmp_path / "corrupt_middle.jsonl",
        "no_columns": tmp_path / "no_columns.csv",
        "folder": tmp_path / "folder.jsonl",
        "latin1": tmp_path / "l1.txt",
        "prompt": tmp_path / "prompt.txt",
    }
    paths["good"].write_text("".join(lines))
    paths["empty"].write_text("")
    paths["blank"].write_text("  \n\n")
    paths["truncated"].write_text("".join(lines)[:-40])  # a download or copy cut short
    paths["corrupt_middle"].write_text(lines[0] + '{"problem": "1+1", "answer":\n' + lines[1])
    paths["no_columns"].write_text("question,target\nwhat,1\n")
    paths["folder"].mkdir()
    paths["latin1"].write_bytes("Réponds en français.".encode("latin-1"))
    paths["prompt"].write_text("Answer in one word.\n")
    return {name: str(path) for name, path in paths.items()}


def cli_args(out, *extra):
    return [
        "--model",
        NO_MODEL,
        "--benchmarks",
        "math500",
        "--limit",
        "2",
        "--k",
        "1",
        "--backend",
        "transformers",
        "--output_dir",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        # --source: missing, empty, a folder, cut short, damaged in the middle, without the benchmark's columns
        (["--source", "math500={missing}"], r"sources\['math500'\]: no such file '.*missing.jsonl' \(looked for "),
        (["--source", "math500={empty}"], r"sources\['math500'\]: .*empty.jsonl is empty"),
        (["--source", "math500={folder}"], r"sources\['math500'\]: .*folder.jsonl is a folder"),
        (
            ["--source", "math500={truncated}"],
            r"math500: cannot read its source file: .*truncated.jsonl as jsonl: line 3: ",
        ),
        (
            ["--source", "math500={corrupt_middle}"],
            r"corrupt_middle.jsonl as jsonl: line 2: .*each line must be one JSON object",
        ),
        (["--source", "math500={no_columns}"], r"math500: cannot read its source file: .*no_columns.csv.*columns"),
        (["--source", "math-500={good}"], r"sources names \['math-500'\]"),
        (["--source", "math500={good}", "--source", "math500={empty}"], r"--source gives 'math500' twice"),
        (["--source", "math500"], r"--source takes NAME=VALUE, got 'math500'"),
        # --mode_prompt_file: missing, empty, a folder, not UTF-8
        (
            ["--mode_prompt_file", "mine={missing}", "--modes", "mine"],
            r"mine=.*missing.jsonl: the file does not exist",
        ),
        (["--mode_prompt_file", "mine={blank}", "--modes", "mine"], r"mine=.*blank.txt: the file is empty"),
        (["--mode_prompt_file", "mine={folder}", "--modes", "mine"], r"mine=.*folder.jsonl: the file is a folder"),
        (["--mode_prompt_file", "mine={latin1}", "--modes", "mine"], r"mine=.*l1.txt: not UTF-8 text"),
        (["--mode_prompt_file", "mine={prompt}", "--mode_prompt", "mine=x"], r"'mine' is given by both"),
        # other flags
        (["--limit_for", "math500=ten"], r"--limit_for math500=ten: the limit must be an integer"),
        (["--temperature", "nan"], r"sampling.temperature must be a finite number, got nan"),
        (["--top_p", "inf"], r"sampling.top_p must be a finite number, got inf"),
        (["--k", "0"], r"k must be an integer >= 1"),
        (["--judge_model", "m"], r"judge is set but benchmarks \['math500'\] has no creative_writing"),
    ],
)
def test_cli_refuses_bad_flags_and_files_before_loading_the_model(files, tmp_path, flags, message):
    flags = [flag.format(missing=str(tmp_path / "missing.jsonl"), **files) for flag in flags]
    out = tmp_path / "out"
    with pytest.raises(EvalConfigError, match=message):
        run(cli_args(out, *flags))
    assert not out.exists()  # nothing written


def test_cli_exits_with_the_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["policy-split-eval", *cli_args(tmp_path / "o", "--temperature", "nan")])
    with pytest.raises(SystemExit) as exit_:
        evaluate_script.cli()
    assert exit_.value.code == "policy-split-eval: sampling.temperature must be a finite number, got nan."
    monkeypatch.setattr(sys, "argv", ["policy-split-eval", *cli_args(tmp_path / "o", "--chat_template_kwargs", "[1]")])
    with pytest.raises(SystemExit) as exit_:
        evaluate_script.cli()
    assert exit_.value.code == 2 and "--chat_template_kwargs: must be a JSON object" in capsys.readouterr().err


def test_relative_paths_are_relative_to_the_working_directory(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = EvalConfig(model=NO_MODEL, output_dir="out", sources={"math500": "good.jsonl"})
    assert config.sources == {"math500": "good.jsonl"}
    with pytest.raises(
        EvalConfigError,
        match=rf"looked for {tmp_path}/data/good.jsonl: a relative path is relative "
        rf"to the working directory, {tmp_path}\)",
    ):
        EvalConfig(model=NO_MODEL, output_dir="out", sources={"math500": "data/good.jsonl"})
    with pytest.raises(EvalConfigError, match=rf"looked for {tmp_path}/prompts/he.txt; a relative path"):
        run(cli_args("out", "--mode_prompt_file", "he=prompts/he.txt"))


@pytest.mark.parametrize("where", ["output_dir_is_a_file", "empty_output_dir", "judge_without_model"])
def test_evaluate_modes_refuses_bad_output_and_judge_settings(tmp_path, monkeypatch, where):
    for name in ("POLICY_SPLIT_JUDGE_MODEL", "POLICY_SPLIT_JUDGE_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "file").write_text("x")
    settings = {
        "output_dir_is_a_file": ({"output_dir": str(tmp_path / "file")}, r"output_dir .*file' is a file"),
        "empty_output_dir": ({"output_dir": ""}, r"output_dir is empty"),
        "judge_without_model": (
            {"output_dir": str(tmp_path / "j"), "benchmarks": ["creative_writing"], "judge": {"base_url": "http://x"}},
            r"judge: No judge model: pass `model=` or set the POLICY_SPLIT_JUDGE_MODEL",
        ),
    }
    fields, message = settings[where]
    with pytest.raises(EvalConfigError, match=message):
        evaluate_modes(EvalConfig(model=NO_MODEL, **fields))


def test_problem_ids_must_be_unique(tmp_path):
    rows = [{"question": "1 + 1", "answer": 2, "id": "a"}, {"question": "2 + 2", "answer": 4, "id": "a"}]
    source = tmp_path / "dup.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(EvalConfigError, match=r"arithmetic: problem ids \['a'\] repeat in .*dup.jsonl"):
        evaluate_modes(
            EvalConfig(
                model=NO_MODEL,
                output_dir=str(tmp_path / "o"),
                benchmarks=["arithmetic"],
                sources={"arithmetic": str(source)},
            )
        )


def test_a_yaml_config_and_flags_give_the_same_config_as_python(files, tmp_path):
    """`policy-split-eval --config eval.yaml` (TrlParser): the file's fields, `sampling` nested, flags override them
    and add to its mappings; the result is the `EvalConfig` built in Python."""
    path = tmp_path / "eval.yaml"
    path.write_text(
        f"model: {NO_MODEL}\noutput_dir: out\nbenchmarks: [math500, creative_writing]\n"
        f"sources: {{math500: {files['good']}}}\nlimits: {{creative_writing: 2}}\nk: 2\n"
        "sampling: {temperature: 1.0e-5, top_k: 0}\nchat_template_kwargs: {enable_thinking: true}\n"
        "judge: {base_url: 'http://judge', model: a}\n"
    )
    config = EvalParser().parse(
        ["--config", str(path), "--top_p", "0.5", "--limit_for", "math500=3", "--judge_model", "b", "--no_kl"]
    )
    assert config == EvalConfig(
        model=NO_MODEL,
        output_dir="out",
        benchmarks=["math500", "creative_writing"],
        sources={"math500": files["good"]},
        limits={"creative_writing": 2, "math500": 3},
        k=2,
        sampling=SamplingConfig(1e-5, 0.5, 0, 32768),
        chat_template_kwargs={"enable_thinking": True},
        judge={"base_url": "http://judge", "model": "b"},
        compute_kl=False,
    )
    assert EvalConfig.from_settings(json.loads(json.dumps(dataclasses.asdict(config)))) == config
    assert EvalParser().parse(["--config", str(path), "--sampling", "top_k=5"]).sampling.top_k == 5


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "model: m\noutput_dir: o\ntemprature: 0.6\n",
            r"Unknown key\(s\) \['temprature'\] in .*eval.yaml; valid keys",
        ),
        ("model: m\noutput_dir: o\nsampling: {temp: 1}\n", r"eval.yaml: sampling names \['temp'\]"),
        ("model: m\noutput_dir: o\nsampling: {top_k: 1}\ntop_k: 2\n", r"\['top_k'\] set both under sampling and as"),
        ("- model\n", r"eval.yaml must contain a YAML mapping"),
        ("model: [unclosed\n", r"eval.yaml is not valid YAML: (?s:.*)line 1"),
        ("model: m\noutput_dir: o\nk: 0\n", r"k must be an integer >= 1, got 0"),
    ],
)
def test_a_bad_yaml_config_names_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "eval.yaml"
    path.write_text(text)
    with pytest.raises(EvalConfigError, match=message):
        EvalParser().parse(["--config", str(path)])
    with pytest.raises(EvalConfigError, match=r"Cannot read the config file '.*missing.yaml'"):
        EvalParser().parse(["--config", str(tmp_path / "missing.yaml")])
