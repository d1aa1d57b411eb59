# `make demo` and `make test` each create .venv when missing. torch==2.13.0 is installed
# first: on these machines it is a CPU build, and installing deepspeed without torch
# present would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= offline
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-fast bench clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,wandb,eval]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/imagen-ds demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/imagen-ds benchmark-throughput --model tiny_res_32 --steps 5

clean:
	rm -rf $(VENV) demo_out runs gpu_results .torch_extensions
