PYTHON ?= .venv/bin/python
VENV ?= .venv

.PHONY: install run test lint bench image run-local

install:  ## venv with the job and its dev tools
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[dev]'

run: install  ## a short real training run on Fashion-MNIST, offline
	GAN_MAX_STEPS=$${GAN_MAX_STEPS:-300} GAN_SAMPLE_EVERY=$${GAN_SAMPLE_EVERY:-100} \
	GAN_CHECKPOINT_EVERY=$${GAN_CHECKPOINT_EVERY:-100} $(PYTHON) -m job

test:  ## the whole test suite
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check job tests
	$(PYTHON) -m ruff format --check job tests
