# famevil_fast: `make demo` and `make test` work on a fresh machine (they create .venv first).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
PYTEST_ARGS ?=
# pytest-xdist processes of `make test` (0: a single process; auto: one per core)
TEST_WORKERS ?= 2

.PHONY: venv demo test lint ctest bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt $(CSRC)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch torchvision setuptools ninja numpy
	$(PIP) install -q -c constraints.txt --no-build-isolation -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/famevil-fast demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS) tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

ctest: $(STAMP)
	cmake -S . -B cmake-build -DPython3_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=Release && cmake --build cmake-build -j2 && ctest --test-dir cmake-build --output-on-failure

bench: $(STAMP)
	$(PY) -m pytest -q bench

clean:
	rm -rf build cmake-build *.egg-info famevil_fast/_C*.so
