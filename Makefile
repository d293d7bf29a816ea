# Two commands for a new user (see README): `make demo` and `make test`.
# Setup is idempotent: the virtualenv is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo main-job test test-fast clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, CPU build, pinned: a looser requirement would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/fdreamer demo

main-job: setup
	$(BIN)/python cluster/main_job.py

test: setup
	$(BIN)/python -m pytest -q --durations=25

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf data/sample models/tiny runs/demo
