# make test / make demo work on a fresh clone: they create .venv, install torch and the test
# extras, build the extension in editable mode against that torch, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed

.PHONY: test demo build bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): $(PY) pyproject.toml
	$(PY) -m pip install torch ninja setuptools wheel
	$(PY) -m pip install pytest numpy expecttest torch_geometric
	touch $@

build: $(DEPS)
	$(PY) -m pip install --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) examples/demo.py

bench: build
	$(PY) benchmarks/spmm.py
	$(PY) benchmarks/gen_conv.py

clean:
	rm -rf build *.egg-info revgnn_ext/_C*.so
