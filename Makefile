# One command sets up, one tests, one runs the main job on the tiny world.
PY := .venv/bin/python
PIP := .venv/bin/pip
export OMP_NUM_THREADS ?= 1
export RAY_AUTH_MODE ?= disabled
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= offline
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: setup test test-fast lint run

setup:
	test -x $(PY) || python3 -m venv .venv
	# torch first, pinned: these builds lie on this machine's disk and keep torchvision importable.
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1 -e ".[dev]"
	# Debian's prometheus + chromium for the observability test (installed as root when missing, else skipped)
	cluster/observe-tools.sh

test:
	$(PY) -m pytest -q tests

test-fast:
	$(PY) -m pytest -q -m "not slow" tests

lint:
	.venv/bin/ruff check .

run:
	$(PY) recipes/nft_flux.py
