# The two commands of the README: `make serve` and `make test`. Everything installs into .venv.
VENV ?= .venv
PORT ?= 3000
BIN := $(VENV)/bin

$(BIN)/python:
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.runtime

.PHONY: serve test lint format
serve: $(VENV)/.runtime  ## install, then serve the embedded default model on :$(PORT)
	$(BIN)/bentoml serve service:QueryRouter --port $(PORT)

test: $(VENV)/.dev  ## install with dev extras, then run the whole suite
	$(BIN)/pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy router service.py training bench scripts locustfile.py

format: $(VENV)/.dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
