# preftune — two commands on a fresh machine:
#   make demo   set up .venv and run the main job on the embedded default
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# The versions the suite was last green with; `make setup CONSTRAINTS=` installs the newest releases instead.
CONSTRAINTS ?= constraints.txt
LATEST_VENV ?= .venv-latest

.PHONY: setup demo test test-latest constraints lint clean

$(BIN)/preftune: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so the range in pyproject.toml never pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test]"
	touch $(BIN)/preftune

setup: $(BIN)/preftune

demo: setup
	$(BIN)/preftune demo

test: setup
	$(BIN)/pytest

# The suite against the newest release of every dependency (in a venv of its own): what a fresh install without
# constraints.txt would get. Green here → `make constraints` moves the recorded versions on purpose.
test-latest:
	rm -rf $(LATEST_VENV)
	$(MAKE) setup VENV=$(LATEST_VENV) CONSTRAINTS=
	$(LATEST_VENV)/bin/pytest

# Record .venv's versions as the ones the suite is green with (run after `make test` passes).
constraints: setup
	{ sed -n '/^#/p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^torch==\|^preftune'; } \
		> constraints.txt.new && mv constraints.txt.new constraints.txt

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs
