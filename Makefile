# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
# `make test` runs `make check` (lint, types, import contracts, protos, the Python 3.10 [edge] job), then pytest.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The [edge] job: a second venv from a Python 3.10 interpreter (JetPack 6 ships 3.10) with only the [edge] extra.
VENV310 := .venv310
# The OpenVINO job: onnxruntime-openvino replaces the onnxruntime package, so its tests run in a venv of their own.
VENVOV := .venv-openvino
# The agent's unit tests and those of the wire contract it uses: they run on Python 3.10 in that venv with only the
# [edge] extra, so they may not import torch or onnx (a test that needs them skips: pytest.importorskip("onnx")).
EDGE_TESTS := $(sort $(wildcard tests/unit/test_agent_*.py)) tests/unit/test_codec.py tests/unit/test_mqtt_schema.py \
              tests/unit/test_serde.py

.PHONY: setup system-packages demo check gates lint typecheck imports protos edge310 edge310-env openvino openvino-env \
        litert-converter test bench clean

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

# The gates CI runs before the tests: all of them run (--keep-going), and any one failing fails the build. They run
# two at a time beside the setup of the [edge] job's venv (and, for `make test`, of the other environments the tests
# use: ENVS): mypy keeps one core busy for a minute while pip mostly waits on the disk and the network. The [edge]
# job's tests run after them, alone.
GATES := lint typecheck imports protos
ENVS := edge310-env
check: setup
	@$(MAKE) --no-print-directory gates

gates:
	@status=0; \
	$(MAKE) --no-print-directory --keep-going -j2 --output-sync=target $(GATES) $(ENVS) || status=1; \
	$(MAKE) --no-print-directory edge310 || status=1; \
	exit $$status

lint:
	$(BIN)/ruff check .

typecheck:
	$(BIN)/mypy

imports:
	$(BIN)/lint-imports

protos:
	$(BIN)/python -m protos.generate --check

# SKIP_PY310=1 skips the job with a warning (for a machine without Python 3.10; CI must not set it).
edge310:
	@if [ -n "$(SKIP_PY310)" ]; then \
		echo "WARNING: SKIP_PY310 is set: the edge agent is NOT checked on Python 3.10 with only the [edge] extra" >&2; \
	else \
		.ci/edge310 $(VENV310) $(EDGE_TESTS); \
	fi

edge310-env:
	@if [ -z "$(SKIP_PY310)" ]; then .ci/edge310 --prepare $(VENV310); fi

# SPLITINFER_MAKE_LITERT_CONVERTER=1: the TFLite conversion tests make the onnx2tf environment (Python 3.12+, once,
# in ~/.cache/splitinfer) instead of skipping; `make test` makes it beside the gates (litert-converter), and the
# OpenVINO job's venv too.
test: setup system-packages
	$(MAKE) --no-print-directory gates ENVS="edge310-env openvino-env litert-converter"
	SPLITINFER_MAKE_LITERT_CONVERTER=1 $(BIN)/python -m pytest -q --durations=15
	$(MAKE) --no-print-directory openvino

openvino:
	.ci/openvino $(VENVOV)

openvino-env:
	.ci/openvino --prepare $(VENVOV)

litert-converter:
	.ci/litert-converter $(BIN)/python

bench: setup
	$(BIN)/python -m benchmarks.planner_accuracy

clean:
	rm -rf $(VENV) $(VENV310) $(VENVOV) build *.egg-info
