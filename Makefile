# Every target creates .venv on first use and installs the pinned set (constraints.txt).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN ?= runs/embedded
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

BASE_RUN ?= runs/embedded-base

.PHONY: venv test reproduce reproduce-quick base lint bench figures clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build on this disk; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	# verl, for the test that composes its trainer configuration and loads the reward with its loader. It pins
	# transformers < 5.11, so it comes without its dependencies: only its configuration files and its
	# import helper are used, never the trainer.
	$(BIN)/pip install -q --no-deps verl==0.9.1
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

reproduce: $(STAMP)
	$(BIN)/toolrl-analyze reproduce --out $(RUN)

reproduce-quick: $(STAMP)
	$(BIN)/toolrl-analyze reproduce --out $(RUN)-quick --quick

# Regenerate the shipped embedded base from the defaults of train-base (about 50 minutes on 2 cores),
# then copy the chosen checkpoint and its manifest into toolrl_analysis/data/embedded/.
base: $(STAMP)
	test -f $(BASE_RUN)/envs/manifest.json || $(BIN)/toolrl-analyze envs build --out $(BASE_RUN)/envs
	$(BIN)/toolrl-analyze train-base --envs $(BASE_RUN)/envs --out $(BASE_RUN)/base $(if $(RESUME),--resume,)
	$(BIN)/python -m toolrl_analysis.training.ship_base $(BASE_RUN)/base

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,trl]"
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

figures: $(STAMP)
	$(BIN)/python figures/make_figures.py --run $(RUN)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
