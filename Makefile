# The two commands of the README: `make demo` and `make test`.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
# Trust the system's certificate store, as pip does: behind a TLS-inspecting
# proxy, uv's own bundle lacks the proxy's authority.
export UV_NATIVE_TLS := 1

.PHONY: demo demo-down test lint lock venv sandbox-deps

# The virtualenv, rebuilt when requirements.txt changes. uv installs it in
# seconds and keeps its wheels in the user's cache for the next clone.
$(VENV)/.installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip sync --quiet --python $(BIN)/python requirements.txt
	touch $@

venv: $(VENV)/.installed

# systemd-nspawn and debootstrap run the sandbox's Debian guest.
sandbox-deps:
	@if ! command -v systemd-nspawn >/dev/null || ! command -v debootstrap >/dev/null; then \
	  echo "installing systemd-container and debootstrap"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    systemd-container debootstrap; \
	fi

# The whole product on this machine: a sandbox standing in for AWS and the
# instance, then provision, deploy, an example run and status.
demo: venv sandbox-deps
	$(BIN)/invoke sandbox.up
	@set -e; eval "$$($(BIN)/invoke sandbox.env)"; \
	$(BIN)/invoke provision; \
	$(BIN)/invoke deploy; \
	eval "$$($(BIN)/invoke sandbox.env)"; \
	$(BIN)/python examples/train.py; \
	$(BIN)/invoke status; \
	echo; \
	echo "MLflow is running at $$MLFLOW_TRACKING_URI (user: $$MLFLOW_TRACKING_USERNAME)"; \
	echo "Point a shell at it (URL, login, certificate):  eval \"\$$($(BIN)/invoke sandbox.env)\""; \
	echo "Tear it all down:  make demo-down"

demo-down: venv
	$(BIN)/invoke sandbox.down

test: venv sandbox-deps lint
	$(BIN)/pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Recompile the pinned requirements after changing requirements.in.
lock: venv
	$(BIN)/uv pip compile --quiet requirements.in -o requirements.txt
