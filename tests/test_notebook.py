"""Execute `notebooks/policy_split_qwen3_lora.ipynb` end to end on the tiny Qwen3, offline, on CPU.

Parameters are injected papermill-style: a cell tagged `injected-parameters` is inserted right after the cell tagged
`parameters`, so the notebook's defaults (Qwen3-0.6B, 30 steps) are overridden by tiny ones.
"""

import importlib.machinery
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import types
from types import SimpleNamespace

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


# ---- The install cell and the runtime-settings cell, executed on their own under faked hardware -----------------

NOTEBOOK_DEFAULTS = {
    "MODEL_ID": "Qwen/Qwen3-0.6B",
    "MAX_PROMPT_LENGTH": 512,
    "MAX_COMPLETION_LENGTH": 512,
    "PER_DEVICE_BATCH": 8,
    "GRAD_ACCUM": 4,
    "USE_VLLM": None,
    "USE_CPU": False,
    "LOAD_IN_4BIT": False,
}
NVIDIA_SMI = {"t4": "Tesla T4, 7.5, 15360\n", "a100": "NVIDIA A100-SXM4-40GB, 8.0, 40960\n"}
# (name, total_memory in bytes as torch reports it, compute capability)
TORCH_GPUS = {"t4": ("Tesla T4", 15095 * 2**20, (7, 5)), "a100": ("NVIDIA A100-SXM4-40GB", 40339 * 2**20, (8, 0))}


def _tagged(nb, tag: str):
    cells = [cell for cell in nb.cells if tag in _tags(cell)]
    assert len(cells) == 1, f"expected exactly one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


class _Pip:
    """Stands in for `subprocess.run`: answers `nvidia-smi` with a fake GPU (or none) and records pip calls."""

    def __init__(self, gpu):
        self.gpu, self.installs = gpu, []

    def __call__(self, command, **kwargs):
        if command[0] == "nvidia-smi":
            if self.gpu is None:
                raise FileNotFoundError("nvidia-smi")
            return subprocess.CompletedProcess(command, 0, stdout=NVIDIA_SMI[self.gpu])
        assert command[:4] == [sys.executable, "-m", "pip", "install"], command
        self.installs.append([arg for arg in command[4:] if arg != "-q"])
        return subprocess.CompletedProcess(command, 0)


def _run_install_cell(monkeypatch, gpu, missing=("vllm", "bitsandbytes"), torch_imported=False, **parameters):
    """Execute the install cell with `missing` modules absent (until pip installs them) and a fake `nvidia-smi`."""
    real_find_spec = importlib.util.find_spec
    pip = _Pip(gpu)

    def find_spec(name, *args, **kwargs):
        if name in missing and not pip.installs:
            return None
        # Present (or just installed), whether or not this machine has it.
        return real_find_spec(name, *args, **kwargs) or importlib.machinery.ModuleSpec(name, None)

    monkeypatch.setattr(subprocess, "run", pip)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    if not torch_imported:  # a fresh kernel: the cell only looks the name up, it never imports torch
        monkeypatch.delitem(sys.modules, "torch")
    namespace = {**NOTEBOOK_DEFAULTS, **parameters}
    try:
        exec(_tagged(_notebook(), "install").source, namespace)  # noqa: S102 -- running our own cell is the point
    finally:
        sys.modules.pop("policy_split_hardware", None)
    return pip.installs, namespace


@pytest.mark.parametrize(
    ("gpu", "parameters", "missing", "uses_vllm", "expected"),
    [
        ("t4", {}, ("vllm", "bitsandbytes"), False, []),  # fp16 + transformers generation: nothing to add
        ("t4", {"LOAD_IN_4BIT": True}, ("vllm", "bitsandbytes"), False, [["bitsandbytes"]]),
        ("t4", {"USE_VLLM": True}, ("vllm", "bitsandbytes"), True, [["policy-split-trl[vllm]"]]),
        ("a100", {}, ("vllm", "bitsandbytes"), True, [["policy-split-trl[vllm]"]]),
        ("a100", {"LOAD_IN_4BIT": True}, ("vllm", "bitsandbytes"), True, [["policy-split-trl[vllm]", "bitsandbytes"]]),
        ("a100", {}, (), True, []),  # vLLM already there
        ("a100", {"USE_VLLM": False}, ("vllm", "bitsandbytes"), False, []),
        ("a100", {"USE_CPU": True, "LOAD_IN_4BIT": True}, ("vllm", "bitsandbytes"), False, []),
        (None, {"LOAD_IN_4BIT": True}, ("vllm", "bitsandbytes"), False, []),  # no GPU: no vLLM, no 4-bit
        (None, {}, ("policy_split_trl", "vllm", "bitsandbytes"), False, [["policy-split-trl"]]),  # the library, always
    ],
    ids=["t4", "t4-4bit", "t4-vllm", "a100", "a100-4bit", "a100-installed", "a100-no-vllm", "use-cpu", "cpu", "bare"],
)
def test_install_cell_installs_only_what_the_run_needs(monkeypatch, gpu, parameters, missing, uses_vllm, expected):
    installs, namespace = _run_install_cell(monkeypatch, gpu, missing, **parameters)
    assert installs == expected
    assert namespace["planned"].use_vllm == uses_vllm


def test_install_cell_asks_for_a_restart_when_vllm_comes_after_torch(monkeypatch):
    with pytest.raises(RuntimeError, match="restart the runtime"):
        _run_install_cell(monkeypatch, "a100", torch_imported=True)


