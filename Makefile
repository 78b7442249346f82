# Two entry points: `make demo` and `make test` each set everything up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-sqlite bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned: `pip install torch==2.13.0` takes the CPU build that lies on disk,
# where a bare `torch` requirement could pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python examples/demo.py

test: install
	$(BIN)/python -m pytest -q

# mlflow is a benchmark-only install, never a dependency of portfolio.
bench: install
	$(BIN)/pip install -q mlflow
	$(BIN)/python bench/registry.py

clean:
	rm -rf $(VENV) .portfolio build *.egg-info
