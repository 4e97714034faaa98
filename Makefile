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

# pip's output condensed to a status line (infra/tools/sif_tools/pip_progress.py); all of it goes to .venv/pip.log.
PIP_INSTALL := $(BIN)/python -m pip install --progress-bar raw
PIP_SHOW := 2>&1 | $(BIN)/python infra/tools/sif_tools/pip_progress.py $(VENV)/pip.log
$(STAMP): pyproject.toml requirements/runtime-base.txt requirements/runtime-ml.txt requirements/runtime.txt requirements/dev.txt
	@echo "==> installing Python packages into $(VENV) (3-5 min on a cold machine; pip's log: $(VENV)/pip.log)"
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@set -o pipefail; $(BIN)/python -m pip install --progress-bar off --upgrade pip $(PIP_SHOW)
	@# The CPU build of torch first (build and baseline only), so nothing pulls a CUDA build.
	@set -o pipefail; $(PIP_INSTALL) torch==2.13.0 $(PIP_SHOW)
	@set -o pipefail; $(PIP_INSTALL) -r requirements/dev.txt $(PIP_SHOW)
	@# setuptools' "Editable installation" notice is for package authors, not for whoever runs make.
	@set -o pipefail; PYTHONWARNINGS="ignore:Editable installation:UserWarning" $(PIP_INSTALL) --no-deps -e . $(PIP_SHOW)
	@touch $(STAMP)

venv: $(STAMP)

models: $(STAMP)
	@echo "==> building models into $(MODELS_DIR) (those up to date are only checked)"
	@$(BIN)/python -m sif_modelbuild --out $(MODELS_DIR)

lint: $(STAMP)
	@echo "==> lint (ruff)"
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	@echo "==> type-checking (mypy)"
	$(BIN)/mypy layers/inference/python/sif_inference layers/metering/python/sif_metering shared/sif_core \
	  functions/api/sif_api functions/authorizer/sif_authorizer functions/scorer/sif_scorer functions/worker/sif_worker \
	  functions/callbacks/sif_callbacks functions/gpu_worker/sif_gpu_worker \
	  infra/local/sif_emulator infra/local/sif_cli infra/tools/sif_tools infra/tools/sif_modelbuild infra/bench/sif_bench

cfn-lint: $(STAMP)
	@echo "==> checking template.yaml (cfn-lint)"
	$(BIN)/cfn-lint template.yaml

test: $(STAMP) models cfn-lint lint typecheck
	@echo "==> tests (pytest: unit, integration, end-to-end)"
	$(BIN)/python -m pytest tests

# `make up` runs in the foreground (Ctrl-C stops it); `make up BACKGROUND=1` returns once it is up.
up: $(STAMP) models
	@echo "==> starting the local stack$(if $(BACKGROUND), in the background)"
	@$(BIN)/sif up $(if $(BACKGROUND),--background)

# Stops a stack started in the background; the state (tenants, files, usage) stays in .local.
down:
	@if [ -x $(BIN)/sif ]; then $(BIN)/sif down; else echo "no local stack running (no $(BIN)/sif)"; fi

# Lambda layers are read-only, so bytecode that is not shipped is recompiled at every cold start:
# ship it (and import-check the result) when a python3.12 like Lambda's is at hand.
PY312 := $(firstword $(foreach p,$(shell command -v python3.12) $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12),\
  $(if $(shell $(p) -c 'import sys; print(sys.version_info[:2] == (3, 12))' 2>/dev/null | grep True),$(p))))
package: $(STAMP)
	$(BIN)/python -m sif_tools.package --out build/package $(if $(PY312),--compile-with $(PY312) --check-with $(PY312))

# The strong peer (sentence-transformers' ONNX int8 export) needs transformers<4.58: it gets its own
# venv, .cache/peer-venv, built on first use. `make bench BENCH_ARGS=--quick` is a smoke run.
bench: $(STAMP) models
	@echo "==> bench: peer venv (.cache/peer-venv) and its int8 export (.cache/peer-models), built once"
	$(BIN)/python -m sif_bench --setup-peer
	@echo "==> bench: measuring (writes docs/benchmarks.md, .json, .png)"
	$(BIN)/python -m sif_bench --out docs/benchmarks.md $(BENCH_ARGS)

deploy: package
	sam build && sam deploy --guided

clean:
	rm -rf build .cache/models .local
