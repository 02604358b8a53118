PYTHON ?= .venv/bin/python
VENV ?= .venv
INSTALLED = $(VENV)/.installed
# the offline FID feature extractor of `make run`, built once by `gan-job features`
FEATURES ?= runs/fid-features/fashion-mnist.pt
# Debian packages: the dataset `make run` trains on; the servers and tools the tests start
DEBIAN_RUN = dataset-fashion-mnist
DEBIAN_TEST = $(DEBIAN_RUN) prometheus prometheus-pushgateway kubectl

.PHONY: install system-deps features run test test-all test-fast lint bench image run-local
.DELETE_ON_ERROR:

install: $(INSTALLED)  ## venv with the job and its dev tools (again only when pyproject.toml changes)

$(INSTALLED): pyproject.toml
	@echo "installing gan-job and its dev tools into $(VENV) (about a minute the first time)"
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q -e '.[dev]'
	touch $@

system-deps:  ## the Debian packages the tests start (apt-get only for missing ones; sudo if not root)
	@scripts/apt-install $(DEBIAN_TEST)

features: $(FEATURES)  ## the offline FID extractor for Fashion-MNIST (once, under a minute)

$(FEATURES): export OMP_NUM_THREADS ?= 1
$(FEATURES): | $(INSTALLED)
	@scripts/apt-install $(DEBIAN_RUN)
	$(PYTHON) -m job features --dataset fashion-mnist --epochs 1 --out $@

# `make run` trains by time, not steps; run it again to train longer (it resumes), or set any
# GAN_* variable: GAN_MAX_MINUTES=10 make run. Threads: the job's default (the CPUs this process
# may use); on a machine shared with other work, OMP_NUM_THREADS=1 make run (or GAN_NUM_THREADS).
run: export GAN_MAX_MINUTES ?= 2
# fast28 at width 16, not 24: 1.5-1.7x the steps in two minutes, a lower FID at 2 minutes and
# no worse at 10 (docs/quality.md, "The first two minutes"); make run again resumes at 16
run: export GAN_WIDTH ?= 16
run: export GAN_MAX_STEPS ?= 1000000
run: export GAN_FID_FEATURES ?= $(FEATURES)
run: export GAN_FID_EVERY ?= 250
run: export GAN_SAMPLE_EVERY ?= 500
run: export GAN_METRICS_PORT ?= 0
run: install $(FEATURES)  ## a real Fashion-MNIST run, offline: installs what it needs, trains 2 minutes
	@scripts/apt-install $(DEBIAN_RUN)
	@echo "training for $(GAN_MAX_MINUTES) minutes (GAN_MAX_MINUTES), FID every $(GAN_FID_EVERY) steps"
	$(PYTHON) -m job
	@run=$$($(PYTHON) -c 'from job.settings import load_settings as l; s = l(); \
	  print(s.artifact_uri.rstrip("/") + "/" + s.resolved_run_id)'); \
	echo; \
	echo "Look at:"; \
	echo "  $$run/report.png          losses, D outputs, the FID curve and the samples over time"; \
	echo "  $$run/samples/            a sample grid every $(GAN_SAMPLE_EVERY) steps"; \
	echo "  $$run/final/generator.pt  the final (EMA) generator"; \
	echo "  $$run/best/generator.pt   the EMA generator of the best evaluation (eval.jsonl: best_step)"; \
	echo "Sample from it:"; \
	echo "  $(PYTHON) -m job sample --checkpoint $$run/final/generator.pt --num 64 --out grid.png"; \
	echo "Train longer: make run again resumes this run for $(GAN_MAX_MINUTES) more minutes;" \
	  "GAN_MAX_MINUTES=10 make run for 10"

# most tests wait on the processes they start: two workers (a test file each) halve the wall time
TEST_WORKERS ?= 2
PYTEST = $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

test: system-deps install  ## between edits: unit tests and one end-to-end test per contract
	$(PYTEST) -m "not e2e or contract"

test-all: system-deps install  ## the whole suite (what CI runs); TEST_WORKERS=0 for one process
	$(PYTEST) --durations=30

test-fast: system-deps install  ## the unit tests only, no process started: about three minutes
	$(PYTHON) -m pytest -q -m "not e2e"

lint: install
	$(PYTHON) -m ruff check job tests benchmarks scripts
	$(PYTHON) -m ruff format --check job tests benchmarks scripts

