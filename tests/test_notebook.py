"""Execute `notebooks/policy_split_qwen3_lora.ipynb` end to end on the tiny Qwen3, offline, on CPU.

Parameters are injected papermill-style: a cell tagged `injected-parameters` is inserted right after the cell tagged
`parameters`, so the notebook's defaults (Qwen3-0.6B, 30 steps) are overridden by tiny ones.
"""

import json
import os
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "policy_split_qwen3_lora.ipynb")
GSM8K_SLICE = os.path.join(REPO, "tests", "data", "gsm8k_slice.jsonl")
KERNEL_NAME = "policy-split-test-python"
TABLE_HEADER = "| benchmark | mode |"
PUSH_SKIPPED = "No Hub token: skipping push_to_hub"


def _kernelspec(jupyter_dir) -> None:
    """A kernel spec that runs this interpreter, whatever other `python3` specs this machine has."""
    folder = jupyter_dir / "kernels" / KERNEL_NAME
    folder.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "policy-split-trl test kernel",
        "language": "python",
    }
    (folder / "kernel.json").write_text(json.dumps(spec))


def _tags(cell) -> list:
    return cell.get("metadata", {}).get("tags", [])


def _parameters_index(nb) -> int:
    indices = [i for i, cell in enumerate(nb.cells) if "parameters" in _tags(cell)]
    assert len(indices) == 1, f"expected exactly one cell tagged 'parameters', found {len(indices)}"
    return indices[0]


def _inject(nb, parameters: dict) -> None:
    source = "# Parameters\n" + "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(_parameters_index(nb) + 1, cell)


def _text(cell) -> str:
    """Everything a cell printed or displayed: streams, text/plain and text/markdown, tracebacks."""
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        for mime in ("text/plain", "text/markdown"):
            parts.append(str(output.get("data", {}).get(mime, "")))
        parts.extend(output.get("traceback", []))
    return "\n".join(parts)


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"committed notebook has outputs: {cell.source[:60]!r}"
            assert cell.execution_count is None, f"committed notebook has an execution count: {cell.source[:60]!r}"
    assert "MODEL_ID" in nb.cells[_parameters_index(nb)].source


def test_notebook_runs_end_to_end(tiny_model_path, tmp_path, monkeypatch):
    # The kernel inherits this environment: no Hub, no GPU, no parallel-tokenizer warnings.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))  # ignore a token stored on this machine
    output_dir = str(tmp_path / "out")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    _inject(
        nb,
        {
            "MODEL_ID": tiny_model_path,
            "LOCAL_DATA": GSM8K_SLICE,
            "MAX_STEPS": 2,
            "NUM_GENERATIONS": 4,
            "PER_DEVICE_BATCH": 4,
            "GRAD_ACCUM": 1,
            "MAX_COMPLETION_LENGTH": 8,
            "EVAL_SAMPLES": 3,
            "EVAL_K": 2,
            "EVAL_MAX_NEW_TOKENS": 8,
            "TRAIN_SAMPLES": 16,
            "DUAL_MODE_EVAL_EVERY": 1,
            "USE_VLLM": False,
            "USE_CPU": True,
            "LOAD_IN_4BIT": False,
            "USE_LORA": True,
            "OUTPUT_DIR": output_dir,
            "HUB_MODEL_ID": None,
        },
    )
    # JUPYTER_PATH comes first in the kernel spec search, so the kernel runs with this interpreter (and its packages).
    _kernelspec(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL_NAME, timeout=600, startup_timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"notebook cell failed:\n{error}")
    print(f"\nnotebook executed in {time.perf_counter() - start:.1f} s")

    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    for cell in code_cells:
        assert not [o for o in cell.outputs if o.output_type == "error"], _text(cell)
    evaluation = [cell for cell in code_cells if "evaluate_modes(" in cell.source]
    assert len(evaluation) == 1
    assert TABLE_HEADER in _text(evaluation[0])
    assert os.path.isfile(os.path.join(output_dir, "policy_split.json"))
    assert os.path.isfile(os.path.join(output_dir, "eval", "results.md"))
    push = [cell for cell in code_cells if "push_to_hub()" in cell.source]
    assert len(push) == 1
    assert PUSH_SKIPPED in _text(push[0])
    chat = [cell for cell in code_cells if "apply_mode(" in cell.source]
    assert "=== normal ===" in _text(chat[0]) and "=== high_entropy ===" in _text(chat[0])
