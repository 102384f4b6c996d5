# Two commands for a newcomer (see README.md): `make demo` and `make test`. Both set everything up first
# (a .venv in the repo) and are idempotent: a second run reuses the venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.m2flow-installed

.PHONY: setup demo demo-seeds test test-slow test-gpu docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# CPU machines: install the CPU build of torch first (a plain `torch` pulls a multi-GB CUDA build), and
	@# triton, which CUDA torch brings along: the tests run the paged-attention kernel in its interpreter.
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q torch==2.13.0 triton==3.9.0; fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	RAY_AUTH_MODE=disabled $(BIN)/m2flow demo

demo-seeds: setup
	RAY_AUTH_MODE=disabled $(BIN)/m2flow demo --seeds 0,1,2,3,4

# the tests also cover `m2flow bench vs-trl`, whose TRL side needs the bench extra (trl, datasets, accelerate)
BENCH_STAMP := $(VENV)/.m2flow-bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[dev,bench]"
	touch $(BENCH_STAMP)

test: setup $(BENCH_STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/pytest -q

test-slow: setup $(BENCH_STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/pytest -q -m slow

test-gpu: setup
	$(BIN)/pytest -q -m "gpu or not slow" tests/gpu tests/rollout

docs: setup
	$(BIN)/python -m m2flow.config > docs/configuration.md

clean:
	rm -rf $(VENV) runs .cache