# make bench BENCH_ARGS="--steps 20 --warmup 3 --repeats 3 --skip-fid --json bench.json"
BENCH_ARGS ?=

bench:  ## gan-job's loop against a plain tutorial loop, side by side (docs/performance.md)
	$(PYTHON) benchmarks/bench.py $(BENCH_ARGS)

# The GPU check (docs/performance.md, "Checking on a GPU"): GPU tests, the benchmark and a 5-minute
# run, each part bounded, in 8 minutes; the folder GPU_BUNDLE is what a lent GPU machine lacks.
GPU_BUNDLE ?= runs/gpu-bundle
.PHONY: gpu-bundle gpu-check gpu-check-dry

gpu-bundle: $(FEATURES)  ## the folder a lent GPU machine needs: wheels it lacks, Fashion-MNIST, the extractor
	$(PYTHON) scripts/gpu_check.py --prepare $(GPU_BUNDLE) --features $(FEATURES)

gpu-check: install $(FEATURES)  ## on a GPU: the GPU check into runs/gpu-check (summary.md: tables for docs/performance.md)
	$(PYTHON) scripts/gpu_check.py --features $(FEATURES)

gpu-check-dry: install $(FEATURES)  ## the GPU check end to end on the CPU at tiny sizes, into runs/gpu-check-dry
	rm -rf runs/gpu-check-dry
	$(PYTHON) scripts/gpu_check.py --dry --features $(FEATURES)

# --- container --------------------------------------------------------------------------------
# make image push IMAGE=registry.example.com/team/gan-job:0.1.0   (docs/container.md)
IMAGE ?= gan-job:dev
FETCH_INCEPTION ?= 1
CONTAINER_ENGINE ?= docker
# empty: the Dockerfile's base (python:3.11.14-slim-bookworm)
PYTHON_IMAGE ?=
# a pip.conf for a private index, given to the build as a secret (never stored in the image)
PIP_CONF ?=
comma := ,
METRICS_PORT ?= 9090
RUN_FLAGS ?=

.PHONY: push compose-up compose-down image-check

image:  ## build the container image (FETCH_INCEPTION=0: without InceptionV3 weights; CONTAINER_ENGINE=podman)
	$(CONTAINER_ENGINE) build --build-arg FETCH_INCEPTION=$(FETCH_INCEPTION) \
	  $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) \
	  $(if $(PIP_CONF),--secret id=pip.conf$(comma)src=$(PIP_CONF)) -t $(IMAGE) .

push:  ## push IMAGE to its registry
	$(CONTAINER_ENGINE) push $(IMAGE)

# With GPUs: all of them, one process each (GAN_NPROC_PER_NODE=auto) unless local.env says otherwise.
# No --init: the image's tini is PID 1.
run-local:  ## train in the image: settings from local.env, artifacts in ./runs, all GPUs if any
	test -f local.env || cp local.env.example local.env
	mkdir -p runs data
	$(CONTAINER_ENGINE) run --rm --shm-size=2g $(RUN_FLAGS) \
	  $$(command -v nvidia-smi >/dev/null 2>&1 && echo $(if $(filter podman,$(CONTAINER_ENGINE)),--device nvidia.com/gpu=all,--gpus all)) \
	  $$(grep -q '^GAN_NPROC_PER_NODE=' local.env || echo --env GAN_NPROC_PER_NODE=auto) \
	  --user $$(id -u):$$(id -g) -e HOME=/tmp \
	  --env-file local.env \
	  -v "$(CURDIR)/runs:/work/runs" -v "$(CURDIR)/data:/work/data" \
	  -p 127.0.0.1:$(METRICS_PORT):9090 \
	  $(IMAGE)

# Opt-in, not part of `make test`: root, the package mirrors, about 20 GB and 15 minutes.
image-check:  ## build the image with buildah on a stand-in base and run it as the manifests do
	scripts/image-check

compose-up:  ## the job with MinIO, Prometheus and Grafana (docker-compose.yml)
	IMAGE=$(IMAGE) docker compose up --build --detach
	@echo "Grafana http://localhost:3000  Prometheus http://localhost:9091  MinIO http://localhost:9001"
	@echo "logs: docker compose logs -f job"

compose-down:  ## stop the compose stack (volumes kept; add -v by hand to drop them)
	docker compose down
