# Every target sets up its own virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extra pip arguments for the environment, e.g. a pinned transformers: make test PIP_EXTRA="transformers==5.17.0"
PIP_EXTRA ?=
# A torch build from PyTorch's own wheel index, e.g. the CPU-only one (about 4 GB smaller than PyPI's CUDA build):
# make clean test TORCH=cpu. Empty (the default): torch from PyPI like every other dependency.
TORCH ?=
TORCH_INDEX ?= https://download.pytorch.org/whl/$(TORCH)

.PHONY: test lint core sweep architectures transformers-tests demo bench gpu-check clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifneq ($(TORCH),)
	$(PY) -m pip install -q torch --index-url $(TORCH_INDEX)
endif
	$(PY) -m pip install -q -e ".[dev]" $(PIP_EXTRA)
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Ruff's checks, configured in pyproject.toml.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check hybrid_hf tests scripts

# The core install alone (`pip install .`, no extras) in a fresh environment: convert a tiny model, save, load it.
# The environment (about 6 GB with PyPI's torch) is removed afterwards, pass or fail.
core:
	rm -rf .venv-core
	$(PYTHON) -m venv .venv-core
	status=0; \
	.venv-core/bin/python -m pip install -q --upgrade pip && \
	.venv-core/bin/python -m pip install -q --no-cache-dir . $(PIP_EXTRA) && \
	out=$$(mktemp -d) && (cd /tmp && $(CURDIR)/.venv-core/bin/python $(CURDIR)/tests/core_check.py $$out/out) \
	|| status=$$?; rm -rf .venv-core $$out; exit $$status

# Every model type of the installed transformers, converted and checked (about 10 minutes).
sweep: $(VENV)/.installed
	$(PY) -m pytest -q -m sweep tests/test_architectures.py

# The same sweep, written as the table in docs/architectures.md.
architectures: $(VENV)/.installed
	cd tests && ../$(PY) sweep.py ../docs/architectures.md

# transformers' own model tests (ModelTesterMixin) on the hybrid Llama, GPT-2 and BERT classes. The test sources
# come from the installed transformers' source distribution on PyPI (kept in ~/.cache/hybrid_hf); about 3 minutes
# on two CPU cores once fetched.
transformers-tests: $(VENV)/.installed
	$(PY) -m pytest -q -o addopts="" -W ignore::pytest.PytestUnknownMarkWarning tests/transformers_suite $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(VENV)/bin/hybrid-hf demo $(DEMO_ARGS)

bench: $(VENV)/.installed
	$(VENV)/bin/hybrid-hf bench $(BENCH_ARGS)

# On a CUDA machine, in under 10 minutes: the device tests on CUDA (float32 and bf16), the local kernel (eager and
# compiled) against causal SDPA at 4K and 16K, and a converted SmolLM2-shaped model against the original; writes
# docs/gpu.json and prints the table. Without CUDA: one line, exit status 2. GPU_CHECK_ARGS="--quick": tiny, on the CPU.
gpu-check: $(VENV)/.installed
	$(PY) -m hybrid_hf.benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
