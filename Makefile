# Set-up, training and tests in a virtual environment of the project's own (.venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; set TORCH_SPEC="torch" (or a CUDA build) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install train test test-slow test-all lint format config-reference clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# W&B's sweep-config schema, for the test of the sweep files (its other dependencies are not needed).
	$(BIN)/python -m pip install --quiet --no-deps "sweeps==0.3.0"
	touch $@

## Train AdaCS on the embedded synthetic data (a few minutes on 2 CPU cores); extra Hydra overrides in ARGS.
train: install
	$(BIN)/adacs-train $(ARGS)

# Test worker processes (pytest-xdist); each uses one thread.
WORKERS ?= auto

## The test suite without the slow end-to-end runs, in random order, on every core (under 2 minutes on 2).
test: install
	$(BIN)/python -m pytest -n $(WORKERS) -m "not slow" $(PYTEST_ARGS)

## The slow end-to-end runs alone (CLI, DDP, notebooks, benchmarks' tiny modes; about 7 minutes on 2 cores).
test-slow: install
	$(BIN)/python -m pytest -n $(WORKERS) -m slow $(PYTEST_ARGS)

## Everything, as CI runs it.
test-all: test test-slow

## Lint and format checks (ruff), as CI runs them.
lint: install
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools

## Fix what ruff can fix and format the code.
format: install
	$(BIN)/ruff check --fix src tests benchmarks tools
	$(BIN)/ruff format src tests benchmarks tools

## Regenerate docs/configuration.md and the README's table of config groups from the comments in conf/.
config-reference: install
	$(BIN)/python tools/config_reference.py --write

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
