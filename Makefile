# Every set-up step lives here, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The packages run from the checkout (Dataflow gets them via --setup_file ./setup.py).
export PYTHONPATH := $(CURDIR)
STAMP := $(VENV)/.installed
COMPILED := $(VENV)/.compiled

# The BigQuery emulator (local-bigquery) needs Python 3.13; pyenv provides it on these machines.
PYTHON313 ?= $(shell for p in $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.13*/bin/python3.13 2>/dev/null) $$(command -v python3.13); do $$p -c "" 2>/dev/null && { echo $$p; break; }; done)
BQ_VENV := .venv-bq
BQ_STAMP := $(BQ_VENV)/.installed

.PHONY: demo test eval soak api-demo bench bench-api lint format validate-rules clean streaming-local

$(STAMP): requirements.txt requirements-dev.txt service/requirements.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

venv: $(COMPILED)

# The modules compiled by Cython (setup.py: transforms/fold.py and transforms/accept.py), rebuilt when a source
# or its declarations change. tests/transforms/test_fold.py and test_accept.py fail if the suite would run a
# missing or stale build.
$(COMPILED): $(STAMP) transforms/fold.py transforms/fold.pxd transforms/accept.py transforms/accept.pxd setup.py
	$(BIN)/python setup.py -q build_ext --inplace
	touch $(COMPILED)

$(BQ_STAMP): devtools/requirements-bq-emulator.txt
	@test -n "$(PYTHON313)" || { echo "Python 3.13 is needed for the BigQuery emulator (pyenv install 3.13)"; exit 1; }
	test -x $(BQ_VENV)/bin/python || $(PYTHON313) -m venv $(BQ_VENV)
	$(BQ_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps local-bigquery==0.4.0
	$(BQ_VENV)/bin/pip install --quiet --disable-pip-version-check -r devtools/requirements-bq-emulator.txt
	# DuckDB loads extensions from $$HOME/.duckdb; install the PyPI-shipped ones under the emulator's own HOME.
	mkdir -p $(BQ_VENV)/home
	HOME=$(CURDIR)/$(BQ_VENV)/home $(BQ_VENV)/bin/python -c "import duckdb, duckdb_extensions; \
	names = ('icu', 'json', 'ducklake', 'spatial'); [duckdb_extensions.import_extension(n) for n in names]; \
	con = duckdb.connect(); [con.execute(f'LOAD {n}') for n in names]"
	touch $(BQ_STAMP)

## Generate seeded traffic with attacks, run the pipeline locally, print a summary.
demo: $(COMPILED)
	$(BIN)/python -m pipelines.demo --output_dir out/demo

## Run the whole test suite (what CI runs); starts the Pub/Sub and BigQuery emulators itself.
test: $(COMPILED) $(BQ_STAMP)
	$(BIN)/python -m pytest -q

## Start both emulators, provision tables, run the streaming job on simulated traffic, print decisions.
streaming-local: $(COMPILED) $(BQ_STAMP)
	$(BIN)/python -m devtools.streaming_local

## streaming-local, then the Mitigation API over the same emulators, with curl commands for a mitigated user.
api-demo: $(COMPILED) $(BQ_STAMP)
	$(BIN)/python -m devtools.streaming_local --serve_api

## All pipeline benchmarks, figures printed and saved in benchmarks/results/ (about 40 minutes; see benchmarks/README.md).
bench: $(COMPILED) $(BQ_STAMP)
	$(BIN)/python -m benchmarks.transform_costs
	@if command -v valgrind >/dev/null && command -v gcc >/dev/null; then \
		$(BIN)/python -m benchmarks.transform_costs --instructions --events 20000; \
	else echo "skipping instruction counts: they need valgrind and gcc (apt-get install valgrind gcc)"; fi
	$(BIN)/python -m benchmarks.batch_throughput
	$(BIN)/python -m benchmarks.streaming_latency
	$(BIN)/python -m benchmarks.memory_keys
	$(BIN)/python -m benchmarks.hot_keys

## Latency of the Mitigation API's single and batch lookups on loopback (writes benchmarks/results/api_latency.json).
bench-api: $(COMPILED)
	$(BIN)/python -m benchmarks.api_latency

## Streaming job for 10 minutes against the emulators with faults injected, then reconciled (SOAK_ARGS to change).
soak: $(COMPILED) $(BQ_STAMP)
	$(BIN)/python -m devtools.soak $(SOAK_ARGS)

## 200k+ signals on a held-out seed (rules were tuned on the demo's seed 7), backtest, quality report.
EVAL_DIR := out/eval
eval: $(COMPILED)
	mkdir -p $(EVAL_DIR)
	$(BIN)/python -m pipelines.simulate --seed 11 --scale 3 --output $(EVAL_DIR)/signals.jsonl --labels $(EVAL_DIR)/labels.jsonl
	$(BIN)/python -m pipelines.backtest --runner_config backtest_local_parallel.yaml --input $(EVAL_DIR)/signals.jsonl --output_dir $(EVAL_DIR) > $(EVAL_DIR)/backtest.log
	$(BIN)/python -m pipelines.evaluate report --decisions $(EVAL_DIR)/decisions.jsonl --audit $(EVAL_DIR)/audit.jsonl \
		--labels $(EVAL_DIR)/labels.jsonl --output_dir $(EVAL_DIR) --min_precision 0.95 --min_recall 0.90

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

validate-rules: $(COMPILED)
	$(BIN)/python -m pipelines.rules validate rules/default.yaml --allowlist rules/allowlist.yaml

clean:
	rm -rf out .pytest_cache build transforms/*.so transforms/*.c $(COMPILED)
