# ingestd: `make demo` and `make test` work on a fresh Debian 12 or 13 machine.
# Every target installs what it needs (Debian packages, TimescaleDB, a Python venv)
# and skips what is already there.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
DEB_PACKAGES := mosquitto mosquitto-clients postgresql postgresql-client python3-venv
# promtool (unit tests of the alert rules) comes with Debian's prometheus package.
DEB_PACKAGES += prometheus
# The systemd test boots a debootstrapped Debian 12 under systemd-nspawn.
DEB_PACKAGES += systemd-container debootstrap
# Stamps: re-run an install step only when its inputs change.
VENV_STAMP := $(VENV)/.installed
SYSTEM_STAMP := var/.system-deps

.PHONY: help deps system-deps python-deps timescaledb services lint format test demo bench clean

help:
	@echo "make demo    start Mosquitto and PostgreSQL+TimescaleDB if needed, migrate, run ingestd and a simulated fleet"
	@echo "make test    install what is needed, lint (ruff, mypy --strict), run the test suite"
	@echo "make lint    ruff and mypy only"
	@echo "make bench   measure throughput, latency, CPU and memory (results in bench/results/)"

deps: system-deps python-deps

# Debian packages and TimescaleDB (built from Debian 13's source on Debian 12).
system-deps: $(SYSTEM_STAMP)
# The Makefile too: a package added to DEB_PACKAGES gets installed on the next run.
$(SYSTEM_STAMP): deploy/install-timescaledb.sh deploy/system-deps.sh Makefile
	$(SUDO) bash deploy/system-deps.sh $(DEB_PACKAGES)
	$(SUDO) bash deploy/install-timescaledb.sh
	@mkdir -p var && touch $@

python-deps: $(VENV_STAMP)
$(VENV_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "ingestd needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

# The local broker and database, started only if they are not running.
services: system-deps
	$(SUDO) bash deploy/services.sh

lint: python-deps
	$(BIN)/ruff check ingestd tests bench
	$(BIN)/ruff format --check ingestd tests bench
	$(BIN)/mypy

format: python-deps
	$(BIN)/ruff format ingestd tests bench
	$(BIN)/ruff check --fix ingestd tests bench

test: deps lint
	promtool check rules deploy/prometheus/alerts.yml
	cd deploy/prometheus && promtool test rules alerts.test.yml
	$(BIN)/pytest -q

demo: deps services
	bash deploy/demo.sh

bench: deps
	$(BIN)/python bench/bench.py

clean:
	rm -rf var .mypy_cache .ruff_cache .pytest_cache
