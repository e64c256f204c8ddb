# Everything this project needs is installed from here: `make test` and `make demo`
# work on a fresh Debian 12 machine (apt as root or with sudo) and are quick when done.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config tpm2-openssl \
	tpm2-abrmd libtss2-tcti-tabrmd0 dbus softhsm2 opensc mosquitto mosquitto-clients \
	postgresql openssl curl gcc python3-dev python3-venv systemd shellcheck
PYTEST_ARGS ?=

.PHONY: all install system-deps venv test test-fast test-example fleet-ci demo bench lint clean

all: test

install: system-deps venv

# apt only when something is missing: a no-op (a few ms) on a prepared machine.
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "Installing system packages:" $$missing; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

# The example project's own tests first (through the shipped pytest plugin, named as
# another project names it), then the whole suite.
test: install test-example
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-example: install
	cd examples/firmware-ci && PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \
		../../$(BIN)/python -m pytest -q -p no:cacheprovider -p tpm_enroll_testing

# A simulated fleet with JUnit XML, as a CI job runs it (FLEET_ARGS: --server URL ...).
FLEET_ARGS ?= --devices 10 --rogue 1 --flaky 1 --seed 1
fleet-ci: install
	$(BIN)/enroll-sim fleet $(FLEET_ARGS) --junit fleet-junit.xml

# Everything but the integration tests (served instances, swtpm, SoftHSM, Mosquitto,
# PostgreSQL): the in-process and pure tests, in seconds.
test-fast: install
	$(BIN)/python -m pytest -q -m "not integration" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

demo: install
	$(BIN)/python -m simulators.demo

bench: install
	$(BIN)/enroll-sim bench est
	$(BIN)/enroll-sim bench attest
	$(BIN)/enroll-sim bench revoke

clean:
	rm -rf $(VENV) demo-instance .pytest_cache fleet-junit.xml
