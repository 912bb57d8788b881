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

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -rs

lint: $(VENV)/.installed
	$(BIN)/ruff check .
