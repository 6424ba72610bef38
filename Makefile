# camserve — the two commands are `make serve` and `make test`; everything else is on the way there.
# Python entry points run as modules from the repository root (python -m tools.shapes, scripts.serve,
# bench.X, export.X): no sys.path edits anywhere.
SHELL := /bin/bash
PY    ?= python3.11
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= models/shapes
SEED  ?= 1234
N     ?= 16
OUT   ?= samples_out

# Test tiers: the markers registered in pyproject.toml. `make test` runs everything (and is what
# .ci/run calls); `make test-fast` leaves out the four heavy tiers. Both run the docstring examples
# of the installed package and of tools/ (doctests of modules whose extra is missing are skipped by
# conftest.py).
PYTEST      = $(BIN)/python -m pytest -q
TEST_PATHS  = tests camserve tools --doctest-modules
FAST_MARKS  = not zoo and not torchserve and not train and not slow

.PHONY: install browser test test-fast train train-seg train-multi train-det evaluate samples samples-det bench-engine bench-tasks bench-detection archive serve stop demo export batch report bench-serve bench-offline clean

install: $(STAMP) browser

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found (camserve needs Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[all]'
	touch $(STAMP)

# Headless Chromium for the browser test tier (tests marked `browser`: the HTML report): Debian's
# chromium from apt, as root. Where it is already there (or CAMSERVE_CHROMIUM names one), where
# apt-get is missing, or where the user is not root, this says so and goes on: the browser tests
# then skip with the reason.
browser:
	@if [ -n "$$CAMSERVE_CHROMIUM" ] || command -v chromium >/dev/null 2>&1 \
			|| command -v chromium-browser >/dev/null 2>&1; then \
		echo "browser: $${CAMSERVE_CHROMIUM:-$$(command -v chromium || command -v chromium-browser)}"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "browser: no apt-get here: install Chromium (or set CAMSERVE_CHROMIUM) for the browser tests; they skip without it"; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "browser: not root: 'sudo apt-get install chromium' for the browser tests; they skip without it"; \
	else \
		echo "browser: apt-get install chromium"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
			|| echo "browser: apt-get could not install chromium; the browser tests will skip"; \
	fi

test: install
	$(PYTEST) $(TEST_PATHS)

test-fast: install
	$(PYTEST) $(TEST_PATHS) -m "$(FAST_MARKS)"

train: install
	$(BIN)/python -m tools.shapes train --out $(MODEL)

# the dense-task defaults (docs/tasks.md): segmentation and multi-label on images of 1-3 shapes
train-seg: install
	$(BIN)/python -m tools.dense_shapes train --task segmentation --out models/shapes-seg

train-multi: install
	$(BIN)/python -m tools.dense_shapes train --task multilabel --out models/shapes-multi

# any shapes folder: the classifier's evaluation, the dense one for a segmentation/multilabel folder,
# the detection one (map50, box_pointing per method) for a detector folder (handler.task: detection)
evaluate: install
	@if grep -qE '^\s*task:\s*detection' $(MODEL)/model-config.yaml 2>/dev/null; then \
		$(BIN)/python -m tools.shapes_det evaluate --model $(MODEL) --seed $(SEED); \
	else $(BIN)/python -m tools.shapes evaluate --model $(MODEL) --seed $(SEED); fi

# the default detector (models/shapes-det): about 12 minutes on 2 cores; run it alone
DET_MODEL ?= models/shapes-det
train-det: install
	$(BIN)/python -m tools.shapes_det train --out $(DET_MODEL)

samples-det: install
	$(BIN)/python -m tools.shapes_det samples --seed $(SEED) --n 6 --out $(DET_MODEL)/samples

bench-detection: install
	$(BIN)/python -m bench.detection

samples: install
	$(BIN)/python -m tools.shapes samples --seed $(SEED) --n $(N) --out $(OUT)

bench-engine: install
	$(BIN)/python -m bench.engine

bench-tasks: install
	$(BIN)/python -m bench.tasks

# -- TorchServe: archive, serve, stop, demo, serving benchmark ---------------------------------------
# make archive [MODEL=DIR] [NAME=name] [BACKEND=torch|onnxruntime] -> model_store/NAME.mar (NAME: the
# folder's name), for any model folder (camserve-scaffold writes one); BACKEND=onnxruntime
# packs the folder's CAM graph (exported into the folder first when it has none or it is stale) and
# no model code. make serve [MODEL=DIR] [NAME=name] serves it.
# `make demo` serves and explains the shapes model.
NAME ?= $(notdir $(abspath $(MODEL)))
BACKEND ?=
SHAPES := models/shapes

archive: install
	@if [ "$(abspath $(MODEL))" = "$(abspath $(SHAPES))" ] || [ "$(abspath $(MODEL))" = "$(abspath $(DET_MODEL))" ]; then \
		for f in weights.pt index_to_name.json; do test -f $(MODEL)/$$f || { \
			echo "error: $(MODEL)/$$f is missing: train the default model first (make train / make train-det)"; exit 1; }; done; fi
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m scripts.archive $(MODEL) --name $(NAME) --out model_store $(if $(BACKEND),--backend $(BACKEND))

serve: archive
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m scripts.serve start --name $(NAME)

stop: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m scripts.serve stop

demo: install
	$(MAKE) archive MODEL=$(SHAPES) NAME=shapes
	$(MAKE) archive MODEL=$(DET_MODEL) NAME=shapes-det
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m scripts.serve demo

bench-serve: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.serve $(if $(BACKEND),--backends $(BACKEND)) $(if $(SERVER),--server $(SERVER))

# -- ONNX companion: export a CAM graph, explain folders offline, benchmark ------------------------
# make export [MODEL=models/shapes] [METHODS=gradcam,gradcam++] -> model_store/shapes.cam.onnx
# make batch [INPUT=folder-or-list] [BATCH_OUT=batch_out] [BATCH_ARGS="--save heatmap,overlay"]
CAM_ONNX  ?= model_store/$(notdir $(MODEL)).cam.onnx
METHODS   ?=
INPUT     ?= $(MODEL)/samples
BATCH_OUT ?= batch_out
BATCH_ARGS ?=
EXPORT_CMD = $(BIN)/python -m export.onnx_export $(MODEL) --out $(CAM_ONNX) $(if $(METHODS),--methods $(METHODS))

export: install
	$(EXPORT_CMD)

$(CAM_ONNX): $(wildcard $(MODEL)/*.py $(MODEL)/*.yaml $(MODEL)/*.pt $(MODEL)/*.json) | $(STAMP)
	$(EXPORT_CMD)

batch: install $(CAM_ONNX)
	$(BIN)/python -m export.batch_cam --model $(CAM_ONNX) $(INPUT) --out $(BATCH_OUT) $(BATCH_ARGS)

# make report [BATCH_OUT=batch_out] -> BATCH_OUT/report.html (docs/report.md)
report: install
	$(BIN)/python -m camserve.report $(BATCH_OUT)

bench-offline: install
	$(BIN)/python -m bench.offline

clean:
	rm -rf model_store/*.mar demo/ .pytest_cache

# -- KServe: TorchServe storage layout, native predictor, side-by-side benchmark --------------------
# make kserve-layout [MODEL=models/shapes] [NAME=shapes] -> build/kserve/NAME/ (printed)
# make serve-kserve [MODEL=models/shapes] [KSERVE_ARGS="--http-port 8085"]
KSERVE_ARGS ?=

.PHONY: kserve-layout serve-kserve bench-kserve

kserve-layout: install
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m scripts.kserve_layout $(MODEL) $(if $(NAME),--name $(NAME)) --out build/kserve

serve-kserve: install
	$(BIN)/python -m camserve.kserve $(MODEL) $(KSERVE_ARGS)

bench-kserve: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.kserve

# -- Ray: the batch job through a private local Ray against the local job (camserve.onnx.ray) -------
bench-ray: install
	$(BIN)/python -m bench.ray

# Soak and worker-kill benchmark against a private TorchServe (SOAK_ARGS: -n, -c, --kill-requests,
# --json); then the worst requests the default work budget allows, each in a fresh process
.PHONY: soak
soak: install
	$(BIN)/python -m bench.soak $(SOAK_ARGS)
	$(BIN)/python -m bench.worst_request
