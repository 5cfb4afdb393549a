# The targets CI runs are the same ones a developer runs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
REDIS_PORT ?= 6379
LISTEN ?= 127.0.0.1:50051
METRICS_PORT ?= 9464
STAMP := $(VENV)/.installed

.PHONY: help deps venv run test lint typecheck proto proto-check check clean bench demo \
	deps-container image test-container

help:
	@echo "make run    - install what is needed, start Redis and the sidecar on policies/"
	@echo "make test   - install what is needed, run lint, type checks, drift check and all tests"
	@echo "make bench  - run the benchmarks (prints ratios against a same-run baseline)"
	@echo "make demo   - Redis, the sidecar, a mock provider and Envoy locally; narrated calls"
	@echo "make proto  - regenerate keel_pdp/api from proto/"
	@echo "make image  - build the container image (buildah; Debian base by debootstrap)"
	@echo "make test-container - build the image and run the sidecar from it (minutes)"

# System packages (Debian): Redis for the budget store and tests, PostgreSQL for
# the production ledger tests, nghttp2-client (h2load) and a C compiler for the
# benchmarks' load driver, prometheus (and its promtool) for the monitoring tests.
deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v h2load >/dev/null || missing="$$missing nghttp2-client"; \
	command -v cc >/dev/null || missing="$$missing build-essential"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: deps venv
	@bash scripts/run-local.sh

proto: venv
	$(PY) scripts/gen_proto.py

proto-check: venv
	@bash scripts/proto-check.sh

lint: venv
	$(VENV)/bin/ruff check .

typecheck: venv
	$(VENV)/bin/mypy

check: lint typecheck proto-check

test: deps venv check
	$(VENV)/bin/pytest -q -p no:cacheprovider

# The container image (Containerfile): buildah builds it on a Debian base made with
# debootstrap, so no registry is needed. Building the base takes minutes, so the
# image tests are not part of `make test`.
deps-container:
	@missing=""; \
	command -v buildah >/dev/null || missing="$$missing buildah"; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

image: deps-container venv
	bash scripts/build-image.sh --debootstrap-base

test-container: deps deps-container venv
	KEEL_CONTAINER_TESTS=1 $(VENV)/bin/pytest -q -p no:cacheprovider -m container tests/integration/test_container.py

demo: deps venv
	@bash scripts/demo.sh

bench: deps venv
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache var
