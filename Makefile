# make test / make demo work on a fresh clone: they create .venv, install torch and the test
# extras, build the extension in editable mode against that torch, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.extension-built
# The compiled extension is rebuilt only when its sources change (Python files are editable).
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: test demo build bench clean gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): $(PY) pyproject.toml
	$(PY) -m pip install torch ninja setuptools wheel
	$(PY) -m pip install pytest numpy expecttest torch_geometric ogb tqdm
	touch $@

$(BUILT): $(DEPS) $(SOURCES)
	REVGNN_EXT_EMULATOR=1 $(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) examples/demo.py

bench: build
	$(PY) benchmarks/spmm.py
	$(PY) benchmarks/gen_conv.py

# On a GPU machine, with its own python (torch with CUDA, torch_geometric; no venv, no network), in
# at most 8 minutes: build for the local GPU, every CUDA test case, the headline, spmm and GENConv
# at full proteins scale; ONLY=memory_depth,spmm_more,gen_conv_more runs the second group. Writes
# benchmarks/results/<date>-<gpu>/ (RESULTS_DIR=... elsewhere). Without a GPU, a CPU dry run.
GPU_PYTHON ?= python3
RESULTS_DIR ?=

gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(if $(RESULTS_DIR),--out $(RESULTS_DIR)) $(if $(ONLY),--only $(ONLY))

clean:
	rm -rf build *.egg-info revgnn_ext/_C*.so revgnn_ext/_emu*.so $(BUILT)
