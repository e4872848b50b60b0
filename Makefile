# Two commands: `make train` (set up, then the default experiment) and `make test` (set up, then tests).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test test-slow coverage gpu-check install clean

# Torch first, pinned: letting pip resolve a bare `torch` would download several GB of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/python train.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# Line coverage of `make test`'s selection (pyproject.toml [tool.coverage.*]: src, datamodules,
# lightning_modules, storage, tools; train.py/eval.py subprocesses included). PYTEST_ARGS="-m slow" measures the rest.
coverage: $(STAMP)
	rm -f .coverage .coverage.*
	$(BIN)/python -m coverage run -m pytest -q $(PYTEST_ARGS)
	$(BIN)/python -m coverage combine -q
	$(BIN)/python -m coverage report $(COVERAGE_ARGS)

# Every GPU target in one call (<= 8 min; benchmarks/gpu_check.py). No install step: a GPU machine brings
# its own CUDA torch; the venv's python is used where there is one. ARGS="--device cpu --quick" runs it on CPU.
GPU_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) outputs/*/ .pytest_cache .coverage .coverage.*
