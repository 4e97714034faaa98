# sif - the two commands are `make up` and `make test`; everything installs itself into .venv.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODELS_DIR ?= .cache/models
export SIF_MODELS_DIR := $(abspath $(MODELS_DIR))
# No HF / tokenizers caches under HOME, ever (Lambda has only /tmp; CI has a clean HOME).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HOME := $(abspath .cache/hf)
export TOKENIZERS_PARALLELISM := false
export MPLCONFIGDIR := $(abspath .cache/mpl)

.PHONY: up down test venv models lint typecheck cfn-lint unit integration e2e package bench deploy clean

$(STAMP): pyproject.toml requirements/runtime-base.txt requirements/runtime-ml.txt requirements/runtime.txt requirements/dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first (build and baseline only), so nothing pulls a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements/dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

models: $(STAMP)
	$(BIN)/python -m sif_modelbuild --out $(MODELS_DIR)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy layers/inference/python/sif_inference layers/metering/python/sif_metering shared/sif_core \
	  infra/local/sif_local infra/gpu_worker/sif_gpu_worker functions/api/sif_api \
	  functions/authorizer/sif_authorizer functions/scorer/sif_scorer functions/worker/sif_worker \
	  functions/callbacks/sif_callbacks

cfn-lint: $(STAMP)
	$(BIN)/cfn-lint template.yaml

test: $(STAMP) models cfn-lint lint typecheck
	$(BIN)/python -m pytest tests

# `make up` runs in the foreground (Ctrl-C stops it); `make up BACKGROUND=1` returns once it is up.
up: $(STAMP) models
	$(BIN)/sif up $(if $(BACKGROUND),--background)

# Stops a stack started in the background; the state (tenants, files, usage) stays in .local.
down:
	@if [ -x $(BIN)/sif ]; then $(BIN)/sif down; else echo "no local stack running (no $(BIN)/sif)"; fi

# Lambda layers are read-only, so bytecode that is not shipped is recompiled at every cold start:
# ship it (and import-check the result) when a python3.12 like Lambda's is at hand.
PY312 := $(firstword $(foreach p,$(shell command -v python3.12) $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12),\
  $(if $(shell $(p) -c 'import sys; print(sys.version_info[:2] == (3, 12))' 2>/dev/null | grep True),$(p))))
package: $(STAMP)
	$(BIN)/python -m sif_local.package --out build/package $(if $(PY312),--compile-with $(PY312) --check-with $(PY312))

bench: $(STAMP) models
	$(BIN)/python -m sif_local.bench --out docs/benchmarks.md

deploy: package
	sam build && sam deploy --guided

clean:
	rm -rf build .cache/models .local
