# crossdim: `make demo` runs the main job on embedded defaults, `make test` runs the test suite.
# Both create .venv/ on first use (pinned by constraints.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-fast demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --progress-bar off -c constraints.txt -e '.[dev]'
	$(BIN)/python -c "import torch, timm, ray, mlflow, monai; print('crossdim venv ready: torch', torch.__version__, 'timm', timm.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__, 'monai', monai.__version__)"
	touch $(STAMP)

# Each test module runs in its own interpreter (tests/run_suite.py); one summary line at the end.
test: $(STAMP)
	$(BIN)/python tests/run_suite.py $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python tests/run_suite.py -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/crossdim demo

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
