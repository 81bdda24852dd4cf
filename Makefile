# PicoBot Scheduler: `make run` (the whole system on SQLite) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PICOBOT_TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/picobot
PYTEST_ARGS ?=
ADDRESS ?= 127.0.0.1:8000

.PHONY: help install run test test-sqlite test-postgres lint bench bench-cron soak clean
.DEFAULT_GOAL := help

help:
	@echo "make run                 install if needed, migrate, start web + scheduler + notifications"
	@echo "                         on SQLite at http://$(ADDRESS)/ (docs: /api/v1/docs)"
	@echo "make run ADDRESS=0.0.0.0:9000   serve on another address (default $(ADDRESS))"
	@echo "make test                lint, then the suite on SQLite and PostgreSQL"
	@echo "                         (PICOBOT_TEST_DATABASE_URL, default $(PICOBOT_TEST_DATABASE_URL))"
	@echo "make test-sqlite | test-postgres | lint    one part of make test (PYTEST_ARGS=... for pytest)"
	@echo "make bench               scheduler benchmarks (docs/benchmarks.md)"
	@echo "make bench-cron          our cron engine beside croniter: correctness and speed"
	@echo "make soak                executions under sustained faults (bench/soak.py)"
	@echo "make install | clean     create or remove .venv"

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '.[dev]'
	@rm -rf build *.egg-info
	@touch $(STAMP)

run: $(STAMP)
	PICOBOT_ADDRESS=$(ADDRESS) $(PY) -m picobot_site.local

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	DJANGO_SETTINGS_MODULE=tests.settings $(PY) manage.py makemigrations --check --dry-run

test: lint test-sqlite test-postgres

test-sqlite: $(STAMP)
	@echo "== test suite on SQLite =="
	DATABASE_URL= $(PY) -m pytest $(PYTEST_ARGS)

test-postgres: $(STAMP)
	@if $(PY) -c "import sys, psycopg; psycopg.connect(sys.argv[1], dbname='postgres', connect_timeout=3).close()" "$(PICOBOT_TEST_DATABASE_URL)" 2>/dev/null; then \
		echo "== test suite on PostgreSQL =="; \
		DATABASE_URL="$(PICOBOT_TEST_DATABASE_URL)" $(PY) -m pytest $(PYTEST_ARGS); \
	elif [ "$$CI" = "true" ]; then \
		echo "PostgreSQL at $(PICOBOT_TEST_DATABASE_URL) is unreachable, and CI=true requires it." >&2; exit 1; \
	else \
		echo "== PostgreSQL at $(PICOBOT_TEST_DATABASE_URL) is unreachable: skipping the PostgreSQL pass (set PICOBOT_TEST_DATABASE_URL) =="; \
	fi

bench: $(STAMP)
	$(PY) -m bench
	$(PY) -m bench.shell_sandbox

# Executions under sustained faults (bench/soak.py): SOAK_EXECUTIONS, SOAK_DURATION_SECS,
# SOAK_WORKERS, SOAK_QCLUSTERS, SOAK_DATABASE=postgres|sqlite (PostgreSQL runs a private
# cluster of its own).
soak: $(STAMP)
	$(PY) -m bench.soak

bench-cron: $(STAMP)
	$(PY) -m bench.cron_engine

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
