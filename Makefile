# preftune — two commands on a fresh machine:
#   make demo   set up .venv and run the main job on the embedded default
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test lint clean

$(BIN)/preftune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so the range in pyproject.toml never pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(BIN)/preftune

setup: $(BIN)/preftune

demo: setup
	$(BIN)/preftune demo

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