def test_install_cell_does_not_import_torch(tmp_path):
    # A fresh interpreter, as a fresh Colab kernel: nothing to install here, and torch must still be unimported.
    source = _tagged(_notebook(), "install").source
    script = tmp_path / "install_cell.py"
    assignments = "\n".join(f"{name} = {value!r}" for name, value in {**NOTEBOOK_DEFAULTS, "USE_CPU": True}.items())
    script.write_text(f"{assignments}\n{source}\nimport sys\nprint('torch imported:', 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Nothing to install." in result.stdout
    assert "torch imported: False" in result.stdout


def test_install_cell_runs_before_torch_is_imported():
    nb = _notebook()
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    imports_torch = re.compile(r"^(import|from) torch\b", re.MULTILINE)
    first_torch = next(i for i, cell in enumerate(code) if imports_torch.search(cell.source))
    assert code.index(nb.cells[_parameters_index(nb)]) < code.index(_tagged(nb, "install")) < first_torch
    assert "USE_VLLM = None" in nb.cells[_parameters_index(nb)].source


@pytest.fixture
def qwen3_0_6b_config(tmp_path):
    """Qwen3-0.6B's config.json (the notebook's default model) in a folder, so `AutoConfig` reads it offline."""
    from transformers import Qwen3Config

    folder = tmp_path / "qwen3-0.6b"
    Qwen3Config(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ).save_pretrained(folder)
    return str(folder)


def _run_settings_cell(monkeypatch, gpu, model_id, vllm_installed=True, **parameters):
    """Execute the runtime-settings cell with torch faking `gpu` (a T4 also claims bf16, as its emulation does)."""
    import torch

    name, total_memory, capability = TORCH_GPUS[gpu]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(name=name, total_memory=total_memory)
    )
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    if vllm_installed:
        monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    namespace = {**NOTEBOOK_DEFAULTS, "MODEL_ID": model_id, **parameters}
    exec(_tagged(_notebook(), "runtime-settings").source, namespace)  # noqa: S102
    return namespace


def test_settings_cell_on_a_t4_uses_fp16_and_transformers_generation(monkeypatch, qwen3_0_6b_config, capsys):
    namespace = _run_settings_cell(monkeypatch, "t4", qwen3_0_6b_config, vllm_installed=False)
    settings = namespace["settings"]
    assert namespace["ON_GPU"] and settings.on_gpu
    assert settings.fp16 and not settings.bf16  # despite is_bf16_supported() == True
    assert not settings.use_vllm
    assert settings.vllm_max_model_length == 1024
    out = capsys.readouterr().out
    assert "Tesla T4, 14.7 GiB, compute capability 7.5" in out and "float16, transformers generation" in out


def test_settings_cell_on_a_t4_with_vllm_forced(monkeypatch, qwen3_0_6b_config):
    settings = _run_settings_cell(monkeypatch, "t4", qwen3_0_6b_config, USE_VLLM=True)["settings"]
    assert settings.use_vllm and settings.fp16 and settings.vllm_max_model_length == 1024
    assert settings.vllm_gpu_memory_utilization == 0.3


def test_settings_cell_on_an_a100_uses_bf16_and_vllm(monkeypatch, qwen3_0_6b_config, capsys):
    settings = _run_settings_cell(monkeypatch, "a100", qwen3_0_6b_config)["settings"]
    assert settings.bf16 and not settings.fp16
    assert settings.use_vllm
    assert settings.vllm_max_model_length == 1024
    assert settings.vllm_gpu_memory_utilization == 0.2
    assert "bfloat16, vLLM generation with 20% of the GPU" in capsys.readouterr().out


def test_settings_cell_stops_early_when_vllm_is_chosen_but_missing(monkeypatch, qwen3_0_6b_config):
    monkeypatch.setattr(importlib.util, "find_spec", _hide("vllm"))
    with pytest.raises(RuntimeError, match=r"policy-split-trl\[vllm\]: run the install cell"):
        _run_settings_cell(monkeypatch, "a100", qwen3_0_6b_config, vllm_installed=False)


def test_settings_cell_honours_use_cpu_on_a_gpu(monkeypatch, qwen3_0_6b_config):
    namespace = _run_settings_cell(monkeypatch, "a100", qwen3_0_6b_config, USE_CPU=True)
    assert not namespace["ON_GPU"]
    assert namespace["settings"].dtype == "float32" and not namespace["settings"].use_vllm


def _hide(*names):
    real_find_spec = importlib.util.find_spec
    return lambda name, *args, **kwargs: None if name in names else real_find_spec(name, *args, **kwargs)


def test_model_and_training_cells_take_the_runtime_settings():
    nb = _notebook()
    training = [cell for cell in nb.cells if "PolicySplitGRPOConfig(" in cell.source]
    assert len(training) == 1
    for field in ("bf16", "fp16", "use_vllm", "vllm_max_model_length", "vllm_gpu_memory_utilization"):
        assert f"    {field}=settings.{field}," in training[0].source, field
    model = [cell for cell in nb.cells if "AutoModelForCausalLM.from_pretrained(" in cell.source]
    assert "getattr(torch, settings.dtype)" in model[0].source
    assert not [cell for cell in nb.cells if "is_bf16_supported" in cell.source and cell.cell_type == "code"]
