# Two entry points: `make demo` (the main job on embedded local defaults) and `make test`.
# Both create .venv and install everything they need on a fresh machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo_out

.PHONY: demo test lint typecheck contracts unit system-deps venv clean

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

lint: venv
	$(VENV)/bin/ruff check .

typecheck: venv
	$(VENV)/bin/mypy edge_agent/qcsight_core edge_agent/qcsight_edge batch/qcsight_batch infra/qcsight_cloud

contracts: venv
	$(VENV)/bin/lint-imports

unit: venv system-deps
	$(VENV)/bin/pytest

test: lint typecheck contracts unit

demo: venv
	bash scripts/demo.sh $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
