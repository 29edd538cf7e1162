# Parley: run `make help` for the targets.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
PROTOS := $(shell find protos -name '*.proto')

.DEFAULT_GOAL := help
.PHONY: help setup lock doctor protos protos-check lint test bench up demo images

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

# The lock: exact versions and hashes of the whole dependency tree, resolved by uv from pyproject.toml for
# CPython 3.11 on Linux x86-64 (what CI and the images run). requirements/README.md says how to upgrade.
LOCK := requirements/dev.txt
UV_COMPILE = $(VENV)/bin/uv pip compile pyproject.toml --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" -q \
	$(foreach p,$(UPGRADE),--upgrade-package $(p))

$(STAMP): pyproject.toml $(LOCK) scripts/setup.sh
	bash scripts/setup.sh $(PYTHON) $(VENV)
	touch $@

setup: $(STAMP) ## .venv from the lock (requirements/dev.txt), espeak-ng, bundled models, smoke check of each

lock: $(STAMP) ## Re-resolve the lock from pyproject.toml (UPGRADE="pkg ..." to move those); then make setup test
	$(UV_COMPILE) --extra dev -o $(LOCK)
	$(UV_COMPILE) -o requirements/runtime.txt
	$(UV_COMPILE) --extra gpu -o requirements/gpu.txt

doctor: $(STAMP) ## Smoke inference of every bundled model, each in its own process (parley doctor)
	$(PY) -m services.cli doctor

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

images: $(STAMP) ## Build the cpu image parley:cpu (TARGET=gpu: parley:gpu); no registry: on a local Debian base
	PYTHON=$(PY) sh deploy/build-images.sh $(or $(TARGET),cpu)

bench: $(STAMP) ## Print the benchmark figures (server vs in-process, RTF, memory)
	$(PY) -m benchmarks.run

up: $(STAMP) ## Start the five servers locally on CPU (gateway on 127.0.0.1:50051); Ctrl-C stops them
	$(PY) -m services.cli up

demo: $(STAMP) ## Local cluster: translate INPUT=file into English (default: an English sample it speaks, into French)
	$(PY) -m services.cli demo $(if $(INPUT),--input $(INPUT)) $(if $(SOURCE),--source $(SOURCE)) $(if $(TARGET),--target $(TARGET)) --out out/demo/translated.wav

.PHONY: eval
eval: $(STAMP) ## Measure WER, chrF/BLEU, TTS round trip, subtitle rules, latency; writes docs/evaluation.md
	$(PY) -m benchmarks.eval
