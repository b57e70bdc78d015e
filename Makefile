# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
MLFLOW_PORT ?= 5000
SERVE_PORT ?= 5001
SERVE_MODEL ?= models:/maskrcnn-shapes@champion
MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
# Test processes: most of the suite waits on process start-ups (Ray, MLflow, DVC), so two
# processes on two cores take about 3/4 of the time of one. A module stays in one process.
TEST_WORKERS ?= 2

.PHONY: install demo serve browser test test-cluster lint

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,onnx]'
	@touch $(STAMP)

install: $(STAMP)

## The whole pipeline on the built-in synthetic dataset: synthesize -> preprocess -> train -> evaluate -> register.
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro
	@echo
	@$(BIN)/python -m stages.report
	@echo
	@echo "Where to look:"
	@echo "  metrics:        artifacts/evaluate/metrics.json  (dvc metrics show: every figure)"
	@echo "  overlays:       artifacts/evaluate/overlays/*.png"
	@echo "  plots:          PATH=$(BIN):\$$PATH dvc plots show   (writes dvc_plots/index.html)"
	@echo "  registry:       artifacts/register/decision.json"
	@echo "  MLflow UI:      $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port $(MLFLOW_PORT)"
	@echo "                  then open http://127.0.0.1:$(MLFLOW_PORT)/#/experiments?workflowType=machine_learning"

## REST serving of the registered champion (after make demo): POST /invocations, README "Serving".
## The venv's bin/ goes on PATH: mlflow starts uvicorn by name.
serve: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" MLFLOW_TRACKING_URI="$(MLFLOW_TRACKING_URI)" \
		$(BIN)/mlflow models serve -m "$(SERVE_MODEL)" --env-manager local --host 127.0.0.1 -p $(SERVE_PORT)

## Headless Chromium (Debian's package) for the MLflow UI browser test, installed when missing.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

## Everything, the multi-process Ray cluster test included.
test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

## Only the multi-process Ray cluster + MLflow server test (about 2 minutes).
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -m cluster

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
