# Two commands do all the set-up: `make demo` (install + run the default recipe) and
# `make test` (install + run the test suite). GPU users: `make setup TORCH=torch` (CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/flashdreams-run

test: setup
	$(VENV)/bin/python -m pytest tests

lint: setup
	$(VENV)/bin/ruff check flashdreams tests scripts
	$(VENV)/bin/ruff format --check flashdreams tests scripts

format: setup
	$(VENV)/bin/ruff format flashdreams tests scripts
	$(VENV)/bin/ruff check --fix flashdreams tests scripts

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
