# Two commands for a new user (see README): `make main-job` and `make test` (and `make demo`).
# Setup is idempotent: the virtualenv is rebuilt only when pyproject.toml changes (or has no pip).
# What a command needs from the machine is checked before any work starts: one line, then exit 1.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
UV_VERSION := 0.13.9

.PHONY: setup demo main-job test test-fast test-tools clean

$(STAMP): pyproject.toml
	@if ! $(BIN)/python -m pip --version >/dev/null 2>&1; then \
	  $(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || { \
	    echo "make: this project needs Python 3.11, and $(PYTHON) is $$($(PYTHON) --version 2>/dev/null || echo 'not found'): install it, or pass PYTHON=/path/to/python3.11"; exit 1; }; \
	  $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	    echo "make: $(PYTHON) cannot create a virtualenv (no ensurepip): install python3.11-venv (Debian/Ubuntu: apt-get install python3.11-venv)"; exit 1; }; \
	  rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); \
	fi
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, CPU build, pinned: a looser requirement would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	# the rest with uv (pinned): 15 s from a cold cache where pip takes minutes; the same pinned versions.
	# uv does not look at the local torch file, but the torch==2.13.0 installed above satisfies the pin.
	# uv writes no .pyc files at install (pip does). Python writes them at the first import, unless
	# PYTHONDONTWRITEBYTECODE is set: then every process, each Ray worker included, would recompile
	# ray/diffusers/transformers from source (~10 s more per import here; CI once went from 23 to 50 min), so
	# with it set uv compiles all of site-packages at install (--compile-bytecode, ~100 s). .ci/run unsets it.
	$(BIN)/python -m pip install -q uv==$(UV_VERSION)
	$(BIN)/uv pip install -q $(if $(PYTHONDONTWRITEBYTECODE),--compile-bytecode) --python $(BIN)/python -e ".[dev]"
	@touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/fdreamer demo

# Needs no system tool (the served mp4 is checked with PyAV); cluster/main_job.py checks what it needs first.
main-job: setup
	$(BIN)/python cluster/main_job.py

# Tests use ffprobe (Debian's ffmpeg) as an extra check that our mp4s play outside PyAV: without it that
# check is skipped (a failure when CI is set); chromium + chromium-driver are optional (the serving page
# test is skipped without them). .ci/run installs both.
test-tools:
	@command -v ffprobe >/dev/null 2>&1 || \
	  echo "make: note: no ffprobe, the tests skip their extra ffprobe checks (install ffmpeg to run them)"

test: test-tools setup
	$(BIN)/python -m pytest -q --durations=25

test-fast: test-tools setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf data/sample models/tiny runs/demo

# One GPU (e.g. one H100, < 8 min): sd15 at stage-1 shapes in bf16 with gradient checkpointing, 3 optimizer steps,
# peak memory vs the estimate, save -> restore -> 1 step vs the uninterrupted run, a 25-step sample; ONE JSON
# line (fields: docs/results.md, "GPU check"). No setup, no Ray: $(PYTHON) needs torch, diffusers, transformers,
# einops, pyarrow and safetensors. On a CPU: $(PYTHON) tests/gpu_check.py --cpu --tiny (what CI runs).
.PHONY: gpu-check
gpu-check:
	$(PYTHON) tests/gpu_check.py
