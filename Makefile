# Two entry points: `make demo` (the main job on embedded local defaults) and `make test`.
# Both create .venv and install everything they need on a fresh machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo_out
# The device install: the edge extra and what the device-side tests themselves use (onnx builds
# their tiny models, cryptography the broker's certificates); never torch, never boto3.
EDGE_VENV := .venv-edge
DEVICE_TEST_DEPS := 'pytest>=8' 'pytest-timeout>=2.3' 'onnx>=1.16' 'cryptography>=42' 'jsonschema>=4.18'

.PHONY: demo test test-device lint typecheck contracts unit system-deps infra-deps venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[all,dev]' $(TORCH)
	touch $@

venv: $(VENV)/.installed

# Mosquitto is the local stand-in for IoT Core in the broker tests; Debian's chromium and its chromedriver
# run the review app's browser tests (tests/review/test_browser.py).
system-deps:
	@command -v mosquitto >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto; \
	  else echo "mosquitto is not installed: sudo apt-get install mosquitto (broker tests will be skipped)"; fi; }
	@command -v chromedriver >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	  else echo "chromium is not installed: sudo apt-get install chromium chromium-driver (browser tests will be skipped)"; fi; }

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
	$(VENV)/bin/mypy edge_agent/qcsight_core edge_agent/qcsight_edge batch/qcsight_batch infra/qcsight_aws \
	  training/qcsight_data training/qcsight_train/launch greengrass/qcsight_gg \
	  infra/qcsight_cloud infra/qcsight_review
	cd infra && MYPYPATH=../edge_agent:../batch:../training:. ../$(VENV)/bin/mypy app.py stacks figures.py

contracts: venv
	$(VENV)/bin/lint-imports

unit: venv system-deps infra-deps
	$(VENV)/bin/pytest

test: lint typecheck contracts unit

$(EDGE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(EDGE_VENV)
	$(EDGE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(EDGE_VENV)/bin/python -m pip install --quiet -e '.[edge]' $(DEVICE_TEST_DEPS)
	touch $@

# The device-side tests (tests/core, tests/edge, not marked torch or cloud) in a venv holding
# only the edge extra: proves the device code imports and runs without torch or boto3.
test-device: $(EDGE_VENV)/.installed system-deps
	@! $(EDGE_VENV)/bin/python -c 'import torch' 2>/dev/null || { echo "torch is installed in $(EDGE_VENV)"; exit 1; }
	$(EDGE_VENV)/bin/python -m pytest tests/core tests/edge -m 'not torch and not cloud' -p no:cacheprovider

demo: venv system-deps
	bash scripts/demo.sh $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(EDGE_VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
