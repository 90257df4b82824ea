"""Resuming a dual-mode evaluation from a `generations.jsonl` cut anywhere (what a SIGKILL mid-write leaves) ends with
exactly the records and metrics of an uninterrupted run; a damaged line elsewhere is an error naming file and line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from policy_split_trl.eval.files import atomic_save, atomic_write_json
from policy_split_trl.eval.harness import GENERATIONS_FILE, GenerationsFileError, read_generations
from policy_split_trl.scripts.evaluate import run

# 5 arithmetic problems (batches of 2 problems x k=2: the last batch is short) + 1 story prompt, 2 modes: 24 records.
PROBLEMS, STORIES, K, MODES = 5, 1, 2, 2
RECORDS = (PROBLEMS + STORIES) * K * MODES
# What results.json holds that depends on the samples (not the run's bookkeeping: versions, plots, this run's count).
METRIC_KEYS = ("per_benchmark", "table1", "comparisons", "creative")


def eval_args(model_path, out, *extra):
    return [
        "--model",
        model_path,
        "--benchmarks",
        "arithmetic",
        "creative_writing",
        "--limit",
        str(PROBLEMS),
        "--limit_for",
        f"creative_writing={STORIES}",
        "--k",
        str(K),
        "--max_new_tokens",
        "6",
        "--temperature",
        "1.0",
        "--top_p",
        "1.0",
        "--top_k",
        "0",
        "--batch_size",
        "4",
        "--backend",
        "transformers",
        "--output_dir",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_path, tmp_path_factory):
    """One uninterrupted run: its records (in file order), its results and the raw bytes of its generations."""
    out = tmp_path_factory.mktemp("uninterrupted")
    results = run(eval_args(tiny_model_path, out))
    data = (out / GENERATIONS_FILE).read_bytes()
    records = [json.loads(line) for line in data.splitlines()]
    assert len(records) == RECORDS and data.endswith(b"\n")
    return {"records": records, "results": results, "bytes": data, "dir": out}


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def cut_offsets(data: bytes) -> dict[str, int]:
    middle_newline = data.index(b"\n", len(data) // 2) + 1  # just after a newline: whole lines, a batch cut short
    return {
        "empty": 0,
        "inside_first_record": 17,
        "middle": len(data) // 2,
        "exactly_at_a_newline": middle_newline,
        "one_byte_into_a_record": middle_newline + 1,
        "one_byte_before_the_end": len(data) - 1,  # the last record without its newline
    }


@pytest.mark.parametrize(
    "where",
    [
        "empty",
        "inside_first_record",
        "middle",
        "exactly_at_a_newline",
        "one_byte_into_a_record",
        "one_byte_before_the_end",
    ],
)
def test_resume_after_a_cut_equals_an_uninterrupted_run(uninterrupted, tiny_model_path, tmp_path, where):
    data = uninterrupted["bytes"]
    offset = cut_offsets(data)[where]
    out = tmp_path / "cut"
    out.mkdir()
    for name in os.listdir(uninterrupted["dir"]):  # the settings the samples were drawn with travel with them
        if name != GENERATIONS_FILE and not name.startswith("results") and not name.endswith(".png"):
            shutil.copy(uninterrupted["dir"] / name, out / name)
    (out / GENERATIONS_FILE).write_bytes(data[:offset])

    results = run(eval_args(tiny_model_path, out))
    resumed = (out / GENERATIONS_FILE).read_bytes()
    records = [json.loads(line) for line in resumed.splitlines()]
    assert len(records) == RECORDS
    for i, (got, expected) in enumerate(zip(records, uninterrupted["records"], strict=True)):
        assert got == expected, f"record {i} differs"
    assert resumed == data  # byte for byte: no fragment left, nothing glued onto it
    assert 0 < results["generated_this_run"] <= RECORDS
    saved = json.loads((out / "results.json").read_text())
    for key in METRIC_KEYS:  # as JSON text: NaN (an ungraded benchmark's accuracy) equals NaN there
        assert canonical(results[key]) == canonical(uninterrupted["results"][key]), key
        assert canonical(saved[key]) == canonical(uninterrupted["results"][key]), key
    for modes in saved["per_benchmark"].values():
        assert all(m["samples"] == m["problems"] * K for m in modes.values())

    again = run(eval_args(tiny_model_path, out))  # a further rerun changes nothing
    assert again["generated_this_run"] == 0 and (out / GENERATIONS_FILE).read_bytes() == data


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda lines: lines.__setitem__(3, b'{"benchmark": "arithm\n'), "is not valid JSON"),
        (lambda lines: lines.__setitem__(3, b"\n"), "is empty"),
        (lambda lines: lines.__setitem__(3, b"[1, 2]\n"), "is not a generation record"),
        (
            lambda lines: lines.__setitem__(3, json.dumps({"benchmark": "arithmetic"}).encode() + b"\n"),
            r"lacks \['problem_id', ",
        ),
        (
            lambda lines: lines.__setitem__(3, lines[3].replace(b'"num_tokens": ', b'"num_tokens": -')),
            "num_tokens must be",
        ),
        (lambda lines: lines.insert(4, lines[3]), "more than once"),
        (lambda lines: lines.__delitem__(2), r"has 1 of k=2 samples"),
    ],
    ids=[
        "torn_in_the_middle",
        "empty_line",
        "not_an_object",
        "missing_fields",
        "negative_length",
        "duplicate",
        "missing_sample",
    ],
)
def test_a_damaged_line_before_the_last_is_an_error_naming_file_and_line(
    uninterrupted, tiny_model_path, tmp_path, damage, message
):
    lines = uninterrupted["bytes"].splitlines(keepends=True)
    damage(lines)
    out = tmp_path / "damaged"
    out.mkdir()
    path = out / GENERATIONS_FILE
    path.write_bytes(b"".join(lines))
    before = path.read_bytes()
    with pytest.raises(GenerationsFileError, match=message) as error:
        run(eval_args(tiny_model_path, out))
    assert f"{path} line " in str(error.value)
    assert path.read_bytes() == before  # nothing repaired, appended or overwritten
    assert not (out / "results.json").exists()


def test_read_generations_ignores_only_a_torn_last_line(uninterrupted, tmp_path):
    data = uninterrupted["bytes"]
    path = tmp_path / GENERATIONS_FILE
    path.write_bytes(data[:-5])
    assert read_generations(str(path)) == uninterrupted["records"][:-1]
    path.write_bytes(data.replace(b"\n", b"\n{oops\n", 1))
    with pytest.raises(GenerationsFileError, match=rf"{path} line 2 is not valid JSON"):
        read_generations(str(path))
    assert read_generations(str(tmp_path / "missing.jsonl")) == []


# ------------------------------------------------------------------------------------ killed processes, atomic writes


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(uninterrupted, tiny_model_path, tmp_path):
    """A real `kill -9` of `policy-split-eval` while it appends; the rerun ends with the uninterrupted run's records."""
    exe = os.path.join(os.path.dirname(sys.executable), "policy-split-eval")
    for attempt in range(3):  # the run may finish before the kill lands; then try again
        out = tmp_path / f"killed{attempt}"
        path = out / GENERATIONS_FILE
        proc = subprocess.Popen(
            [exe, *eval_args(tiny_model_path, out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                if path.exists() and path.stat().st_size > 0:  # killed as soon as it has written something
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.001)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if proc.returncode == -signal.SIGKILL:
            break
    assert proc.returncode == -signal.SIGKILL, "the run always finished before it could be killed"
    assert 0 < path.stat().st_size < len(uninterrupted["bytes"])  # killed midway: some, not all, records
    results = run(eval_args(tiny_model_path, out))
    assert path.read_bytes() == uninterrupted["bytes"]
    for key in METRIC_KEYS:
        assert canonical(results[key]) == canonical(uninterrupted["results"][key]), key


def test_atomic_save_keeps_the_old_file_when_the_writer_dies_midway(tmp_path):
    target = tmp_path / "results.json"
    target.write_text('{"version": 1}')

    def dies_midway(temporary):
        with open(temporary, "w") as f:
            f.write('{"version": 2, "half')  # what a process killed mid-write leaves
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        atomic_save(str(target), dies_midway)
    assert target.read_text() == '{"version": 1}' and os.listdir(tmp_path) == ["results.json"]
    atomic_write_json(str(tmp_path / "new" / "state.json"), {"version": 2})  # makes the folder
    assert json.loads((tmp_path / "new" / "state.json").read_text()) == {"version": 2}


WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("files", sys.argv[1])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
version = 0
while True:
    version += 1
    files.atomic_write_json(sys.argv[2], {"version": version, "payload": "x" * 4_000_000})
"""


def test_atomic_write_survives_sigkill_at_any_moment(tmp_path):
    """A process rewriting a 4 MB JSON file in a loop, killed at 6 moments: the file always parses, whole."""
    from policy_split_trl.eval import files

    target = tmp_path / "state.json"
    for delay in (0.05, 0.13, 0.21, 0.34, 0.55, 0.89):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, files.__file__, str(target)])
        try:
            while not target.exists():
                time.sleep(0.001)
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        data = json.loads(target.read_text())  # never cut: the old or the new version
        assert len(data["payload"]) == 4_000_000 and data["version"] >= 1


def test_every_file_an_evaluation_rewrites_goes_through_a_temporary_file(
    uninterrupted, tiny_model_path, tmp_path, monkeypatch
):
    import builtins

    opened = []
    real_open = builtins.open

    def recording_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            opened.append((os.path.abspath(os.fspath(file)), mode))
        return real_open(file, mode, *args, **kwargs)

    out = tmp_path / "recorded"
    shutil.copytree(uninterrupted["dir"], out)
    (out / GENERATIONS_FILE).write_bytes(uninterrupted["bytes"][:-7])  # a cut file: repaired, then appended to
    monkeypatch.setattr(builtins, "open", recording_open)
    run(eval_args(tiny_model_path, out, "--modes", "normal", "high_entropy", "low_entropy"))  # a new mode
    monkeypatch.undo()
    written = [(os.path.basename(path), mode) for path, mode in opened if path.startswith(str(out))]
    direct = [(name, mode) for name, mode in written if ".tmp-" not in name]
    assert sorted(set(direct)) == [(GENERATIONS_FILE, "a"), (GENERATIONS_FILE, "rb+")]  # append, and the repair
    targets = {name.split(".tmp-")[0][1:] for name, _ in written if ".tmp-" in name}
    assert targets == {"results", "entropy_histogram", "accuracy_vs_entropy", "generations_settings"}
    assert not [name for name in os.listdir(out) if ".tmp-" in name]


@pytest.mark.parametrize(
    "target",
    ["results.json", "results.md", "entropy_histogram.png", "accuracy_vs_entropy.png", "generations_settings.json"],
)
def test_a_kill_while_replacing_an_output_leaves_the_old_version(
    uninterrupted, tiny_model_path, tmp_path, monkeypatch, target
):
    out = tmp_path / "replaced"
    shutil.copytree(uninterrupted["dir"], out)
    before = (out / target).read_bytes()
    real_replace = os.replace

    def killed_at_target(src, dst):
        if os.path.basename(dst) == target:
            raise KeyboardInterrupt(f"killed while replacing {target}")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_target)
    args = eval_args(tiny_model_path, out, "--modes", "normal", "high_entropy", "low_entropy")  # new results
    with pytest.raises(KeyboardInterrupt):
        run(args)
    monkeypatch.undo()
    assert (out / target).read_bytes() == before  # complete, the previous version
    assert not [name for name in os.listdir(out) if ".tmp-" in name]
    results = run(args)  # the rerun finishes the job
    assert set(results["per_benchmark"]["arithmetic"]) == {"normal", "high_entropy", "low_entropy"}
    assert (out / target).read_bytes() != before
    saved = json.loads((out / "generations_settings.json").read_text())
    assert set(saved["system_prompts"]) == {"normal", "high_entropy", "low_entropy"}
