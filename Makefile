# specmoe-bench: `make bench` and `make test` set themselves up from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A range that the local torch 2.13 CPU build satisfies; on a GPU machine pip takes a CUDA build.
TORCH_SPEC ?= torch>=2.4,<2.14
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist); the suite is made for 2 cores: each test process runs one torch thread, trained
# checkpoints are cached on disk behind a file lock, so the processes share them.
TEST_WORKERS ?= 2

.PHONY: setup test bench bench-micro clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the project with its test tools

test: $(STAMP)  ## run the test suite
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

bench: $(STAMP)  ## run the default matrix (matrices/gpu.toml with CUDA, matrices/cpu.toml otherwise); prints the table and the run directory
	$(VENV)/bin/specmoe-bench run --default $(BENCH_ARGS)
	@echo "specmoe-bench is installed in $(VENV)/bin: run '. $(VENV)/bin/activate' to put it on PATH"

bench-micro: $(STAMP)  ## pytest-benchmark micro-benchmarks of the hot paths
	$(PY) -m pytest -q tests/micro --benchmark-only --benchmark-enable

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache *.egg-info
