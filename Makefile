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
	$(PYTHON) -m ruff check job tests benchmarks
	$(PYTHON) -m ruff format --check job tests benchmarks

# make bench BENCH_ARGS="--steps 20 --warmup 3 --repeats 3 --skip-fid --json bench.json"
BENCH_ARGS ?=

bench:  ## gan-job's loop against a plain tutorial loop, side by side (docs/performance.md)
	$(PYTHON) benchmarks/bench.py $(BENCH_ARGS)

# --- container --------------------------------------------------------------------------------
# make image push IMAGE=registry.example.com/team/gan-job:0.1.0   (docs/container.md)
IMAGE ?= gan-job:dev
FETCH_INCEPTION ?= 1

.PHONY: push compose-up compose-down

image:  ## build the container image (FETCH_INCEPTION=0: without InceptionV3 weights)
	docker build --build-arg FETCH_INCEPTION=$(FETCH_INCEPTION) -t $(IMAGE) .

push:  ## push IMAGE to its registry
	docker push $(IMAGE)

run-local:  ## train in the image: settings from local.env, artifacts in ./runs, all GPUs if any
	test -f local.env || cp local.env.example local.env
	mkdir -p runs data
	docker run --rm --init --shm-size=2g \
	  $$(command -v nvidia-smi >/dev/null 2>&1 && echo --gpus all) \
	  --user $$(id -u):$$(id -g) -e HOME=/tmp \
	  --env-file local.env \
	  -v "$(CURDIR)/runs:/work/runs" -v "$(CURDIR)/data:/work/data" \
	  -p 127.0.0.1:9090:9090 \
	  $(IMAGE)

compose-up:  ## the job with MinIO, Prometheus and Grafana (docker-compose.yml)
	IMAGE=$(IMAGE) docker compose up --build --detach
	@echo "Grafana http://localhost:3000  Prometheus http://localhost:9091  MinIO http://localhost:9001"
	@echo "logs: docker compose logs -f job"

compose-down:  ## stop the compose stack (volumes kept; add -v by hand to drop them)
	docker compose down
