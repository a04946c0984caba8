# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup system-packages demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so nothing pulls the multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0

setup: $(BIN)/python
	$(BIN)/pip install -q -e ".[dev]"

# Mosquitto (MQTT tests) and Chromium (dashboard test) from Debian; needs root or sudo.
system-packages:
	@if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ] || ! command -v chromium >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q mosquitto chromium chromium-driver; \
	fi

demo: setup
	$(BIN)/split-demo

test: setup system-packages
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/planner_accuracy.py

clean:
	rm -rf $(VENV) build *.egg-info
