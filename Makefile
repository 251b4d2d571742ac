# Two entry points: `make demo` (the main job on embedded local defaults) and `make test`.
# Both create .venv and install everything they need on a fresh machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo_out

.PHONY: demo test lint typecheck contracts unit system-deps infra-deps venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[all,dev]' $(TORCH)
	touch $@

venv: $(VENV)/.installed

# Mosquitto is the local stand-in for IoT Core in the broker tests.
system-deps:
	@command -v mosquitto >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto; \
	  else echo "mosquitto is not installed: sudo apt-get install mosquitto (broker tests will be skipped)"; fi; }

# Node from Debian runs the pinned CDK CLI (infra/package-lock.json) for the infra tests' `cdk synth`.
infra-deps: infra/node_modules/.package-lock.json

infra/node_modules/.package-lock.json: infra/package-lock.json
	@command -v npm >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm; \
	  else echo "node/npm are not installed: sudo apt-get install nodejs npm (the infra tests need them)"; exit 1; fi; }
	npm ci --prefix infra --no-audit --no-fund --loglevel=error

lint: venv
	$(VENV)/bin/ruff check .

typecheck: venv
	$(VENV)/bin/mypy edge_agent/qcsight_core edge_agent/qcsight_edge batch/qcsight_batch
	cd infra && ../$(VENV)/bin/mypy app.py stacks figures.py

contracts: venv
	$(VENV)/bin/lint-imports

unit: venv system-deps infra-deps
	$(VENV)/bin/pytest

test: lint typecheck contracts unit

demo: venv
	bash scripts/demo.sh $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
