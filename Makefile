# Two set-up commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
# `make lint`: ruff (configured in pyproject.toml) checks the code and its formatting; it changes nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch that lies on disk; pinning it first keeps the resolver away from CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dsv4 demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --timeout 900 tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not dist and not e2e" tests

clean:
	rm -rf $(VENV) runs
