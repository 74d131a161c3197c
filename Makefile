# Every set-up step lives here, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The packages run from the checkout (Dataflow gets them via --setup_file ./setup.py).
export PYTHONPATH := $(CURDIR)
STAMP := $(VENV)/.installed

.PHONY: demo test lint format validate-rules clean

$(STAMP): requirements.txt requirements-dev.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

## Generate seeded traffic with attacks, run the pipeline locally, print a summary.
demo: $(STAMP)
	$(BIN)/python -m pipelines.demo --output_dir out/demo

## Run the whole test suite (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

validate-rules: $(STAMP)
	$(BIN)/python -m pipelines.rules validate rules/default.yaml

clean:
	rm -rf out .pytest_cache
