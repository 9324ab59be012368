# The order centre. A newcomer needs two commands: `make run` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install services migrate topology run test test-unit test-integration test-model test-faults lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## everything into .venv/ (the `orders` command included)

services:  ## start PostgreSQL and RabbitMQ here when they are down
	./scripts/services.sh

migrate: install
	$(PY) scripts/ensure_database.py
	$(VENV)/bin/alembic upgrade head

topology: install
	$(PY) topology.py

# Development mode: without PAYMENT_WEBHOOK_SECRET the consumers use a development secret (with
# a warning); `orders sign` in another terminal needs DEV_MODE=true too. Deployments never set it.
run: install services migrate topology  ## the whole service in the foreground; Ctrl-C stops it cleanly
	DEV_MODE=$${DEV_MODE:-true} exec $(PY) run_consumer.py --all

test: install services  ## unit, integration, model-based (bounded) and fault tests against the real broker and database
	$(PY) -m pytest -q -p no:cacheprovider tests/unit tests/integration tests/model tests/faults

test-unit: install
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

test-integration: install services
	$(PY) -m pytest -q -p no:cacheprovider tests/integration

test-model: install services  ## the model-based test, long profile (MODEL_EXAMPLES / MODEL_STEPS to change it)
	MODEL_EXAMPLES=$${MODEL_EXAMPLES:-200} MODEL_STEPS=$${MODEL_STEPS:-60} \
	MODEL_REVIEW_TIMEOUT=$${MODEL_REVIEW_TIMEOUT:-4s} MODEL_AUTO_CONFIRM=$${MODEL_AUTO_CONFIRM:-6s} \
	$(PY) -m pytest -q -p no:cacheprovider tests/model

test-faults: install services
	$(PY) -m pytest -q -p no:cacheprovider tests/faults

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy domain store consumers publishers cli settings.py topology.py run_consumer.py logs.py metrics.py

bench: install services  ## benchmarks with progress bars; results in bench/RESULTS.md and bench/out/
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info
