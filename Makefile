# The two commands of the README. `make` builds the virtual environment once (.venv) and
# reuses it; CPU machines get the CPU build of torch first so pip never pulls a CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/distillkit demo --out demo-out

# Two pytest processes, each file on one of them (module fixtures built once): the slow
# end-to-end tests are single-threaded, so the suite takes ~11 min instead of ~20 on 2 cores.
test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -rs -n 2 --dist loadfile

lint: $(VENV)/.installed
	$(BIN)/ruff check .
