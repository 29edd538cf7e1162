# Parley: run `make help` for the targets.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
PROTOS := $(shell find protos -name '*.proto')

.DEFAULT_GOAL := help
.PHONY: help setup protos protos-check lint test bench

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(PYTHON) $(VENV)
	touch $@

setup: $(STAMP) ## Create .venv, install Parley with its dev tools, espeak-ng and the bundled CPU models

protos: $(STAMP) ## Regenerate the Python code in parley/ from protos/
	bash scripts/gen_protos.sh $(PY) parley

protos-check: $(STAMP) ## Fail when parley/ is stale against protos/
	bash scripts/gen_protos.sh $(PY) $$(mktemp -d)/parley --check parley

lint: $(STAMP) ## ruff (lint + format check) and mypy
	$(VENV)/bin/ruff check services tests benchmarks
	$(VENV)/bin/ruff format --check services tests benchmarks
	$(VENV)/bin/mypy

test: $(STAMP) protos-check ## Run the test suite (unit + integration on real models and ../shared/data)
	$(VENV)/bin/pytest -ra

bench: $(STAMP) ## Print the benchmark figures (server vs in-process, RTF, memory)
	$(PY) -m benchmarks.run
