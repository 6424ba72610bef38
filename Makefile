# camserve — the two commands are `make serve` and `make test`; everything else is on the way there.
SHELL := /bin/bash
PY    ?= python3.11
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= models/shapes
SEED  ?= 1234
N     ?= 16
OUT   ?= samples_out

.PHONY: install test train evaluate samples bench-engine archive serve stop demo export batch bench-serve bench-offline clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found (camserve needs Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

train: install
	$(BIN)/python -m camserve.shapes train --out $(MODEL)

evaluate: install
	$(BIN)/python -m camserve.shapes evaluate --model $(MODEL) --seed $(SEED)

samples: install
	$(BIN)/python -m camserve.shapes samples --seed $(SEED) --n $(N) --out $(OUT)

bench-engine: install
	$(BIN)/python bench/engine.py

clean:
	rm -rf model_store/*.mar demo/ .pytest_cache
